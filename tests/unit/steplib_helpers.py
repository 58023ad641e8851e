"""Shared pieces of the step library tests: a store to resume runs on, call counters, trees.

A resumed run always uses a fresh ``Flujo`` and (on SQLite) a fresh backend on the same file, as
a new process would. A "crash" is a sub-step that fails once (the run ends ``failed``) or a
:class:`Crash` (a ``BaseException``, standing in for the process dying) raised right after a
given record was checkpointed.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

import orjson

from flujo import Flujo, PipelineResult, StepResult
from flujo.state import InMemoryBackend, SQLiteBackend, StateBackend
from flujo.state.backends.base import Checkpoint


class Crash(BaseException):
    """Stands in for the process dying (not an Exception: nothing catches it)."""


class CrashingMemoryBackend(InMemoryBackend):
    """An in-memory store that "dies" right after writing the record named ``crash_after``."""

    def __init__(self) -> None:
        super().__init__()
        self.crash_after: str | None = None

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        version = await super().write_checkpoint(checkpoint)
        if self.crash_after is not None:
            for raw in checkpoint.steps:
                if orjson.loads(raw)["name"] == self.crash_after:
                    self.crash_after = None
                    raise Crash(f"died after checkpointing {raw!r}")
        return version


class Store:
    """Where the runs of one test live: ``memory`` (one shared instance) or ``sqlite`` (a file
    in ``tmp_path``, opened afresh by every runner)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.path = tmp_path / "runs.db"
        self._memory = InMemoryBackend()

    def backend(self) -> StateBackend:
        if self.kind == "memory":
            return self._memory
        return SQLiteBackend(self.path)

    async def run(
        self, pipeline: Any, data: Any, *, run_id: str | None = None, **options: Any
    ) -> PipelineResult[Any, Any]:
        """Run (or resume) with a fresh runner (and a fresh backend on the same storage)."""
        async with Flujo(pipeline, state_backend=self.backend(), **options) as runner:
            return await runner.run_async(data, run_id=run_id)

    async def load(self, run_id: str) -> dict[str, Any]:
        state = await self.load_or_none(run_id)
        assert state is not None
        return state

    async def load_or_none(self, run_id: str) -> dict[str, Any] | None:
        backend = self.backend()
        try:
            return await backend.load_state(run_id)
        finally:
            if backend is not self._memory:
                await backend.aclose()


class Calls:
    """Thread-safe call log (sync steps run in worker threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.log: list[Hashable] = []

    def add(self, key: Hashable) -> None:
        with self._lock:
            self.log.append(key)

    def count(self, key: Hashable) -> int:
        return Counter(self.log)[key]

    def clear(self) -> None:
        with self._lock:
            self.log.clear()

    def keys(self) -> set[Hashable]:
        return set(self.log)


def shape(history: Iterable[StepResult]) -> list[Any]:
    """A step history as a comparable tree: (name, path, success, cache_hit, children)."""
    return [(r.name, r.path, r.success, r.cache_hit, shape(r.step_history)) for r in history]


def flat_paths(history: Iterable[StepResult]) -> list[tuple[Any, ...] | None]:
    """Every path in a history tree, depth first."""
    found: list[tuple[Any, ...] | None] = []
    for result in history:
        found.append(result.path)
        found.extend(flat_paths(result.step_history))
    return found


def stored_paths(
    state: dict[str, Any], *, success: bool = True, kind: str = "step"
) -> list[tuple[Any, ...]]:
    """The paths of the stored nested records of one kind (successful steps by default)."""
    return [
        tuple(record["path"])
        for record in state["step_history"]
        if record.get("path") is not None
        and bool(record["success"]) is success
        and record.get("kind", "step") == kind
    ]


#: Name suffixes of bookkeeping records (a branch decision, the end of a loop iteration ...):
#: stored for resuming, not steps of their own.
BOOKKEEPING = (":decision", ":iteration", ":start", ":router")


def steps_only(results: Iterable[Any]) -> list[Any]:
    """``results`` without bookkeeping records (e.g. streamed items)."""
    return [r for r in results if not (isinstance(r, StepResult) and r.name.endswith(BOOKKEEPING))]


async def wait_for_records(store: Store, run_id: str, *paths: tuple[Any, ...]) -> None:
    """Wait until the store holds a successful record at each of ``paths`` (a step that must
    fail only after its siblings were checkpointed polls this)."""
    wanted = {tuple(path) for path in paths}
    while True:
        state = await store.load_or_none(run_id)
        found = {
            tuple(record["path"])
            for record in (state or {}).get("step_history", [])
            if record.get("path") is not None and record["success"]
        }
        if wanted <= found:
            return
        await asyncio.sleep(0.002)
