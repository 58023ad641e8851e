"""How a job lives in a flujo state backend: one run per job, one checkpoint per activation.

The mapping onto the public :class:`~flujo.state.backends.base.StateBackend` API:

- the run id is the job id; ``pipeline_name`` is the name the flow was run under (so jobs list
  in ``TaskClient.list_tasks`` next to pipeline runs); ``pipeline_id`` is ``"flujo.routines"``,
  ``pipeline_version`` :data:`JOB_VERSION`; ``step_names`` the flow's routine ids; the
  metadata ``{"kind": "routines_job", "flow_id": ...}``; the initial input the entry params;
- each routine's state is one context field, ``"routine.<routine id>"``;
- the step history holds the job's records: ``entry`` (the first checkpoint: the entry
  deliveries), then one ``activation`` record per committed activation::

      {"kind": "activation", "seq": 7, "routine": "r7", "consumed": [7],
       "emitted": [{"id": 8, "src": "r7", "event": "output", "dst": "r8", "slot": "input",
                    "data": {"x": 8}}]}

  and ``failure``, ``resume`` and ``restore`` records; ``current_step_index`` counts the
  committed activations.

Each activation is ONE checkpoint, a compare-and-swap on the run's version carrying its record
and the state fields it changed. The pending deliveries are never written as such: they are
every delivery emitted (since the last ``entry`` or ``restore`` record) minus those consumed,
derived when a job is loaded. So a checkpoint costs the same late in a long job as early.

Backends whose writes never suspend (SQLite, files, memory: ``writes_may_suspend = False``) are
written from the worker thread that ran the activation, without an event loop; the others
(Postgres) through one event loop thread per runtime, which owns their connections.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from flujo.exceptions import CorruptStateError, JobStateError, StateBackendError
from flujo.routines.job_state import Delivery, JobState, JobStatus, parse_delivery
from flujo.state.backends.base import (
    Checkpoint,
    RunHeader,
    StateBackend,
    encode_metadata,
    epoch,
    now,
)
from flujo.state.serialization import active_scrubber

__all__ = [
    "JOB_KIND",
    "JOB_VERSION",
    "PIPELINE_ID",
    "STATE_PREFIX",
    "JobStore",
    "derive_pending",
]

PIPELINE_ID = "flujo.routines"
#: The ``pipeline_version`` of every stored job: the version of this storage format.
JOB_VERSION = "routines/1"
JOB_KIND = "routines_job"
#: Context field name prefix of routine states.
STATE_PREFIX = "routine."

_T = TypeVar("_T")


class JobStore:
    """A :class:`StateBackend` as a runtime uses it, from its worker threads."""

    def __init__(self, backend: StateBackend) -> None:
        self.backend = backend
        self.serializer = backend.serializer
        self.inline = not backend.writes_may_suspend
        self.scrubber = active_scrubber()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- writes ----------------------------------------------------------------------------------

    def create(
        self,
        state: JobState,
        routine_ids: Iterable[str],
        records: list[dict[str, Any]],
    ) -> None:
        """The job's first checkpoint: header, routine states, ``records``; status running."""
        dumps = self.serializer.dumps
        header = RunHeader(
            pipeline_id=PIPELINE_ID,
            pipeline_name=state.flow_name or state.flow_id or "",
            pipeline_version=JOB_VERSION,
            step_names=dumps(list(routine_ids), "step_names"),
            initial_input=dumps(state.entry_params, "entry_params"),
            created_at=state.created_at,
            metadata=encode_metadata({"kind": JOB_KIND, "flow_id": state.flow_id}, self.serializer),
        )
        context = {
            STATE_PREFIX + rid: dumps(value, f"routine_states.{rid}")
            for rid, value in state._states.items()
        }
        steps = [dumps(record, f"history[{i}]") for i, record in enumerate(records)]
        self._write(
            state,
            Checkpoint(
                run_id=state.job_id,
                expected_version=0,
                status=JobStatus.RUNNING.value,
                current_step_index=state._activations,
                updated_at=now(),
                last_step_output=None,
                error=None,
                context=context,
                steps=steps,
                step_offset=0,
                header=header,
            ),
        )

    def append(
        self,
        state: JobState,
        record: dict[str, Any],
        states: Mapping[str, Any] | None,
        *,
        activations: int,
        status: str = JobStatus.RUNNING.value,
        error: dict[str, Any] | None = None,
    ) -> None:
        """One record (and the routine states it changed), with CAS on the stored version."""
        dumps = self.serializer.dumps
        where = f"job {state.job_id!r}, {record.get('kind')} of {record.get('routine')!r}"
        context = (
            {
                STATE_PREFIX + rid: dumps(value, f"routine_states.{rid}")
                for rid, value in states.items()
            }
            if states
            else {}
        )
        self._write(
            state,
            Checkpoint(
                run_id=state.job_id,
                expected_version=state._version,
                status=status,
                current_step_index=activations,
                updated_at=now(),
                last_step_output=None,
                error=None if error is None else dumps(error, "error"),
                context=context,
                steps=[dumps(record, where)],
                step_offset=len(state._history),
                status_changed=status != state._stored_status,
            ),
        )

    def set_status(self, state: JobState, status: str, error: dict[str, Any] | None) -> None:
        """The job's status (and error), with CAS on the stored version."""
        self._write(
            state,
            Checkpoint(
                run_id=state.job_id,
                expected_version=state._version,
                status=status,
                current_step_index=state._activations,
                updated_at=now(),
                last_step_output=None,
                error=None if error is None else self.serializer.dumps(error, "error"),
                step_offset=len(state._history),  # no record: keep every stored one
                status_changed=status != state._stored_status,
            ),
        )

    def _write(self, state: JobState, checkpoint: Checkpoint) -> None:
        if self.scrubber is not None:
            from flujo.governance import scrub_checkpoint  # noqa: PLC0415 - loaded with it

            checkpoint = scrub_checkpoint(checkpoint, self.scrubber)
        coro = self.backend.write_checkpoint(checkpoint)
        version = _drive(coro) if self.inline else self.call(coro)
        state._version = version
        state._store = self.backend
        state._stored_status = checkpoint.status

    # -- reads -----------------------------------------------------------------------------------

    def load(self, job_id: str) -> tuple[JobState, list[str]] | None:
        """The stored job (and its recorded routine ids), or None when there is no such run."""
        stored = self.call(self.backend.load_state(job_id))
        if stored is None:
            return None
        return job_state_from_run(job_id, stored), _names(job_id, stored.get("step_names"))

    # -- the event loop thread -------------------------------------------------------------------

    def call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on this store's event loop thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._running_loop()).result()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=loop.run_forever, name="flujo-routines-store", daemon=True
                )
                self._thread.start()
            return loop

    def close(self) -> None:
        """Release the backend's connections (on the loop that opened them); stop the loop."""
        try:
            if self.inline and self._loop is None:
                _drive(self.backend.aclose())
            else:
                self.call(self.backend.aclose())
        finally:
            with self._lock:
                loop, thread = self._loop, self._thread
                self._loop = self._thread = None
            if loop is not None and thread is not None:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
                loop.close()


def _drive(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine that never suspends (a write of a backend with ``writes_may_suspend``
    False) to its end on this thread, without an event loop."""
    advice = "a state backend with writes_may_suspend = False must not await I/O in a write"
    try:
        while True:
            if coro.send(None) is not None:  # a real suspension (a bare yield is harmless)
                break
    except StopIteration as stop:
        result: _T = stop.value
        return result
    except RuntimeError as exc:  # it needed an event loop ("no running event loop")
        raise StateBackendError(f"{advice} ({exc}); set writes_may_suspend = True") from exc
    coro.close()
    raise StateBackendError(f"{advice}; set writes_may_suspend = True on it")


# -- loading ---------------------------------------------------------------------------------------


def job_state_from_run(job_id: str, stored: Mapping[str, Any]) -> JobState:
    """A JobState from a stored run (``StateBackend.load_state``), pending derived."""
    metadata = stored.get("metadata") or {}
    if stored.get("pipeline_id") != PIPELINE_ID or metadata.get("kind") != JOB_KIND:
        raise JobStateError(
            f"run {job_id!r} is not a routines job (pipeline {stored.get('pipeline_name')!r}): "
            "resume it with the pipeline runner or TaskClient.resume_task",
            job_id=job_id,
        )
    if stored.get("pipeline_version") != JOB_VERSION:
        raise JobStateError(
            f"job {job_id!r} was stored as {stored.get('pipeline_version')!r}; this flujo "
            f"reads {JOB_VERSION!r}",
            job_id=job_id,
        )
    flow_id = metadata.get("flow_id")
    entry = stored.get("initial_input")
    name = stored.get("pipeline_name")
    context = stored.get("pipeline_context") or {}
    records = stored.get("step_history") or []
    try:
        status = JobStatus(str(stored.get("status")))
    except ValueError:
        raise _corrupt(job_id, f"status {stored.get('status')!r}") from None
    if not isinstance(flow_id, str) or not isinstance(name, str):
        raise _corrupt(job_id, "flow id or name")
    if entry is not None and not isinstance(entry, dict):
        raise _corrupt(job_id, "entry params")
    state = JobState(job_id, flow_id, flow_name=name, entry_params=entry)
    state.status = status
    error = stored.get("error")
    state.error = error if isinstance(error, dict) else None
    for key in ("created_at", "updated_at"):
        value = stored.get(key)
        if isinstance(value, datetime):
            setattr(state, key, epoch(value))
    for field, value in context.items():
        if not field.startswith(STATE_PREFIX):
            continue
        if not isinstance(value, dict):
            raise _corrupt(job_id, f"routine state {field!r}")
        state._states[field[len(STATE_PREFIX) :]] = value
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise _corrupt(job_id, "history")
    state._history = list(records)
    state._pending, state._next_id, state._activations = derive_pending(job_id, records)
    version = stored.get("version")
    state._version = version if isinstance(version, int) else None
    state._stored_status = status.value
    return state


def derive_pending(
    job_id: str, records: Iterable[Mapping[str, Any]]
) -> tuple[dict[int, Delivery], int, int]:
    """(pending deliveries by id, next message id, committed activations) from a job's
    records: every delivery emitted since the last ``entry``/``restore`` record, minus those
    consumed since."""
    pending: dict[int, Delivery] = {}
    next_id = 0
    activations = 0
    for i, record in enumerate(records):
        kind = record.get("kind")
        if kind in ("entry", "restore"):
            pending = {}
            base_next = record.get("next_message_id", 0)
            base_count = record.get("activations", activations)
            if not _whole(base_next) or not _whole(base_count):
                raise _corrupt(job_id, f"history[{i}] counters")
            next_id = max(next_id, base_next)
            activations = base_count
        emitted = record.get("emitted", [])
        consumed = record.get("consumed", [])
        if not isinstance(emitted, list) or not isinstance(consumed, list):
            raise _corrupt(job_id, f"history[{i}]")
        for item in emitted:
            delivery = parse_delivery(item)
            if delivery is None:
                raise _corrupt(job_id, f"history[{i}].emitted")
            pending[delivery.id] = delivery
            next_id = max(next_id, delivery.id + 1)
        for ident in consumed:
            if not _whole(ident):
                raise _corrupt(job_id, f"history[{i}].consumed")
            pending.pop(ident, None)
        if kind == "activation":
            activations += 1
    return dict(sorted(pending.items())), next_id, activations


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _names(job_id: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _corrupt(job_id, "routine ids (step_names)")
    return value


def _corrupt(job_id: str, what: str) -> CorruptStateError:
    return CorruptStateError(f"stored job {job_id!r} is corrupt: unreadable {what}", run_id=job_id)
