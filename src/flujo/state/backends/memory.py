"""InMemoryBackend: state in a dict, for tests and demos; lost when the process ends."""

from __future__ import annotations

import threading
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

from flujo.state.backends.base import (
    WORKER_FORGET_S,
    Checkpoint,
    Claim,
    MetadataValue,
    StateBackend,
    StoredRun,
    Wakeup,
    cancel_error,
    check_limit,
    check_version,
    checkpoint_from_state,
    epoch,
    metadata_filter_items,
    now,
    to_datetime,
    validate_queue_name,
    validate_run_id,
)
from flujo.state.models import Evaluation

__all__ = ["InMemoryBackend"]


class InMemoryBackend(StateBackend):
    """Keeps every run in memory, serialized exactly as the persistent backends store it.

    Values go through the same serializer (so a value that would fail on SQLite fails here
    too) and come back as JSON data, as they would after a restart.

    >>> import asyncio
    >>> backend = InMemoryBackend()
    >>> asyncio.run(backend.load_state("nothing-here")) is None
    True
    """

    writes_may_suspend: ClassVar[bool] = False  # its writes never await: nothing to protect
    supports_queues: ClassVar[bool] = True  # within this process (the store is its memory)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._runs: dict[str, StoredRun] = {}
        self._evaluations: list[Evaluation] = []
        self._lock = threading.Lock()
        self._limits: dict[str, int] = {}
        self._workers: dict[str, dict[str, Any]] = {}
        self._wakeup = Wakeup()

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        """Apply ``checkpoint`` under a lock, after the compare-and-swap check."""
        validate_run_id(checkpoint.run_id)
        with self._lock:
            run = self._runs.get(checkpoint.run_id)
            check_version(checkpoint, None if run is None else run.version)
            if run is None:
                self._runs[checkpoint.run_id] = run = StoredRun.create(checkpoint)
            else:
                run.apply(checkpoint)
            return run.version

    async def save_state(self, run_id: str, state: dict[str, Any]) -> None:
        """Store ``state`` whole, replacing what was there."""
        validate_run_id(run_id)
        await self.write_checkpoint(checkpoint_from_state(run_id, state, self.serializer))

    async def load_state(self, run_id: str) -> dict[str, Any] | None:
        """The stored state of ``run_id``, or None."""
        validate_run_id(run_id)
        with self._lock:
            run = self._runs.get(run_id)
            return None if run is None else run.to_state(self.serializer)

    async def delete_state(self, run_id: str) -> None:
        """Forget ``run_id``."""
        validate_run_id(run_id)
        with self._lock:
            self._runs.pop(run_id, None)
            self._evaluations = [e for e in self._evaluations if e.run_id != run_id]

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
        """Summaries of stored runs, newest first."""
        wanted = metadata_filter_items(metadata_filter)
        after = None if since is None else epoch(since)
        with self._lock:
            runs = [
                run
                for run in self._runs.values()
                if run.matches(status, pipeline_name, wanted, after)
            ]
        runs.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        start = max(offset, 0)
        return [run.summary() for run in runs[start : start + max(limit, 0)]]

    async def delete_runs(self, *, updated_before: datetime, status: str | None = None) -> int:
        """Delete runs last updated before ``updated_before`` (of ``status``)."""
        cutoff = epoch(updated_before)
        with self._lock:
            doomed = [
                run_id
                for run_id, run in self._runs.items()
                if run.updated_at < cutoff and (status is None or run.status == status)
            ]
            for run_id in doomed:
                del self._runs[run_id]
            gone = set(doomed)
            self._evaluations = [e for e in self._evaluations if e.run_id not in gone]
        return len(doomed)

    async def save_evaluation(self, evaluation: Evaluation) -> None:
        """Keep a shadow evaluation's score."""
        validate_run_id(evaluation.run_id)
        with self._lock:
            self._evaluations.append(evaluation)

    async def list_evaluations(
        self,
        *,
        run_id: str | None = None,
        step_name: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Evaluation]:
        """Kept evaluations, newest first."""
        if run_id is not None:
            validate_run_id(run_id)
        with self._lock:
            found = [
                e
                for e in self._evaluations
                if (run_id is None or e.run_id == run_id)
                and (step_name is None or e.step_name == step_name)
                and (since is None or e.created_at >= since)
            ]
        found.sort(key=lambda e: (e.created_at, e.eval_id), reverse=True)
        start = max(int(offset), 0)
        return found[start : start + max(int(limit), 0)]

    # -- queues and workers (within this process) ------------------------------------------------

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
        """Claim up to ``limit`` queued (or abandoned) runs of ``queues``; see StateBackend."""
        names = [validate_queue_name(queue) for queue in queues]
        claimed: list[Claim] = []
        with self._lock:
            current = now()
            for queue in names:
                room = limit - len(claimed)
                if queue in self._limits:
                    busy = sum(
                        1
                        for run in self._runs.values()
                        if run.queue == queue and _leased(run, current)
                    )
                    room = min(room, self._limits[queue] - busy)
                if room <= 0:
                    continue
                ready = [
                    run
                    for run in self._runs.values()
                    if run.queue == queue
                    and _claimable(run, current)
                    and run.run_id not in exclude
                    and (
                        pipelines is None
                        or f"{run.pipeline_name}@{run.pipeline_version}" in pipelines
                    )
                ]
                ready.sort(key=lambda run: (-run.priority, run.created_at, run.run_id))
                for run in ready[:room]:
                    run.status, run.locked_by = "running", worker_id
                    run.lease_expires_at, run.version = current + lease_s, run.version + 1
                    run.updated_at = current
                    claimed.append(Claim(run.run_id, run.pipeline_name, run.pipeline_version))
        return claimed

    async def renew_leases(
        self, *, worker_id: str, run_ids: Sequence[str], lease_s: float
    ) -> dict[str, bool]:
        """Extend the leases ``worker_id`` still holds; see StateBackend."""
        held: dict[str, bool] = {}
        with self._lock:
            expires = now() + lease_s
            for run_id in run_ids:
                run = self._runs.get(run_id)
                if run is not None and run.locked_by == worker_id and run.status == "running":
                    run.lease_expires_at = expires
                    held[run_id] = run.cancel_requested
        return held

    async def release_runs(self, *, worker_id: str, run_ids: Sequence[str]) -> None:
        """Give up ``worker_id``'s leases on ``run_ids``; see StateBackend."""
        with self._lock:
            for run_id in run_ids:
                run = self._runs.get(run_id)
                if run is None or run.locked_by != worker_id:
                    continue
                run.locked_by = run.lease_expires_at = None
                if run.status == "running":
                    run.status, run.version = "queued", run.version + 1
        self._wakeup.wake()

    async def requeue_run(
        self, run_id: str, *, queue: str | None = None, priority: int | None = None
    ) -> bool:
        """Put a failed (or abandoned) run back in its queue; see StateBackend."""
        validate_run_id(run_id)
        if queue is not None:
            validate_queue_name(queue)
        with self._lock:
            run = self._runs.get(run_id)
            current = now()
            if run is None or (queue or run.queue) is None:
                return False
            abandoned = run.status == "running" and (
                run.locked_by is None or (run.lease_expires_at or 0) < current
            )
            unqueued = run.status == "queued" and run.queue is None
            if run.status != "failed" and not abandoned and not unqueued:
                return False
            run.queue = queue or run.queue
            run.priority = run.priority if priority is None else priority
            run.status, run.locked_by, run.lease_expires_at = "queued", None, None
            run.cancel_requested, run.version, run.updated_at = False, run.version + 1, current
        self._wakeup.wake()
        return True

    async def request_cancel(self, run_id: str) -> str | None:
        """Cancel a queued or paused run; flag a running one; see StateBackend."""
        validate_run_id(run_id)
        with self._lock:
            run = self._runs.get(run_id)
            if run is None:
                return None
            status = run.status
            if status in ("queued", "paused"):
                run.status, run.error = "cancelled", cancel_error(status)
                run.cancel_requested, run.locked_by, run.lease_expires_at = True, None, None
                run.version, run.updated_at = run.version + 1, now()
                return "cancelled"
            if status == "running":
                run.cancel_requested = True
        if status == "running":
            self._wakeup.wake(cancelled=run_id)
        return status

    async def set_queue_limit(self, queue: str, limit: int | None) -> None:
        """Limit how many runs of ``queue`` run at once (None: no limit)."""
        validate_queue_name(queue)
        with self._lock:
            if limit is None:
                self._limits.pop(queue, None)
            else:
                self._limits[queue] = check_limit(limit)

    async def queue_limits(self) -> dict[str, int]:
        """The concurrency limit of each queue that has one."""
        with self._lock:
            return dict(self._limits)

    async def next_lease_expiry(self, queues: Sequence[str]) -> float | None:
        """When the earliest lease of a running run of ``queues`` expires."""
        wanted = {validate_queue_name(queue) for queue in queues}
        with self._lock:
            leases = [
                run.lease_expires_at
                for run in self._runs.values()
                if run.queue in wanted
                and run.status == "running"
                and run.locked_by is not None
                and run.lease_expires_at is not None
            ]
        return min(leases) if leases else None

    async def register_worker(self, worker_id: str, info: Mapping[str, Any]) -> None:
        """Record (or refresh) a live worker."""
        with self._lock:
            current = now()
            known = self._workers.get(worker_id)
            self._workers[worker_id] = {
                "worker_id": worker_id,
                "info": dict(info),
                "started_at": known["started_at"] if known else to_datetime(current),
                "heartbeat_at": to_datetime(current),
            }
            forgotten = to_datetime(current - WORKER_FORGET_S)
            for known_id, entry in list(self._workers.items()):
                if entry["heartbeat_at"] < forgotten:
                    del self._workers[known_id]

    async def remove_worker(self, worker_id: str) -> None:
        """Forget a worker that stopped."""
        with self._lock:
            self._workers.pop(worker_id, None)

    async def list_workers(self) -> list[dict[str, Any]]:
        """Registered workers, most recently seen first."""
        with self._lock:
            workers = [dict(worker) for worker in self._workers.values()]
        return sorted(workers, key=lambda w: w["heartbeat_at"], reverse=True)

    async def notify_work(self, queue: str) -> None:
        """Wake this process's workers."""
        self._wakeup.wake()

    async def notify_cancel(self, run_id: str) -> None:
        """Tell this process's workers that ``run_id`` is to be cancelled."""
        self._wakeup.wake(cancelled=run_id)

    async def wait_for_work(self, timeout_s: float) -> set[str]:
        """Wait for a notification or ``timeout_s``."""
        return await self._wakeup.wait(timeout_s)


def _leased(run: StoredRun, current: float) -> bool:
    return (
        run.status == "running"
        and run.locked_by is not None
        and (run.lease_expires_at or 0) >= current
    )


def _claimable(run: StoredRun, current: float) -> bool:
    if run.status == "queued":
        return True
    return (
        run.status == "running"
        and run.locked_by is not None
        and (run.lease_expires_at or 0) < current
    )
