"""ExecutorCore: runs one step of any kind, with injection, retries, backoff and a timeout."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

from flujo.application.core.frame import ChildFailed
from flujo.domain.models import ContextReference, StepError, StepResult
from flujo.domain.usage import _CURRENT, NO_USAGE, RunMeter
from flujo.exceptions import RUN_STOPPERS, StepTimeoutError, UsageLimitExceededError

if TYPE_CHECKING:
    from flujo.application.core.frame import Frame, Path
    from flujo.application.shadow import ShadowEvaluator
    from flujo.domain.step import Step

__all__ = ["ExecutorCore"]

logger = logging.getLogger("flujo.state_providers")


class ExecutorCore:
    """Executes steps. A failure becomes a failed :class:`StepResult`; signals propagate.

    A plain step calls its function or agent. A composite step (loop, map, branch, ...) runs
    in a :class:`~flujo.application.core.frame.Frame`, which records each sub-step durably; a
    sub-step's failure fails the composite step with the sub-step's error.

    Retries use exponential backoff (``backoff_s``, doubling, capped at ``backoff_max_s``).
    Before each retry of a plain step the context is restored to what it was before the first
    attempt, so an attempt's half-done changes never leak into the next one. A composite step
    that retries continues from the sub-steps it already recorded.
    """

    __slots__ = ("_missing", "shadow", "state_providers")

    def __init__(self, *, state_providers: Mapping[str, Any] | None = None) -> None:
        self.state_providers: dict[str, Any] = dict(state_providers or {})
        self._missing: set[str] = set()  # providers already warned about
        self.shadow: ShadowEvaluator | None = None
        """Scores agent steps' outputs in the background (shadow evaluation), when on."""

    async def execute(
        self,
        step: Step[Any, Any],
        data: Any,
        context: Any,
        resources: Any,
        index: int,
        frame: Frame | None = None,
        path: Path | None = None,
        *,
        meter: RunMeter | None = None,
    ) -> StepResult:
        """Run ``step`` on ``data`` and describe the outcome.

        The agent calls the step makes count into ``meter`` (the run's usage; a sub-step
        counts into its composite step's run) and into the result's ``usage``.
        """
        parent = None
        if meter is None:  # a sub-step: it counts into its composite step (and that one's run)
            parent = _CURRENT.get()
            if parent is not None:
                meter = parent.run
        if meter is None:  # not in a run (an executor used on its own): nothing to count
            if self.state_providers and not step.runs_sub_steps:
                return await self._with_references(
                    step, data, context, resources, index, frame, path
                )
            return await self._execute(step, data, context, resources, index, frame, path)
        step_meter = meter.step_meter(parent)
        token = _CURRENT.set(step_meter)
        try:
            if self.state_providers and not step.runs_sub_steps:
                result = await self._with_references(
                    step, data, context, resources, index, frame, path
                )
            else:
                result = await self._execute(step, data, context, resources, index, frame, path)
        except UsageLimitExceededError as exc:
            # The run stops here; the runner records, for the top-level step, this result.
            exc.step_result = StepResult(
                step.name,
                None,
                False,
                1,
                0.0,
                StepError.from_exception(exc),
                index,
                path,
                frame.children if frame is not None else [],
                usage=step_meter.usage if step_meter.usage is not NO_USAGE else None,
            )
            raise
        finally:
            _CURRENT.reset(token)
        if step_meter.usage is not NO_USAGE:
            result.usage = step_meter.usage
        if self.shadow is not None and result.success and step.agent is not None:
            run_id = getattr(context, "run_id", "")
            self.shadow.submit(run_id, step.name, path or (index,), data, result.output)
        return result

    async def _execute(
        self,
        step: Step[Any, Any],
        data: Any,
        context: Any,
        resources: Any,
        index: int,
        frame: Frame | None,
        path: Path | None,
    ) -> StepResult:
        config = step.config
        start = perf_counter()
        if config.retries == 0:
            try:
                if config.timeout_s is not None:
                    output = await _with_timeout(step, data, context, resources, frame)
                elif frame is None:
                    output = await step._invoke(data, context, resources)
                else:
                    output = await step._run(data, frame)
            except RUN_STOPPERS:
                raise
            except Exception as exc:
                return _failure(step, exc, 1, start, index, frame, path)
            if frame is None:
                return StepResult(
                    step.name, output, True, 1, perf_counter() - start, None, index, path
                )
            return _success(step, output, 1, start, index, frame, path)
        return await self._with_retries(step, data, context, resources, index, start, frame, path)

    async def _with_retries(
        self,
        step: Step[Any, Any],
        data: Any,
        context: Any,
        resources: Any,
        index: int,
        start: float,
        frame: Frame | None,
        path: Path | None,
    ) -> StepResult:
        from tenacity import (  # noqa: PLC0415 - loaded only by steps that retry
            AsyncRetrying,
            retry_if_exception_type,
            retry_if_not_exception_type,
            stop_after_attempt,
            wait_exponential,
        )

        config = step.config
        # A composite step's progress is durable: a retry continues it, with the context as
        # its recorded sub-steps left it. A plain step starts again from a clean context.
        snapshot = context.model_copy(deep=True) if context is not None and frame is None else None
        attempts = 0
        retrying = AsyncRetrying(
            stop=stop_after_attempt(config.retries + 1),
            wait=wait_exponential(multiplier=config.backoff_s, max=config.backoff_max_s),
            retry=retry_if_exception_type(Exception) & retry_if_not_exception_type(RUN_STOPPERS),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    if attempts > 1 and snapshot is not None:
                        _restore(context, snapshot)
                    if config.timeout_s is not None:
                        output = await _with_timeout(step, data, context, resources, frame)
                    elif frame is None:
                        output = await step._invoke(data, context, resources)
                    else:
                        output = await step._run(data, frame)
        except RUN_STOPPERS:
            raise
        except Exception as exc:
            return _failure(step, exc, attempts, start, index, frame, path)
        return _success(step, output, attempts, start, index, frame, path)

    async def _with_references(
        self,
        step: Step[Any, Any],
        data: Any,
        context: Any,
        resources: Any,
        index: int,
        frame: Frame | None,
        path: Path | None,
    ) -> StepResult:
        """Hydrate the context's references, run the step, save them back if it worked.

        A provider that fails to load or save fails the step (typed, recorded; the run can be
        resumed once the provider is back)."""
        start = perf_counter()
        try:
            for name, reference in _references(context):
                provider = self.state_providers.get(reference.provider_id)
                if provider is None:
                    self.warn_missing(reference.provider_id, name)
                    continue
                reference.set(await provider.load(reference.key))
        except Exception as exc:
            return _failure(step, exc, 1, start, index, frame, path)
        result = await self._execute(step, data, context, resources, index, frame, path)
        if result.success:
            try:
                # Gathered again: a retry may have replaced the context's reference objects.
                for _, reference in _references(context):
                    provider = self.state_providers.get(reference.provider_id)
                    if provider is not None and reference.hydrated:
                        await provider.save(reference.key, reference.get())
            except Exception as exc:
                return _failure(step, exc, result.attempts, start, index, frame, path)
        return result

    def warn_missing(self, provider_id: str, field: str) -> None:
        """Log, once per provider id, that a reference has no provider to hydrate it."""
        if provider_id not in self._missing:
            self._missing.add(provider_id)
            logger.warning(
                "no state provider %r for context field %r; it stays unhydrated, and its get() "
                "raises ContextReferenceError",
                provider_id,
                field,
            )


def references(context: Any) -> list[tuple[str, ContextReference[Any]]]:
    """The context's fields that hold a ContextReference."""
    return _references(context)


def _references(context: Any) -> list[tuple[str, ContextReference[Any]]]:
    """The context's fields that hold a ContextReference."""
    values = getattr(context, "__dict__", None) or {}
    return [(name, value) for name, value in values.items() if isinstance(value, ContextReference)]


def _success(
    step: Step[Any, Any],
    output: Any,
    attempts: int,
    start: float,
    index: int,
    frame: Frame | None,
    path: Path | None,
) -> StepResult:
    elapsed = perf_counter() - start
    result = StepResult(step.name, output, True, attempts, elapsed, None, index, path)
    if frame is not None:
        result.step_history = frame.children
        result.cache_hit = frame.cache_hit
    return result


def _failure(
    step: Step[Any, Any],
    exc: Exception,
    attempts: int,
    start: float,
    index: int,
    frame: Frame | None,
    path: Path | None,
) -> StepResult:
    # A composite step fails with the error of the sub-step that failed.
    error = exc.result.error if isinstance(exc, ChildFailed) else None
    result = StepResult(
        step.name,
        None,
        False,
        attempts,
        perf_counter() - start,
        error or StepError.from_exception(exc),
        index,
        path,
    )
    if frame is not None:
        result.step_history = frame.children
    return result


async def _with_timeout(
    step: Step[Any, Any], data: Any, context: Any, resources: Any, frame: Frame | None
) -> Any:
    timeout_s = step.config.timeout_s
    assert timeout_s is not None
    deadline = asyncio.timeout(timeout_s)
    try:
        async with deadline:
            if frame is None:
                return await step._invoke(data, context, resources)
            return await step._run(data, frame)
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
