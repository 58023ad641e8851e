"""Flujo: the runner. Starts runs, resumes them by id, and drives their steps.

The way a run flows: load or create the run's state -> for each remaining step, the executor
runs it (retries, timeout) -> the state manager commits one checkpoint -> hooks -> next step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Literal, cast

import orjson
from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypeVar

from flujo.application.background import KIND, PATH, background_pipeline, drain
from flujo.application.core.executor_core import references
from flujo.application.core.factories import ExecutorFactory
from flujo.application.core.frame import Frame, Path, Recorded, RunScope, typed_output
from flujo.application.state_manager import StateManager
from flujo.domain.events import HookCallable, HookEvent, PostRun, PostStep, PreRun, StepFailure
from flujo.domain.interfaces import StateProvider
from flujo.domain.models import (
    AppResources,
    ContextReference,
    PipelineContext,
    PipelineResult,
    StepError,
    StepResult,
    build_history,
)
from flujo.domain.pipeline import Pipeline, PipelineRegistry, parse_version
from flujo.domain.step import Step
from flujo.domain.usage import RunMeter, Usage, UsageLimits
from flujo.exceptions import (
    CancelRequested,
    ConfigurationError,
    ContextValidationError,
    CorruptStateError,
    FlujoSignal,
    PausedException,
    PipelineAbortSignal,
    PipelineMismatchError,
    PipelineNotFoundError,
    RunNotFoundError,
    SerializationError,
    StateConflictError,
    UsageLimitExceededError,
)
from flujo.state.backends.base import (
    RunHeader,
    StateBackend,
    encode_metadata,
    now,
    validate_metadata_key,
    validate_queue_name,
    validate_run_id,
)
from flujo.state.models import WorkflowState

if TYPE_CHECKING:
    from flujo.application.background import BackgroundLauncher
    from flujo.application.shadow import ShadowEvalConfig, ShadowEvaluator
    from flujo.client import BackgroundTask

__all__ = ["Flujo"]

logger = logging.getLogger("flujo.runner")

#: How long ``aclose()`` lets background tasks run before cancelling them (they are durable:
#: a cancelled one resumes from its last checkpoint).
_BACKGROUND_GRACE_S = 30.0


InT = TypeVar("InT", default=Any)
OutT = TypeVar("OutT", default=Any)
CtxT = TypeVar("CtxT", bound=PipelineContext, default=PipelineContext)


@dataclass(slots=True)
class _Run(Generic[CtxT]):
    """A run being executed: where it starts and what it carries."""

    run_id: str
    pipeline: Pipeline[Any, Any]
    context: CtxT
    data: Any
    start: int
    history: list[StepResult]
    manager: StateManager | None
    resumed: bool
    records: dict[tuple[Path, str], Recorded] = field(default_factory=dict)
    """What composite steps recorded of the step in progress (on resume)."""
    meter: RunMeter = field(default_factory=RunMeter)
    """The run's usage (earlier processes' included) and its limits."""
    version: str = ""
    """The pipeline version the run runs on."""
    queue: str | None = None
    """The queue of a run submitted to workers."""
    cancel_requested: bool = False
    """Its cancellation was asked (TaskClient.cancel): it stops before its next step."""


class Flujo(Generic[InT, OutT, CtxT]):
    """Runs a pipeline durably: a checkpoint after every step, resumable by ``run_id``.

    >>> from flujo import Flujo, step
    >>> @step
    ... async def add_one(x: int) -> int:
    ...     return x + 1
    >>> runner = Flujo(add_one >> add_one, persist_state=False)
    >>> runner.run(1).output
    3

    With ``state_backend`` unset, runs are stored in ``flujo_ops.db`` (SQLite) in the working
    directory; ``persist_state=False`` runs with no store at all. Pass either a ``pipeline``
    (or a single step), or a ``registry`` with a ``pipeline_name`` (and ``pipeline_version``,
    ``"latest"`` by default).
    """

    def __init__(
        self,
        pipeline: Pipeline[InT, OutT] | Step[InT, OutT] | None = None,
        *,
        context_model: type[CtxT] | None = None,
        initial_context_data: Mapping[str, Any] | None = None,
        resources: AppResources | None = None,
        hooks: Sequence[HookCallable] | None = None,
        state_backend: StateBackend | None = None,
        delete_on_completion: bool = False,
        registry: PipelineRegistry | None = None,
        pipeline_name: str | None = None,
        pipeline_version: str = "latest",
        pipeline_id: str | None = None,
        persist_state: bool = True,
        state_providers: Mapping[str, StateProvider] | None = None,
        executor_factory: ExecutorFactory | None = None,
        usage_limits: UsageLimits | None = None,
        shadow_eval: ShadowEvalConfig | None = None,
        background_mode: Literal["local", "queue"] | None = None,
    ) -> None:
        self._pipeline = None if pipeline is None else Pipeline.coerce(pipeline)
        if self._pipeline is None and (registry is None or not pipeline_name):
            raise ConfigurationError(
                "Flujo needs a pipeline, or a registry together with a pipeline_name"
            )
        if context_model is not None and not (
            isinstance(context_model, type) and issubclass(context_model, PipelineContext)
        ):
            raise ConfigurationError(
                f"context_model must be a PipelineContext subclass, got {context_model!r}"
            )
        if resources is not None and not isinstance(resources, AppResources):
            raise ConfigurationError(
                f"resources must be an AppResources instance, got {type(resources).__name__}"
            )
        if state_backend is not None and not persist_state:
            raise ConfigurationError("persist_state=False cannot be combined with a state_backend")
        if state_backend is not None and not isinstance(state_backend, StateBackend):
            raise ConfigurationError(
                f"state_backend must be a StateBackend, got {type(state_backend).__name__}"
            )
        if pipeline_version != "latest":
            parse_version(pipeline_version)
        if background_mode not in (None, "local", "queue"):
            raise ConfigurationError(
                f"background_mode must be 'local' or 'queue', got {background_mode!r}"
            )
        if usage_limits is not None and not isinstance(usage_limits, UsageLimits):
            raise ConfigurationError(
                f"usage_limits must be a UsageLimits, got {type(usage_limits).__name__}"
            )
        self.context_model: type[CtxT] = cast(type[CtxT], context_model or PipelineContext)
        self.initial_context_data: dict[str, Any] = dict(initial_context_data or {})
        self.resources = resources
        self.hooks: list[HookCallable] = list(hooks or [])
        self.delete_on_completion = delete_on_completion
        self.registry = registry
        self.pipeline_name = pipeline_name or "default"
        self.pipeline_version = pipeline_version
        self.pipeline_id = pipeline_id or self.pipeline_name
        self.persist_state = persist_state
        if usage_limits is None:
            from flujo.config_file import configured_usage_limits  # noqa: PLC0415

            usage_limits = configured_usage_limits(self.pipeline_name)
        self.usage_limits: UsageLimits | None = usage_limits
        """The most each run may use (``[budgets]`` in flujo.toml when not given)."""
        if persist_state and state_backend is None:
            from flujo.config import configured_backend  # noqa: PLC0415 - settings on demand

            state_backend = configured_backend()
        self.state_backend: StateBackend | None = state_backend
        if executor_factory is None:
            executor_factory = ExecutorFactory(state_providers=state_providers)
        self._executor = executor_factory.create_executor()
        if state_providers:  # given to both: the runner's add to (and win over) the factory's
            checked = ExecutorFactory(state_providers=state_providers).state_providers
            self._executor.state_providers.update(checked)
        self.state_providers = dict(self._executor.state_providers)
        self.background_mode = background_mode
        """Where background steps' tasks run: ``"local"`` (on this runner's event loop) or
        ``"queue"`` (for workers); None: the ``background_mode`` setting (default local)."""
        self._background: set[asyncio.Task[Any]] = set()
        self._background_ids: set[str] = set()  # the tasks of those (local background tasks)
        self._children: dict[tuple[str, tuple[int | str, ...]], Pipeline[Any, Any]] = {}
        self._shadow: ShadowEvaluator | None = None
        if shadow_eval is None and os.environ.get("FLUJO_SHADOW_EVAL_ENABLED"):
            from flujo.application.shadow import shadow_config_from_env  # noqa: PLC0415

            shadow_eval = shadow_config_from_env()
        if shadow_eval is not None and shadow_eval.enabled:
            from flujo.application.shadow import ShadowEvaluator  # noqa: PLC0415

            self._shadow = ShadowEvaluator(shadow_eval, self.state_backend)
            self._executor.shadow = self._shadow

    @property
    def pipeline(self) -> Pipeline[InT, OutT] | None:
        """The pipeline new runs use when one was given (else it comes from the registry)."""
        return self._pipeline

    # -- public API ------------------------------------------------------------------------------

    def run(
        self,
        initial_input: InT,
        *,
        run_id: str | None = None,
        initial_context_data: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> PipelineResult[OutT, CtxT]:
        """Run (or resume, given the ``run_id`` of a stored run) to the end, synchronously.

        Each call runs its own event loop and releases the store's connections at its end.
        Cannot be called from a running event loop: use :meth:`run_async` there.
        """
        _refuse_running_loop("Flujo.run()", "await runner.run_async(...)")

        async def run_then_release() -> PipelineResult[OutT, CtxT]:
            try:
                return await self.run_async(
                    initial_input,
                    run_id=run_id,
                    initial_context_data=initial_context_data,
                    metadata=metadata,
                )
            finally:
                if self._background:  # background steps' tasks run to their end
                    await drain(self._background, None)
                if self._shadow is not None:  # scores still being written (bounded wait)
                    await self._shadow.drain()
                # This event loop ends with the call: release what the store bound to it
                # (a Postgres pool); the store reopens on next use.
                if self.state_backend is not None:
                    await self.state_backend.aclose()

        return asyncio.run(run_then_release())

    async def run_async(
        self,
        initial_input: InT,
        *,
        run_id: str | None = None,
        initial_context_data: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> PipelineResult[OutT, CtxT]:
        """Run (or resume) to the end and return the result.

        With ``run_id`` of a stored run: a completed (or cancelled, or paused) run returns its
        stored result and nothing runs; a running or failed run continues after its last
        checkpoint, with its stored context and last output (``initial_input`` and
        ``initial_context_data`` are then ignored). An unknown ``run_id`` starts a new run
        under that id. ``metadata`` (a JSON object whose keys are 1-64 of ``A-Z a-z 0-9 _ . -``)
        is stored with a new run, for finding it later (``list_runs(metadata_filter=...)``).
        """
        result: Any = None
        async for item in self._drive(initial_input, run_id, initial_context_data, metadata):
            result = item
        return cast(PipelineResult[OutT, CtxT], result)

    async def run_result_async(
        self,
        initial_input: InT,
        *,
        run_id: str | None = None,
        initial_context_data: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> PipelineResult[OutT, CtxT]:
        """Same as :meth:`run_async` (the name the production manual uses)."""
        return await self.run_async(
            initial_input,
            run_id=run_id,
            initial_context_data=initial_context_data,
            metadata=metadata,
        )

    async def run_stream(
        self,
        initial_input: InT,
        *,
        run_id: str | None = None,
        initial_context_data: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[StepResult | PipelineResult[OutT, CtxT]]:
        """Yield a :class:`StepResult` as each step finishes, then the final result.

        Sub-steps of composite steps (loop iterations, map items, branches) are yielded too, as
        they finish, with their ``path`` set; a top-level step's result has ``path`` None. Each
        yielded success has already been checkpointed.
        """
        async for item in self._drive(
            initial_input, run_id, initial_context_data, metadata, stream=True
        ):
            yield item

    async def resume_async(
        self,
        paused: PipelineResult[Any, Any] | str,
        human_input: Any,
        *,
        paused_at: Sequence[int | str] | None = None,
    ) -> PipelineResult[OutT, CtxT]:
        """Answer a paused run (its result, or its run id) and continue it to the end.

        The answer becomes the output of the step that paused (validated into a
        :class:`~flujo.HumanInTheLoopStep`'s ``input_schema``; a mismatch raises
        :class:`~flujo.exceptions.HumanInputError` and the run stays paused) and is committed
        before anything else runs. Answering a pause that was already answered (here, or in
        another process at the same time) raises :class:`~flujo.exceptions.StateConflictError`
        and runs nothing. ``paused_at`` (the ``path`` of the pause that was shown to the person,
        e.g. ``TaskSummary.pause_path``) makes the answer apply to that pause only: if the run
        has since moved on to another pause, StateConflictError is raised.
        """
        run_id = paused if isinstance(paused, str) else paused.run_id
        if paused_at is None and not isinstance(paused, str):
            paused_at = paused.pause_path  # the pause this result showed, and no other
        validate_run_id(run_id)
        backend = self.state_backend
        if backend is None:
            raise ConfigurationError("resume_async needs a state backend: paused runs are stored")
        stored = await backend.load_state(run_id)
        if stored is None:
            raise RunNotFoundError(f"no run {run_id!r} in the store", run_id=run_id)
        try:
            state = WorkflowState.model_validate(stored)
        except ValidationError as exc:
            raise CorruptStateError(
                f"stored state of run {run_id!r} has an unexpected shape: {exc}", run_id=run_id
            ) from exc
        if state.status != "paused":
            raise StateConflictError(
                f"run {run_id!r} is {state.status}, not paused: its pause was answered already, "
                "or it never paused",
                run_id=run_id,
                expected_version=state.version,
                actual_version=state.version,
            )
        pipeline = self._pipeline_for_stored(state)
        raw = (state.error or {}).get("path")
        path = tuple(raw) if isinstance(raw, list) and raw else (state.current_step_index,)
        if paused_at is not None and tuple(paused_at) != path:
            raise StateConflictError(
                f"run {run_id!r} is paused at {list(path)}, not at {list(paused_at)}: the pause "
                "that was answered is no longer the one waiting",
                run_id=run_id,
                expected_version=state.version,
                actual_version=state.version,
            )
        try:
            step = pipeline.step_at(path)
        except LookupError as exc:
            raise CorruptStateError(
                f"run {run_id!r} paused at {list(path)}, which its pipeline does not have",
                run_id=run_id,
            ) from exc
        validate = getattr(step, "validate_answer", None)
        answer = validate(human_input, run_id=run_id) if validate else human_input
        context = self._restore_context(state)
        manager = StateManager(
            backend,
            run_id,
            context,
            version=state.version,
            history_len=len(state.step_history),
            header=None,
            stored_context=state.pipeline_context,
            status="paused",
        )
        last = path[-1] if isinstance(path[-1], int) else 0
        if len(path) > 1:  # a sub-step: its composite step finds the answer when it runs again
            answered = StepResult(step.name, answer, True, 1, 0.0, None, last, path)
            await manager.step_recorded(answered, top_index=int(path[0]), extras={"answer": True})
            return await self.run_async(cast(InT, None), run_id=run_id)  # input unused
        # A top-level step: the answer completes it, as its result would have.
        answered = StepResult(step.name, answer, True, 1, 0.0, None, last)
        finishing = last == len(pipeline.steps) - 1
        await manager.step_completed(answered, completed=finishing)
        if self.hooks:
            await self._emit_quietly(PostStep(run_id, answered, context))
        result = await self.run_async(cast(InT, None), run_id=run_id)  # input unused on resume
        if finishing:  # nothing was left to run: finish as a run that completes does
            if self.delete_on_completion:
                await backend.delete_state(run_id)
            if self.hooks:
                await self._emit_quietly(PostRun(run_id, result))
        return result

    async def aclose(self) -> None:
        """Wait for pending shadow evaluations (up to their timeout), then release the state
        backend (including one passed in) and anything it holds."""
        if self._background:  # durable: what is cut short is resumed later
            await drain(self._background, _BACKGROUND_GRACE_S)
        if self._shadow is not None:
            await self._shadow.drain()
        if self.state_backend is not None:
            await self.state_backend.aclose()

    # -- queued runs and background tasks --------------------------------------------------------

    async def submit(
        self,
        initial_input: InT,
        *,
        run_id: str | None = None,
        initial_context_data: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        queue: str = "default",
        priority: int = 0,
    ) -> str:
        """Store a new run as queued, for a worker (``flujo worker``) to run; return its id.

        Nothing runs here. Higher ``priority`` runs first within ``queue``. A run id that is
        already stored raises :class:`~flujo.exceptions.StateConflictError`.

        >>> run_id = await runner.submit({"topic": "rivers"}, queue="research")  # doctest: +SKIP
        """
        backend = self.state_backend
        if backend is None or not backend.supports_queues:
            raise ConfigurationError(
                "submit needs a store that queues runs (SQLite or Postgres), got "
                f"{type(backend).__name__ if backend else 'no store (persist_state=False)'}"
            )
        validate_queue_name(queue)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigurationError(f"priority must be an int, got {priority!r}")
        self._check_runnable_by_workers()
        if run_id is None:
            run_id = uuid.uuid4().hex
        validate_run_id(run_id)
        run = self._new_run(
            run_id, initial_input, initial_context_data, metadata, queue=queue, priority=priority
        )
        assert run.manager is not None
        await run.manager.queued()
        await backend.notify_work(queue)
        return run_id

    async def get_failed_background_tasks(
        self,
        *,
        parent_run_id: str | None = None,
        step_name: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[BackgroundTask]:
        """Background tasks that failed, newest first (of one parent run, one step, since a
        time)."""
        from flujo.client import TaskClient  # noqa: PLC0415

        return await TaskClient(self._store()).get_failed_background_tasks(
            parent_run_id=parent_run_id, step_name=step_name, since=since, limit=limit
        )

    async def resume_background_task(self, task_id: str) -> PipelineResult[Any, CtxT]:
        """Run a background task again from its last checkpoint, here, and return its result
        (a failed task retries its step; a completed one returns its stored result)."""
        validate_run_id(task_id)
        stored = await self._store().load_state(task_id)
        if stored is None or (stored.get("metadata") or {}).get(KIND) != "background":
            raise RunNotFoundError(f"no background task {task_id!r} in the store", run_id=task_id)
        result = await self.run_async(cast(InT, None), run_id=task_id)
        return cast(PipelineResult[Any, CtxT], result)

    def _store(self) -> StateBackend:
        if self.state_backend is None:
            raise ConfigurationError("background tasks are stored: this runner has no store")
        return self.state_backend

    def _spawn_background(self, work: Coroutine[Any, Any, Any], task_id: str) -> None:
        """Run a background task on this event loop, keeping hold of it until it ends."""
        task = asyncio.ensure_future(_logged(work, task_id))
        self._background.add(task)
        self._background_ids.add(task_id)

        def done(task: asyncio.Task[Any]) -> None:
            self._background.discard(task)
            self._background_ids.discard(task_id)

        task.add_done_callback(done)

    def _launcher(self, run: _Run[CtxT]) -> BackgroundLauncher:
        from flujo.application.background import BackgroundLauncher  # noqa: PLC0415

        return BackgroundLauncher(self, run.run_id, run.version, parent_queue=run.queue)

    def _check_runnable_by_workers(self) -> None:
        """Refuse to queue work no worker could claim: a worker finds a run's pipeline by its
        exact name and version, and a runner given a pipeline without a version records
        ``"latest"``."""
        if self._pipeline is not None and self.pipeline_version == "latest":
            raise ConfigurationError(
                f"pipeline {self.pipeline_name!r} has no version: a queued run (or background "
                "task) is run by a worker, which finds its pipeline by name and version; give "
                "this runner pipeline_version= (a version the workers' registry has) or "
                "registry=",
            )

    def _resolved_background_mode(self) -> Literal["local", "queue"]:
        """``background_mode``, or the setting of that name (read once)."""
        if self.background_mode is None:
            from flujo.config import load_settings  # noqa: PLC0415 - settings on demand

            self.background_mode = load_settings().background_mode
        return self.background_mode

    async def __aenter__(self) -> Flujo[InT, OutT, CtxT]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- starting and resuming -------------------------------------------------------------------

    async def _open(
        self,
        initial_input: Any,
        run_id: str | None,
        context_data: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
    ) -> _Run[CtxT] | PipelineResult[OutT, CtxT]:
        backend = self.state_backend
        stored = None
        if run_id is None:
            run_id = uuid.uuid4().hex
        else:
            validate_run_id(run_id)
            if backend is not None:
                stored = await backend.load_state(run_id)
        if stored is None:
            return self._new_run(run_id, initial_input, context_data, metadata)
        try:
            state = WorkflowState.model_validate(stored)
        except ValidationError as exc:
            raise CorruptStateError(
                f"stored state of run {run_id!r} has an unexpected shape: {exc}", run_id=run_id
            ) from exc
        return self._resume(state)

    def _new_run(
        self,
        run_id: str,
        initial_input: Any,
        context_data: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        *,
        queue: str | None = None,
        priority: int = 0,
    ) -> _Run[CtxT]:
        pipeline, version = self._pipeline_for_new_run()
        data = {**self.initial_context_data, **(context_data or {}), "run_id": run_id}
        for key, value in data.items():  # each run gets its own references, never shared
            if isinstance(value, ContextReference):
                data[key] = type(value)(provider_id=value.provider_id, key=value.key)
        try:
            context = self.context_model.model_validate(data)
        except ValidationError as exc:
            raise _context_error(
                exc, f"initial context data for {self.context_model.__name__}"
            ) from exc
        manager = None
        if metadata:
            for key in metadata:
                validate_metadata_key(key)
        meter = RunMeter(self.usage_limits)
        if self.state_backend is not None:
            dumps = self.state_backend.serializer.dumps
            header = RunHeader(
                pipeline_id=self.pipeline_id,
                pipeline_name=self.pipeline_name,
                pipeline_version=version,
                step_names=orjson.dumps(pipeline.step_names),
                initial_input=dumps(initial_input, "initial_input"),
                created_at=now(),
                metadata=encode_metadata(metadata, self.state_backend.serializer),
                queue=queue,
                priority=priority,
            )
            manager = StateManager(
                self.state_backend,
                run_id,
                context,
                version=0,
                history_len=0,
                header=header,
                meter=meter,
            )
        return _Run(
            run_id,
            pipeline,
            context,
            initial_input,
            0,
            [],
            manager,
            resumed=False,
            meter=meter,
            version=version,
            queue=queue,
        )

    def _pipeline_for_new_run(self) -> tuple[Pipeline[Any, Any], str]:
        if self._pipeline is not None:
            return self._pipeline, self.pipeline_version
        registry = self.registry
        assert registry is not None
        version: str | None = self.pipeline_version
        if version == "latest":
            version = registry.get_latest_version(self.pipeline_name)
        pipeline = None if version is None else registry.get(self.pipeline_name, version)
        if pipeline is None or version is None:
            raise PipelineNotFoundError(
                f"no pipeline {self.pipeline_name!r} version {self.pipeline_version!r} "
                "is registered",
                name=self.pipeline_name,
                version=self.pipeline_version,
            )
        return pipeline, version

    def _pipeline_for_stored(self, state: WorkflowState) -> Pipeline[Any, Any]:
        """The pipeline a stored run must continue on; refuse if it changed."""
        name, version, run_id = state.pipeline_name, state.pipeline_version, state.run_id
        if name != self.pipeline_name:
            raise PipelineMismatchError(
                f"run {run_id!r} belongs to pipeline {name!r}, not {self.pipeline_name!r}",
                run_id=run_id,
            )
        pipeline = None
        if self._pipeline is not None and version == self.pipeline_version:
            pipeline = self._pipeline
        elif self.registry is not None and version == "latest":
            # A run of an unversioned pipeline (Flujo(pipeline), flujo run): the newest
            # registered version, if its steps are the run's (checked below).
            pipeline = self.registry.get_latest(name)
        elif self.registry is not None:
            pipeline = self.registry.get(name, version)
        if pipeline is None:
            raise PipelineMismatchError(
                f"run {run_id!r} was started on pipeline {name!r} version {version!r}, which "
                f"this runner does not have (it runs version {self.pipeline_version!r}); "
                "register that version to resume the run",
                run_id=run_id,
            )
        if state.metadata.get(KIND) == "background":
            pipeline = self._background_pipeline(pipeline, state)
        if pipeline.step_names != state.step_names:
            raise PipelineMismatchError(
                f"run {run_id!r} was started on steps {state.step_names}, but pipeline "
                f"{name!r} version {version!r} now has steps {pipeline.step_names}; "
                "register the change under a new version",
                run_id=run_id,
            )
        return pipeline

    def _background_pipeline(
        self, parent: Pipeline[Any, Any], state: WorkflowState
    ) -> Pipeline[Any, Any]:
        """The one-step pipeline of a background task: its step of ``parent``."""
        try:
            raw = orjson.loads(state.metadata.get(PATH, "null"))
            path = tuple(raw) if isinstance(raw, list) else ()
            key = (state.pipeline_version, path)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = background_pipeline(parent, path)
        except (LookupError, ValueError) as exc:
            raise PipelineMismatchError(
                f"background task {state.run_id!r} runs the step at {state.metadata.get(PATH)} of "
                f"pipeline {state.pipeline_name!r} version {state.pipeline_version!r}, which it "
                "does not have",
                run_id=state.run_id,
            ) from exc
        return child

    def _restore_context(self, state: WorkflowState) -> CtxT:
        try:
            context = self.context_model.model_validate_json(
                orjson.dumps(state.pipeline_context), by_name=True
            )
        except ValidationError as exc:
            raise _context_error(
                exc, f"stored context of run {state.run_id!r} for {self.context_model.__name__}"
            ) from exc
        context.run_id = state.run_id
        return context

    def _resume(self, state: WorkflowState) -> _Run[CtxT] | PipelineResult[OutT, CtxT]:
        run_id = state.run_id
        history = build_history(state.step_history)
        if state.status in ("completed", "cancelled", "paused"):
            return self._stored_result(state, history)
        pipeline = self._pipeline_for_stored(state)
        context = self._restore_context(state)
        index = state.current_step_index
        if not 0 <= index <= len(pipeline.steps):
            raise CorruptStateError(
                f"run {run_id!r} is at step {index} of a {len(pipeline.steps)}-step pipeline",
                run_id=run_id,
            )
        if index == len(pipeline.steps):  # every step done; only the final status was lost
            return self._stored_result(state.model_copy(update={"status": "completed"}), history)
        value = state.last_step_output if index > 0 else state.initial_input
        step = pipeline.steps[index]
        if step.input_type is Any and index > 0:  # the next step declares nothing: use what
            data = typed_output(value, pipeline.steps[index - 1])  # the previous one declared
        else:
            data = _typed(value, step, run_id)
        manager = None
        meter = RunMeter(self.usage_limits, Usage.from_dict(state.usage))
        if self.state_backend is not None:
            manager = StateManager(
                self.state_backend,
                run_id,
                context,
                version=state.version,
                history_len=len(state.step_history),
                header=None,
                stored_context=state.pipeline_context,
                status=state.status,
                meter=meter,
            )
        # The step in progress continues in this process: its recorded sub-steps are handed to
        # it (below) rather than shown under a placeholder.
        history = [r for r in history if r.attempts or r.index != index]
        records = _records_of(state.step_history, index)
        return _Run(
            run_id,
            pipeline,
            context,
            data,
            index,
            history,
            manager,
            True,
            records,
            meter,
            state.pipeline_version,
            state.queue,
            state.cancel_requested,
        )

    def _stored_result(
        self, state: WorkflowState, history: list[StepResult]
    ) -> PipelineResult[OutT, CtxT]:
        """The result of a run that already stopped, read from the store; nothing runs."""
        output = None
        if state.status == "completed":
            output = state.last_step_output
            try:
                pipeline = self._pipeline_for_stored(state)
            except PipelineMismatchError:
                pipeline = None
            if pipeline is not None:
                output = typed_output(output, pipeline.steps[-1])
        error = None
        failed_step = None
        pause_path = None
        if state.error:
            error = StepError.from_dict(state.error)
            failed_step = state.error.get("step")
            raw = state.error.get("path")
            if state.status == "paused" and isinstance(raw, list) and raw:
                pause_path = tuple(raw)
        return PipelineResult(
            run_id=state.run_id,
            status=state.status,
            output=output,
            step_history=history,
            final_pipeline_context=self._restore_context(state),
            error=error,
            failed_step=failed_step if isinstance(failed_step, str) else None,
            pause_path=pause_path,
            usage=Usage.from_dict(state.usage),
        )

    # -- driving ---------------------------------------------------------------------------------

    async def _drive(
        self,
        initial_input: Any,
        run_id: str | None,
        context_data: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        *,
        stream: bool = False,
    ) -> AsyncIterator[StepResult | PipelineResult[OutT, CtxT]]:
        opened = await self._open(initial_input, run_id, context_data, metadata)
        if isinstance(opened, PipelineResult):
            logger.debug("run %s is %s; returning its stored result", opened.run_id, opened.status)
            yield opened
            return
        run = opened
        logger.debug(
            "run %s: %s at step %d of %d",
            run.run_id,
            "resuming" if run.resumed else "starting",
            run.start,
            len(run.pipeline.steps),
        )
        hooks = self.hooks
        manager = run.manager
        context = run.context
        if not self.state_providers:
            for name, reference in references(context):  # nothing will hydrate them: say so
                self._executor.warn_missing(reference.provider_id, name)
        history = run.history
        steps = run.pipeline.steps
        last = len(steps) - 1
        execute = self._executor.execute
        resources = self.resources
        data = run.data
        scope: RunScope | None = None  # made when the first composite step runs
        final: PipelineResult[OutT, CtxT] | None = None
        if hooks:
            try:
                await self._emit(PreRun(run.run_id, data, context, run.resumed))
            except PipelineAbortSignal as signal:
                final = await self._stop(run, signal, run.start, None)
        if final is None and run.cancel_requested:  # TaskClient.cancel asked for it
            final = await self._stop(run, CancelRequested(), run.start, None)
        index = run.start
        meter = run.meter
        launcher: BackgroundLauncher | None = None
        while final is None and index <= last:
            step = steps[index]
            try:
                if step.config.execution_mode == "background":
                    if launcher is None:
                        launcher = self._launcher(run)
                    result = await launcher.launch(step, data, context, index, None)
                elif not step.composite:
                    result = await execute(step, data, context, resources, index, meter=meter)
                else:
                    if scope is None:
                        scope = RunScope(
                            self._executor, manager, context, resources, run.run_id, run.records
                        )
                        scope.launcher = launcher = launcher or self._launcher(run)
                    scope.top_index = index
                    frame = Frame(scope, (index,))
                    if not stream:
                        result = await execute(
                            step, data, context, resources, index, frame, meter=meter
                        )
                    else:
                        streamed = _stream_composite(
                            scope, execute, step, data, index, frame, meter
                        )
                        async for nested in streamed:
                            if nested.path is not None:
                                yield nested
                            else:
                                result = nested
            except FlujoSignal as signal:
                final = await self._stop(run, signal, index, step.name)
                break
            except UsageLimitExceededError as exc:
                await self._over_budget(run, exc, step, index)
                raise
            history.append(result)
            if not result.success:
                if manager is not None:
                    await manager.step_failed(result)
                    manager.rollback_context()
                if hooks:
                    await self._emit_quietly(StepFailure(run.run_id, result, context))
                yield result
                final = PipelineResult(
                    run.run_id,
                    "failed",
                    None,
                    history,
                    context,
                    result.error,
                    step.name,
                    usage=meter.total,
                )
                break
            data = result.output
            if manager is not None:
                await self._checkpoint(manager, result, completed=index == last)
            if hooks:
                try:
                    await self._emit(PostStep(run.run_id, result, context))
                except PipelineAbortSignal as signal:
                    if index < last:
                        final = await self._stop(run, signal, index + 1, None)
            yield result
            index += 1
        if final is None:
            final = PipelineResult(
                run.run_id, "completed", data, history, context, usage=meter.total
            )
            if self.delete_on_completion and self.state_backend is not None:
                await self.state_backend.delete_state(run.run_id)
        logger.debug("run %s stopped: %s", run.run_id, final.status)
        if hooks:
            await self._emit_quietly(PostRun(run.run_id, final))
        yield final

    @staticmethod
    async def _checkpoint(manager: StateManager, result: StepResult, *, completed: bool) -> None:
        try:
            await manager.step_completed(result, completed=completed)
        except SerializationError as exc:
            # The step's output or context cannot be stored: the previous checkpoint stays as
            # it is, the run is marked failed (with the culprit named), and the error is raised.
            failed = StepResult(
                result.name,
                None,
                False,
                result.attempts,
                result.latency_s,
                StepError.from_exception(exc),
                result.index,
            )
            try:
                await manager.step_failed(failed)
            except Exception:
                logger.exception("could not record the failure of run %r", manager.run_id)
            raise

    async def _stop(
        self, run: _Run[CtxT], signal: FlujoSignal, index: int, step_name: str | None
    ) -> PipelineResult[OutT, CtxT]:
        """Store a pause or a cancellation at step ``index`` and describe it."""
        if isinstance(signal, PausedException):
            status: Any = "paused"
        elif isinstance(signal, PipelineAbortSignal):
            status = "cancelled"
        else:  # pragma: no cover - no other signals exist
            raise signal
        reason = StepError(type(signal).__name__, str(signal))
        path: tuple[int | str, ...] | None = None
        if isinstance(signal, PausedException):
            path = signal.path or (index,)
            step_name = signal.step_name or step_name
        if run.manager is not None:
            await run.manager.stopped(
                status, index=index, reason=reason, step_name=step_name, path=path
            )
            run.manager.rollback_context()
        return PipelineResult(
            run.run_id,
            status,
            None,
            run.history,
            run.context,
            reason,
            step_name,
            path,
            usage=run.meter.total,
        )

    async def _over_budget(
        self, run: _Run[CtxT], exc: UsageLimitExceededError, step: Step[Any, Any], index: int
    ) -> None:
        """A usage limit stopped the run at top-level step ``index``: record the step as failed
        (with what it used), the run as failed, and give the error its result."""
        failed = exc.step_result
        if not isinstance(failed, StepResult) or failed.path is not None:
            failed = StepResult(
                step.name, None, False, 1, 0.0, StepError.from_exception(exc), index
            )
        exc.usage = run.meter.total
        run.history.append(failed)
        if run.manager is not None:
            await run.manager.step_failed(failed)
            run.manager.rollback_context()
        result: PipelineResult[OutT, CtxT] = PipelineResult(
            run.run_id,
            "failed",
            None,
            run.history,
            run.context,
            failed.error,
            step.name,
            usage=run.meter.total,
        )
        exc.result = result
        if self.hooks:
            await self._emit_quietly(StepFailure(run.run_id, failed, run.context))
            await self._emit_quietly(PostRun(run.run_id, result))

    async def _emit(self, event: HookEvent) -> None:
        """Call every hook; a PipelineAbortSignal propagates, other errors are logged."""
        for hook in self.hooks:
            try:
                outcome = hook(event)
                if outcome is not None:
                    await outcome
            except Exception:
                logging.getLogger("flujo.hooks").exception(
                    "hook %r failed on %s", hook, event.event_name
                )

    async def _emit_quietly(self, event: HookEvent) -> None:
        """Like :meth:`_emit`, for events after which there is nothing left to abort."""
        try:
            await self._emit(event)
        except PipelineAbortSignal:
            logger.debug("ignoring PipelineAbortSignal raised by a %s hook", event.event_name)


async def _stream_composite(
    scope: RunScope,
    execute: Any,
    step: Step[Any, Any],
    data: Any,
    index: int,
    frame: Frame,
    meter: RunMeter,
) -> AsyncIterator[StepResult]:
    """Run a composite step, yielding its sub-steps' results as they finish, then its own."""
    events: asyncio.Queue[StepResult] = asyncio.Queue()
    scope.events = events
    task = asyncio.ensure_future(
        execute(step, data, scope.context, scope.resources, index, frame, meter=meter)
    )
    try:
        while not task.done():
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                yield getter.result()
            else:
                getter.cancel()
        while not events.empty():
            yield events.get_nowait()
        yield task.result()
    finally:
        scope.events = None
        if not task.done():  # the consumer stopped early: stop the step too
            task.cancel()


def _refuse_running_loop(what: str, instead: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise ConfigurationError(
        f"{what} cannot be called from a running event loop; use `{instead}` instead"
    )


def _context_error(exc: ValidationError, what: str) -> ContextValidationError:
    errors = exc.errors(include_url=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    field = ".".join(str(part) for part in first["loc"]) or "<root>"
    return ContextValidationError(
        f"{what}: field {field!r}: {first['msg']}", field=field, errors=cast(Any, errors)
    )


def _typed(value: Any, step: Step[Any, Any], run_id: str) -> Any:
    """A stored value (JSON data) validated into ``step``'s declared input type."""
    target = step.input_type
    if target is Any or target is object:
        return value
    try:
        return TypeAdapter(target).validate_python(value)
    except ValidationError as exc:
        raise PipelineMismatchError(
            f"run {run_id!r}: the stored input of step {step.name!r} does not fit its declared "
            f"type {target!r}: {exc.errors(include_url=False)[0]['msg']}",
            run_id=run_id,
        ) from exc
    except Exception:  # a type pydantic cannot validate: hand over the JSON data as it is
        return value


#: The keys of a stored step record that StepResult holds; any other key is an extra.
_RECORD_KEYS = frozenset(
    {"index", "name", "output", "success", "attempts", "latency_s", "error", "path", "kind"}
    | {"cache_hit", "usage"}
)


def _records_of(records: list[dict[str, Any]], index: int) -> dict[tuple[Path, str], Recorded]:
    """The successful sub-step records of top-level step ``index``, by (path, kind)."""
    found: dict[tuple[Path, str], Recorded] = {}
    for raw in records:
        path = raw.get("path")
        if not (isinstance(path, list) and path and path[0] == index and raw.get("success")):
            continue
        extras = {key: value for key, value in raw.items() if key not in _RECORD_KEYS}
        found[(tuple(path), str(raw.get("kind", "step")))] = Recorded(
            StepResult.from_dict(raw), extras
        )
    return found


async def _logged(work: Coroutine[Any, Any, Any], task_id: str) -> None:
    """Run a background task; its failure is stored with it, anything else is logged."""
    try:
        result = await work
    except Exception:
        logger.exception("background task %s stopped with an error", task_id)
        return
    status = getattr(result, "status", None)
    if status == "failed":
        logger.warning("background task %s failed: %s", task_id, getattr(result, "error", ""))
