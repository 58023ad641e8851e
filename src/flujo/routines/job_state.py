"""JobState: one execution of a flow: its status, routine states, history and pending messages.

A job state keeps two kinds of data apart:

- **routine states**, the application's: what routines remember across activations
  (``get_routine_state(rid)``, ``update_routine_state(rid, values)``), one JSON object per
  routine;
- **engine bookkeeping**: the status, the entry params, the execution history (one record per
  activation, listing the messages it consumed and emitted) and the pending deliveries
  (messages emitted and not yet consumed).

``serialize()`` returns all of it as JSON data (``save(path)`` writes that to a file atomically);
``JobState.deserialize(data)`` / ``JobState.load(path)`` read it back, checking its shape, and
never call anything named in it. ``Runtime.exec(flow_name, job_state=...)`` runs a completed job
state's flow again with its routine states, and continues an interrupted one from its pending
deliveries.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson

from flujo.exceptions import InvalidRoutineIdError, JobStateError
from flujo.routines.activation import _local
from flujo.routines.routine import check_id
from flujo.state.backends.base import validate_run_id
from flujo.state.serialization import Serializer

__all__ = ["JOB_FORMAT", "Delivery", "JobState", "JobStatus"]

#: The ``format`` tag of serialized job states.
JOB_FORMAT = "flujo.routines.job_state/1"
_SERIALIZER = Serializer()


class JobStatus(StrEnum):
    """Where a job stands. ``str(status)`` is its value (``"completed"``)."""

    PENDING = "pending"
    """Created, not started."""
    RUNNING = "running"
    PAUSED = "paused"
    """Stopped by ``Runtime.pause_job`` or ``Runtime.shutdown(wait=False)``; continue it with
    ``Runtime.resume`` or ``Runtime.exec(..., job_state=...)``."""
    COMPLETED = "completed"
    """No activation is running and none can start."""
    FAILED = "failed"
    """A routine's logic raised (see ``error``); its inputs are still pending."""
    CANCELLED = "cancelled"


FINISHED = frozenset({JobStatus.COMPLETED, JobStatus.CANCELLED})


class Delivery:
    """A message on its way to a slot: emitted by ``src``'s ``event`` (both None for entry
    params), for ``dst``'s ``slot``. ``id`` orders messages within a job."""

    __slots__ = ("data", "dst", "event", "id", "slot", "src")

    def __init__(
        self,
        id: int,
        src: str | None,
        event: str | None,
        dst: str,
        slot: str,
        data: dict[str, Any],
    ) -> None:
        self.id = id
        self.src = src
        self.event = event
        self.dst = dst
        self.slot = slot
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "src": self.src,
            "event": self.event,
            "dst": self.dst,
            "slot": self.slot,
            "data": self.data,
        }

    def __repr__(self) -> str:
        return f"Delivery({self.id}, {self.src!r}.{self.event} -> {self.dst!r}.{self.slot})"


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobState:
    """The state of one job (see the module docstring)."""

    def __init__(
        self,
        job_id: str | None = None,
        flow_id: str | None = None,
        *,
        flow_name: str | None = None,
        entry_params: Mapping[str, Any] | None = None,
    ) -> None:
        self.job_id: str = new_job_id() if job_id is None else validate_run_id(job_id)
        self.flow_id: str | None = None if flow_id is None else check_id(flow_id, "flow id")
        self.flow_name: str | None = flow_name if flow_name is not None else self.flow_id
        """The name the flow was run under (``Runtime.exec``'s first argument)."""
        self.status: JobStatus = JobStatus.PENDING
        self.error: dict[str, Any] | None = None
        """Why the job failed, paused or was cancelled: ``{"type", "message", "step",
        "routine"}`` (``step`` and ``routine`` name the routine), else None."""
        self.entry_params: dict[str, Any] | None = (
            None if entry_params is None else dict(entry_params)
        )
        self.created_at: float = time.time()
        self.updated_at: float = self.created_at
        self._states: dict[str, dict[str, Any]] = {}
        self._history: list[dict[str, Any]] = []
        self._pending: dict[int, Delivery] = {}  # by id, in id order
        self._next_id = 0
        self._activations = 0
        self._lock = threading.Lock()  # the job's commit lock (held by the runtime)
        self._settled = threading.Event()
        self._settled.set()
        self._runner: object | None = None  # the runtime running this job, if any
        self._version: int | None = None  # the store version this process last committed
        self._store: object | None = None  # the backend that version belongs to
        self._stored_status: str | None = None  # the status last written there

    # -- routine states --------------------------------------------------------------------------

    def get_routine_state(self, routine_id: str, default: Any = None) -> Any:
        """Routine ``routine_id``'s state (a copy), or ``default`` if it has none. In logic,
        this includes the running activation's own updates."""
        activation = _local.activation
        if activation is not None and activation.state is self and activation.states:
            found = activation.states.get(routine_id)
            if found is not None:
                return dict(found)
        found = self._states.get(routine_id)
        return default if found is None else dict(found)

    def update_routine_state(self, routine_id: str, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into routine ``routine_id``'s state.

        In logic, the update belongs to the running activation: it is applied (and stored)
        when the activation commits, together with the messages it emitted, and dropped if the
        logic raises. Outside logic it applies at once, and only while the job is not running.
        """
        if not isinstance(values, Mapping):
            raise JobStateError(
                f"update_routine_state({routine_id!r}, values): values must be a mapping, got "
                f"{type(values).__name__}",
                job_id=self.job_id,
            )
        activation = _local.activation
        if activation is not None and activation.state is self:
            if routine_id not in activation.plan.routines:
                raise JobStateError(
                    f"update_routine_state: flow {self.flow_id!r} has no routine {routine_id!r}",
                    job_id=self.job_id,
                )
            states = activation.states
            if states is None:
                states = activation.states = {}
            current = states.get(routine_id)
            if current is None:
                current = self._states.get(routine_id) or {}
            states[routine_id] = {**current, **values}
            return
        check_id(routine_id, "routine id", flow_id=self.flow_id)
        with self._lock:
            if self._runner is not None:
                raise JobStateError(
                    f"job {self.job_id!r} is running: update routine states from routine logic",
                    job_id=self.job_id,
                )
            self._states[routine_id] = {**self._states.get(routine_id, {}), **values}

    # -- reading ---------------------------------------------------------------------------------

    @property
    def routine_states(self) -> dict[str, dict[str, Any]]:
        """Every routine's state, by routine id (copies)."""
        with self._lock:
            return {rid: dict(state) for rid, state in self._states.items()}

    @property
    def history(self) -> list[dict[str, Any]]:
        """The execution history: one record per activation (``{"kind": "activation",
        "seq", "routine", "consumed": [message ids], "emitted": [deliveries]}``), preceded by
        the ``"entry"`` record of the entry deliveries; also ``"failure"``, ``"resume"`` and
        ``"restore"`` records."""
        with self._lock:
            return list(self._history)

    @property
    def pending(self) -> list[dict[str, Any]]:
        """Messages emitted and not yet consumed (including those a running activation took),
        oldest first: ``{"id", "src", "event", "dst", "slot", "data"}``."""
        with self._lock:
            return [delivery.to_dict() for delivery in self._pending.values()]

    @property
    def activations(self) -> int:
        """How many activations have committed."""
        return self._activations

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the job is not running; False if ``timeout`` (seconds) ran out first."""
        return self._settled.wait(timeout)

    def __repr__(self) -> str:
        return (
            f"JobState(job_id={self.job_id!r}, flow_id={self.flow_id!r}, "
            f"status={self.status.value!r})"
        )

    # -- serialization ---------------------------------------------------------------------------

    def serialize(self) -> dict[str, Any]:
        """The whole job state as JSON data (a consistent snapshot, even while running).

        Raises :class:`~flujo.exceptions.SerializationError` naming the path of a value that is
        not JSON data (routine states and message values should be).
        """
        with self._lock:
            raw: dict[str, Any] = {
                "format": JOB_FORMAT,
                "job_id": self.job_id,
                "flow_id": self.flow_id,
                "flow_name": self.flow_name,
                "status": self.status.value,
                "error": self.error,
                "entry_params": self.entry_params,
                "created_at": self.created_at,
                "updated_at": self.updated_at,
                "routine_states": dict(self._states),
                "pending": [delivery.to_dict() for delivery in self._pending.values()],
                "next_message_id": self._next_id,
                "activations": self._activations,
                "history": list(self._history),
            }
        data: dict[str, Any] = orjson.loads(_SERIALIZER.dumps(raw, "job_state"))
        return data

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> JobState:
        """A job state from :meth:`serialize`'s data; raises
        :class:`~flujo.exceptions.JobStateError` (or ``InvalidRunIdError`` for a bad job id)
        when the data does not have that shape."""
        if not isinstance(data, Mapping):
            raise JobStateError(
                f"serialized job state must be a mapping, got {type(data).__name__}: use "
                "JobState.deserialize(data) on what job_state.serialize() returned",
                job_id=None,
            )
        job_id = validate_run_id(data.get("job_id"))

        def bad(path: str, what: str) -> JobStateError:
            return JobStateError(f"job state {job_id!r}: {path} {what}", job_id=job_id)

        if data.get("format") != JOB_FORMAT:
            raise bad("format", f"must be {JOB_FORMAT!r}, found {data.get('format')!r}")
        try:
            copy = orjson.loads(orjson.dumps(dict(data)))
        except (TypeError, ValueError) as exc:
            raise bad("data", f"is not JSON data: {exc}") from exc
        try:
            flow_id = copy.get("flow_id")
            state = cls(job_id, None if flow_id is None else check_id(flow_id, "flow id"))
        except InvalidRoutineIdError as exc:
            raise bad("flow_id", "is not a valid flow id") from exc
        flow_name = copy.get("flow_name")
        if flow_name is not None and not isinstance(flow_name, str):
            raise bad("flow_name", "must be a string or null")
        state.flow_name = flow_name
        try:
            state.status = JobStatus(copy.get("status"))
        except ValueError:
            raise bad("status", f"must be one of {[s.value for s in JobStatus]}") from None
        for key in ("error", "entry_params"):
            if copy.get(key) is not None and not isinstance(copy[key], dict):
                raise bad(key, "must be an object or null")
        state.error = copy.get("error")
        state.entry_params = copy.get("entry_params")
        for key in ("created_at", "updated_at"):
            value = copy.get(key, state.created_at)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(key, "must be a number (seconds since the epoch)")
            setattr(state, key, float(value))
        states = copy.get("routine_states", {})
        if not isinstance(states, dict):
            raise bad("routine_states", "must be an object")
        for rid, value in states.items():
            if not isinstance(value, dict):
                raise bad(f"routine_states.{rid}", "must be an object")
            try:
                check_id(rid, "routine id")
            except InvalidRoutineIdError as exc:
                raise bad("routine_states", f"has an invalid routine id: {exc}") from exc
        state._states = states
        history = copy.get("history", [])
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise bad("history", "must be a list of objects")
        state._history = history
        pending = copy.get("pending", [])
        if not isinstance(pending, list):
            raise bad("pending", "must be a list")
        for i, item in enumerate(pending):
            delivery = parse_delivery(item)
            if delivery is None:
                raise bad(f"pending[{i}]", "is not a delivery {id, src, event, dst, slot, data}")
            if delivery.id in state._pending:
                raise bad(f"pending[{i}]", f"repeats message id {delivery.id}")
            state._pending[delivery.id] = delivery
        state._pending = dict(sorted(state._pending.items()))
        highest = max(state._pending, default=-1)
        for key, least in (("next_message_id", highest + 1), ("activations", 0)):
            value = copy.get(key, least)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise bad(key, f"must be a whole number >= {least}")
        state._next_id = copy.get("next_message_id", highest + 1)
        state._activations = copy.get("activations", 0)
        return state

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`serialize`'s data to ``path`` as JSON, atomically (a temporary file in
        the same directory, fsynced, renamed over ``path``, directory fsynced)."""
        target = Path(path)
        data = orjson.dumps(self.serialize(), option=orjson.OPT_INDENT_2)
        directory = target.parent if str(target.parent) else Path()
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, target)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        _fsync_directory(directory)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> JobState:
        """A job state from a file :meth:`save` wrote."""
        raw = Path(path).read_bytes()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise JobStateError(f"{path}: not a JSON job state ({exc})", job_id=None) from exc
        return cls.deserialize(data)


def parse_delivery(item: Any) -> Delivery | None:
    """A delivery from its JSON form (``Delivery.to_dict``), or None if malformed."""
    if not isinstance(item, dict):
        return None
    ident, src, event = item.get("id"), item.get("src"), item.get("event")
    dst, slot, data = item.get("dst"), item.get("slot"), item.get("data")
    if isinstance(ident, bool) or not isinstance(ident, int) or ident < 0:
        return None
    if not (isinstance(dst, str) and isinstance(slot, str) and isinstance(data, dict)):
        return None
    if not (src is None or isinstance(src, str)) or not (event is None or isinstance(event, str)):
        return None
    return Delivery(ident, src, event, dst, slot, data)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
