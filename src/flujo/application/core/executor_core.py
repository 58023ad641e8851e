"""ExecutorCore: runs one step, with injection, retries, backoff and a timeout."""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import TYPE_CHECKING, Any

from flujo.domain.models import StepError, StepResult
from flujo.exceptions import StepTimeoutError

if TYPE_CHECKING:
    from flujo.domain.step import Step

__all__ = ["ExecutorCore"]


class ExecutorCore:
    """Executes steps. A failure becomes a failed :class:`StepResult`; signals propagate.

    Retries use exponential backoff (``backoff_s``, doubling, capped at ``backoff_max_s``).
    Before each retry the context is restored to what it was before the first attempt, so an
    attempt's half-done changes never leak into the next one.
    """

    __slots__ = ()

    async def execute(
        self, step: Step[Any, Any], data: Any, context: Any, resources: Any, index: int
    ) -> StepResult:
        """Run ``step`` on ``data`` and describe the outcome."""
        config = step.config
        start = perf_counter()
        if config.retries == 0:
            try:
                if config.timeout_s is None:
                    output = await step._invoke(data, context, resources)
                else:
                    output = await _with_timeout(step, data, context, resources)
            except Exception as exc:
                return StepResult(
                    step.name,
                    None,
                    False,
                    1,
                    perf_counter() - start,
                    StepError.from_exception(exc),
                    index,
                )
            return StepResult(step.name, output, True, 1, perf_counter() - start, None, index)
        return await self._with_retries(step, data, context, resources, index, start)

    async def _with_retries(
        self,
        step: Step[Any, Any],
        data: Any,
        context: Any,
        resources: Any,
        index: int,
        start: float,
    ) -> StepResult:
        from tenacity import (  # noqa: PLC0415 - loaded only by steps that retry
            AsyncRetrying,
            retry_if_exception_type,
            stop_after_attempt,
            wait_exponential,
        )

        config = step.config
        snapshot = context.model_copy(deep=True) if context is not None else None
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(config.retries + 1),
            wait=wait_exponential(multiplier=config.backoff_s, max=config.backoff_max_s),
            retry=retry_if_exception_type(Exception),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    if attempts > 1 and snapshot is not None:
                        _restore(context, snapshot)
                    if config.timeout_s is None:
                        output = await step._invoke(data, context, resources)
                    else:
                        output = await _with_timeout(step, data, context, resources)
        except Exception as exc:
            return StepResult(
                step.name,
                None,
                False,
                attempts,
                perf_counter() - start,
                StepError.from_exception(exc),
                index,
            )
        return StepResult(step.name, output, True, attempts, perf_counter() - start, None, index)


async def _with_timeout(step: Step[Any, Any], data: Any, context: Any, resources: Any) -> Any:
    timeout_s = step.config.timeout_s
    assert timeout_s is not None
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            return await step._invoke(data, context, resources)
    except TimeoutError:
        if not deadline.expired():
            raise  # the step's own TimeoutError, not ours
        raise StepTimeoutError(
            f"step {step.name!r} timed out after {timeout_s:g} s",
            step_name=step.name,
            timeout_s=timeout_s,
        ) from None


def _restore(context: Any, snapshot: Any) -> None:
    """Put ``context`` back to ``snapshot`` in place (steps hold a reference to it)."""
    fresh = snapshot.model_copy(deep=True)
    context.__dict__.update(fresh.__dict__)
    if context.__pydantic_extra__ is not None:
        context.__pydantic_extra__.clear()
        context.__pydantic_extra__.update(fresh.__pydantic_extra__ or {})
