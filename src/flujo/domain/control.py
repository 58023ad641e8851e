"""Control-flow steps: branch on a condition, loop, map over items, run a state machine.

Each one runs its sub-steps in a :class:`~flujo.application.core.frame.Frame`, which
checkpoints every sub-step as it finishes. After a crash the step runs again and skips what
already finished: a loop resumes in the iteration it was in, a map re-runs no item whose result
was stored, a state machine resumes in the state it was in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from typing_extensions import TypeVar

from flujo.application.core.frame import call_user, typed_input, typed_output
from flujo.domain.models import StepResult, _path_key
from flujo.domain.pipeline import Pipeline
from flujo.domain.step import Step, StepConfig
from flujo.exceptions import ConfigurationError, IterationLimitError, UnknownBranchError

if TYPE_CHECKING:
    from flujo.application.core.frame import Frame

__all__ = ["ConditionalStep", "LoopStep", "MapStep", "StateMachineStep", "Transition"]

InT = TypeVar("InT", default=Any)
OutT = TypeVar("OutT", default=Any)

Condition = Callable[[Any, Any], Any]
"""``(output, context) -> value``, sync or async."""

StepLike = Step[Any, Any] | Pipeline[Any, Any]

_SAME: Any = object()

#: The history label of a conditional step's default branch.
DEFAULT_LABEL = "<default>"


def _pipeline(item: StepLike, what: str) -> Pipeline[Any, Any]:
    if not isinstance(item, (Step, Pipeline)):
        raise ConfigurationError(f"{what} must be a Step or a Pipeline, got {item!r}")
    return Pipeline.coerce(item)


def _callable(fn: Any, what: str, *, optional: bool = False) -> Any:
    if fn is None and optional:
        return None
    if not callable(fn):
        raise ConfigurationError(f"{what} must be callable, got {fn!r}")
    return fn


class _Composite(Step[InT, OutT]):
    """A step that runs other steps (a loop, a map, a branch ...) durably."""

    composite: ClassVar[bool] = True
    runs_sub_steps: ClassVar[bool] = True

    def __init__(
        self,
        name: str,
        *,
        config: StepConfig | None = None,
        retries: int | None = None,
        timeout_s: float | None = None,
        backoff_s: float | None = None,
        backoff_max_s: float | None = None,
    ) -> None:
        super().__init__(
            name,
            config=config,
            retries=retries,
            timeout_s=timeout_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
        )

    async def _invoke(self, data: Any, context: Any, resources: Any) -> Any:
        raise ConfigurationError(f"{type(self).__name__} {self.name!r} runs in a frame only")


class ConditionalStep(_Composite[InT, OutT]):
    """Run one of several branches, chosen by ``condition_callable(output, context)``.

    >>> route = ConditionalStep(
    ...     "route",
    ...     condition_callable=lambda data, ctx: "big" if data > 10 else "small",
    ...     branches={"big": Step.from_callable(lambda x: x // 10, name="shrink"),
    ...               "small": Step.from_callable(lambda x: x * 10, name="grow")},
    ... )

    The chosen key is recorded, so a resumed run takes the same branch even when the condition
    would now choose another. An unknown key without ``default_branch`` fails the step with
    :class:`~flujo.exceptions.UnknownBranchError`.
    """

    def __init__(
        self,
        name: str,
        condition_callable: Condition,
        branches: Mapping[Hashable, StepLike],
        default_branch: StepLike | None = None,
        **config: Any,
    ) -> None:
        super().__init__(name, **config)
        self.condition_callable = _callable(condition_callable, "condition_callable")
        if not isinstance(branches, Mapping) or not branches:
            raise ConfigurationError(f"step {name!r}: branches must be a non-empty mapping")
        self.branches = {key: _pipeline(item, f"branch {key!r}") for key, item in branches.items()}
        labels = [str(key) for key in self.branches]
        if len(set(labels)) != len(labels) or DEFAULT_LABEL in labels:
            raise ConfigurationError(
                f"step {name!r}: branch keys must be distinct as text (they name the branches "
                f"in the run's history), and {DEFAULT_LABEL!r} is reserved; got {labels}"
            )
        self.default_branch = (
            None if default_branch is None else _pipeline(default_branch, "default_branch")
        )

    async def _run(self, data: Any, frame: Frame) -> Any:
        decided = frame.recorded(frame.path, "decision")
        if decided is not None:
            label = str(decided.result.output)
        else:
            key = await call_user(self.condition_callable, data, frame.context)
            if key in self.branches:
                label = str(key)
            elif self.default_branch is not None:
                label = DEFAULT_LABEL
            else:
                raise UnknownBranchError(
                    f"step {self.name!r}: the condition chose {key!r}, which is not one of the "
                    f"branches {list(self.branches)} and there is no default_branch",
                    step_name=self.name,
                    key=repr(key),
                )
            await frame.record(
                StepResult(f"{self.name}:decision", label, path=frame.path), kind="decision"
            )
        branch = self._branch(label)
        return await frame.run_pipeline(branch, data, (*frame.path, label))

    def _locate(self, rest: tuple[int | str, ...]) -> tuple[Step[Any, Any], tuple[int | str, ...]]:
        # (branch label, step index, ...)
        return _nth(self._branch(str(rest[0])), rest[1]), rest[2:]

    def _branch(self, label: str) -> Pipeline[Any, Any]:
        for key, branch in self.branches.items():
            if str(key) == label:
                return branch
        if label == DEFAULT_LABEL and self.default_branch is not None:
            return self.default_branch
        raise UnknownBranchError(
            f"step {self.name!r}: the recorded branch {label!r} no longer exists",
            step_name=self.name,
            key=label,
        )


class LoopStep(_Composite[InT, OutT]):
    """Run ``loop_body_pipeline`` until ``exit_condition_callable(output, context)`` is true.

    >>> count = LoopStep(
    ...     name="count_to_3",
    ...     loop_body_pipeline=Step.from_callable(lambda x: x + 1, name="add"),
    ...     exit_condition_callable=lambda out, ctx: out >= 3,
    ...     max_loops=10,
    ... )

    The condition is checked after each iteration. Each iteration's output is the next one's
    input and the loop's output is the last iteration's, unless mappers say otherwise:
    ``initial_input_to_loop_body_mapper(input, context)``, ``iteration_input_mapper(output,
    context, iteration)`` and ``loop_output_mapper(output, context)`` (sync or async).
    Running ``max_loops`` iterations without exiting fails the step with
    :class:`~flujo.exceptions.IterationLimitError`. Every body step is checkpointed; a crash
    in iteration 7 resumes in iteration 7, with the context as it was then.
    """

    def __init__(
        self,
        name: str,
        loop_body_pipeline: StepLike,
        exit_condition_callable: Condition,
        max_loops: int = 5,
        *,
        initial_input_to_loop_body_mapper: Condition | None = None,
        iteration_input_mapper: Callable[[Any, Any, int], Any] | None = None,
        loop_output_mapper: Condition | None = None,
        **config: Any,
    ) -> None:
        super().__init__(name, **config)
        self.loop_body_pipeline = _pipeline(loop_body_pipeline, "loop_body_pipeline")
        self.exit_condition_callable = _callable(exit_condition_callable, "exit_condition")
        if isinstance(max_loops, bool) or not isinstance(max_loops, int) or max_loops < 1:
            raise ConfigurationError(f"step {name!r}: max_loops must be an int >= 1")
        self.max_loops = max_loops
        self.initial_input_to_loop_body_mapper = _callable(
            initial_input_to_loop_body_mapper, "initial_input_to_loop_body_mapper", optional=True
        )
        self.iteration_input_mapper = _callable(
            iteration_input_mapper, "iteration_input_mapper", optional=True
        )
        self.loop_output_mapper = _callable(loop_output_mapper, "loop_output_mapper", optional=True)

    async def _run(self, data: Any, frame: Frame) -> Any:
        context = frame.context
        body = self.loop_body_pipeline
        if self.initial_input_to_loop_body_mapper is not None:
            started = frame.recorded(frame.path, "decision")
            if started is not None:
                data = typed_input(started.result.output, body.steps[0])
            else:
                data = await call_user(self.initial_input_to_loop_body_mapper, data, context)
                await frame.record(
                    StepResult(f"{self.name}:start", data, path=frame.path), kind="decision"
                )
        for iteration in range(self.max_loops):
            prefix = (*frame.path, iteration)
            # An iteration whose end was recorded is replayed, not re-decided: its exit decision
            # and its mapped next input were taken with the context of that moment.
            ended = frame.recorded(prefix, "iteration")
            if ended is not None:
                frame.pipeline_done(body, prefix)  # its steps, for the history
                if ended.extras.get("exit"):
                    if self.loop_output_mapper is not None:
                        return ended.result.output
                    return typed_output(ended.result.output, body.steps[-1])
                data = typed_input(ended.extras.get("next", ended.result.output), body.steps[0])
                continue
            done = frame.pipeline_done(body, prefix)
            if done is not None:  # the body finished, its end was not recorded yet
                output = done.output
            else:
                output = await frame.run_pipeline(body, data, prefix)
            if await call_user(self.exit_condition_callable, output, context):
                if self.loop_output_mapper is not None:
                    output = await call_user(self.loop_output_mapper, output, context)
                await self._ended(frame, prefix, output, exit=True)
                return output
            data = output
            if self.iteration_input_mapper is not None:
                data = await call_user(self.iteration_input_mapper, output, context, iteration)
            await self._ended(frame, prefix, output, exit=False, following=data)
        raise IterationLimitError(
            f"loop {self.name!r} reached max_loops={self.max_loops} without its exit condition",
            step_name=self.name,
            limit=self.max_loops,
        )

    def _locate(self, rest: tuple[int | str, ...]) -> tuple[Step[Any, Any], tuple[int | str, ...]]:
        # (iteration, step index, ...)
        return _nth(self.loop_body_pipeline, rest[1]), rest[2:]

    async def _ended(
        self,
        frame: Frame,
        prefix: tuple[int | str, ...],
        output: Any,
        *,
        exit: bool,
        following: Any = _SAME,
    ) -> None:
        """Record the end of an iteration: its output, the exit decision, the next input."""
        extras: dict[str, Any] = {"exit": exit}
        if following is not _SAME and self.iteration_input_mapper is not None:
            extras["next"] = following
        result = StepResult(f"{self.name}:iteration", output, path=prefix)
        await frame.record(result, kind="iteration", extras=extras)


class MapStep(_Composite[InT, OutT]):
    """Run ``item_pipeline`` over each item of the list it receives; outputs in input order.

    >>> squares = MapStep(
    ...     name="squares",
    ...     item_pipeline=Step.from_callable(lambda x: x * x, name="square"),
    ...     max_concurrency=4,
    ... )

    Each item's steps are checkpointed as they finish, so a crash at item 700 re-runs no item
    whose result was stored. Up to ``max_concurrency`` items run at once; the first failure
    stops the others and fails the step. Items share the run's context: with
    ``max_concurrency`` above 1 their context changes interleave, and those of items cut short
    by a crash may be applied again when they re-run (keep an item's work in its output).
    """

    def __init__(
        self, name: str, item_pipeline: StepLike, max_concurrency: int = 1, **config: Any
    ) -> None:
        super().__init__(name, **config)
        self.item_pipeline = _pipeline(item_pipeline, "item_pipeline")
        if (
            isinstance(max_concurrency, bool)
            or not isinstance(max_concurrency, int)
            or max_concurrency < 1
        ):
            raise ConfigurationError(f"step {name!r}: max_concurrency must be an int >= 1")
        self.max_concurrency = max_concurrency

    async def _run(self, data: Any, frame: Frame) -> Any:
        if isinstance(data, (str, bytes, bytearray, Mapping)) or not isinstance(data, Iterable):
            raise TypeError(f"map {self.name!r} needs a list of items, got {type(data).__name__}")
        items = list(data)
        pipeline = self.item_pipeline
        outputs: list[Any] = [None] * len(items)
        pending: list[int] = []
        for position in range(len(items)):
            done = frame.pipeline_done(pipeline, (*frame.path, position))
            if done is None:
                pending.append(position)
            else:
                outputs[position] = done.output
        if self.max_concurrency == 1 or len(pending) <= 1:
            for position in pending:
                outputs[position] = await frame.run_pipeline(
                    pipeline, items[position], (*frame.path, position)
                )
        else:
            await self._concurrently(frame, items, pending, outputs)
        frame.children.sort(key=lambda r: _path_key(r.location))
        return outputs

    def _locate(self, rest: tuple[int | str, ...]) -> tuple[Step[Any, Any], tuple[int | str, ...]]:
        # (item, step index, ...)
        return _nth(self.item_pipeline, rest[1]), rest[2:]

    async def _concurrently(
        self, frame: Frame, items: list[Any], pending: list[int], outputs: list[Any]
    ) -> None:
        queue = iter(pending)
        pipeline = self.item_pipeline

        async def worker() -> None:
            for position in queue:
                outputs[position] = await frame.run_pipeline(
                    pipeline, items[position], (*frame.path, position)
                )

        workers = [
            asyncio.ensure_future(worker()) for _ in range(min(self.max_concurrency, len(pending)))
        ]
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class Transition:
    """What a state machine's state returns: the next state, and the output handed to it.

    >>> Transition("critique", {"draft": "..."}).to
    'critique'
    """

    to: str
    output: Any = None


class StateMachineStep(_Composite[InT, OutT]):
    """Run states (pipelines) from ``start_state`` until an end state has run.

    Each state's pipeline returns a :class:`Transition` naming the next state and the output
    it hands over (a plain value from an end state is the machine's output). Each state
    receives the previous state's output; the machine's output is its end state's output.

    >>> review = StateMachineStep(
    ...     "review",
    ...     states={"draft": draft, "critique": critique, "edit": edit, "approval": approve},
    ...     start_state="draft",
    ...     end_states=["approval"],
    ... )                                                        # doctest: +SKIP

    More than ``max_transitions`` state runs fail the step with
    :class:`~flujo.exceptions.IterationLimitError`; a state naming an unknown state fails it
    with :class:`~flujo.exceptions.UnknownBranchError`. Every state's steps are checkpointed; a
    resumed machine continues in the state it was in.
    """

    def __init__(
        self,
        name: str,
        states: Mapping[str, StepLike],
        start_state: str,
        end_states: Sequence[str],
        max_transitions: int = 50,
        **config: Any,
    ) -> None:
        super().__init__(name, **config)
        if not isinstance(states, Mapping) or not states:
            raise ConfigurationError(f"state machine {name!r}: states must be a non-empty mapping")
        self.states = {str(state): _pipeline(p, f"state {state!r}") for state, p in states.items()}
        if start_state not in self.states:
            raise ConfigurationError(
                f"state machine {name!r}: start_state {start_state!r} is not a state"
            )
        self.start_state = start_state
        self.end_states = frozenset(end_states)
        unknown = self.end_states - set(self.states)
        if unknown or not self.end_states:
            raise ConfigurationError(
                f"state machine {name!r}: end_states must be states, got {sorted(self.end_states)}"
            )
        if isinstance(max_transitions, bool) or not isinstance(max_transitions, int):
            raise ConfigurationError(f"state machine {name!r}: max_transitions must be an int")
        if max_transitions < 1:
            raise ConfigurationError(f"state machine {name!r}: max_transitions must be >= 1")
        self.max_transitions = max_transitions

    async def _run(self, data: Any, frame: Frame) -> Any:
        state = self.start_state
        for turn in range(self.max_transitions):
            pipeline = self.states[state]
            prefix = (*frame.path, turn, state)
            done = frame.pipeline_done(pipeline, prefix)
            if done is not None:
                output = done.output
            else:
                output = await frame.run_pipeline(pipeline, data, prefix)
            nxt, data = _transition(output)
            if state in self.end_states:  # its output, unwrapped if it named a transition
                return output if nxt is None else data
            if nxt is None:
                raise UnknownBranchError(
                    f"state {state!r} of {self.name!r} returned {type(output).__name__}, not a "
                    "Transition naming the next state",
                    step_name=self.name,
                    key=repr(output)[:80],
                )
            if nxt not in self.states:
                raise UnknownBranchError(
                    f"state {state!r} of {self.name!r} named {nxt!r}, which is not a state",
                    step_name=self.name,
                    key=nxt,
                )
            state = nxt
        raise IterationLimitError(
            f"state machine {self.name!r} ran {self.max_transitions} states without reaching "
            f"an end state ({sorted(self.end_states)})",
            step_name=self.name,
            limit=self.max_transitions,
        )

    def _locate(self, rest: tuple[int | str, ...]) -> tuple[Step[Any, Any], tuple[int | str, ...]]:
        # (turn, state, step index, ...)
        state = str(rest[1])
        if state not in self.states:
            raise LookupError(f"state machine {self.name!r} has no state {state!r}")
        return _nth(self.states[state], rest[2]), rest[3:]


def _nth(pipeline: Pipeline[Any, Any], index: int | str) -> Step[Any, Any]:
    if not isinstance(index, int) or not 0 <= index < len(pipeline.steps):
        raise LookupError(f"no step {index!r} in {pipeline!r}")
    return pipeline.steps[index]


def _transition(output: Any) -> tuple[str | None, Any]:
    """The next state and the data for it, from a state's output (live or as stored)."""
    if isinstance(output, Transition):
        return output.to, output.output
    if isinstance(output, Mapping) and set(output) == {"to", "output"}:
        to = output["to"]
        return (to if isinstance(to, str) else None), output["output"]
    return None, output
