"""Workers and background steps in one process, on SQLite and in memory.

A worker runs as a task of the test's event loop; the test waits for what it expects by polling
the store (``wait_until``, bounded so that a hang fails instead of blocking), then stops the
worker. Steps that must stay in progress wait on an ``asyncio.Event`` the test controls; each
step notes its work in a list *after* doing it, so a step cut off mid-way notes nothing.

SQLite stores are opened afresh (another connection) by every party, as separate processes
would: a worker on SQLite is not woken by another connection's enqueue and polls (``poll_s`` is
short here). The in-memory store is one shared instance. Real processes on Postgres are in
tests/integration/test_worker_processes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner, Result

from flujo import (
    Flujo,
    LoopStep,
    MapStep,
    Pipeline,
    PipelineContext,
    PipelineRegistry,
    Step,
    TaskClient,
    cli,
    step,
)
from flujo.domain.models import BackgroundLaunched
from flujo.exceptions import (
    ConfigurationError,
    FlujoError,
    RunNotFoundError,
    StateBackendError,
    StateConflictError,
)
from flujo.state import FileBackend, InMemoryBackend, SQLiteBackend, StateBackend
from flujo.state.backends.base import Checkpoint
from flujo.state.backends.postgres import PostgresBackend
from flujo.worker import Worker

#: Bound on every wait for something the test expects (a hang fails instead of blocking).
GUARD_S = 30.0
#: Worker settings for tests: quick polls and heartbeats, leases that never run out by accident.
FAST: dict[str, Any] = {"lease_s": 30.0, "heartbeat_s": 0.05, "poll_s": 0.02}


class Ctx(PipelineContext):
    note: str = ""
    seen: list[str] = []


# -- stores ----------------------------------------------------------------------------------------


class Store:
    """One test's store: ``memory`` (one shared instance), ``sqlite`` (a file in tmp_path) or
    ``postgres`` (a fresh schema); every ``backend()`` of the last two is a connection (pool)
    of its own, as another process's would be."""

    def __init__(self, kind: str, tmp_path: Path, dsn: str = "", schema: str = "") -> None:
        self.kind = kind
        self.path = tmp_path / "runs.db"
        self.dsn, self.schema = dsn, schema
        self._memory = InMemoryBackend()
        self._opened: list[StateBackend] = []

    def backend(self) -> StateBackend:
        if self.kind == "memory":
            return self._memory
        backend: StateBackend
        if self.kind == "postgres":
            backend = PostgresBackend(self.dsn, schema=self.schema, pool_min=0, pool_max=4)
        else:
            backend = SQLiteBackend(self.path)
        self._opened.append(backend)
        return backend

    async def load(self, run_id: str) -> dict[str, Any]:
        backend = self.backend()
        state = await backend.load_state(run_id)
        assert state is not None, run_id
        return state

    async def status(self, run_id: str) -> str:
        return str((await self.load(run_id))["status"])

    async def close(self) -> None:
        for backend in self._opened:
            await backend.aclose()
        await self._memory.aclose()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    """The kind of store, and for Postgres its DSN and a fresh schema (the Postgres fixtures
    are only requested by the Postgres cases, so the others never skip for want of a server)."""
    if request.param != "postgres":
        return request.param, "", ""
    return (
        "postgres",
        request.getfixturevalue("postgres_dsn"),
        request.getfixturevalue("postgres_schema"),
    )


@pytest.fixture
async def store(store_kind: tuple[str, str, str], tmp_path: Path) -> AsyncIterator[Store]:
    kind, dsn, schema = store_kind
    if kind == "postgres":
        opened = Store("postgres", tmp_path, dsn, schema)
        migrating = PostgresBackend(dsn, schema=opened.schema, pool_min=0, pool_max=1)
        await migrating.migrate()
        await migrating.aclose()
    else:
        opened = Store(kind, tmp_path)
    yield opened
    await opened.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = Store("sqlite", tmp_path)
    yield opened
    await opened.close()


# -- helpers ---------------------------------------------------------------------------------------


async def wait_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until it holds; fail after GUARD_S."""
    async with asyncio.timeout(GUARD_S):
        while not await check():
            await asyncio.sleep(0.01)
    assert await check(), what


async def wait_for_status(store: Store, run_ids: list[str], status: str = "completed") -> None:
    async def done() -> bool:
        return all([await store.status(run_id) == status for run_id in run_ids])

    try:
        await wait_until(done, f"runs {run_ids} {status}")
    except TimeoutError:
        found = {run_id: await store.status(run_id) for run_id in run_ids}
        raise AssertionError(f"not all {status}: {found}") from None


@contextlib.asynccontextmanager
async def working(*workers: Worker) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run ``workers`` as tasks; stop them (gracefully) and wait for them at the end."""
    tasks = [asyncio.ensure_future(worker.run()) for worker in workers]
    try:
        yield tasks
    finally:
        for worker in workers:
            worker.stop()
        async with asyncio.timeout(GUARD_S):
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result


def make_worker(store: Store, registry: PipelineRegistry, **options: Any) -> Worker:
    return Worker(registry, state_backend=store.backend(), **{**FAST, **options})


def noting(log: list[str], name: str, work: Callable[[Any], Any] | None = None) -> Step[Any, Any]:
    """A step that notes ``"<run_id>:<name>"`` in ``log`` after its work."""

    async def fn(x: Any, *, context: Ctx) -> Any:
        out = x if work is None else work(x)
        log.append(f"{context.run_id}:{name}")
        return out

    return Step.from_callable(fn, name=name)


def gated(log: list[str], name: str, gate: asyncio.Event, started: asyncio.Event) -> Step[Any, Any]:
    """A step that announces it started, waits for ``gate``, then notes itself."""

    async def fn(x: Any, *, context: Ctx) -> Any:
        started.set()
        await gate.wait()
        log.append(f"{context.run_id}:{name}")
        return x

    return Step.from_callable(fn, name=name)


def registry_of(pipeline: Pipeline[Any, Any], name: str = "p", version: str = "1.0.0") -> Any:
    registry = PipelineRegistry()
    registry.register(pipeline, name, version, context_model=Ctx)
    return registry


def runner_for(store: Store, registry: PipelineRegistry, name: str = "p", **options: Any) -> Any:
    return Flujo(
        registry=registry,
        pipeline_name=name,
        context_model=Ctx,
        state_backend=store.backend(),
        **options,
    )


def linear(log: list[str], n: int = 3) -> Pipeline[Any, Any]:
    return Pipeline.from_steps([noting(log, f"s{i}", lambda x: x + 1) for i in range(n)])


# -- submit and enqueue ----------------------------------------------------------------------------


async def test_a_worker_runs_submitted_and_enqueued_runs(store: Store) -> None:
    log: list[str] = []
    registry = registry_of(linear(log))
    runner = runner_for(store, registry)
    submitted = [await runner.submit(i) for i in range(5)]
    client = TaskClient(store.backend(), registry)
    enqueued = [await client.enqueue("p", 100 + i, metadata={"k": i}) for i in range(3)]
    run_ids = submitted + enqueued
    for run_id in run_ids:
        state = await store.load(run_id)
        assert (state["status"], state["queue"], state["current_step_index"]) == (
            "queued",
            "default",
            0,
        )
        assert state["pipeline_version"] == "1.0.0"
    assert log == []  # nothing ran yet

    worker = make_worker(store, registry, concurrency=3)
    async with working(worker):
        await wait_for_status(store, run_ids)
        [listed] = await client.list_workers()
        assert listed["worker_id"] == worker.worker_id
        assert listed["info"]["pipelines"] == ["p@1.0.0"]
        assert listed["info"]["queues"] == ["default"]
    assert await client.list_workers() == []  # a stopped worker unregisters

    for i, run_id in enumerate(submitted):
        state = await store.load(run_id)
        assert state["last_step_output"] == i + 3
        assert (state["locked_by"], state["lease_expires_at"]) == (None, None)
    assert (await store.load(enqueued[1]))["last_step_output"] == 104
    assert (await store.load(enqueued[1]))["metadata"] == {"k": 1}
    assert Counter(log) == Counter(f"{r}:s{i}" for r in run_ids for i in range(3))
    assert worker.completed == len(run_ids)
    assert worker.active == []


async def test_submit_checks_its_arguments(store: Store, tmp_path: Path) -> None:
    registry = registry_of(linear([]))
    runner = runner_for(store, registry)
    run_id = await runner.submit(1, run_id="fixed-id", queue="mail", priority=-3)
    state = await store.load(run_id)
    assert (state["queue"], state["priority"], state["status"]) == ("mail", -3, "queued")
    with pytest.raises(StateConflictError):
        await runner.submit(1, run_id="fixed-id")
    for bad in ("", "x'; DROP TABLE runs; --", "a" * 65):
        with pytest.raises(ConfigurationError):
            await runner.submit(1, queue=bad)
    with pytest.raises(ConfigurationError):
        await runner.submit(1, priority=True)
    with pytest.raises(FlujoError):
        await runner.submit(1, run_id="../etc/passwd")

    files = Flujo(registry=registry, pipeline_name="p", state_backend=FileBackend(tmp_path / "f"))
    with pytest.raises(ConfigurationError):
        await files.submit(1)
    unstored = Flujo(registry=registry, pipeline_name="p", persist_state=False)
    with pytest.raises(ConfigurationError):
        await unstored.submit(1)


async def test_a_run_without_a_pipeline_version_is_refused(store: Store) -> None:
    """``Flujo(pipeline).submit()`` would record pipeline version "latest" (the runner's
    default), which no worker claims (a worker claims exact ``name@version``): refused, with
    the fix in the message; with a version (or a registry) the run is queued and runs."""
    log: list[str] = []
    pipeline = linear(log)
    runner = Flujo(pipeline, pipeline_name="p", context_model=Ctx, state_backend=store.backend())
    with pytest.raises(ConfigurationError, match="pipeline_version="):
        await runner.submit(1)
    assert await store.backend().list_runs() == []
    pinned = Flujo(
        pipeline,
        pipeline_name="p",
        pipeline_version="1.0.0",
        context_model=Ctx,
        state_backend=store.backend(),
    )
    run_id = await pinned.submit(1)
    worker = make_worker(store, registry_of(pipeline))
    async with working(worker):
        await wait_for_status(store, [run_id])


def test_worker_checks_its_arguments(tmp_path: Path) -> None:
    registry = registry_of(linear([]))
    backend = SQLiteBackend(tmp_path / "w.db")
    with pytest.raises(ConfigurationError):
        Worker(registry, state_backend=backend, concurrency=0)
    with pytest.raises(ConfigurationError):
        Worker(registry, state_backend=backend, concurrency=True)
    with pytest.raises(ConfigurationError):
        Worker(registry, state_backend=backend, queues=[])
    with pytest.raises(ConfigurationError):
        Worker(registry, state_backend=backend, queues=["ok", "bad name"])
    with pytest.raises(ConfigurationError):
        Worker(registry, state_backend=backend, lease_s=1.0, heartbeat_s=1.0)
    with pytest.raises(ConfigurationError):
        Worker(registry, state_backend=backend, lease_s=1.0, heartbeat_s=0)
    with pytest.raises(ConfigurationError):
        Worker(registry, state_backend=FileBackend(tmp_path / "files"))
    worker = Worker(registry, state_backend=backend, queues=["a", "b"], worker_id="me")
    assert (worker.worker_id, worker.queues, worker.pipelines) == ("me", ["a", "b"], ["p@1.0.0"])


def test_worker_lease_and_heartbeat_come_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUJO_WORKER_LEASE_S", "12")
    monkeypatch.setenv("FLUJO_WORKER_HEARTBEAT_S", "3")
    monkeypatch.delenv("FLUJO_CONFIG_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    worker = Worker(registry_of(linear([])), state_backend=SQLiteBackend(tmp_path / "w.db"))
    assert (worker.lease_s, worker.heartbeat_s) == (12.0, 3.0)
    worker = Worker(
        registry_of(linear([])), state_backend=SQLiteBackend(tmp_path / "w.db"), lease_s=5.0
    )
    assert (worker.lease_s, worker.heartbeat_s) == (5.0, 3.0)
    monkeypatch.setenv("FLUJO_WORKER_HEARTBEAT_S", "20")
    with pytest.raises(ConfigurationError):
        Worker(registry_of(linear([])), state_backend=SQLiteBackend(tmp_path / "w.db"))


# -- priorities, queues, limits --------------------------------------------------------------------


async def test_priorities_are_honoured(store: Store) -> None:
    log: list[str] = []
    registry = registry_of(linear(log, 2))
    client = TaskClient(store.backend(), registry)
    priorities = {"p0": 0, "p5a": 5, "p1": 1, "p5b": 5, "pneg": -1, "p9": 9}
    for run_id, priority in priorities.items():
        await client.enqueue("p", 0, run_id=run_id, priority=priority)
    worker = make_worker(store, registry, concurrency=1)
    async with working(worker):
        await wait_for_status(store, list(priorities))
    finished = [entry.split(":")[0] for entry in log if entry.endswith(":s1")]
    assert finished == ["p9", "p5a", "p5b", "p1", "p0", "pneg"]


async def test_a_worker_takes_only_its_queues(store: Store) -> None:
    log: list[str] = []
    registry = registry_of(linear(log, 1))
    client = TaskClient(store.backend(), registry)
    mail = await client.enqueue("p", 0, queue="mail")
    other = await client.enqueue("p", 0, queue="other")
    plain = await client.enqueue("p", 0)
    worker = make_worker(store, registry, queues=["mail", "default"])
    async with working(worker):
        await wait_for_status(store, [mail, plain])
    assert await store.status(other) == "queued"
    assert (await store.load(other))["locked_by"] is None


async def test_a_queue_limit_holds_across_two_workers(store: Store) -> None:
    inside = 0
    most = 0
    release = asyncio.Event()

    async def enter(x: int) -> int:
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        return x

    async def middle(x: int) -> int:
        await asyncio.sleep(0.01)
        if most >= 2:
            release.set()
        await release.wait()  # two runs in flight at once, so the limit is reached
        return x

    async def leave(x: int) -> int:
        nonlocal inside
        inside -= 1
        return x

    pipeline = Pipeline.from_steps(
        [Step.from_callable(f, name=f.__name__) for f in (enter, middle, leave)]
    )
    registry = registry_of(pipeline)
    client = TaskClient(store.backend(), registry)
    await client.set_queue_limit("default", 2)
    assert await client.queue_limits() == {"default": 2}
    run_ids = [await client.enqueue("p", i) for i in range(8)]
    first, second = (make_worker(store, registry, concurrency=4) for _ in range(2))
    async with working(first, second):
        await wait_for_status(store, run_ids)
    assert most == 2
    assert first.completed + second.completed == 8


async def test_a_zero_limit_holds_a_queue_until_raised(store: Store) -> None:
    log: list[str] = []
    registry = registry_of(linear(log, 1))
    client = TaskClient(store.backend(), registry)
    await client.set_queue_limit("default", 0)
    run_id = await client.enqueue("p", 0)
    worker = make_worker(store, registry)
    async with working(worker):
        await asyncio.sleep(0.1)  # a few polls: nothing is claimed
        assert await store.status(run_id) == "queued"
        await client.set_queue_limit("default", None)
        await store.backend().notify_work("default")
        await wait_for_status(store, [run_id])


# -- cancellation ----------------------------------------------------------------------------------


async def test_a_cancelled_queued_run_never_starts(store: Store) -> None:
    log: list[str] = []
    registry = registry_of(linear(log))
    client = TaskClient(store.backend(), registry)
    doomed = await client.enqueue("p", 0, priority=10)
    kept = await client.enqueue("p", 0)
    assert await client.cancel(doomed) == "cancelled"
    worker = make_worker(store, registry, concurrency=1)
    async with working(worker):
        await wait_for_status(store, [kept])
    state = await store.load(doomed)
    assert state["status"] == "cancelled"
    assert state["error"]["type"] == "CancelRequested"
    assert state["step_history"] == []
    assert not [entry for entry in log if entry.startswith(doomed)]
    assert await client.cancel(doomed) == "cancelled"
    assert await client.cancel(kept) == "completed"
    with pytest.raises(RunNotFoundError):
        await client.cancel("no-such-run")


async def _heartbeats(client: TaskClient, worker: Worker, count: int) -> None:
    """Wait until ``worker`` renewed its leases ``count`` more times (each renewal reads the
    cancel flags of its runs, then refreshes its registration)."""

    async def seen() -> datetime | None:
        for entry in await client.list_workers():
            if entry["worker_id"] == worker.worker_id:
                return entry["heartbeat_at"]  # type: ignore[no-any-return]
        return None

    for _ in range(count):
        before = await seen()

        async def moved(before: datetime | None = before) -> bool:
            now = await seen()
            return now is not None and (before is None or now > before)

        await wait_until(moved, "a heartbeat")


async def test_a_cancelled_running_run_stops_at_its_next_step_boundary(store: Store) -> None:
    log: list[str] = []
    gate, started = asyncio.Event(), asyncio.Event()
    pipeline = Pipeline.from_steps(
        [gated(log, "s0", gate, started), noting(log, "s1"), noting(log, "s2")]
    )
    registry = registry_of(pipeline)
    client = TaskClient(store.backend(), registry)
    run_id = await client.enqueue("p", 0)
    worker = make_worker(store, registry, concurrency=1)
    async with working(worker):
        async with asyncio.timeout(GUARD_S):
            await started.wait()
        assert await client.cancel(run_id) == "running"
        await _heartbeats(client, worker, 2)  # the worker has seen the request by now
        gate.set()
        await wait_for_status(store, [run_id], "cancelled")
    state = await store.load(run_id)
    assert log == [f"{run_id}:s0"]  # the step in progress finished; nothing after it ran
    assert [record["name"] for record in state["step_history"]] == ["s0"]
    assert state["current_step_index"] == 1
    assert state["cancel_requested"] is True
    assert state["error"]["type"] == "CancelRequested"
    assert state["locked_by"] is None


async def test_a_run_cancelled_while_running_stops_before_its_next_step_on_resume(
    store: Store,
) -> None:
    """A worker that dies after the cancel request: whoever resumes the run stops it at once."""
    log: list[str] = []
    registry = registry_of(linear(log))
    backend = store.backend()
    client = TaskClient(backend, registry)
    run_id = await client.enqueue("p", 0)
    claimed = await backend.claim_runs(worker_id="dead", queues=["default"], limit=1, lease_s=0.05)
    assert [c.run_id for c in claimed] == [run_id]
    assert await client.cancel(run_id) == "running"
    await asyncio.sleep(0.1)  # the dead worker's lease runs out
    worker = make_worker(store, registry)
    async with working(worker):
        await wait_for_status(store, [run_id], "cancelled")
    assert log == []


# -- shutdown and handing back ---------------------------------------------------------------------


async def test_graceful_stop_hands_an_unfinished_run_back(store: Store) -> None:
    log: list[str] = []
    gate, started = asyncio.Event(), asyncio.Event()
    pipeline = Pipeline.from_steps(
        [noting(log, "s0"), gated(log, "s1", gate, started), noting(log, "s2")]
    )
    registry = registry_of(pipeline)
    client = TaskClient(store.backend(), registry)
    run_id = await client.enqueue("p", 0)

    first = make_worker(store, registry, grace_s=0.05)
    task = asyncio.ensure_future(first.run())
    async with asyncio.timeout(GUARD_S):
        await started.wait()
    first.stop()
    async with asyncio.timeout(GUARD_S):
        await task  # the grace ran out: the run was cut off in s1 and handed back
    state = await store.load(run_id)
    assert (state["status"], state["locked_by"], state["current_step_index"]) == ("queued", None, 1)
    assert log == [f"{run_id}:s0"]

    gate.set()
    second = make_worker(store, registry)
    async with working(second):
        await wait_for_status(store, [run_id])
    state = await store.load(run_id)
    assert [record["name"] for record in state["step_history"]] == ["s0", "s1", "s2"]
    assert log == [f"{run_id}:s0", f"{run_id}:s1", f"{run_id}:s2"]  # s0 did not run again


async def test_graceful_stop_lets_a_run_finish_within_the_grace(store: Store) -> None:
    log: list[str] = []
    gate, started = asyncio.Event(), asyncio.Event()
    pipeline = Pipeline.from_steps([gated(log, "s0", gate, started), noting(log, "s1")])
    registry = registry_of(pipeline)
    client = TaskClient(store.backend(), registry)
    run_id = await client.enqueue("p", 0)
    late = await client.enqueue("p", 0)  # not claimed once the worker is stopping
    worker = make_worker(store, registry, concurrency=1, grace_s=GUARD_S)
    task = asyncio.ensure_future(worker.run())
    async with asyncio.timeout(GUARD_S):
        await started.wait()
    worker.stop()
    await asyncio.sleep(0.05)
    assert not task.done()  # waiting for the run
    gate.set()
    async with asyncio.timeout(GUARD_S):
        await task
    assert await store.status(run_id) == "completed"
    assert await store.status(late) == "queued"


# -- pipeline versions -----------------------------------------------------------------------------


async def test_a_version_the_worker_lacks_stays_queued_for_one_that_has_it(store: Store) -> None:
    log: list[str] = []
    one, two = linear(log, 1), linear(log, 2)
    both = PipelineRegistry()
    both.register(one, "p", "1.0.0", context_model=Ctx)
    both.register(two, "p", "2.0.0", context_model=Ctx)
    client = TaskClient(store.backend(), both)
    old = await client.enqueue("p", 0, version="1.0.0")
    new = await client.enqueue("p", 0)  # latest: 2.0.0
    assert (await store.load(new))["pipeline_version"] == "2.0.0"

    only_one = make_worker(store, registry_of(one))
    async with working(only_one):
        await wait_for_status(store, [old])
        await asyncio.sleep(0.05)  # more polls: still not taken
        state = await store.load(new)
        assert (state["status"], state["locked_by"]) == ("queued", None)

    has_two = make_worker(store, both)
    async with working(has_two):
        await wait_for_status(store, [new])
    assert (await store.load(new))["last_step_output"] == 2


# -- lost leases -----------------------------------------------------------------------------------


async def test_a_worker_that_lost_its_lease_cannot_checkpoint(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """Worker A stalls (no heartbeat) in step s1; its lease runs out; worker B takes the run
    over and resumes it at s1. When A's s1 ends, its checkpoint is refused: each step is
    committed once, by B."""
    log: list[str] = []
    gate, started = asyncio.Event(), asyncio.Event()
    pipeline = Pipeline.from_steps(
        [noting(log, "s0"), gated(log, "s1", gate, started), noting(log, "s2")]
    )
    registry = registry_of(pipeline)
    backend = store.backend()
    run_id = await TaskClient(backend, registry).enqueue("p", 0)
    stalled = make_worker(store, registry, concurrency=1, lease_s=30.0, heartbeat_s=20.0)
    taker = make_worker(store, registry, concurrency=1)
    caplog.set_level(logging.WARNING, logger="flujo.worker")
    async with working(stalled):
        async with asyncio.timeout(GUARD_S):
            await started.wait()
        held = await backend.renew_leases(
            worker_id=stalled.worker_id, run_ids=[run_id], lease_s=0.01
        )
        assert held == {run_id: False}
        await asyncio.sleep(0.05)  # A's lease ran out (A did not renew: it stalled)
        started.clear()
        async with working(taker):
            async with asyncio.timeout(GUARD_S):
                await started.wait()  # B resumed the run at s1
            assert (await store.load(run_id))["locked_by"] == taker.worker_id
            gate.set()  # both finish s1; only B's checkpoint is taken
            await wait_for_status(store, [run_id])
    state = await store.load(run_id)
    assert [record["name"] for record in state["step_history"]] == ["s0", "s1", "s2"]
    assert Counter(log) == {f"{run_id}:s0": 1, f"{run_id}:s1": 2, f"{run_id}:s2": 1}
    assert any("lost run" in record.getMessage() for record in caplog.records)


async def test_a_worker_never_runs_one_run_twice_at_once(store: Store) -> None:
    """A worker whose lease on a run it is still running ran out (its renewals failed, or a
    blocking step held its event loop) must not claim that run again beside itself."""
    log: list[str] = []
    gate, started = asyncio.Event(), asyncio.Event()
    pipeline = Pipeline.from_steps([gated(log, "s0", gate, started), noting(log, "s1")])
    registry = registry_of(pipeline)
    backend = store.backend()
    run_id = await TaskClient(backend, registry).enqueue("p", 0)
    worker = make_worker(store, registry, concurrency=2, lease_s=30.0, heartbeat_s=20.0)
    async with working(worker):
        async with asyncio.timeout(GUARD_S):
            await started.wait()
        started.clear()
        await backend.renew_leases(worker_id=worker.worker_id, run_ids=[run_id], lease_s=0.01)
        await asyncio.sleep(0.3)  # the worker's idle loop wakes at the lease's expiry
        again = started.is_set()
        gate.set()
        await wait_for_status(store, [run_id])
        assert worker.active == []
    assert not again, "the worker started the run a second time while running it"
    assert Counter(log)[f"{run_id}:s0"] == 1


# -- background steps: local mode ------------------------------------------------------------------


def test_background_launched_is_importable_from_flujo() -> None:
    # The docstrings of StepConfig.execution_mode and flujo.application.background name it
    # ``flujo.BackgroundLaunched``.
    import flujo

    assert flujo.BackgroundLaunched is BackgroundLaunched


def background_pipeline(calls: list[Any], *, fail: Callable[[], bool] = lambda: False) -> Any:
    @step
    async def first(x: int, *, context: Ctx) -> int:
        context.note = "set-by-first"
        return x + 1

    @step(execution_mode="background")
    async def report(x: int, *, context: Ctx) -> int:
        if fail():
            raise RuntimeError("report failed")
        calls.append(("report", x, context.note, context.run_id))
        context.note = "changed-in-background"
        return x * 10

    @step
    async def last(x: Any, *, context: Ctx) -> str:
        calls.append(("last", type(x).__name__))
        return "done"

    return first >> report >> last


def test_a_background_step_runs_beside_its_pipeline_locally(tmp_path: Path) -> None:
    calls: list[Any] = []
    backend = SQLiteBackend(tmp_path / "runs.db")
    runner = Flujo(
        background_pipeline(calls),
        context_model=Ctx,
        state_backend=backend,
        pipeline_name="p",
        pipeline_version="1.0.0",
        background_mode="local",
    )
    result = runner.run(1, run_id="parent-1")  # waits for the background task too
    assert result.status == "completed"
    assert result.output == "done"
    launched = result.step_history[1].output
    assert isinstance(launched, BackgroundLaunched)
    assert launched.task_id.startswith("bg-")
    assert (launched.queue, launched.status) == (None, "launched")  # local: no worker claims it
    assert ("last", "BackgroundLaunched") in calls  # the next step got the launch
    assert result.final_pipeline_context.note == "set-by-first"  # the task has its own copy
    assert ("report", 2, "set-by-first", launched.task_id) in calls  # ... of the context

    async def look() -> None:
        check = SQLiteBackend(tmp_path / "runs.db")
        task = await check.load_state(launched.task_id)
        parent = await check.load_state("parent-1")
        await check.aclose()
        assert task is not None
        assert parent is not None
        assert task["status"] == "completed"
        assert task["metadata"] == {
            "flujo.kind": "background",
            "flujo.parent_run_id": "parent-1",
            "flujo.step_name": "report",
            "flujo.step_path": "[1]",
        }
        assert task["initial_input"] == 2
        assert task["last_step_output"] == 20
        assert task["pipeline_context"]["note"] == "changed-in-background"
        assert task["step_names"] == ["report"]
        assert (task["pipeline_name"], task["pipeline_version"]) == ("p", "1.0.0")
        assert parent["step_history"][1]["output"] == launched.model_dump()
        assert parent["pipeline_context"]["note"] == "set-by-first"

    asyncio.run(look())


async def test_a_local_background_task_is_waited_for_by_aclose(store: Store) -> None:
    calls: list[Any] = []
    runner = Flujo(
        background_pipeline(calls),
        context_model=Ctx,
        state_backend=store.backend(),
        pipeline_name="p",
        pipeline_version="1.0.0",
        background_mode="local",
    )
    result = await runner.run_async(1)
    task_id = result.step_history[1].output.task_id
    await runner.aclose()
    assert await store.status(task_id) == "completed"


def test_a_background_step_without_a_store_still_runs() -> None:
    calls: list[Any] = []
    runner = Flujo(background_pipeline(calls), context_model=Ctx, persist_state=False)
    result = runner.run(1)
    assert result.status == "completed"
    assert isinstance(result.step_history[1].output, BackgroundLaunched)
    assert [c for c in calls if c[0] == "report"] == [("report", 2, "set-by-first", result.run_id)]


async def test_failed_background_tasks_are_listed_and_resumed(store: Store) -> None:
    calls: list[Any] = []
    broken = {"on": True}
    pipeline = background_pipeline(calls, fail=lambda: broken["on"])
    registry = registry_of(pipeline)
    before = datetime.now(UTC) - timedelta(seconds=1)
    runner = runner_for(store, registry, background_mode="local")
    results = [await runner.run_async(i, run_id=f"parent-{i}") for i in range(3)]
    await runner.aclose()  # the tasks ran (and failed)
    assert all(result.status == "completed" for result in results)  # the parents went on
    task_ids = [result.step_history[1].output.task_id for result in results]
    for task_id in task_ids:
        state = await store.load(task_id)
        assert state["status"] == "failed"
        assert state["error"]["type"] == "RuntimeError"

    runner = runner_for(store, registry, background_mode="local")
    client = TaskClient(store.backend(), registry)
    for source in (runner, client):
        failed = await source.get_failed_background_tasks()
        assert {task.task_id for task in failed} == set(task_ids)
        assert {task.step_name for task in failed} == {"report"}
        mine = await source.get_failed_background_tasks(parent_run_id="parent-1")
        assert [(t.task_id, t.parent_run_id) for t in mine] == [(task_ids[1], "parent-1")]
        assert await source.get_failed_background_tasks(step_name="other") == []
        assert len(await source.get_failed_background_tasks(step_name="report")) == 3
        assert len(await source.get_failed_background_tasks(since=before)) == 3
        later = datetime.now(UTC) + timedelta(hours=1)
        assert await source.get_failed_background_tasks(since=later) == []
        assert len(await source.get_failed_background_tasks(limit=2)) == 2
        assert await source.get_failed_background_tasks(parent_run_id="parent-9") == []

    broken["on"] = False
    retried = await runner.resume_background_task(task_ids[0])  # here, on the runner
    assert (retried.status, retried.output) == ("completed", 10)
    retried = await client.resume_background_task(task_ids[1])  # here, on the TaskClient
    assert retried is not None
    assert (retried.status, retried.output) == ("completed", 20)
    assert await client.resume_background_task(task_ids[2], requeue=True) is None  # to workers
    assert await store.status(task_ids[2]) == "queued"
    worker = make_worker(store, registry)
    async with working(worker):
        await wait_for_status(store, [task_ids[2]])
    assert (await store.load(task_ids[2]))["last_step_output"] == 30
    assert await runner.get_failed_background_tasks() == []
    await runner.aclose()

    with pytest.raises(StateConflictError):  # only a failed (or abandoned) task is requeued
        await client.resume_background_task(task_ids[0], requeue=True)
    for source in (runner, client):
        with pytest.raises(RunNotFoundError):
            await source.resume_background_task("no-such-task")
        with pytest.raises(RunNotFoundError):
            await source.resume_background_task("parent-0")  # a run, not a background task


# -- background steps: queue mode ----------------------------------------------------------------


async def test_queue_mode_leaves_the_task_for_a_worker(store: Store) -> None:
    calls: list[Any] = []
    registry = registry_of(background_pipeline(calls))
    runner = runner_for(store, registry, background_mode="queue")
    result = await runner.run_async(1, run_id="parent-q")
    await runner.aclose()
    assert result.status == "completed"
    task_id = result.step_history[1].output.task_id
    assert await store.status(task_id) == "queued"
    assert not [c for c in calls if c[0] == "report"]

    worker = make_worker(store, registry)
    async with working(worker):
        await wait_for_status(store, [task_id])
    assert ("report", 2, "set-by-first", task_id) in calls
    assert (await store.load(task_id))["last_step_output"] == 20


async def test_the_background_mode_setting(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUJO_BACKGROUND_MODE", "queue")
    calls: list[Any] = []
    registry = registry_of(background_pipeline(calls))
    runner = runner_for(store, registry)
    result = await runner.run_async(1)
    await runner.aclose()
    assert await store.status(result.step_history[1].output.task_id) == "queued"
    with pytest.raises(ConfigurationError):
        Flujo(background_pipeline(calls), background_mode="elsewhere")  # type: ignore[arg-type]


async def test_a_background_steps_queue(store: Store) -> None:
    done: list[int] = []

    async def slow_report(x: int) -> int:
        done.append(x)
        return x

    pipeline = Pipeline.from_steps(
        [
            Step.from_callable(
                slow_report, name="report", execution_mode="background", queue="reports"
            )
        ]
    )
    registry = registry_of(pipeline)
    client = TaskClient(store.backend(), registry)
    parent = await client.enqueue("p", 7, queue="main")
    main = make_worker(store, registry, queues=["main"])
    async with working(main):
        await wait_for_status(store, [parent])
    launched = (await store.load(parent))["last_step_output"]
    assert launched["queue"] == "reports"
    task_id = launched["task_id"]
    state = await store.load(task_id)
    assert (state["status"], state["queue"]) == ("queued", "reports")  # workers queue them
    assert done == []

    reports = make_worker(store, registry, queues=["reports"])
    async with working(reports):
        await wait_for_status(store, [task_id])
    assert done == [7]


async def test_a_background_task_inherits_its_parents_queue(store: Store) -> None:
    calls: list[Any] = []
    registry = registry_of(background_pipeline(calls))
    client = TaskClient(store.backend(), registry)
    parent = await client.enqueue("p", 1, queue="research")
    worker = make_worker(store, registry, queues=["research"])
    async with working(worker):
        await wait_for_status(store, [parent])
        task_id = (await store.load(parent))["step_history"][1]["output"]["task_id"]
        await wait_for_status(store, [task_id])  # the same worker took the task too
    assert (await store.load(task_id))["queue"] == "research"


# -- background steps inside composite steps -------------------------------------------------------


async def test_nested_background_steps_get_a_task_per_path(store: Store) -> None:
    seen: list[tuple[str, Any]] = []

    async def note(x: Any, *, context: Ctx) -> Any:
        seen.append((context.run_id, x))
        return x

    def item_pipeline() -> Pipeline[Any, Any]:
        return Pipeline.from_steps(
            [Step.from_callable(note, name="note", execution_mode="background")]
        )

    exits = iter([False, True])  # the loop stops after its second iteration
    mapped = MapStep("each", item_pipeline())
    looped = LoopStep(
        "again",
        item_pipeline(),
        lambda output, context: next(exits),
        max_loops=2,
        iteration_input_mapper=lambda output, context, i: f"iteration-{i}",
    )

    async def reset(x: Any) -> list[int]:
        return [1, 2, 3]

    pipeline = mapped >> Step.from_callable(reset, name="reset") >> looped
    runner = Flujo(
        pipeline,
        context_model=Ctx,
        state_backend=store.backend(),
        pipeline_name="p",
        pipeline_version="1.0.0",
        background_mode="local",
    )
    result = await runner.run_async(["a", "b", "c"], run_id="nested")
    await runner.aclose()
    assert result.status == "completed", result.error

    backend = store.backend()
    tasks = await backend.list_runs(metadata_filter={"flujo.parent_run_id": "nested"})
    paths = sorted(task["metadata"]["flujo.step_path"] for task in tasks)
    assert len(tasks) == 5
    assert paths == sorted(["[0,0,0]", "[0,1,0]", "[0,2,0]", "[2,0,0]", "[2,1,0]"])
    assert len({task["run_id"] for task in tasks}) == 5
    inputs = {}
    for task in tasks:
        state = await store.load(task["run_id"])
        assert state["status"] == "completed"
        inputs[task["metadata"]["flujo.step_path"]] = state["initial_input"]
    assert [inputs[p] for p in ("[0,0,0]", "[0,1,0]", "[0,2,0]")] == ["a", "b", "c"]
    assert sorted(repr(x) for _, x in seen) == sorted(repr(x) for x in inputs.values())
    assert len(seen) == 5  # each ran once


# -- launching is idempotent -----------------------------------------------------------------------


class CrashOnce(SQLiteBackend):
    """A SQLite store whose first checkpoint recording ``step_name`` fails, as if the process
    died right after the background task was launched and before the launch was checkpointed."""

    def __init__(self, path: Path, step_name: str) -> None:
        super().__init__(path)
        self.step_name = step_name
        self.crashed = False

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        if not self.crashed and any(
            orjson.loads(raw).get("name") == self.step_name for raw in checkpoint.steps
        ):
            self.crashed = True
            raise StateBackendError("simulated crash before the launch was checkpointed")
        return await super().write_checkpoint(checkpoint)


#: A runner of ``background_pipeline`` as pipeline p 1.0.0, background tasks in local mode.
LOCAL_OPTIONS: dict[str, Any] = {
    "context_model": Ctx,
    "pipeline_name": "p",
    "pipeline_version": "1.0.0",
    "background_mode": "local",
}


async def test_relaunching_a_background_step_creates_no_second_task(tmp_path: Path) -> None:
    calls: list[Any] = []
    pipeline = background_pipeline(calls)
    options = LOCAL_OPTIONS
    crashing = CrashOnce(tmp_path / "runs.db", "report")
    runner = Flujo(pipeline, state_backend=crashing, **options)
    with pytest.raises(StateBackendError):
        await runner.run_async(1, run_id="parent-x")
    await runner.aclose()  # the task launched before the "crash" ran
    state = await crashing.load_state("parent-x")
    assert state is not None
    assert state["current_step_index"] == 1  # the launch was not checkpointed

    again = Flujo(pipeline, state_backend=SQLiteBackend(tmp_path / "runs.db"), **options)
    result = await again.run_async(None, run_id="parent-x")  # runs the background step again
    await again.aclose()
    assert result.status == "completed"
    backend = SQLiteBackend(tmp_path / "runs.db")
    tasks = await backend.list_runs(metadata_filter={"flujo.parent_run_id": "parent-x"})
    await backend.aclose()
    assert len(tasks) == 1
    assert result.step_history[1].output.task_id == tasks[0]["run_id"]
    assert tasks[0]["status"] == "completed"
    assert [c for c in calls if c[0] == "report"] == [
        ("report", 2, "set-by-first", tasks[0]["run_id"])
    ]  # the task ran once


async def test_a_local_task_that_never_ran_is_run_when_its_parent_is_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process died after storing the task and before running it or checkpointing the
    launch: running the parent again finds the task unfinished, with no queue (so no worker
    will take it), and runs it."""
    calls: list[Any] = []
    pipeline = background_pipeline(calls)
    options = LOCAL_OPTIONS
    crashing = CrashOnce(tmp_path / "runs.db", "report")
    runner = Flujo(pipeline, state_backend=crashing, **options)
    monkeypatch.setattr(runner, "_spawn_background", lambda work, task_id: work.close())
    with pytest.raises(StateBackendError):
        await runner.run_async(1, run_id="parent-y")
    await runner.aclose()
    backend = SQLiteBackend(tmp_path / "runs.db")
    [task] = await backend.list_runs(metadata_filter={"flujo.parent_run_id": "parent-y"})
    assert (task["status"], task["queue"]) == ("queued", None)  # stored, never run

    again = Flujo(pipeline, state_backend=SQLiteBackend(tmp_path / "runs.db"), **options)
    result = await again.run_async(None, run_id="parent-y")
    await again.aclose()
    assert result.status == "completed"
    state = await backend.load_state(task["run_id"])
    await backend.aclose()
    assert state is not None
    assert state["status"] == "completed"
    assert [c for c in calls if c[0] == "report"] == [("report", 2, "set-by-first", task["run_id"])]


async def test_a_worker_never_claims_a_local_background_task(store: Store) -> None:
    """Local mode runs the task on the launching runner's loop; a worker on the same store and
    queue must not run it too."""
    gate, started = asyncio.Event(), asyncio.Event()
    runs: list[str] = []

    @step(execution_mode="background")
    async def slow(x: int, *, context: Ctx) -> int:
        runs.append(context.run_id)
        started.set()
        await gate.wait()
        return x

    pipeline = Step.from_callable(lambda x: x, name="first") >> slow
    registry = registry_of(pipeline)
    worker = make_worker(store, registry)
    runner = Flujo(
        registry=registry,
        pipeline_name="p",
        context_model=Ctx,
        state_backend=store.backend(),
        background_mode="local",
    )
    async with working(worker):
        result = await runner.run_async(1, run_id="parent-z")
        assert result.status == "completed"
        async with asyncio.timeout(GUARD_S):
            await started.wait()
        await asyncio.sleep(0.2)  # several idle rounds of the worker (it polls every 20 ms)
        task_id = result.step_history[1].output.task_id
        assert (await store.load(task_id))["locked_by"] is None
        gate.set()
        await runner.aclose()
        assert worker.completed == 0
    assert runs == [task_id]
    assert await store.status(task_id) == "completed"


async def test_a_stranded_local_task_is_requeued_for_the_workers(store: Store) -> None:
    """A local task whose process died before it ran (queued, no queue) goes to the default
    queue with resume_background_task(requeue=True), and a worker runs it."""
    calls: list[Any] = []
    pipeline = background_pipeline(calls)
    registry = registry_of(pipeline)
    runner = Flujo(
        registry=registry,
        pipeline_name="p",
        context_model=Ctx,
        state_backend=store.backend(),
        background_mode="local",
    )
    runner._spawn_background = lambda work, task_id: work.close()  # type: ignore[method-assign]
    result = await runner.run_async(1, run_id="parent-s")
    task_id = result.step_history[1].output.task_id
    assert (await store.load(task_id))["queue"] is None
    client = TaskClient(store.backend(), registry)
    assert await client.resume_background_task(task_id, requeue=True) is None
    assert (await store.load(task_id))["queue"] == "default"
    async with working(make_worker(store, registry)):
        await wait_for_status(store, [task_id])
    assert [c for c in calls if c[0] == "report"] == [("report", 2, "set-by-first", task_id)]


async def test_resuming_a_parent_after_a_later_failure_launches_nothing_again(
    store: Store,
) -> None:
    calls: list[Any] = []
    broken = {"on": True}

    @step(execution_mode="background")
    async def report(x: int) -> int:
        calls.append(x)
        return x

    @step
    async def flaky(x: Any) -> str:
        if broken["on"]:
            raise RuntimeError("flaky")
        return "ok"

    pipeline = report >> flaky
    options: dict[str, Any] = {"context_model": Ctx, "background_mode": "local"}
    runner = Flujo(pipeline, state_backend=store.backend(), **options)
    assert (await runner.run_async(5, run_id="parent-y")).status == "failed"
    broken["on"] = False
    assert (await runner.run_async(None, run_id="parent-y")).status == "completed"
    await runner.aclose()
    tasks = await store.backend().list_runs(metadata_filter={"flujo.parent_run_id": "parent-y"})
    assert len(tasks) == 1
    assert calls == [5]


# -- a worker runs parents and their background tasks --------------------------------------------


async def test_a_worker_runs_a_parent_then_its_background_task(store: Store) -> None:
    calls: list[Any] = []
    registry = registry_of(background_pipeline(calls))
    run_id = await TaskClient(store.backend(), registry).enqueue("p", 1)
    worker = make_worker(store, registry)
    async with working(worker):
        await wait_for_status(store, [run_id])
        task_id = (await store.load(run_id))["step_history"][1]["output"]["task_id"]
        await wait_for_status(store, [task_id])
    assert ("report", 2, "set-by-first", task_id) in calls


# -- the command line ------------------------------------------------------------------------------

FLOWS = """
import asyncio
import os
from pathlib import Path

from flujo import Pipeline, PipelineRegistry, Step


async def work(x: int) -> int:
    await asyncio.sleep(float(os.environ.get("STEP_SLEEP", "0")))
    with Path(os.environ["STEP_LOG"]).open("a") as handle:
        handle.write(f"{x}\\n")
    return x + 1


pipeline = Pipeline.from_steps([Step.from_callable(work, name=f"s{i}") for i in range(3)])
registry = PipelineRegistry()
registry.register(pipeline, "p", "1.0.0")
"""


@pytest.fixture
def workdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """tmp_path as the working directory, its own SQLite store, no stray settings."""
    monkeypatch.chdir(tmp_path)
    for variable in ("FLUJO_APP", "FLUJO_CONFIG_PATH", "COLUMNS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("FLUJO_STATE_URI", f"sqlite:///{tmp_path / 'runs.db'}")
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.app, list(args))


def _registry() -> PipelineRegistry:
    async def work(x: int) -> int:
        return x + 1

    registry = PipelineRegistry()
    registry.register(
        Pipeline.from_steps([Step.from_callable(work, name=f"s{i}") for i in range(3)]),
        "p",
        "1.0.0",
    )
    return registry


def test_runs_cancel_command(workdir: Path) -> None:
    async def setup() -> tuple[str, str, str]:
        backend = SQLiteBackend(workdir / "runs.db")
        client = TaskClient(backend, _registry())
        queued = await client.enqueue("p", 1)
        running = await client.enqueue("p", 2)
        done = await client.enqueue("p", 3)
        await backend.claim_runs(worker_id="w", queues=["default"], limit=2, lease_s=600)
        # "queued" was claimed first (oldest): hand it back, so that it is queued again.
        await backend.release_runs(worker_id="w", run_ids=[queued])
        await Flujo(registry=_registry(), pipeline_name="p", state_backend=backend).run_async(
            None, run_id=done
        )
        await backend.aclose()
        return queued, running, done

    queued, running, done = asyncio.run(setup())
    result = invoke("runs", "cancel", queued)
    assert result.exit_code == 0, result.output
    assert f"Run {queued} is cancelled." in result.stdout
    result = invoke("runs", "cancel", running)
    assert result.exit_code == 0, result.output
    assert "will stop at its next step boundary" in result.stdout
    result = invoke("runs", "cancel", done)
    assert result.exit_code == 0, result.output
    assert "already completed" in result.stdout
    result = invoke("runs", "cancel", "no-such-run")
    assert result.exit_code == cli.EXIT_NOT_FOUND, result.output
    result = invoke("runs", "cancel", "../etc/passwd")
    assert result.exit_code != 0

    async def check() -> dict[str, Any]:
        backend = SQLiteBackend(workdir / "runs.db")
        states = {run_id: await backend.load_state(run_id) for run_id in (queued, running)}
        await backend.aclose()
        return states

    states = asyncio.run(check())
    assert states[queued]["status"] == "cancelled"
    assert (states[running]["status"], states[running]["cancel_requested"]) == ("running", True)


def test_runs_list_says_why_a_queued_run_waits(workdir: Path) -> None:
    async def setup() -> tuple[str, str]:
        backend = SQLiteBackend(workdir / "runs.db")
        registry = _registry()
        registry.register(linear([], 1), "p", "2.0.0", context_model=Ctx)
        client = TaskClient(backend, registry)
        old = await client.enqueue("p", 1, version="1.0.0")
        new = await client.enqueue("p", 1, version="2.0.0", queue="other")
        await backend.aclose()
        return old, new

    asyncio.run(setup())
    result = invoke("runs", "list")
    assert result.exit_code == 0, result.output
    assert "no live worker on queue 'default'" in result.stdout

    async def register() -> None:
        backend = SQLiteBackend(workdir / "runs.db")
        info = {"queues": ["default", "other"], "pipelines": ["p@1.0.0"], "lease_s": 600}
        await backend.register_worker("w-1", info)
        await backend.aclose()

    asyncio.run(register())
    result = CliRunner().invoke(cli.app, ["runs", "list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "no worker on queue 'other' has p@2.0.0" in result.stdout
    assert "no live worker" not in result.stdout


def _spawn_worker(workdir: Path, module: str, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flujo.cli", "worker", "--app", f"{module}:registry", *args],
        cwd=workdir,
        env={**os.environ, "STEP_LOG": str(workdir / "steps.log"), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_worker_command_runs_queued_runs_and_exits_0_on_sigterm(workdir: Path) -> None:
    module = f"worker_flows_{uuid.uuid4().hex[:8]}"
    (workdir / f"{module}.py").write_text(FLOWS)

    async def enqueue() -> list[str]:
        backend = SQLiteBackend(workdir / "runs.db")
        client = TaskClient(backend, _registry())
        run_ids = [await client.enqueue("p", i * 10) for i in range(4)]
        await backend.aclose()
        return run_ids

    run_ids = asyncio.run(enqueue())
    process = _spawn_worker(
        workdir, module, "--concurrency", "2", "--lease", "5", "--heartbeat", "0.5"
    )
    try:
        asyncio.run(_wait_completed(workdir / "runs.db", run_ids))
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=GUARD_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    assert "stopped after 4 run(s)" in stderr
    assert Counter((workdir / "steps.log").read_text().split()) == Counter(
        str(i * 10 + k) for i in range(4) for k in range(3)
    )


@pytest.mark.slow
def test_worker_command_hands_a_run_back_on_sigterm(workdir: Path) -> None:
    module = f"worker_flows_{uuid.uuid4().hex[:8]}"
    (workdir / f"{module}.py").write_text(FLOWS)

    async def enqueue() -> str:
        backend = SQLiteBackend(workdir / "runs.db")
        run_id = await TaskClient(backend, _registry()).enqueue("p", 0)
        await backend.aclose()
        return run_id

    run_id = asyncio.run(enqueue())
    process = _spawn_worker(workdir, module, "--grace", "0", STEP_SLEEP="30")
    try:
        asyncio.run(_wait_status(workdir / "runs.db", run_id, "running"))
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=GUARD_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr

    async def state() -> dict[str, Any]:
        backend = SQLiteBackend(workdir / "runs.db")
        found = await backend.load_state(run_id)
        await backend.aclose()
        assert found is not None
        return found

    handed_back = asyncio.run(state())
    assert (handed_back["status"], handed_back["locked_by"]) == ("queued", None)
    assert not (workdir / "steps.log").exists()


def test_worker_command_needs_an_app(workdir: Path) -> None:
    result = invoke("worker")
    assert result.exit_code == cli.EXIT_USAGE
    assert "--app" in result.stderr


async def _wait_status(path: Path, run_id: str, status: str) -> None:
    backend = SQLiteBackend(path)
    try:

        async def reached() -> bool:
            state = await backend.load_state(run_id)
            return state is not None and state["status"] == status

        await wait_until(reached, f"{run_id} {status}")
    finally:
        await backend.aclose()


async def _wait_completed(path: Path, run_ids: list[str]) -> None:
    for run_id in run_ids:
        await _wait_status(path, run_id, "completed")
