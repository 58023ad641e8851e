"""Parallel branches: every branch gets the same input and its own copy of the context.

When all branches have finished, their outputs form a dict keyed by branch name and their
context changes are merged into the run's context, by what each branch changed (compared with
the context the branches started from), in the order the branches are declared, so the result
never depends on which branch finished first.

Durability: each branch is checkpointed when it finishes, with its output and its context
changes. After a crash, finished branches are not run again; an unfinished branch runs again
from its start (its copy of the context was never stored).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from typing_extensions import TypeVar

from flujo.application.core.frame import ChildFailed, call_user
from flujo.domain.control import StepLike, _callable, _Composite, _nth, _pipeline
from flujo.domain.models import StepError, StepResult, _path_key
from flujo.domain.usage import Usage, count_recorded
from flujo.exceptions import (
    RUN_STOPPERS,
    ConfigurationError,
    MergeConflictError,
    UnknownBranchError,
)

if TYPE_CHECKING:
    from flujo.application.core.frame import Frame
    from flujo.domain.step import Step

__all__ = [
    "BranchFailureStrategy",
    "DynamicParallelRouterStep",
    "MergeStrategy",
    "ParallelStep",
]

InT = TypeVar("InT", default=Any)
OutT = TypeVar("OutT", default=Any)

#: ``merge(context, {branch name: branch context})``, sync or async: merge by hand.
MergeCallable = Callable[[Any, Mapping[str, Any]], Awaitable[None] | None]


class MergeStrategy(Enum):
    """How branch contexts flow back into the run's context."""

    NO_MERGE = "no_merge"
    """Branch context changes are dropped."""
    OVERWRITE = "overwrite"
    """Every change is applied, branch by branch in declaration order: the later one wins."""
    CONTEXT_UPDATE = "context_update"
    """Every change is applied; a field two branches changed differently is a
    :class:`~flujo.exceptions.MergeConflictError` unless ``field_mapping`` gives it to one of
    them (dict fields merge key by key first)."""


class BranchFailureStrategy(Enum):
    """What a failing branch does to the parallel step."""

    PROPAGATE = "propagate"
    """The step fails with the branch's error (running branches are cancelled)."""
    IGNORE = "ignore"
    """The failed branch is left out of the output and of the merge; the others go on."""


class ParallelStep(_Composite[InT, OutT]):
    """Run ``branches`` concurrently on the same input; output ``{branch name: output}``.

    >>> both = ParallelStep(
    ...     name="both",
    ...     branches={"upper": Step.from_callable(str.upper, name="up"),
    ...               "lower": Step.from_callable(str.lower, name="low")},
    ... )                                                          # doctest: +SKIP

    ``merge_strategy`` is a :class:`MergeStrategy` or a callable ``merge(context,
    branch_contexts)``. ``field_mapping`` (``{branch: [field, ...]}``) limits which fields each
    listed branch may merge back, and settles conflicts. ``max_concurrency`` bounds how many
    branches run at once (all of them by default).
    """

    def __init__(
        self,
        name: str,
        branches: Mapping[str, StepLike],
        merge_strategy: MergeStrategy | MergeCallable = MergeStrategy.CONTEXT_UPDATE,
        field_mapping: Mapping[str, Sequence[str]] | None = None,
        on_branch_failure: BranchFailureStrategy = BranchFailureStrategy.PROPAGATE,
        max_concurrency: int | None = None,
        **config: Any,
    ) -> None:
        super().__init__(name, **config)
        if not isinstance(branches, Mapping) or not branches:
            raise ConfigurationError(f"step {name!r}: branches must be a non-empty mapping")
        self.branches = {
            str(key): _pipeline(item, f"branch {key!r}") for key, item in branches.items()
        }
        if not isinstance(merge_strategy, MergeStrategy):
            _callable(merge_strategy, "merge_strategy")
        self.merge_strategy = merge_strategy
        self.field_mapping = {str(k): tuple(v) for k, v in (field_mapping or {}).items()}
        unknown = set(self.field_mapping) - set(self.branches)
        if unknown:
            raise ConfigurationError(
                f"step {name!r}: field_mapping names unknown branches {sorted(unknown)}"
            )
        if not isinstance(on_branch_failure, BranchFailureStrategy):
            raise ConfigurationError(
                f"step {name!r}: on_branch_failure must be a BranchFailureStrategy"
            )
        self.on_branch_failure = on_branch_failure
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool)
            or not isinstance(max_concurrency, int)
            or max_concurrency < 1
        ):
            raise ConfigurationError(f"step {name!r}: max_concurrency must be an int >= 1")
        self.max_concurrency = max_concurrency

    def _locate(self, rest: tuple[int | str, ...]) -> tuple[Step[Any, Any], tuple[int | str, ...]]:
        # (branch name, step index, ...)
        branch = self.branches.get(str(rest[0]))
        if branch is None:
            raise LookupError(f"parallel step {self.name!r} has no branch {rest[0]!r}")
        return _nth(branch, rest[1]), rest[2:]

    async def _selected(self, data: Any, frame: Frame) -> list[str]:
        """The branches to run (all of them; the router picks some)."""
        return list(self.branches)

    async def _run(self, data: Any, frame: Frame) -> Any:
        context = frame.context
        names = await self._selected(data, frame)
        base = _dump(context)
        outcomes: dict[str, tuple[Any, dict[str, Any]]] = {}
        failures: dict[str, StepResult] = {}
        pending = []
        for name in names:
            recorded = frame.recorded((*frame.path, name), "branch")
            if recorded is None:
                pending.append(name)
            else:
                frame.children.append(recorded.result)
                count_recorded(recorded.result.usage)
                outcomes[name] = (
                    recorded.result.output,
                    dict(recorded.extras.get("context_changes") or {}),
                )
        if pending:
            await self._run_branches(data, frame, pending, base, outcomes, failures)
        if failures and self.on_branch_failure is BranchFailureStrategy.PROPAGATE:
            raise ChildFailed(failures[min(failures, key=names.index)])
        finished = [name for name in names if name in outcomes]
        await self._merge(context, base, [(name, outcomes[name][1]) for name in finished])
        frame.children.sort(key=lambda r: _path_key(r.location))  # as the stored history has it
        return {name: outcomes[name][0] for name in finished}

    async def _run_branches(
        self,
        data: Any,
        frame: Frame,
        pending: list[str],
        base: dict[str, Any],
        outcomes: dict[str, tuple[Any, dict[str, Any]]],
        failures: dict[str, StepResult],
    ) -> None:
        limit = asyncio.Semaphore(self.max_concurrency or len(pending))
        context = frame.context

        async def branch(name: str) -> None:
            async with limit:
                copy = context.model_copy(deep=True)
                path = (*frame.path, name)
                inner = frame.child(path, context=copy, durable=False)
                try:
                    output = await inner.run_pipeline(self.branches[name], data, path)
                except ChildFailed as failed:
                    result = StepResult(name, None, False, error=failed.result.error, path=path)
                    result.step_history = inner.children
                    result.usage = _used(inner.children)
                    failures[name] = result
                    await frame.record(result, kind="branch")
                    if self.on_branch_failure is BranchFailureStrategy.PROPAGATE:
                        raise
                    return
                except RUN_STOPPERS:
                    raise  # the whole run stops: not a branch's failure
                except Exception as exc:
                    result = StepResult(
                        name, None, False, error=StepError.from_exception(exc), path=path
                    )
                    result.usage = _used(inner.children)
                    failures[name] = result
                    await frame.record(result, kind="branch")
                    if self.on_branch_failure is BranchFailureStrategy.PROPAGATE:
                        raise ChildFailed(result) from exc
                    return
                changes = _changes(base, _dump(copy))
                result = StepResult(name, output, True, path=path)
                result.step_history = inner.children
                result.usage = _used(inner.children)
                outcomes[name] = (output, changes)
                await frame.record(result, kind="branch", extras={"context_changes": changes})

        tasks = [asyncio.ensure_future(branch(name)) for name in pending]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                error = task.exception()
                if error is not None and not isinstance(error, ChildFailed):
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _merge(
        self, context: Any, base: dict[str, Any], changes: list[tuple[str, dict[str, Any]]]
    ) -> None:
        strategy = self.merge_strategy
        if strategy is MergeStrategy.NO_MERGE:
            return
        if not isinstance(strategy, MergeStrategy):
            branch_contexts = {
                name: type(context).model_validate({**base, **changed}, by_name=True)
                for name, changed in changes
            }
            await call_user(strategy, context, branch_contexts)
            return
        allowed = [
            (name, {k: v for k, v in changed.items() if _mapped(self.field_mapping, name, k)})
            for name, changed in changes
        ]
        if strategy is MergeStrategy.OVERWRITE:
            merged: dict[str, Any] = {}
            for _, changed in allowed:
                merged.update(changed)
        else:
            merged = self._update(base, allowed)
        for field, value in merged.items():
            setattr(context, field, value)

    def _update(
        self, base: dict[str, Any], changes: list[tuple[str, dict[str, Any]]]
    ) -> dict[str, Any]:
        """CONTEXT_UPDATE: each changed field once; dicts key by key; conflicts refused."""
        by_field: dict[str, list[tuple[str, Any]]] = {}
        for name, changed in changes:
            for field, value in changed.items():
                by_field.setdefault(field, []).append((name, value))
        merged: dict[str, Any] = {}
        for field, writers in by_field.items():
            values = [value for _, value in writers]
            if all(value == values[0] for value in values):
                merged[field] = values[0]
                continue
            original = base.get(field)
            if isinstance(original, dict) and all(isinstance(v, dict) for v in values):
                combined = _merge_keys(original, writers)
                if combined is not None:
                    merged[field] = combined
                    continue
            raise MergeConflictError(
                f"parallel step {self.name!r}: branches {[n for n, _ in writers]} all changed "
                f"context field {field!r}; give it to one of them with field_mapping, or pick "
                "another merge_strategy",
                step_name=self.name,
                field=field,
                branches=[name for name, _ in writers],
            )
        return merged


class DynamicParallelRouterStep(ParallelStep[InT, OutT]):
    """A parallel step whose branches are chosen per run by ``router_agent``.

    The router is a callable ``router(data, context)`` (sync or async) or an agent (an object
    with ``async run(data, **kwargs)``), returning a branch name or a list of them. The choice
    is recorded, so a resumed run runs the same branches.
    """

    def __init__(
        self,
        name: str,
        router_agent: Any,
        branches: Mapping[str, StepLike],
        **options: Any,
    ) -> None:
        super().__init__(name, branches, **options)
        if not callable(router_agent) and not callable(getattr(router_agent, "run", None)):
            raise ConfigurationError(
                f"step {name!r}: router_agent must be a callable or have run(data, **kwargs)"
            )
        self.router_agent = router_agent

    async def _selected(self, data: Any, frame: Frame) -> list[str]:
        decided = frame.recorded(frame.path, "decision")
        if decided is not None:
            return [str(name) for name in decided.result.output]
        router = self.router_agent
        if callable(getattr(router, "run", None)):
            run = router.run
            if "context" in inspect.signature(run).parameters:
                choice = await call_user(run, data, context=frame.context)
            else:
                choice = await call_user(run, data)
        else:
            choice = await call_user(router, data, frame.context)
        names = [choice] if isinstance(choice, str) else list(choice or [])
        for chosen in names:
            if chosen not in self.branches:
                raise UnknownBranchError(
                    f"router of {self.name!r} chose {chosen!r}, which is not one of the "
                    f"branches {list(self.branches)}",
                    step_name=self.name,
                    key=str(chosen),
                )
        ordered = [name for name in self.branches if name in names]
        await frame.record(
            StepResult(f"{self.name}:router", ordered, path=frame.path), kind="decision"
        )
        return ordered


def _dump(context: Any) -> dict[str, Any]:
    """The context's fields as JSON data (the form branch changes are kept and stored in)."""
    if isinstance(context, BaseModel):
        return context.model_dump(mode="json", round_trip=True, warnings=False)
    return {}


def _changes(base: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {field: value for field, value in after.items() if base.get(field) != value}


def _mapped(mapping: Mapping[str, Sequence[str]], branch: str, field: str) -> bool:
    fields = mapping.get(branch)
    return fields is None or field in fields


def _merge_keys(original: dict[str, Any], writers: list[tuple[str, Any]]) -> dict[str, Any] | None:
    """Merge dicts changed by several branches key by key; None if one key got two values."""
    merged = dict(original)
    claimed: dict[str, Any] = {}
    for _, value in writers:
        keys: Iterable[str] = set(value) | set(original)
        for key in keys:
            before, now = original.get(key, _MISSING), value.get(key, _MISSING)
            if before == now:
                continue
            if key in claimed and claimed[key] != now:
                return None
            claimed[key] = now
    for key, now in claimed.items():
        if now is _MISSING:
            merged.pop(key, None)
        else:
            merged[key] = now
    return merged


_MISSING: Any = object()


def _used(results: list[StepResult]) -> Usage | None:
    """What a branch's steps used together (None when nothing)."""
    total = Usage()
    for result in results:
        if result.usage:
            total = total + result.usage
    return total or None
