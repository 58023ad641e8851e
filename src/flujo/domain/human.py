"""HumanInTheLoopStep: pause the run until a person answers, then go on with the answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypeVar

from flujo.application.core.frame import call_user
from flujo.domain.step import Step
from flujo.exceptions import ConfigurationError, HumanInputError, PausedException

__all__ = ["HumanInTheLoopStep"]

OutT = TypeVar("OutT", default=Any)


class HumanInTheLoopStep(Step[Any, OutT]):
    """Pause the run with a question; the person's answer becomes this step's output.

    >>> approve = HumanInTheLoopStep(
    ...     name="approve",
    ...     message_for_user="Publish this draft? (yes/no)",
    ...     input_schema=bool,
    ... )

    Running it stores the run as ``paused`` (with the question) and returns a result with
    ``status="paused"``. Resume with ``runner.resume_async(paused_result, answer)`` or
    ``TaskClient.resume_task(run_id, answer)``, in any process: the answer is validated into
    ``input_schema`` (a pydantic model or any type pydantic validates; a mismatch raises
    :class:`~flujo.exceptions.HumanInputError` and the run stays paused), committed as this
    step's output, and the run goes on with it. ``message_for_user`` may also be a callable
    ``(data, context) -> str`` (sync or async) that words the question from the step's input.
    """

    def __init__(
        self,
        name: str,
        message_for_user: str | Callable[[Any, Any], Any],
        input_schema: Any = None,
        **config: Any,
    ) -> None:
        super().__init__(name, **config)
        if not isinstance(message_for_user, str) and not callable(message_for_user):
            raise ConfigurationError(
                f"step {name!r}: message_for_user must be a string or a callable"
            )
        self.message_for_user = message_for_user
        self.input_schema = input_schema
        self._adapter: TypeAdapter[Any] | None = None
        if input_schema is not None:
            try:
                self._adapter = TypeAdapter(input_schema)
            except Exception as exc:
                raise ConfigurationError(
                    f"step {name!r}: input_schema {input_schema!r} is not a type pydantic can "
                    f"validate ({exc})"
                ) from exc
            self.output_type = input_schema

    async def _invoke(self, data: Any, context: Any, resources: Any) -> Any:
        message = self.message_for_user
        if not isinstance(message, str):
            message = str(await call_user(message, data, context))
        raise PausedException(message)

    def validate_answer(self, answer: Any, *, run_id: str) -> Any:
        """``answer`` validated into ``input_schema`` (as is without one)."""
        if self._adapter is None:
            return answer
        try:
            return self._adapter.validate_python(answer)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            first = errors[0] if errors else {"msg": str(exc), "loc": ()}
            where = ".".join(str(part) for part in first.get("loc", ())) or "the answer"
            raise HumanInputError(
                f"run {run_id!r}: the answer to {self.name!r} does not fit its input_schema: "
                f"{where}: {first['msg']}; the run stays paused",
                run_id=run_id,
                errors=[dict(error) for error in errors],
            ) from exc
