"""Lifecycle events passed to hooks.

A hook is any callable (sync or async) taking one event; ``event.event_name`` tells which::

    async def audit(event: HookEvent) -> None:
        if event.event_name == "post_step":
            print(event.run_id, event.step_result.name)

    runner = Flujo(pipeline, hooks=[audit])

Hooks run in the run's task. ``post_step`` runs after the step's checkpoint committed. A hook
that raises :class:`~flujo.exceptions.PipelineAbortSignal` stops the run (stored as
``cancelled``); any other exception from a hook is logged (logger ``flujo.hooks``) and ignored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from flujo.domain.models import PipelineContext, PipelineResult, StepResult

__all__ = ["HookCallable", "HookEvent", "PostRun", "PostStep", "PreRun", "StepFailure"]


@dataclass(frozen=True, slots=True)
class PreRun:
    """The run is about to execute its first (or, on resume, its next) step."""

    run_id: str
    initial_input: Any
    context: PipelineContext
    resumed: bool
    """True when the run continues from a stored checkpoint."""
    event_name: Literal["pre_run"] = "pre_run"


@dataclass(frozen=True, slots=True)
class PostStep:
    """A step succeeded and its checkpoint committed."""

    run_id: str
    step_result: StepResult
    context: PipelineContext
    event_name: Literal["post_step"] = "post_step"


@dataclass(frozen=True, slots=True)
class StepFailure:
    """A step failed after its retries; the run is about to stop as ``failed``."""

    run_id: str
    step_result: StepResult
    context: PipelineContext
    event_name: Literal["on_step_failure"] = "on_step_failure"


@dataclass(frozen=True, slots=True)
class PostRun:
    """The run stopped (completed, failed, paused or cancelled)."""

    run_id: str
    result: PipelineResult[Any, Any]
    event_name: Literal["post_run"] = "post_run"


HookEvent = PreRun | PostStep | StepFailure | PostRun
HookCallable = Callable[[HookEvent], Awaitable[None] | None]
