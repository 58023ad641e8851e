"""The storage interface every state backend implements.

A backend stores one record per run. The spec's three methods are the whole contract a custom
backend must meet::

    from flujo.state.backends.base import StateBackend

    class MyBackend(StateBackend):
        async def save_state(self, run_id: str, state: dict[str, Any]) -> None: ...
        async def load_state(self, run_id: str) -> dict[str, Any] | None: ...
        async def delete_state(self, run_id: str) -> None: ...

The runner writes through :meth:`StateBackend.write_checkpoint`, which carries only what changed
since the last checkpoint (new step records, changed context fields). The built-in backends
apply it incrementally in one transaction with a compare-and-swap on the run's ``version``; the
default implementation here rebuilds the whole state and calls :meth:`save_state`, which is
correct for a single process but not atomic across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import orjson

from flujo.exceptions import (
    ConfigurationError,
    CorruptStateError,
    InvalidMetadataError,
    InvalidRunIdError,
    SerializationError,
    StateConflictError,
)
from flujo.state.serialization import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    Default,
    Serializer,
    active_scrubber,
)

if TYPE_CHECKING:
    from flujo.state.models import Evaluation

__all__ = [
    "MAX_RUN_ID_LENGTH",
    "Checkpoint",
    "RunHeader",
    "StateBackend",
    "epoch",
    "now",
    "to_datetime",
    "validate_run_id",
]

MAX_RUN_ID_LENGTH = 128
_RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")

#: The fields of a run summary, as returned by :meth:`StateBackend.list_runs`.
SUMMARY_FIELDS = (
    "run_id",
    "pipeline_id",
    "pipeline_name",
    "pipeline_version",
    "status",
    "current_step_index",
    "version",
    "created_at",
    "updated_at",
    "metadata",
    "error",
    "usage",
    "queue",
    "priority",
    "locked_by",
    "lease_expires_at",
    "cancel_requested",
)

MAX_METADATA_KEY_LENGTH = 64
_METADATA_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
#: JSON types a metadata filter may compare against.
MetadataValue = str | int | float | bool | None


_QUEUE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


#: A worker entry not refreshed for this long (a killed worker's) is removed when any worker
#: registers or heartbeats.
WORKER_FORGET_S = 3600.0


def validate_queue_name(queue: object) -> str:
    """Return ``queue`` if it can name a queue: 1-64 of ``A-Z a-z 0-9 _ . -``, not starting
    with ``.`` or ``-``.

    >>> validate_queue_name("default")
    'default'
    """
    if not isinstance(queue, str) or _QUEUE_NAME.fullmatch(queue) is None:
        raise ConfigurationError(
            f"invalid queue name {queue!r}: use 1-64 letters, digits, '_', '.' or '-', not "
            "starting with '.' or '-'"
        )
    return queue


def validate_metadata_key(key: object) -> str:
    """Return ``key`` if it can name run metadata: 1-64 of ``A-Z a-z 0-9 _ . -``.

    Keys never reach SQL text or a JSON path unchecked; values are always bound parameters.

    >>> validate_metadata_key("user_id")
    'user_id'
    """
    if (
        not isinstance(key, str)
        or len(key) > MAX_METADATA_KEY_LENGTH
        or _METADATA_KEY.fullmatch(key) is None
    ):
        shown = repr(key if not isinstance(key, str) or len(key) <= 60 else key[:60] + "...")
        raise InvalidMetadataError(
            f"invalid metadata key {shown}: use 1-{MAX_METADATA_KEY_LENGTH} letters, digits, "
            "'_', '.' or '-', not starting with '.' or '-'",
            key=str(key),
        )
    return key


def metadata_filter_items(metadata_filter: Mapping[str, Any] | None) -> list[tuple[str, bytes]]:
    """A metadata filter as (key, canonical JSON of the value) pairs, checked.

    Each key must equal its value (JSON scalars only: str, int, float, bool, None).
    """
    if not metadata_filter:
        return []
    if not isinstance(metadata_filter, Mapping):
        raise InvalidMetadataError("a metadata filter must be a mapping", key="")
    items = []
    for key, value in metadata_filter.items():
        validate_metadata_key(key)
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise InvalidMetadataError(
                f"metadata filter {key!r}: only strings, numbers, booleans and None can be "
                f"compared, got {type(value).__name__}",
                key=key,
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidMetadataError(
                f"metadata filter {key!r}: {value!r} is not a finite number", key=key
            )
        try:
            items.append((key, _canonical(value)))
        except TypeError as exc:  # a lone surrogate, an int over 64 bits
            raise InvalidMetadataError(f"metadata filter {key!r}: {exc}", key=key) from exc
    return items


def metadata_index(metadata: bytes) -> list[tuple[str, bytes]]:
    """The (key, canonical JSON) pairs of a run's metadata that filters can match (scalars)."""
    data = orjson.loads(metadata)
    return [
        (key, _canonical(value))
        for key, value in data.items()
        if value is None or isinstance(value, (str, int, float, bool))
    ]


def _canonical(value: MetadataValue) -> bytes:
    """One JSON spelling per value, so that equal numbers match (3 == 3.0, as JSON has it)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    return orjson.dumps(value)


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is safe everywhere (as a file name, a key, a SQL value).

    A run id is 1 to 128 characters from ``A-Z a-z 0-9 . _ -`` and does not start with ``.``,
    so ``.``, ``..``, separators, NUL and other control characters can never appear.

    >>> validate_run_id("run-2026_11.a")
    'run-2026_11.a'
    >>> validate_run_id("../etc/passwd")
    Traceback (most recent call last):
    ...
    flujo.exceptions.InvalidRunIdError: invalid run id '../etc/passwd': ...
    """
    if not isinstance(run_id, str):
        raise InvalidRunIdError(
            f"a run id must be a string, got {type(run_id).__name__}", run_id=repr(run_id)
        )
    shown = repr(run_id if len(run_id) <= 60 else run_id[:60] + "...")
    if not run_id:
        raise InvalidRunIdError("invalid run id '': it is empty", run_id=run_id)
    if len(run_id) > MAX_RUN_ID_LENGTH:
        raise InvalidRunIdError(
            f"invalid run id {shown}: longer than {MAX_RUN_ID_LENGTH} characters", run_id=run_id
        )
    if _RUN_ID.fullmatch(run_id) is None:
        raise InvalidRunIdError(
            f"invalid run id {shown}: use only letters, digits, '.', '_' and '-', "
            "and do not start with '.'",
            run_id=run_id,
        )
    return run_id


def now() -> float:
    """The current time as stored: seconds since the Unix epoch."""
    return time.time()


def to_datetime(value: float) -> datetime:
    """A stored timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(value, UTC)


def epoch(value: datetime) -> float:
    """A datetime as stored (epoch seconds). A naive datetime is local time, everywhere (as
    Python's ``datetime.timestamp()`` and ``datetime.now()`` have it)."""
    stamp: float = value.timestamp()
    return stamp


@dataclass(slots=True)
class RunHeader:
    """What a run records once, when it is created."""

    pipeline_id: str
    pipeline_name: str
    pipeline_version: str
    step_names: bytes
    """JSON list of the pipeline's step names."""
    initial_input: bytes
    """JSON of the run's first input."""
    created_at: float
    """Seconds since the Unix epoch."""
    metadata: bytes = b"{}"
    """JSON object of the run's metadata (keys checked by :func:`validate_metadata_key`)."""
    queue: str | None = None
    """The queue a queued run waits in for a worker (None: a run that is not queued)."""
    priority: int = 0
    """Higher runs first among the queued runs of a queue."""


class Claim(NamedTuple):
    """A run a worker claimed: its id and the pipeline version it runs."""

    run_id: str
    pipeline_name: str
    pipeline_version: str


@dataclass(slots=True)
class Checkpoint:
    """One atomic change to a stored run: what changed since ``expected_version``.

    All JSON values arrive already serialized (``bytes``), by the backend's own serializer.
    """

    run_id: str
    expected_version: int | None
    """The version the writer last saw (0: the run must not exist yet; None: no check)."""
    status: str
    current_step_index: int
    updated_at: float
    """Seconds since the Unix epoch."""
    last_step_output: bytes | None
    """JSON of the newest step output, or None to keep the stored one."""
    error: bytes | None
    """JSON of the run's error ({"type", "message", "step"}), or None for no error."""
    context: dict[str, bytes] = field(default_factory=dict)
    """Context fields that changed, serialized; others keep their stored value."""
    steps: list[bytes] = field(default_factory=list)
    """New step records to append, serialized, in order."""
    step_offset: int = 0
    """The position in the run's step history of ``steps[0]``."""
    header: RunHeader | None = None
    """Set when the run is created (or replaced by ``save_state``)."""
    replace: bool = False
    """Drop every stored context field and step record first (a whole-state save)."""
    version: int | None = None
    """The version to store; None means one more than the stored (or expected) version."""
    status_changed: bool = True
    """False when ``status`` is the one already stored (lets SQL skip the status index)."""
    usage: bytes | None = None
    """JSON of the run's usage so far (agent requests, tokens, cost), or None to keep the
    stored one."""

    def new_version(self, stored: int) -> int:
        """The version this checkpoint stores, given the one in the store."""
        if self.version is not None:
            return self.version
        return stored + 1


class StateBackend(ABC):
    """Abstract interface for workflow state persistence.

    ``writes_may_suspend`` tells the runner whether :meth:`write_checkpoint` awaits anything
    (network I/O): if it does, the runner lets a started write finish even when the step that
    asked for it is cancelled, so its outcome is never unknown. Backends whose writes run
    without suspending (SQLite, files, memory) set it to False to skip that protection.

    ``serializer_default`` replaces :func:`~flujo.state.serialization.flujo_default_serializer`
    for values orjson cannot serialize natively; ``max_payload_bytes`` bounds one serialized
    value (a context field, a step output, a step record).
    """

    writes_may_suspend: ClassVar[bool] = True

    def __init__(
        self,
        *,
        serializer_default: Default | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self.serializer = Serializer(serializer_default, max_bytes=max_payload_bytes)

    @abstractmethod
    async def save_state(self, run_id: str, state: dict[str, Any]) -> None:
        """Store ``state`` (a :class:`~flujo.state.models.WorkflowState` as a dict), whole."""

    @abstractmethod
    async def load_state(self, run_id: str) -> dict[str, Any] | None:
        """The stored state of ``run_id`` as a dict, or None when there is none."""

    @abstractmethod
    async def delete_state(self, run_id: str) -> None:
        """Forget ``run_id``; deleting an absent run does nothing."""

    async def list_runs(
        self,
        *,
        status: str | None = None,
        pipeline_name: str | None = None,
        metadata_filter: Mapping[str, MetadataValue] | None = None,
        since: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Summaries of stored runs, newest first (by creation; keys: ``SUMMARY_FIELDS``).

        ``metadata_filter`` keeps runs whose metadata holds each key with an equal value;
        ``since`` keeps runs created at or after it; ``offset`` and ``limit`` page the result.
        """
        raise NotImplementedError(f"{type(self).__name__} does not list runs")

    async def delete_runs(self, *, updated_before: datetime, status: str | None = None) -> int:
        """Delete runs last updated before ``updated_before`` (of ``status``); return how many."""
        raise NotImplementedError(f"{type(self).__name__} does not delete runs in bulk")

    # -- queues and workers (SQLite and Postgres) ---------------------------------------------
    #
    # A queued run has a ``queue``; a worker claims it (status ``running``, ``locked_by``, a
    # lease until ``lease_expires_at``, and one more ``version``, so a worker that lost the
    # run can no longer checkpoint it), renews the lease while it works, and releases it.

    supports_queues: ClassVar[bool] = False
    """Whether this backend can queue runs for workers."""

    async def claim_runs(
        self,
        *,
        worker_id: str,
        queues: Sequence[str],
        limit: int,
        lease_s: float,
        pipelines: Collection[str] | None = None,
        exclude: Collection[str] = (),
    ) -> list[Claim]:
        """Claim up to ``limit`` runs of ``queues`` (highest priority, then oldest first):
        queued runs, and running runs whose lease expired. ``pipelines`` (``"name@version"``)
        restricts the claim to runs of those pipeline versions; runs in ``exclude`` (the ones
        the worker is running) are never claimed, even with an expired lease. Per-queue
        concurrency limits (:meth:`set_queue_limit`) hold across all workers. Returns the
        claimed runs."""
        raise NotImplementedError(f"{type(self).__name__} does not queue runs")

    async def renew_leases(
        self, *, worker_id: str, run_ids: Sequence[str], lease_s: float
    ) -> dict[str, bool]:
        """Extend the leases ``worker_id`` still holds among ``run_ids``: returns, for each run
        still held, whether its cancellation was requested (a run missing was lost)."""
        raise NotImplementedError(f"{type(self).__name__} does not queue runs")

    async def release_runs(self, *, worker_id: str, run_ids: Sequence[str]) -> None:
        """Give up the leases ``worker_id`` holds on ``run_ids`` (a running run becomes
        claimable at once)."""
        raise NotImplementedError(f"{type(self).__name__} does not queue runs")

    async def requeue_run(
        self, run_id: str, *, queue: str | None = None, priority: int | None = None
    ) -> bool:
        """Put a failed (or running but unleased) run back in its queue (or ``queue``); a
        queued run with no queue (a local background task that never started) is put in
        ``queue``. False if the run is not there, in another state, or has no queue."""
        raise NotImplementedError(f"{type(self).__name__} does not queue runs")

    async def request_cancel(self, run_id: str) -> str | None:
        """Cancel a run: a queued or paused one at once (status ``cancelled``); a running one
        is flagged and stops at its next step boundary. Returns the run's status after the
        request (``cancelled``, ``running``, or the finished status), None for no such run."""
        raise NotImplementedError(f"{type(self).__name__} does not queue runs")

    async def set_queue_limit(self, queue: str, limit: int | None) -> None:
        """At most ``limit`` runs of ``queue`` run at once, across all workers (None: no
        limit)."""
        raise NotImplementedError(f"{type(self).__name__} does not queue runs")

    async def queue_limits(self) -> dict[str, int]:
        """The concurrency limit of each queue that has one."""
        raise NotImplementedError(f"{type(self).__name__} does not queue runs")

    async def next_lease_expiry(self, queues: Sequence[str]) -> float | None:
        """When the earliest lease of a running run of ``queues`` expires (store clock, epoch
        seconds), or None: a worker waits until then to take over a dead worker's runs."""
        raise NotImplementedError(f"{type(self).__name__} does not queue runs")

    async def store_time(self) -> float:
        """The store's clock (epoch seconds): leases are measured on it, not on each host's."""
        return now()

    async def register_worker(self, worker_id: str, info: Mapping[str, Any]) -> None:
        """Record (or refresh) a live worker: its queues, pipelines, concurrency, host."""
        raise NotImplementedError(f"{type(self).__name__} does not queue runs")

    async def remove_worker(self, worker_id: str) -> None:
        """Forget a worker that stopped."""
        raise NotImplementedError(f"{type(self).__name__} does not queue runs")

    async def list_workers(self) -> list[dict[str, Any]]:
        """Registered workers: ``worker_id``, ``info``, ``started_at``, ``heartbeat_at``."""
        raise NotImplementedError(f"{type(self).__name__} does not queue runs")

    async def notify_work(self, queue: str) -> None:  # noqa: B027 - optional: others poll
        """Wake the workers waiting on ``queue`` (a run was queued or released)."""

    async def notify_cancel(self, run_id: str) -> None:  # noqa: B027 - optional: others poll
        """Tell the worker running ``run_id`` that its cancellation was requested."""

    async def wait_for_work(self, timeout_s: float) -> set[str]:
        """Wait until work may be waiting (a notification) or ``timeout_s`` passed; returns
        the run ids whose cancellation was announced meanwhile."""
        await asyncio.sleep(timeout_s)
        return set()

    async def save_evaluation(self, evaluation: Evaluation) -> None:
        """Store a shadow evaluation's score (the ``evaluations`` table)."""
        raise NotImplementedError(f"{type(self).__name__} does not store evaluations")

    async def list_evaluations(
        self,
        *,
        run_id: str | None = None,
        step_name: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Evaluation]:
        """Stored evaluations, newest first, filtered by run, step name and creation time."""
        raise NotImplementedError(f"{type(self).__name__} does not store evaluations")

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        """Apply ``checkpoint`` atomically; return the new version.

        Raises :class:`~flujo.exceptions.StateConflictError` (writing nothing) when the stored
        version is not ``checkpoint.expected_version``. This default goes through
        :meth:`load_state` and :meth:`save_state`; the built-in backends override it with a
        single transaction that writes only what changed.
        """
        current = await self.load_state(checkpoint.run_id)
        stored_version = 0 if current is None else int(current.get("version", 0))
        check_version(checkpoint, stored_version if current is not None else None)
        state = apply_to_dict(current, checkpoint, self.serializer)
        await self.save_state(checkpoint.run_id, state)
        return int(state["version"])

    async def migrate(self) -> list[int]:
        """Bring the store's schema up to date; return the numbers of the migrations applied.

        Stores without a schema (memory, files) have nothing to do.
        """
        return []

    async def schema_version(self) -> int | None:
        """The store's schema version, or None for stores without a schema."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections and files. The backend reopens them if used again."""

    async def __aenter__(self) -> StateBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def check_version(checkpoint: Checkpoint, stored: int | None) -> None:
    """Raise StateConflictError unless ``stored`` (None: absent) is the expected version."""
    expected = checkpoint.expected_version
    if expected is None:
        return
    if (stored or 0) != expected or (expected == 0 and stored is not None):
        raise StateConflictError(
            f"run {checkpoint.run_id!r} was advanced by another writer "
            f"(expected version {expected}, found {stored if stored is not None else 'none'})",
            run_id=checkpoint.run_id,
            expected_version=expected,
            actual_version=stored,
        )


def apply_to_dict(
    current: dict[str, Any] | None, checkpoint: Checkpoint, serializer: Serializer
) -> dict[str, Any]:
    """The whole state after ``checkpoint``, as a plain dict (for backends without deltas)."""
    loads = serializer.loads
    state: dict[str, Any] = {} if current is None or checkpoint.replace else dict(current)
    if checkpoint.header is not None:
        header = checkpoint.header
        state.update(
            pipeline_id=header.pipeline_id,
            pipeline_name=header.pipeline_name,
            pipeline_version=header.pipeline_version,
            step_names=loads(header.step_names),
            initial_input=loads(header.initial_input),
            created_at=to_datetime(header.created_at),
            metadata=loads(header.metadata),
            queue=header.queue,
            priority=header.priority,
        )
    stored_version = 0 if current is None else int(current.get("version", 0))
    context = dict(state.get("pipeline_context") or {})
    context.update({name: loads(value) for name, value in checkpoint.context.items()})
    history = list(state.get("step_history") or [])
    del history[checkpoint.step_offset :]
    history.extend(loads(record) for record in checkpoint.steps)
    state.update(
        run_id=checkpoint.run_id,
        status=checkpoint.status,
        current_step_index=checkpoint.current_step_index,
        updated_at=to_datetime(checkpoint.updated_at),
        error=None if checkpoint.error is None else loads(checkpoint.error),
        pipeline_context=context,
        step_history=history,
        version=checkpoint.new_version(stored_version),
    )
    if checkpoint.last_step_output is not None:
        state["last_step_output"] = loads(checkpoint.last_step_output)
    state.setdefault("last_step_output", None)
    if checkpoint.usage is not None:
        state["usage"] = loads(checkpoint.usage)
    state.setdefault("usage", None)
    return state


def checkpoint_from_state(run_id: str, state: dict[str, Any], serializer: Serializer) -> Checkpoint:
    """A whole-state ``save_state`` expressed as a replacing checkpoint."""
    dumps = serializer.dumps
    try:
        context = state.get("pipeline_context") or {}
        if not isinstance(context, dict):
            raise TypeError("pipeline_context must be a dict")
        history = state.get("step_history") or []
        current = now()
        header = RunHeader(
            pipeline_id=str(state.get("pipeline_id", "")),
            pipeline_name=str(state.get("pipeline_name", "")),
            pipeline_version=str(state.get("pipeline_version", "")),
            step_names=dumps(list(state.get("step_names") or []), "step_names"),
            initial_input=dumps(state.get("initial_input"), "initial_input"),
            created_at=_epoch(state.get("created_at"), current),
            metadata=_metadata(state.get("metadata"), dumps),
            queue=None if state.get("queue") is None else str(state["queue"]),
            priority=int(state.get("priority") or 0),
        )
        error = state.get("error")
        usage = state.get("usage")
        version = state.get("version")
        checkpoint = Checkpoint(
            run_id=run_id,
            expected_version=None,
            status=str(state.get("status", "running")),
            current_step_index=int(state.get("current_step_index", 0)),
            updated_at=_epoch(state.get("updated_at"), current),
            last_step_output=dumps(state.get("last_step_output"), "last_step_output"),
            error=None if error is None else dumps(error, "error"),
            context={
                str(name): dumps(value, f"pipeline_context.{name}")
                for name, value in context.items()
            },
            steps=[dumps(record, f"step_history[{i}]") for i, record in enumerate(history)],
            step_offset=0,
            header=header,
            replace=True,
            version=None if version is None else int(version),
            usage=b"null" if usage is None else dumps(usage, "usage"),
        )
    except (SerializationError, InvalidMetadataError):
        raise
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"state of run {run_id!r}: {exc}", path="state") from exc
    scrubber = active_scrubber()  # FLUJO_GOVERNANCE_PII_SCRUB applies to whole-state saves too
    if scrubber is not None:
        from flujo.governance import scrub_checkpoint  # noqa: PLC0415

        checkpoint = scrub_checkpoint(checkpoint, scrubber)
    return checkpoint


def encode_metadata(metadata: Mapping[str, Any] | None, serializer: Serializer) -> bytes:
    """Run metadata as stored: a JSON object whose keys are checked."""
    if not metadata:
        return b"{}"
    if not isinstance(metadata, Mapping):
        raise InvalidMetadataError("run metadata must be a mapping", key="")
    for key in metadata:
        validate_metadata_key(key)
    return serializer.dumps(dict(metadata), "metadata")


def _metadata(value: Any, dumps: Any) -> bytes:
    if value is None:
        return b"{}"
    if not isinstance(value, Mapping):
        raise TypeError("metadata must be a mapping")
    for key in value:
        validate_metadata_key(key)
    data: bytes = dumps(dict(value), "metadata")
    return data


def _epoch(value: Any, default: float) -> float:
    """A timestamp given as a datetime, an ISO 8601 string or epoch seconds, as epoch seconds."""
    if value is None:
        return default
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return epoch(value)
    return float(value)


def _usage(stored: bytes | None) -> bytes | None:
    """A checkpoint's usage as kept: JSON ``null`` means none."""
    return None if stored is None or stored == b"null" else stored


def corrupt(run_id: str | None, detail: str) -> CorruptStateError:
    """The error for stored bytes that cannot be read back."""
    return CorruptStateError(f"stored state of run {run_id!r} is corrupt: {detail}", run_id=run_id)


@dataclass(slots=True)
class StoredRun:
    """A run as the built-in backends keep it: columns, plus JSON bytes per part.

    Context fields and step records are stored apart, so a checkpoint writes only the fields
    that changed and appends only new records.
    """

    run_id: str
    pipeline_id: str
    pipeline_name: str
    pipeline_version: str
    step_names: bytes
    initial_input: bytes
    created_at: float
    status: str
    current_step_index: int
    updated_at: float
    version: int
    last_step_output: bytes
    error: bytes | None
    context: dict[str, bytes]
    steps: list[bytes]
    metadata: bytes = b"{}"
    usage: bytes | None = None
    queue: str | None = None
    priority: int = 0
    locked_by: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False

    @classmethod
    def create(cls, checkpoint: Checkpoint) -> StoredRun:
        """A new run from its first checkpoint (which must carry the header)."""
        header = checkpoint.header
        if header is None:
            raise corrupt(checkpoint.run_id, "the first checkpoint of a run has no header")
        return cls(
            run_id=checkpoint.run_id,
            pipeline_id=header.pipeline_id,
            pipeline_name=header.pipeline_name,
            pipeline_version=header.pipeline_version,
            step_names=header.step_names,
            initial_input=header.initial_input,
            created_at=header.created_at,
            status=checkpoint.status,
            current_step_index=checkpoint.current_step_index,
            updated_at=checkpoint.updated_at,
            version=checkpoint.new_version(0),
            last_step_output=checkpoint.last_step_output or b"null",
            error=checkpoint.error,
            context=dict(checkpoint.context),
            steps=list(checkpoint.steps),
            metadata=header.metadata,
            usage=_usage(checkpoint.usage),
            queue=header.queue,
            priority=header.priority,
        )

    def apply(self, checkpoint: Checkpoint) -> None:
        """Apply a checkpoint whose version was already checked. Never fails halfway."""
        if checkpoint.replace:
            self.context = {}
            self.steps = []
        header = checkpoint.header
        if header is not None:
            self.pipeline_id = header.pipeline_id
            self.pipeline_name = header.pipeline_name
            self.pipeline_version = header.pipeline_version
            self.step_names = header.step_names
            self.initial_input = header.initial_input
            self.created_at = header.created_at
            self.metadata = header.metadata
            self.queue = header.queue
            self.priority = header.priority
        self.status = checkpoint.status
        self.current_step_index = checkpoint.current_step_index
        self.updated_at = checkpoint.updated_at
        self.error = checkpoint.error
        if checkpoint.last_step_output is not None:
            self.last_step_output = checkpoint.last_step_output
        if checkpoint.usage is not None:
            self.usage = _usage(checkpoint.usage)
        self.context.update(checkpoint.context)
        del self.steps[checkpoint.step_offset :]
        self.steps.extend(checkpoint.steps)
        self.version = checkpoint.new_version(self.version)

    def summary(self) -> dict[str, Any]:
        """The run's summary, as :meth:`StateBackend.list_runs` returns it."""
        try:
            metadata = orjson.loads(self.metadata)
            error = None if self.error is None else orjson.loads(self.error)
            usage = None if self.usage is None else orjson.loads(self.usage)
        except orjson.JSONDecodeError as exc:
            raise corrupt(
                self.run_id, f"metadata, error or usage is not valid JSON ({exc})"
            ) from exc
        return {
            "metadata": metadata,
            "error": error,
            "usage": usage,
            "run_id": self.run_id,
            "pipeline_id": self.pipeline_id,
            "pipeline_name": self.pipeline_name,
            "pipeline_version": self.pipeline_version,
            "status": self.status,
            "current_step_index": self.current_step_index,
            "version": self.version,
            "created_at": to_datetime(self.created_at),
            "updated_at": to_datetime(self.updated_at),
            "queue": self.queue,
            "priority": self.priority,
            "locked_by": self.locked_by,
            "lease_expires_at": (
                None if self.lease_expires_at is None else to_datetime(self.lease_expires_at)
            ),
            "cancel_requested": self.cancel_requested,
        }

    def to_state(self, serializer: Serializer) -> dict[str, Any]:
        """The whole state as a dict; stored bytes that do not parse raise CorruptStateError."""
        loads = serializer.loads
        part = "step_names"
        try:
            step_names = loads(self.step_names)
            part = "initial_input"
            initial_input = loads(self.initial_input)
            part = "last_step_output"
            last_output = loads(self.last_step_output)
            part = "metadata, error or usage"
            state = self.summary()
            context = {}
            for name, value in self.context.items():
                part = f"pipeline_context.{name}"
                context[name] = loads(value)
            history = []
            for i, record in enumerate(self.steps):
                part = f"step_history[{i}]"
                history.append(loads(record))
        except ValueError as exc:
            raise corrupt(self.run_id, f"{part} is not valid JSON ({exc})") from exc
        state.update(
            step_names=step_names,
            initial_input=initial_input,
            last_step_output=last_output,
            pipeline_context=context,
            step_history=history,
        )
        return state

    def matches(
        self,
        status: str | None,
        pipeline_name: str | None,
        metadata: list[tuple[str, bytes]],
        since: float | None,
    ) -> bool:
        """Whether this run passes a list_runs filter."""
        if status is not None and self.status != status:
            return False
        if pipeline_name is not None and self.pipeline_name != pipeline_name:
            return False
        if since is not None and self.created_at < since:
            return False
        if metadata:
            indexed = dict(metadata_index(self.metadata))
            return all(indexed.get(key) == value for key, value in metadata)
        return True


def cancel_error(status: str) -> bytes:
    """The error a run cancelled by request before it could stop by itself is stored with."""
    when = "before it started" if status == "queued" else f"while {status}"
    return orjson.dumps(
        {"type": "CancelRequested", "message": f"cancelled by request {when}", "step": None}
    )


def check_limit(limit: object) -> int:
    """A queue's concurrency limit: an int of 0 or more."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ConfigurationError(f"a queue's concurrency limit must be an int >= 0, got {limit!r}")
    return limit


class Wakeup:
    """Wakes the workers of this process that wait on a store (from any event loop or thread).

    Backends whose store cannot notify other processes use it for their own process; the
    workers of other processes poll.
    """

    __slots__ = ("_cancelled", "_lock", "_waiters")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._cancelled: set[str] = set()

    def wake(self, *, cancelled: str | None = None) -> None:
        """Wake every waiter (noting a run whose cancellation was requested)."""
        with self._lock:
            if cancelled is not None:
                self._cancelled.add(cancelled)
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, future)

    async def wait(self, timeout_s: float) -> set[str]:
        """Wait for :meth:`wake` or ``timeout_s``; return the cancellations noted since."""
        loop = asyncio.get_running_loop()
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if cancelled:
                return cancelled
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout_s)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Woken and cancelled at once (wait_for then returns): the caller is gone.
                raise asyncio.CancelledError
        except TimeoutError:
            pass
        except BaseException:  # the waiter was cancelled: leave the noted ones for its next wait
            with self._lock:
                self._waiters = [(lp, f) for lp, f in self._waiters if f is not future]
            raise
        with self._lock:
            self._waiters = [(lp, f) for lp, f in self._waiters if f is not future]
            cancelled, self._cancelled = self._cancelled, set()
        return cancelled


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
