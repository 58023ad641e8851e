"""Runtime: runs jobs of registered flows on a thread pool, committing each activation.

How a job runs. Every routine has one queue per slot. Entry params go to the first slot of each
routine no connection targets. Whenever messages arrive, the routine's activation policy
selects what its next activation takes; that activation goes to the job's ready queue. Worker
threads (at most ``thread_pool_size`` per job) take ready activations and run their logic
outside any lock, so independent routines run at the same time; a routine has at most one
activation ready or running at a time, so its state updates never race.

When the logic returns, the activation commits under the job's lock: its record (the messages
it consumed and emitted) and the routine states it set are written as one checkpoint when
there is a store, then applied in memory, and the messages it emitted are queued at their
targets. The worker then takes the next ready activation itself (a chain of routines runs on
one thread, with no hand-off between hops) and wakes more workers only when more activations
are ready than workers are running.

A job settles when no activation is running and none is ready: the last worker to find
nothing to do records the final status (completed, or failed/paused/cancelled) and sets the
job's event. ``exec(wait=True)`` and ``wait_until_all_jobs_finished`` wait on events and a
condition, never by polling.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flujo.exceptions import (
    ConfigurationError,
    FlowError,
    FlujoError,
    JobFlowMismatchError,
    JobStateError,
    PausedException,
    PipelineAbortSignal,
    RunNotFoundError,
    SerializationError,
    StateConflictError,
)
from flujo.routines.activation import Activation, _local
from flujo.routines.flow import Plan
from flujo.routines.job_state import FINISHED, Delivery, JobState, JobStatus
from flujo.routines.registry import FlowRegistry
from flujo.routines.store import JobStore
from flujo.state.backends.base import StateBackend, validate_run_id

__all__ = ["Runtime"]

logger = logging.getLogger("flujo.routines")

_Taken = list[tuple[str, list[Delivery]]]


class _Job:
    """A job while this runtime runs it: its queues and workers (never stored)."""

    __slots__ = (
        "busy",
        "error",
        "plan",
        "queues",
        "ready",
        "state",
        "stop",
        "store_failed",
        "workers",
    )

    def __init__(self, state: JobState, plan: Plan) -> None:
        self.state = state
        self.plan = plan
        self.queues: dict[str, dict[str, deque[Delivery]]] = {
            rid: {slot: deque() for slot in slots} for rid, slots in plan.slots.items()
        }
        self.busy: set[str] = set()
        """Routines with an activation ready or running."""
        self.ready: deque[tuple[str, _Taken]] = deque()
        self.workers = 0
        """Worker loops running (or submitted) for this job."""
        self.stop: JobStatus | None = None
        """Set to stop the job: no activation starts any more; it settles with this status."""
        self.error: dict[str, Any] | None = None
        self.store_failed = False


class Runtime:
    """Runs jobs of flows registered in a :class:`FlowRegistry` (see the module docstring).

    ``thread_pool_size`` bounds the threads running routine logic; ``state_backend`` (a
    :class:`~flujo.state.backends.base.StateBackend` or a state URI such as
    ``"sqlite:///jobs.db"``) makes every activation durable and lets :meth:`resume` continue a
    job after a crash. Use it as a context manager: leaving the block waits for running jobs
    and releases the threads (and the store's connections).
    """

    def __init__(
        self,
        thread_pool_size: int = 10,
        state_backend: StateBackend | str | None = None,
        *,
        registry: FlowRegistry | None = None,
    ) -> None:
        if (
            isinstance(thread_pool_size, bool)
            or not isinstance(thread_pool_size, int)
            or thread_pool_size < 1
        ):
            raise ConfigurationError(
                f"thread_pool_size must be a whole number >= 1, got {thread_pool_size!r}"
            )
        if isinstance(state_backend, str):
            from flujo.state.uri import backend_from_uri  # noqa: PLC0415 - drivers load lazily

            state_backend = backend_from_uri(state_backend)
        if state_backend is not None and not isinstance(state_backend, StateBackend):
            raise ConfigurationError(
                f"state_backend must be a StateBackend or a state URI, got {state_backend!r}"
            )
        self.thread_pool_size = thread_pool_size
        self.state_backend = state_backend
        self._registry = registry
        self._store = None if state_backend is None else JobStore(state_backend)
        self._executor = ThreadPoolExecutor(
            max_workers=thread_pool_size, thread_name_prefix="flujo-routines"
        )
        self._jobs: dict[str, _Job] = {}
        self._starting: set[str] = set()  # job ids reserved by exec/resume, not launched yet
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._closed = False

    @property
    def registry(self) -> FlowRegistry:
        return self._registry or FlowRegistry.get_instance()

    # -- starting jobs ---------------------------------------------------------------------------

    def exec(
        self,
        flow_name: str,
        entry_params: Mapping[str, Any] | None = None,
        job_state: JobState | None = None,
        *,
        job_id: str | None = None,
        wait: bool = True,
    ) -> JobState:
        """Run the flow registered as ``flow_name``; return its JobState.

        Without ``job_state``, a new job (id ``job_id``, or a fresh one) delivers
        ``entry_params`` to the first slot of each routine no connection targets. With a
        ``job_state`` of this flow: a completed (or cancelled) one starts a new job on its
        entry params (or ``entry_params``) carrying its routine states over; a pending one
        starts; an interrupted one (running, paused or failed) continues with its pending
        deliveries (and, with a store that holds the job, from what the store holds).

        ``wait=True`` returns once the job has settled (completed, failed, paused or
        cancelled); ``wait=False`` returns at once (see :meth:`wait_until_all_jobs_finished`
        and ``JobState.wait``).
        """
        self._check_open()
        flow = self.registry.get_by_name(flow_name)
        plan = flow.plan()
        if entry_params is not None and not isinstance(entry_params, Mapping):
            raise ConfigurationError(
                f"entry_params must be a mapping (it is delivered as one message), got "
                f"{type(entry_params).__name__}"
            )
        if job_id is not None:
            validate_run_id(job_id)
        if job_state is None:
            state = JobState(
                job_id, plan.flow_id, flow_name=flow_name, entry_params=entry_params or {}
            )
            return self._start(state, plan, wait=wait)
        if not isinstance(job_state, JobState):
            raise JobStateError(
                f"job_state must be a JobState, got {type(job_state).__name__}: restore "
                "serialized data with JobState.deserialize(data) first",
                job_id=None,
            )
        _check_flow(job_state, plan)
        if job_state.status in FINISHED:
            with job_state._lock:
                states = copy.deepcopy(job_state._states)
            params = entry_params if entry_params is not None else job_state.entry_params
            state = JobState(job_id, plan.flow_id, flow_name=flow_name, entry_params=params or {})
            state._states = states
            return self._start(state, plan, wait=wait)
        if job_id is not None and job_id != job_state.job_id:
            raise JobStateError(
                f"job_id {job_id!r} differs from the job state's {job_state.job_id!r}",
                job_id=job_state.job_id,
            )
        job_state.flow_name = flow_name
        if job_state.status is JobStatus.PENDING and not (job_state._pending or job_state._history):
            if entry_params is not None:
                job_state.entry_params = dict(entry_params)
            elif job_state.entry_params is None:
                job_state.entry_params = {}
            return self._start(job_state, plan, wait=wait)
        if entry_params is not None:
            raise JobStateError(
                f"job {job_state.job_id!r} is {job_state.status.value}: it continues with its "
                "pending deliveries, so entry_params cannot be given",
                job_id=job_state.job_id,
            )
        return self._continue(job_state, plan, wait=wait)

    def resume(self, job_id: str, *, wait: bool = True) -> JobState:
        """Continue stored job ``job_id`` (after a crash, a pause or a failure) in this process.

        Its flow is the one registered under the name it was run with. Activations that
        committed never run again; the messages they emitted and no activation consumed are
        delivered. A completed or cancelled job is returned as stored; nothing runs.
        """
        self._check_open()
        store = self._store
        if store is None:
            raise ConfigurationError("Runtime.resume needs a Runtime(state_backend=...)")
        validate_run_id(job_id)
        self._reserve(job_id)
        try:
            found = store.load(job_id)
            if found is None:
                raise RunNotFoundError(f"no job {job_id!r} in the store", run_id=job_id)
            state, routine_ids = found
            assert state.flow_name is not None
            plan = self.registry.get_by_name(state.flow_name).plan()
            _check_flow(state, plan, routine_ids)
            if state.status in FINISHED:
                self._release(job_id)
                return state
            self._claim(state, store)
        except BaseException:
            self._release(job_id)
            raise
        return self._launch(state, plan, wait=wait)

    # -- controlling jobs ------------------------------------------------------------------------

    def pause_job(self, job_id: str) -> bool:
        """Stop starting activations of a running job; running ones finish and commit, then it
        settles as paused (resumable). False if this runtime is not running that job."""
        return self._stop(job_id, JobStatus.PAUSED, "paused by Runtime.pause_job")

    def cancel_job(self, job_id: str) -> bool:
        """Like :meth:`pause_job`, but the job settles as cancelled (it does not resume)."""
        return self._stop(job_id, JobStatus.CANCELLED, "cancelled by Runtime.cancel_job")

    def get_job(self, job_id: str) -> JobState | None:
        """The JobState of a job this runtime is running, or None."""
        with self._lock:
            job = self._jobs.get(job_id)
        return None if job is None else job.state

    def wait_until_all_jobs_finished(self, timeout: float | None = None) -> bool:
        """Wait until no job of this runtime is running; False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._jobs or self._starting:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def shutdown(self, *, wait: bool = True) -> None:
        """Stop accepting jobs; with ``wait`` let running jobs finish, else pause them (running
        activations finish and commit); then release the threads and the store."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = list(self._jobs)
        if not wait:
            for job_id in running:
                self._stop(job_id, JobStatus.PAUSED, "paused by Runtime.shutdown(wait=False)")
        self.wait_until_all_jobs_finished()
        self._executor.shutdown(wait=True)
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    # -- internals: starting ---------------------------------------------------------------------

    def _stop(self, job_id: str, status: JobStatus, message: str) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            return False
        with job.state._lock:
            if job.workers == 0:  # settled meanwhile
                return False
            if job.stop is None:
                job.stop = status
                job.error = {
                    "type": status.value,
                    "message": message,
                    "step": None,
                    "routine": None,
                }
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError("this Runtime is shut down")

    def _reserve(self, job_id: str) -> None:
        """Mark ``job_id`` as starting here (a placeholder until _launch)."""
        with self._lock:
            if job_id in self._jobs or job_id in self._starting:
                raise StateConflictError(
                    f"job {job_id!r} is already running in this runtime",
                    run_id=job_id,
                    expected_version=0,
                    actual_version=None,
                )
            self._starting.add(job_id)

    def _release(self, job_id: str) -> None:
        with self._lock:
            self._starting.discard(job_id)
            if not self._jobs and not self._starting:
                self._idle.notify_all()

    def _start(self, state: JobState, plan: Plan, *, wait: bool) -> JobState:
        """Start a new job: entry deliveries, first checkpoint, then run."""
        self._reserve(state.job_id)
        try:
            with state._lock:
                if state._runner is not None:
                    raise StateConflictError(
                        f"job {state.job_id!r} is running",
                        run_id=state.job_id,
                        expected_version=0,
                        actual_version=None,
                    )
                params = state.entry_params or {}
                next_id = state._next_id
                entries = []
                for rid, slot in plan.entries:
                    entries.append(Delivery(next_id, None, None, rid, slot, dict(params)))
                    next_id += 1
                record: dict[str, Any] = {
                    "kind": "entry",
                    "emitted": [delivery.to_dict() for delivery in entries],
                }
                if self._store is not None:
                    self._store.create(state, plan.routines, [record])
                state._history.append(record)
                state._next_id = next_id
                for delivery in entries:
                    state._pending[delivery.id] = delivery
        except BaseException:
            self._release(state.job_id)
            raise
        return self._launch(state, plan, wait=wait)

    def _continue(self, state: JobState, plan: Plan, *, wait: bool) -> JobState:
        """Continue an interrupted job state (from the store if the store holds the job)."""
        store = self._store
        self._reserve(state.job_id)
        try:
            if state._runner is not None:
                raise StateConflictError(
                    f"job {state.job_id!r} is running",
                    run_id=state.job_id,
                    expected_version=state._version or 0,
                    actual_version=None,
                )
            if store is None:
                with state._lock:
                    state._history.append({"kind": "resume", "pending": len(state._pending)})
            else:
                found = store.load(state.job_id)
                if found is None:  # never stored here: store it from the job state
                    with state._lock:
                        restore = {
                            "kind": "restore",
                            "emitted": [d.to_dict() for d in state._pending.values()],
                            "next_message_id": state._next_id,
                            "activations": state._activations,
                        }
                        store.create(state, plan.routines, [*state._history, restore])
                        state._history.append(restore)
                else:  # the store is the truth: continue from what it holds
                    stored, routine_ids = found
                    _check_flow(stored, plan, routine_ids)
                    _adopt(state, stored)
                    if state.status in FINISHED:
                        self._release(state.job_id)
                        return state
                    self._claim(state, store)
        except BaseException:
            self._release(state.job_id)
            raise
        return self._launch(state, plan, wait=wait)

    def _claim(self, state: JobState, store: JobStore) -> None:
        """Write a ``resume`` record with CAS: of two processes resuming a job, one wins."""
        with state._lock:
            record = {"kind": "resume", "pending": len(state._pending)}
            store.append(state, record, None, activations=state._activations)
            state._history.append(record)

    def _launch(self, state: JobState, plan: Plan, *, wait: bool) -> JobState:
        job = _Job(state, plan)
        with self._lock:
            self._starting.discard(state.job_id)
            self._jobs[state.job_id] = job
        with state._lock:
            state._runner = self
            state._settled.clear()
            state.status = JobStatus.RUNNING
            state.error = None
            queues = job.queues
            for delivery in state._pending.values():
                queues[delivery.dst][delivery.slot].append(delivery)
            try:
                for rid in plan.routines:
                    self._dispatch(job, rid)
            except FlowError as exc:  # a custom policy's bad selection
                job.stop, job.error = JobStatus.FAILED, _error(exc, rid)
                job.ready.clear()
            if not job.ready:
                self._settle(job)
            else:
                self._spawn(job, min(len(job.ready), self.thread_pool_size))
        if wait:
            state.wait()
        return state

    # -- internals: running ----------------------------------------------------------------------

    def _spawn(self, job: _Job, count: int) -> None:
        """Start ``count`` more worker loops for ``job`` (under its lock)."""
        job.workers += count
        for _ in range(count):
            self._executor.submit(self._work, job)

    def _work(self, job: _Job) -> None:
        try:
            self._work_loop(job)
        except BaseException as exc:  # a bug, not a routine's failure: stop the job cleanly
            logger.exception(
                "flujo.routines: job %r stopped by an internal error", job.state.job_id
            )
            with job.state._lock:
                if job.stop is None:
                    job.stop = JobStatus.FAILED
                    job.error = _error(exc, None)
                job.workers -= 1
                if job.workers == 0:
                    self._settle(job)

    def _work_loop(self, job: _Job) -> None:
        state = job.state
        lock = state._lock
        plan = job.plan
        routines = plan.routines
        local = _local
        with lock:
            item = self._take(job)
        while item is not None:
            rid, taken = item
            routine = routines[rid]
            consumed: list[Delivery] = []
            slot_data: dict[str, list[dict[str, Any]]] = {}
            for slot, deliveries in taken:
                slot_data[slot] = [delivery.data for delivery in deliveries]
                consumed += deliveries
            activation = Activation(state, plan, rid, routine)
            local.activation = activation
            failure: BaseException | None = None
            try:
                logic = routine._logic
                if logic is not None:
                    logic(slot_data, routine._policy.message, state)
            except BaseException as exc:
                failure = exc
            finally:
                local.activation = None
            with lock:
                if failure is None:
                    self._commit(job, activation, consumed)
                else:
                    self._failed(job, activation, consumed, failure)
                job.busy.discard(rid)
                self._dispatch(job, rid)
                item = self._take(job)

    def _take(self, job: _Job) -> tuple[str, _Taken] | None:
        """The next ready activation for this worker, or None (then the worker exits, and the
        last one out settles the job). Wakes helpers for the rest. Under the job's lock."""
        ready = job.ready
        if ready and job.stop is None:
            item = ready.popleft()
            if ready:
                spare = self.thread_pool_size - job.workers
                if spare > 0:
                    self._spawn(job, min(spare, len(ready)))
            return item
        job.workers -= 1
        if job.workers == 0:
            self._settle(job)
        return None

    def _commit(self, job: _Job, activation: Activation, consumed: list[Delivery]) -> None:
        """Commit an activation whose logic returned (under the job's lock)."""
        state = job.state
        routes = job.plan.routes
        next_id = state._next_id
        new: list[Delivery] = []
        for src, event, values in activation.emits:
            targets = routes[src].get(event)
            if targets:
                data = values
                for dst, slot in targets:
                    new.append(Delivery(next_id, src, event, dst, slot, data))
                    next_id += 1
                    data = dict(values)  # each further target gets its own copy
        rid = activation.rid
        seq = state._activations
        record = {
            "kind": "activation",
            "seq": seq,
            "routine": rid,
            "consumed": [delivery.id for delivery in consumed],
            "emitted": [delivery.to_dict() for delivery in new],
        }
        states = activation.states
        store = self._store
        if store is not None and not job.store_failed:
            try:
                store.append(state, record, states, activations=seq + 1)
            except SerializationError as exc:  # nothing written: the activation did not happen
                self._failed(job, activation, consumed, exc)
                return
            except FlujoError as exc:  # another writer won, or the store failed: stop here
                job.store_failed = isinstance(exc, StateConflictError)
                if job.stop is not JobStatus.FAILED:
                    job.stop = JobStatus.FAILED
                    job.error = _error(exc, rid)
                logger.error("flujo.routines: job %r cannot commit: %s", state.job_id, exc)
                return
        state._history.append(record)
        state._next_id = next_id
        state._activations = seq + 1
        pending = state._pending
        for delivery in consumed:
            del pending[delivery.id]
        if states:
            state._states.update(states)
        if new:
            queues = job.queues
            for delivery in new:
                pending[delivery.id] = delivery
                queues[delivery.dst][delivery.slot].append(delivery)
            for delivery in new:
                if delivery.dst not in job.busy:
                    self._dispatch(job, delivery.dst)

    def _failed(
        self, job: _Job, activation: Activation, consumed: list[Delivery], exc: BaseException
    ) -> None:
        """An activation's logic raised (or its results could not be stored): nothing of it is
        applied, its inputs stay pending, the job stops. Under the job's lock."""
        state = job.state
        rid = activation.rid
        error = _error(exc, rid)
        if isinstance(exc, PausedException):
            stop = JobStatus.PAUSED
        elif isinstance(exc, PipelineAbortSignal):
            stop = JobStatus.CANCELLED
        else:
            stop = JobStatus.FAILED
            record = {
                "kind": "failure",
                "routine": rid,
                "inputs": [delivery.id for delivery in consumed],
                "error": error,
            }
            store = self._store
            wrote = True
            if store is not None and not job.store_failed:
                try:
                    store.append(state, record, None, activations=state._activations)
                except FlujoError as store_error:
                    wrote = False
                    logger.error(
                        "flujo.routines: job %r: cannot record a failure: %s",
                        state.job_id,
                        store_error,
                    )
            if wrote:
                state._history.append(record)
            if not isinstance(exc, Exception):
                logger.error("flujo.routines: routine %r raised %r", rid, exc)
        if job.stop is None:
            job.stop = stop
            job.error = error

    def _dispatch(self, job: _Job, rid: str) -> None:
        """If routine ``rid`` is idle and its policy selects an activation, make it ready."""
        if rid in job.busy:
            return
        queues = job.queues[rid]
        selection = job.plan.routines[rid]._policy.select(queues)
        if not selection:
            return
        taken: _Taken = []
        for slot, count in selection:
            queue = queues.get(slot)
            if queue is None or not 1 <= count <= len(queue):
                raise FlowError(
                    f"the activation policy of routine {rid!r} selected {count!r} message(s) "
                    f"from slot {slot!r}, which holds {0 if queue is None else len(queue)}",
                    flow_id=job.plan.flow_id,
                )
            if count == 1:
                taken.append((slot, [queue.popleft()]))
            else:
                taken.append((slot, [queue.popleft() for _ in range(count)]))
        job.busy.add(rid)
        job.ready.append((rid, taken))

    def _settle(self, job: _Job) -> None:
        """Record the job's final status and wake its waiters (under the job's lock)."""
        state = job.state
        status = job.stop or JobStatus.COMPLETED
        error = job.error if status is not JobStatus.COMPLETED else None
        store = self._store
        if store is not None and not job.store_failed:
            try:
                store.set_status(state, status.value, error)
            except FlujoError as exc:  # the store keeps "running": resume finds the job
                logger.error(
                    "flujo.routines: job %r: cannot store status %s: %s",
                    state.job_id,
                    status.value,
                    exc,
                )
        state.status = status
        state.error = error
        state.updated_at = time.time()
        state._runner = None
        job.ready.clear()
        job.busy.clear()
        state._settled.set()
        with self._lock:
            self._jobs.pop(state.job_id, None)
            if not self._jobs and not self._starting:
                self._idle.notify_all()


def _error(exc: BaseException, rid: str | None) -> dict[str, Any]:
    message = getattr(exc, "message", None) if isinstance(exc, PausedException) else None
    return {
        "type": type(exc).__name__,
        "message": message if isinstance(message, str) else str(exc),
        "step": rid,
        "routine": rid,
    }


def _check_flow(state: JobState, plan: Plan, routine_ids: list[str] | None = None) -> None:
    """Refuse a job state of another flow, or one naming routines or slots the flow lacks."""

    def mismatch(reason: str) -> JobFlowMismatchError:
        return JobFlowMismatchError(
            f"job {state.job_id!r} cannot run on flow {plan.flow_id!r}: {reason}",
            job_id=state.job_id,
            flow_id=state.flow_id,
            expected_flow_id=plan.flow_id,
        )

    if state.flow_id != plan.flow_id:
        raise mismatch(f"it belongs to flow {state.flow_id!r}")
    routines = plan.routines
    if routine_ids is not None and set(routine_ids) != set(routines):
        raise mismatch(
            f"it was stored with routines {sorted(routine_ids)}, the flow has {sorted(routines)}"
        )
    for rid in state._states:
        if rid not in routines:
            raise mismatch(f"it has a state for routine {rid!r}, which the flow does not have")
    for delivery in state._pending.values():
        if delivery.slot not in plan.slots.get(delivery.dst, ()):
            raise mismatch(
                f"pending message {delivery.id} goes to {delivery.dst!r}.{delivery.slot}, "
                "which the flow does not have"
            )


def _adopt(target: JobState, source: JobState) -> None:
    """Make ``target`` hold what ``source`` (loaded from the store) holds."""
    with target._lock:
        target.status = source.status
        target.error = source.error
        target.entry_params = source.entry_params
        target.created_at = source.created_at
        target.updated_at = source.updated_at
        target._states = source._states
        target._history = source._history
        target._pending = source._pending
        target._next_id = source._next_id
        target._activations = source._activations
        target._version = source._version
        target._store = source._store
        target._stored_status = source._stored_status
