"""Frames: where composite steps (loops, maps, branches, state machines) run their sub-steps.

A frame is a path in the run, for example ``(2, 7)`` for item 7 of the map that is top-level
step 2. Every sub-step that finishes is recorded there: kept in its parent's history, written
to the store as one checkpoint (its record, its output, the context fields it changed), and
remembered, so that a composite step that runs again after a crash (or a retry) finds what
already finished and runs only the rest.

Frames of parallel branches are not durable: a branch works on its own copy of the context,
which is not stored until the branch finishes, so an unfinished branch runs again from its
start; a finished one never does.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter

from flujo.domain.models import BackgroundLaunched, StepResult
from flujo.domain.usage import count_recorded
from flujo.exceptions import PausedException

if TYPE_CHECKING:
    from flujo.application.background import BackgroundLauncher
    from flujo.application.core.executor_core import ExecutorCore
    from flujo.application.state_manager import StateManager
    from flujo.domain.pipeline import Pipeline
    from flujo.domain.step import Step

__all__ = [
    "ChildFailed",
    "Frame",
    "Recorded",
    "RunScope",
    "call_user",
    "typed_input",
    "typed_output",
]

Path = tuple[int | str, ...]

#: Record kinds that appear in the step history (the others are bookkeeping).
_SHOWN = frozenset({"step", "branch", "turn"})


@dataclass(slots=True)
class Recorded:
    """A sub-step that finished, as recorded: its result and any extra data its parent kept."""

    result: StepResult
    extras: dict[str, Any] = field(default_factory=dict)


class ChildFailed(Exception):
    """A composite step's sub-step failed; the composite fails with the sub-step's error."""

    def __init__(self, result: StepResult) -> None:
        super().__init__(str(result.error))
        self.result = result


class RunScope:
    """What every frame of one run shares: the executor, the store, the context, the records."""

    __slots__ = (
        "context",
        "events",
        "executor",
        "launcher",
        "manager",
        "records",
        "resources",
        "run_id",
        "top_index",
    )

    def __init__(
        self,
        executor: ExecutorCore,
        manager: StateManager | None,
        context: Any,
        resources: Any,
        run_id: str,
        records: dict[tuple[Path, str], Recorded] | None = None,
    ) -> None:
        self.executor = executor
        self.manager = manager
        self.context = context
        self.resources = resources
        self.run_id = run_id
        self.records: dict[tuple[Path, str], Recorded] = records or {}
        self.top_index = 0
        self.events: asyncio.Queue[StepResult] | None = None
        self.launcher: BackgroundLauncher | None = None
        """Launches the run's background steps."""


class Frame:
    """The runtime a composite step works in, at one path of the run."""

    __slots__ = ("cache_hit", "children", "context", "durable", "path", "scope")

    def __init__(
        self, scope: RunScope, path: Path, *, context: Any = None, durable: bool = True
    ) -> None:
        self.scope = scope
        self.path = path
        self.context = scope.context if context is None else context
        self.durable = durable
        self.children: list[StepResult] = []
        self.cache_hit = False

    @property
    def resources(self) -> Any:
        """The runner's AppResources."""
        return self.scope.resources

    def child(self, path: Path, *, context: Any = None, durable: bool | None = None) -> Frame:
        """A frame below this one (same context and durability unless given)."""
        return Frame(
            self.scope,
            path,
            context=self.context if context is None else context,
            durable=self.durable if durable is None else durable,
        )

    def recorded(self, path: Path, kind: str = "step") -> Recorded | None:
        """What an earlier attempt recorded at ``path`` (only in durable frames), or None."""
        if not self.durable:
            return None
        return self.scope.records.get((path, kind))

    async def record(
        self, result: StepResult, *, kind: str = "step", extras: dict[str, Any] | None = None
    ) -> None:
        """Keep a finished sub-step: in this frame's history and, in a durable frame, in the
        run's records and the store (one checkpoint, with the context fields that changed).

        Bookkeeping records (kinds other than ``step`` and ``branch``: a branch decision, the
        end of a loop iteration) are stored but not shown in the history."""
        shown = kind in _SHOWN
        if shown:
            self.children.append(result)
        scope = self.scope
        if self.durable:
            if scope.manager is not None:
                await scope.manager.step_recorded(
                    result, top_index=scope.top_index, kind=kind, extras=extras
                )
            if result.success:  # remembered once stored (a refused write is not done)
                scope.records[(result.location, kind)] = Recorded(result, extras or {})
            if scope.manager is not None and not result.success:
                # The failed sub-step's context changes were not committed: drop them, so a
                # retry (or the rest of the run) sees the context as recorded.
                scope.manager.rollback_context()
        if shown and scope.events is not None:
            scope.events.put_nowait(result)

    async def run_step(self, step: Step[Any, Any], data: Any, path: Path, index: int) -> StepResult:
        """Run ``step`` at ``path`` (or take its recorded result) and record it."""
        recorded = self.recorded(path)
        if recorded is None:
            # An answer to a pause is found even in a frame that is not durable (a parallel
            # branch runs again from its start, and the step that paused must not ask again).
            answer = self.scope.records.get((path, "step"))
            if answer is not None and answer.extras.get("answer"):
                recorded = answer
        if recorded is not None:
            result = replace(recorded.result, output=typed_output(recorded.result.output, step))
            self.children.append(result)
            count_recorded(result.usage)
            return result
        frame = self.child(path) if step.composite else None
        launcher = self.scope.launcher
        try:
            if launcher is not None and step.config.execution_mode == "background":
                result = await launcher.launch(step, data, self.context, index, path)
            else:
                result = await self.scope.executor.execute(
                    step, data, self.context, self.scope.resources, index, frame, path
                )
        except PausedException as signal:
            if signal.path is None:  # the innermost step that paused names itself
                signal.path, signal.step_name = path, step.name
            raise
        await self.record(result)
        return result

    async def run_pipeline(self, pipeline: Pipeline[Any, Any], data: Any, prefix: Path) -> Any:
        """Run ``pipeline`` on ``data`` with its steps at ``prefix + (j,)``; return its output.

        A failed step raises :class:`ChildFailed`, which fails the composite step.
        """
        for index, step in enumerate(pipeline.steps):
            result = await self.run_step(step, data, (*prefix, index), index)
            if not result.success:
                raise ChildFailed(result)
            data = result.output
        return data

    def pipeline_done(self, pipeline: Pipeline[Any, Any], prefix: Path) -> StepResult | None:
        """If ``pipeline`` finished at ``prefix`` in an earlier attempt: its last step's result
        (output typed), after adding the recorded results of all its steps to the history."""
        last = len(pipeline.steps) - 1
        recorded = self.recorded((*prefix, last))
        if recorded is None:
            return None
        for index in range(last):
            earlier = self.recorded((*prefix, index))
            if earlier is not None:
                self.children.append(earlier.result)
                count_recorded(earlier.result.usage)
        result = replace(
            recorded.result, output=typed_output(recorded.result.output, pipeline.steps[-1])
        )
        self.children.append(result)
        count_recorded(result.usage)
        return result


async def call_user(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a user callable (a condition, a mapper, a router), sync or async."""
    outcome = fn(*args, **kwargs)
    if inspect.isawaitable(outcome):
        outcome = await outcome
    return outcome


def typed_input(value: Any, step: Step[Any, Any]) -> Any:
    """A stored value (JSON data) validated into ``step``'s declared input type, if any."""
    target = step.input_type
    if target is Any or target is object:
        return value
    try:
        return TypeAdapter(target).validate_python(value)
    except Exception:  # a type pydantic cannot validate, or data that no longer fits
        return value


def typed_output(value: Any, step: Step[Any, Any]) -> Any:
    """A stored output (JSON data) validated into ``step``'s declared output type, if any."""
    if step.config.execution_mode == "background":  # its output is its task, not its value
        target: Any = BackgroundLaunched
    else:
        target = step.output_type
    if target is Any or target is object or target is None:
        return value
    try:
        return TypeAdapter(target).validate_python(value)
    except Exception:  # a type pydantic cannot validate, or data that no longer fits
        return value
