"""TaskClient: what dashboards, webhooks and operators use to find, inspect and manage runs.

>>> client = TaskClient("sqlite:///flujo_ops.db", registry=registry)          # doctest: +SKIP
>>> await client.list_tasks(status="failed", metadata_filter={"user_id": "u-7"})  # doctest: +SKIP
>>> await client.resume_task("run-42")                                          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from flujo.application.background import KIND, PARENT, STEP
from flujo.domain.models import StepResult, build_history
from flujo.domain.usage import NO_USAGE, StoredUsage
from flujo.exceptions import (
    ConfigurationError,
    PipelineMismatchError,
    RunNotFoundError,
    StateConflictError,
)
from flujo.state.backends.base import MetadataValue, StateBackend, validate_run_id

if TYPE_CHECKING:
    from flujo.application.runner import Flujo
    from flujo.domain.interfaces import StateProvider
    from flujo.domain.models import PipelineResult
    from flujo.domain.pipeline import PipelineRegistry
    from flujo.state.models import Evaluation

__all__ = ["BackgroundTask", "TaskClient", "TaskDetail", "TaskSummary"]


class TaskSummary(BaseModel):
    """One run, as listed."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    pipeline_name: str
    pipeline_version: str
    status: str
    current_step_index: int
    """How many top-level steps have completed."""
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, Any] = Field(default_factory=dict)
    error: dict[str, Any] | None = None
    """Why the run failed, paused or was cancelled: ``{"type", "message", "step"}`` (and
    ``"path"`` for a pause)."""
    usage: StoredUsage = NO_USAGE
    """What the run's agent calls used so far (requests, tokens, cost)."""
    queue: str | None = None
    """The queue of a run submitted to workers (None for an in-process run)."""
    priority: int = 0
    locked_by: str | None = None
    """The worker running it, while one holds its lease."""
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False

    @property
    def pause_path(self) -> list[int | str] | None:
        """Where a paused run paused (pass it as ``paused_at=`` when answering), else None."""
        if self.status != "paused" or not self.error:
            return None
        path = self.error.get("path")
        return list(path) if isinstance(path, list) else None

    @property
    def question(self) -> str | None:
        """What a paused run is waiting for (the paused step's message), else None."""
        if self.status != "paused" or not self.error:
            return None
        message = self.error.get("message")
        return message if isinstance(message, str) else None


class BackgroundTask(TaskSummary):
    """A background step's task (a run of its own), as listed."""

    @property
    def task_id(self) -> str:
        """The task's id (its run id)."""
        return self.run_id

    @property
    def parent_run_id(self) -> str | None:
        """The run whose background step launched it."""
        value = self.metadata.get(PARENT)
        return value if isinstance(value, str) else None

    @property
    def step_name(self) -> str | None:
        """The background step it runs."""
        value = self.metadata.get(STEP)
        return value if isinstance(value, str) else None


class TaskDetail(TaskSummary):
    """One run in full: its context, its step history and where it stands."""

    pipeline_id: str
    version: int
    """The number of checkpoints committed."""
    step_names: list[str]
    context: dict[str, Any]
    """The context as last committed (JSON data)."""
    step_history: list[StepResult]
    last_step_output: Any = None
    initial_input: Any = None


class TaskClient:
    """Lists, inspects, resumes, deletes and prunes stored runs.

    ``backend_or_uri`` is a :class:`StateBackend`, a state URI, or None for the configured
    store (``FLUJO_STATE_URI`` > ``flujo.toml`` > ``sqlite:///flujo_ops.db``). ``registry`` is
    needed only to resume runs: the run's recorded pipeline name and version are looked up
    there (with the context model registered alongside).
    """

    def __init__(
        self,
        backend_or_uri: StateBackend | str | None = None,
        registry: PipelineRegistry | None = None,
        *,
        state_providers: Mapping[str, StateProvider] | None = None,
    ) -> None:
        if backend_or_uri is None:
            from flujo.config import configured_backend  # noqa: PLC0415

            backend_or_uri = configured_backend()
        elif isinstance(backend_or_uri, str):
            from flujo.state.uri import backend_from_uri  # noqa: PLC0415

            backend_or_uri = backend_from_uri(backend_or_uri)
        if not isinstance(backend_or_uri, StateBackend):
            raise ConfigurationError(
                f"TaskClient needs a StateBackend or a state URI, got {backend_or_uri!r}"
            )
        self.backend = backend_or_uri
        self.registry = registry
        self.state_providers = dict(state_providers or {})

    async def list_tasks(
        self,
        status: str | None = None,
        metadata_filter: Mapping[str, MetadataValue] | None = None,
        pipeline_name: str | None = None,
        limit: int = 50,
        offset: int = 0,
        since: datetime | None = None,
    ) -> list[TaskSummary]:
        """Runs, newest first, filtered by status, pipeline, metadata (key equals value,
        every value a bound parameter) and creation time; ``offset``/``limit`` page them."""
        rows = await self.backend.list_runs(
            status=status,
            pipeline_name=pipeline_name,
            metadata_filter=metadata_filter,
            since=since,
            limit=limit,
            offset=offset,
        )
        return [TaskSummary.model_validate(row) for row in rows]

    async def get_task(self, run_id: str) -> TaskDetail | None:
        """Everything stored about ``run_id``, or None when there is no such run."""
        validate_run_id(run_id)
        state = await self.backend.load_state(run_id)
        if state is None:
            return None
        return TaskDetail(
            run_id=state["run_id"],
            pipeline_id=state["pipeline_id"],
            pipeline_name=state["pipeline_name"],
            pipeline_version=state["pipeline_version"],
            status=state["status"],
            current_step_index=state["current_step_index"],
            version=state["version"],
            created_at=state["created_at"],
            updated_at=state["updated_at"],
            metadata=state.get("metadata") or {},
            error=state.get("error"),
            usage=state.get("usage"),
            queue=state.get("queue"),
            priority=state.get("priority") or 0,
            locked_by=state.get("locked_by"),
            lease_expires_at=state.get("lease_expires_at"),
            cancel_requested=bool(state.get("cancel_requested")),
            step_names=state.get("step_names") or [],
            context=state.get("pipeline_context") or {},
            step_history=build_history(state.get("step_history") or []),
            last_step_output=state.get("last_step_output"),
            initial_input=state.get("initial_input"),
        )

    async def resume_task(
        self,
        run_id: str,
        input: Any = None,
        *,
        paused_at: Sequence[int | str] | None = None,
    ) -> PipelineResult[Any, Any]:
        """Continue a run on the pipeline version it started with (found in the registry).

        A paused run gets ``input`` as the answer to its pause (see
        :meth:`Flujo.resume_async`: validated, committed, then the run goes on; answering a
        pause twice raises :class:`~flujo.exceptions.StateConflictError`, and so does an
        ``input`` for a run that is not paused). Without ``input``, a failed or interrupted
        run continues after its last checkpoint, and a completed (or cancelled) run returns
        its stored result and runs nothing. Raises
        :class:`~flujo.exceptions.RunNotFoundError` for an unknown id and
        :class:`~flujo.exceptions.PipelineMismatchError` when that version is not in the
        registry or its steps changed.
        """
        validate_run_id(run_id)
        state = await self.backend.load_state(run_id)
        if state is None:
            raise RunNotFoundError(f"no run {run_id!r} in the store", run_id=run_id)
        runner = self._runner(state["pipeline_name"], state["pipeline_version"], run_id)
        if state["status"] == "paused":
            return await runner.resume_async(run_id, input, paused_at=paused_at)
        if input is not None or paused_at is not None:
            raise StateConflictError(
                f"run {run_id!r} is {state['status']}, not paused: there is no pause to answer "
                "(was it answered already?)",
                run_id=run_id,
                expected_version=int(state["version"]),
                actual_version=int(state["version"]),
            )
        return await runner.run_async(input, run_id=run_id)

    def _runner(self, name: str, version: str, run_id: str | None) -> Flujo[Any, Any, Any]:
        """A runner of pipeline ``name`` ``version`` from the registry, on this store."""
        from flujo.application.runner import Flujo  # noqa: PLC0415

        if self.registry is None:
            raise ConfigurationError("TaskClient needs a registry= to run pipelines")
        if version == "latest":
            version = self.registry.get_latest_version(name) or version
        if self.registry.get(name, version) is None:
            what = f"run {run_id!r} was started on" if run_id else "there is no"
            raise PipelineMismatchError(
                f"{what} pipeline {name!r} version {version!r}, which is not in this "
                "TaskClient's registry",
                run_id=run_id or "",
            )
        return Flujo(
            registry=self.registry,
            pipeline_name=name,
            pipeline_version=version,
            context_model=self.registry.get_context_model(name, version),
            state_backend=self.backend,
            state_providers=self.state_providers,
        )

    # -- queues, workers and background tasks -------------------------------------------------

    async def enqueue(
        self,
        pipeline_name: str,
        initial_input: Any,
        *,
        version: str = "latest",
        run_id: str | None = None,
        initial_context_data: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        queue: str = "default",
        priority: int = 0,
    ) -> str:
        """Queue a new run of a registered pipeline for the workers; return its id.

        >>> await client.enqueue("report", {"month": "2026-10"}, priority=5)  # doctest: +SKIP
        """
        runner = self._runner(pipeline_name, version, None)
        return await runner.submit(
            initial_input,
            run_id=run_id,
            initial_context_data=initial_context_data,
            metadata=metadata,
            queue=queue,
            priority=priority,
        )

    async def cancel(self, run_id: str) -> str:
        """Cancel a run. A queued (or paused) run is cancelled at once and never starts; a
        running one is flagged: a worker running it stops it at its next step boundary
        (status ``cancelled``); a run in a process of your own (``runner.run_async``) stops
        only if it is resumed. Returns the run's status after the request: ``cancelled``,
        ``running`` (flagged), or the status it had already finished with. Raises
        RunNotFoundError for an unknown id."""
        validate_run_id(run_id)
        status = await self.backend.request_cancel(run_id)
        if status is None:
            raise RunNotFoundError(f"no run {run_id!r} in the store", run_id=run_id)
        if status == "running":
            await self.backend.notify_cancel(run_id)
        return status

    async def get_failed_background_tasks(
        self,
        *,
        parent_run_id: str | None = None,
        step_name: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[BackgroundTask]:
        """Background tasks that failed, newest first (of one parent run, one step name,
        created since a time)."""
        wanted: dict[str, MetadataValue] = {KIND: "background"}
        if parent_run_id is not None:
            wanted[PARENT] = validate_run_id(parent_run_id)
        if step_name is not None:
            wanted[STEP] = step_name
        rows = await self.backend.list_runs(
            status="failed", metadata_filter=wanted, since=since, limit=limit
        )
        return [BackgroundTask.model_validate(row) for row in rows]

    async def resume_background_task(
        self, task_id: str, *, requeue: bool = False, queue: str | None = None
    ) -> PipelineResult[Any, Any] | None:
        """Retry a background task from its last checkpoint: here (needs a registry; returns
        its result), or, with ``requeue=True``, by handing it back to the workers on its queue
        (or ``queue``; a local-mode task, which has none, goes to ``default``) and returning
        None. Requeueing a task that is neither failed nor abandoned (running with no live
        lease, or a local task that never started) raises StateConflictError."""
        validate_run_id(task_id)
        state = await self.backend.load_state(task_id)
        if state is None or (state.get("metadata") or {}).get(KIND) != "background":
            raise RunNotFoundError(f"no background task {task_id!r} in the store", run_id=task_id)
        if requeue:
            if queue is None and state.get("queue") is None:
                queue = "default"
            if not await self.backend.requeue_run(task_id, queue=queue):
                raise StateConflictError(
                    f"background task {task_id!r} is {state['status']}: only a failed (or "
                    "abandoned) task is requeued",
                    run_id=task_id,
                    expected_version=int(state["version"]),
                    actual_version=int(state["version"]),
                )
            await self.backend.notify_work(queue or state.get("queue") or "default")
            return None
        runner = self._runner(state["pipeline_name"], state["pipeline_version"], task_id)
        return await runner.run_async(None, run_id=task_id)

    async def set_queue_limit(self, queue: str, limit: int | None) -> None:
        """At most ``limit`` runs of ``queue`` run at once, across every worker (None: no
        limit)."""
        await self.backend.set_queue_limit(queue, limit)

    async def queue_limits(self) -> dict[str, int]:
        """The concurrency limit of each queue that has one."""
        return await self.backend.queue_limits()

    async def list_workers(self) -> list[dict[str, Any]]:
        """The workers registered on this store (``worker_id``, ``info``, ``started_at``,
        ``heartbeat_at``), most recently seen first."""
        return await self.backend.list_workers()

    async def list_evaluations(
        self,
        run_id: str | None = None,
        *,
        step_name: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Evaluation]:
        """Shadow evaluation scores, newest first (of one run, one step name, since a time).

        >>> [e.score for e in await client.list_evaluations("run-42")]   # doctest: +SKIP
        [0.9, 0.4]
        """
        return await self.backend.list_evaluations(
            run_id=run_id, step_name=step_name, since=since, limit=limit, offset=offset
        )

    async def delete_task(self, run_id: str) -> bool:
        """Delete ``run_id``; False when there was no such run."""
        validate_run_id(run_id)
        if await self.backend.load_state(run_id) is None:
            return False
        await self.backend.delete_state(run_id)
        return True

    async def prune(self, older_than: timedelta | datetime, status: str | None = None) -> int:
        """Delete runs not updated for ``older_than`` (an age, or a cutoff datetime), optionally
        only those of ``status``; return how many were deleted."""
        if isinstance(older_than, timedelta):
            if older_than < timedelta(0):
                raise ConfigurationError(f"older_than must not be negative, got {older_than}")
            cutoff = datetime.now(UTC) - older_than
        elif isinstance(older_than, datetime):
            cutoff = older_than  # naive: local time, as everywhere in flujo
        else:
            raise ConfigurationError(
                f"older_than must be a timedelta or a datetime, got {older_than!r}"
            )
        return await self.backend.delete_runs(updated_before=cutoff, status=status)

    async def aclose(self) -> None:
        """Release the backend's connections."""
        await self.backend.aclose()

    async def __aenter__(self) -> TaskClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
