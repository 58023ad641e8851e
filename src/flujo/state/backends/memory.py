"""InMemoryBackend: state in a dict, for tests and demos; lost when the process ends."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar

from flujo.state.backends.base import (
    Checkpoint,
    MetadataValue,
    StateBackend,
    StoredRun,
    check_version,
    checkpoint_from_state,
    epoch,
    metadata_filter_items,
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

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._runs: dict[str, StoredRun] = {}
        self._evaluations: list[Evaluation] = []
        self._lock = threading.Lock()

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
