"""Postgres with real processes and real connection failures: RELIABILITY.md promises 1
(exactly-once progress), 3 (one writer per run) and 7 (a lost connection never records a step
twice).

The process tests reuse the child of test_crash_recovery.py (``_crash_child.py``, with
``backend="postgres"``): a 10-step pipeline whose step ``i`` appends ``"i"`` to a side-effect
file. The connection tests run a pipeline in this process and cut its connections from the
side: with ``pg_terminate_backend`` (found by a unique ``application_name`` in the DSN), by
closing a TCP relay the backend reaches the server through (the server is then gone for good),
or by failing the driver call that carries a checkpoint, before or after the server ran it.

Every test has its own schema (``postgres_schema``); without a server they fail under CI=true
and skip elsewhere (``postgres_dsn``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import orjson
import pytest
from test_crash_recovery import (
    ALL_STEPS,
    STEPS,
    assert_completed,
    assert_consistent,
    assert_exactly_once_progress,
    committed_steps,
    effect_lines,
    spawn,
)

from flujo import Flujo, Pipeline, PipelineContext, Step
from flujo.domain.events import PostStep
from flujo.exceptions import FlujoError, StateBackendError
from flujo.state.backends.base import Checkpoint, RunHeader
from flujo.state.backends.postgres import PostgresBackend

PIPELINE_NAME = "pg-connection-test"


# -- helpers ---------------------------------------------------------------------------------------


class PgStore:
    """One test's Postgres store: a DSN and a migrated schema."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema

    def backend(self, dsn: str | None = None, **kwargs: Any) -> PostgresBackend:
        kwargs.setdefault("pool_min", 0)
        return PostgresBackend(dsn or self.dsn, schema=self.schema, **kwargs)

    async def load_async(self, run_id: str) -> dict[str, Any] | None:
        async with self.backend() as backend:
            return await backend.load_state(run_id)

    def load(self, run_id: str) -> dict[str, Any] | None:
        """The run's stored state, read by this (the parent) process in a loop of its own."""
        return asyncio.run(self.load_async(run_id))

    async def step_rows(self, run_id: str) -> list[int]:
        """The seq of every stored step record of ``run_id`` (straight from the table)."""
        conn = await asyncpg.connect(self.dsn, server_settings={"search_path": self.schema})
        try:
            rows = await conn.fetch(
                "SELECT seq FROM flujo_run_steps WHERE run_id = $1 ORDER BY seq", run_id
            )
        finally:
            await conn.close()
        return [row["seq"] for row in rows]


async def _migrate(store: PgStore) -> None:
    async with store.backend() as backend:
        assert await backend.migrate() == [1, 2]


@pytest.fixture
def pg_store(postgres_dsn: str, postgres_schema: str) -> PgStore:
    store = PgStore(postgres_dsn, postgres_schema)
    asyncio.run(_migrate(store))
    return store


@pytest.fixture
async def pg_store_async(postgres_dsn: str, postgres_schema: str) -> PgStore:
    store = PgStore(postgres_dsn, postgres_schema)
    await _migrate(store)
    return store


def _assert_history_once(state: dict[str, Any] | None, *, failures: int = 0) -> None:
    """No step is recorded twice; the history is whole (RELIABILITY.md promise 7)."""
    assert state is not None
    names = [record["name"] for record in state["step_history"] if record["success"]]
    assert names == [f"s{i}" for i in range(len(names))], names
    assert len(state["step_history"]) == len(names) + failures, state["step_history"]


# -- promise 3: two processes resuming one run ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("origin", ["interrupted", "failed"])
def test_two_processes_resuming_one_run_on_postgres(
    tmp_path: Path, pg_store: PgStore, origin: str
) -> None:
    """Both resumers load version v and run step 3 (a file barrier holds them until both
    have); exactly one advances the run, the other gets StateConflictError and wrote nothing."""
    base = {"backend": "postgres", "store": pg_store.dsn, "schema": pg_store.schema}
    base["run_id"] = "shared"
    start_step = 3
    if origin == "interrupted":
        spawn(
            tmp_path, **base, effects=str(tmp_path / "effects0"), kill=["after_commit", 2]
        ).killed()
        failures = 0
    else:
        outcome = spawn(
            tmp_path, **base, effects=str(tmp_path / "effects0"), fail_step=start_step
        ).outcome()
        assert outcome == {"status": "failed", "output": None}
        failures = 1
    before = pg_store.load("shared")
    assert before is not None
    assert before["current_step_index"] == start_step
    assert_consistent(before, failures=failures)
    version = before["version"]

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    resumers = [
        spawn(
            tmp_path,
            **base,
            effects=str(tmp_path / f"effects-{name}"),
            barrier=[str(barrier), start_step, 2],
        )
        for name in ("a", "b")
    ]
    outcomes = [child.outcome() for child in resumers]

    winners = [n for n, o in enumerate(outcomes) if o.get("status") == "completed"]
    losers = [n for n, o in enumerate(outcomes) if o.get("error") == "StateConflictError"]
    assert len(winners) == 1, outcomes
    assert len(losers) == 1, outcomes
    winner, loser = "ab"[winners[0]], "ab"[losers[0]]
    assert outcomes[winners[0]]["output"] == ALL_STEPS
    conflict = outcomes[losers[0]]
    assert conflict["expected_version"] == version, conflict
    assert conflict["actual_version"] is not None, conflict
    assert conflict["actual_version"] > version, conflict

    # The loser ran the step it resumed at (at-least-once), then stopped.
    assert effect_lines(tmp_path / f"effects-{loser}") == [start_step]
    assert effect_lines(tmp_path / f"effects-{winner}") == list(range(start_step, STEPS))
    # ... and wrote nothing: the store holds exactly the winner's checkpoints.
    after = pg_store.load("shared")
    assert_completed(after, failures=failures)
    assert after is not None
    assert after["version"] == version + STEPS - start_step
    assert after["step_history"][: len(before["step_history"])] == before["step_history"]
    assert asyncio.run(pg_store.step_rows("shared")) == list(range(STEPS + failures))


# -- promise 1: SIGKILL at a step boundary, then resume ------------------------------------------

# point -> (does step k's checkpoint survive the kill?, times step k runs in all)
KILL_POINTS = {
    "enter": (False, 1),
    "after_effect": (False, 2),
    "after_commit": (True, 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_at_every_step_then_resume_on_postgres(
    tmp_path: Path, pg_store: PgStore, point: str
) -> None:
    """For each step k: a child dies at ``point`` of step k, a second one resumes the run.
    The ten crashes (one run id per k, one schema) run side by side, then the ten resumes."""
    survives, runs_of_k = KILL_POINTS[point]
    dirs = [tmp_path / f"k{k}" for k in ALL_STEPS]
    for directory in dirs:
        directory.mkdir()

    def config(k: int) -> dict[str, Any]:
        return {
            "backend": "postgres",
            "store": pg_store.dsn,
            "schema": pg_store.schema,
            "run_id": f"run-{k}",
            "effects": str(dirs[k] / "effects"),
        }

    crashes = [spawn(dirs[k], **config(k), kill=[point, k]) for k in ALL_STEPS]
    for child in crashes:
        child.killed()

    committed: dict[int, list[int]] = {}
    for k in ALL_STEPS:
        state = pg_store.load(f"run-{k}")
        assert_consistent(state)
        committed[k] = committed_steps(state)
        expected = list(range(k + 1 if survives else k))
        assert committed[k] == expected, f"k={k}: store holds steps {committed[k]}"
        effects = effect_lines(dirs[k] / "effects")
        assert effects == list(range(k if point == "enter" else k + 1)), f"k={k}: {effects}"

    resumes = [spawn(dirs[k], **config(k)) for k in ALL_STEPS]
    for k, child in enumerate(resumes):
        assert child.outcome() == {"status": "completed", "output": ALL_STEPS}, f"k={k}"

    for k in ALL_STEPS:
        assert_completed(pg_store.load(f"run-{k}"))
        effects = effect_lines(dirs[k] / "effects")
        assert_exactly_once_progress(effects, committed[k], f"{point} at step {k}")
        assert Counter(effects)[k] == runs_of_k, f"k={k}: {effects}"


# -- promise 7: a connection lost mid-run ----------------------------------------------------------


class Effects:
    """The side effects of the in-process pipeline: which step ran, how often."""

    def __init__(self) -> None:
        self.ran: list[int] = []

    def pipeline(self) -> Pipeline[list[int], list[int]]:
        def make(index: int) -> Step[list[int], list[int]]:
            async def run(data: list[int], context: PipelineContext) -> list[int]:
                self.ran.append(index)
                context.scratchpad["done"] = [*context.scratchpad.get("done", []), index]
                return [*data, index]

            return Step.from_callable(run, name=f"s{index}")

        return Pipeline.from_steps([make(i) for i in range(STEPS)])


def _runner(
    effects: Effects,
    backend: PostgresBackend,
    after_step: Callable[[int], Awaitable[None]] | None = None,
) -> Flujo[Any, Any, Any]:
    async def hook(event: Any) -> None:
        if after_step is not None and isinstance(event, PostStep):
            await after_step(event.step_result.index)

    return Flujo(
        effects.pipeline(), state_backend=backend, pipeline_name=PIPELINE_NAME, hooks=[hook]
    )


async def _terminate(dsn: str, application_name: str) -> int:
    """Cut every connection of ``application_name`` from the server side; return how many."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND application_name = $1",
            application_name,
        )
    finally:
        await conn.close()
    return sum(1 for row in rows if row["ok"])


def _with_application_name(dsn: str, name: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}application_name={name}"


async def _resume_and_check(
    store: PgStore, run_id: str, effects: Effects, *, failures: int = 0
) -> None:
    """A new runner (and backend) on the same run id completes it with the right output."""
    async with store.backend() as backend:
        result = await _runner(effects, backend).run_async([], run_id=run_id)
    assert result.status == "completed", result
    assert result.output == ALL_STEPS
    state = await store.load_async(run_id)
    assert_completed(state, failures=failures)
    _assert_history_once(state, failures=failures)
    assert await store.step_rows(run_id) == list(range(STEPS + failures))


@pytest.mark.parametrize("k", [0, 4, 8])
async def test_connections_terminated_after_a_step(pg_store_async: PgStore, k: int) -> None:
    """After step k committed, the server kills every connection of the backend. The run
    completes (the backend reconnects) or fails with a typed error; either way no step is
    recorded twice, and a resume completes it."""
    store = pg_store_async
    name = f"flujo-test-{uuid.uuid4().hex[:12]}"
    backend = store.backend(_with_application_name(store.dsn, name), pool_min=2)
    effects = Effects()
    terminated: list[int] = []

    async def after_step(index: int) -> None:
        if index == k:
            terminated.append(await _terminate(store.dsn, name))

    run_id = f"drop-{k}"
    try:
        result = await _runner(effects, backend, after_step).run_async([], run_id=run_id)
    except FlujoError as exc:  # a clean, typed failure is allowed; a raw driver error is not
        assert isinstance(exc, StateBackendError), repr(exc)  # noqa: PT017
        result = None
    finally:
        await backend.aclose()
    assert terminated
    assert terminated[0] >= 1  # the backend's connections were there, and were cut

    state = await store.load_async(run_id)
    _assert_history_once(state)
    if result is not None:
        assert result.status == "completed"
        assert result.output == ALL_STEPS
        assert effects.ran == ALL_STEPS
    await _resume_and_check(store, run_id, effects)
    assert_exactly_once_progress(effects.ran, list(range(k + 1)), f"terminated after {k}")


async def test_connections_terminated_after_every_step(pg_store_async: PgStore) -> None:
    """The backend's connections are cut after every step (so the next checkpoint almost
    always meets a connection the server killed). Each attempt completes or fails typed;
    attempts resume until the run completes, recording each step once."""
    store = pg_store_async
    name = f"flujo-test-{uuid.uuid4().hex[:12]}"
    effects = Effects()
    outcomes: list[str] = []

    async def after_step(index: int) -> None:
        await _terminate(store.dsn, name)

    run_id = "drop-every"
    for _ in range(STEPS + 1):  # a typed failure is allowed: resume until it completes
        backend = store.backend(_with_application_name(store.dsn, name), pool_min=1)
        try:
            result = await _runner(effects, backend, after_step).run_async([], run_id=run_id)
            outcomes.append(result.status)
            break
        except StateBackendError as exc:
            outcomes.append(type(exc).__name__)
        finally:
            await backend.aclose()
        _assert_history_once(await store.load_async(run_id))
    assert outcomes[-1] == "completed", outcomes
    state = await store.load_async(run_id)
    assert_completed(state)
    _assert_history_once(state)
    assert await store.step_rows(run_id) == list(range(STEPS))
    # Committed steps never ran again; each typed failure may have re-run one step.
    counts = Counter(effects.ran)
    assert all(1 <= counts[i] <= 2 for i in ALL_STEPS), effects.ran
    assert len(effects.ran) - STEPS <= outcomes.count("StateBackendError"), effects.ran


class _Relay:
    """A TCP relay to the test's Postgres server, so that a test can make the server go away.

    ``stop()`` closes the listening socket and resets every relayed connection: the backend's
    connections break, and every new connection to the relay's port is refused (pool
    reconnects included), as when the server is gone. Changing the backend's ``dsn`` instead is
    not enough: an asyncpg pool reconnects a broken connection with the address it was made
    with."""

    def __init__(self, dsn: str) -> None:
        parts = urlsplit(dsn)
        self.dsn = dsn
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 5432
        self.relayed = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        """Listen on a free local port; return the DSN that reaches the server through it."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self.dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        self.relayed += 1
        self._writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in self._writers:
            writer.transport.abort()


async def test_a_server_gone_mid_run_fails_cleanly_and_the_run_resumes(
    pg_store_async: PgStore,
) -> None:
    """After step 5 the server goes away for good (the backend reaches it through a relay,
    which then closes: every connection cut, every new one refused): the run fails with
    StateBackendError, its stored state is the step-5 checkpoint, and a resume completes it."""
    store = pg_store_async
    relay = _Relay(store.dsn)
    backend = store.backend(await relay.start(), pool_min=1)
    effects = Effects()

    async def after_step(index: int) -> None:
        if index == 5:
            await relay.stop()

    try:
        with pytest.raises(StateBackendError):
            await _runner(effects, backend, after_step).run_async([], run_id="gone")
    finally:
        await backend.aclose()
    assert relay.relayed >= 1  # the backend did go through the relay

    state = await store.load_async("gone")
    assert_consistent(state)
    assert committed_steps(state) == list(range(6))
    _assert_history_once(state)
    assert effects.ran == list(range(7))  # step 6 ran; its checkpoint could not be written
    await _resume_and_check(store, "gone", effects)
    assert_exactly_once_progress(effects.ran, list(range(6)), "server gone after step 5")


# -- the ambiguous commit: the connection drops around a checkpoint statement --------------------


@pytest.fixture
def cut_checkpoint(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[str]]:
    """``cut_checkpoint(at_step, when, error=None)``: the driver call carrying the checkpoint of
    step ``at_step`` raises ``error`` (ConnectionDoesNotExistError by default), ``"before"`` or
    ``"after"`` the server ran it (after: the server committed, the client never read the
    answer). Returns a log of the cuts."""
    # Connection.fetchval carries every checkpoint statement, whether it goes through the pool or
    # through the backend's checkpoint lane (a pooled connection kept for checkpoints).
    real_fetchval = asyncpg.connection.Connection.fetchval
    log: list[str] = []
    plan: dict[str, Any] = {}

    async def fetchval(
        self: asyncpg.connection.Connection, query: str, *args: Any, **kwargs: Any
    ) -> Any:
        # A checkpoint statement: it creates the run ($10 is the current_step_index) or
        # advances it ($3 is).
        index = None
        if "INSERT INTO flujo_runs" in query:
            index = args[9]
        elif "UPDATE flujo_runs" in query:
            index = args[2]
        is_target = bool(plan) and index == plan["at_step"] + 1 and not plan.get("done")
        if is_target and plan["when"] == "before":
            plan["done"] = True
            log.append("cut before the statement")
            raise plan["error"]
        result = await real_fetchval(self, query, *args, **kwargs)
        if is_target:
            plan["done"] = True
            log.append(f"cut after the statement (it returned {result!r})")
            raise plan["error"]
        return result

    monkeypatch.setattr(asyncpg.connection.Connection, "fetchval", fetchval)

    def arm(at_step: int, when: str, error: BaseException | None = None) -> list[str]:
        lost = asyncpg.exceptions.ConnectionDoesNotExistError("connection lost (test)")
        plan.update(at_step=at_step, when=when, error=error or lost)
        return log

    return arm


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("at_step", [0, 3, 9])
async def test_a_connection_lost_around_a_checkpoint_never_records_a_step_twice(
    pg_store_async: PgStore, cut_checkpoint: Callable[..., list[str]], at_step: int, when: str
) -> None:
    """Before: the write did not land and is retried once. After: the server committed it;
    the backend must find that out and not write it again. Either way the run goes on."""
    store = pg_store_async
    log = cut_checkpoint(at_step, when)
    effects = Effects()
    async with store.backend() as backend:
        result = await _runner(effects, backend).run_async([], run_id="cut")

    assert log, "the checkpoint statement was never cut"
    assert result.status == "completed"
    assert result.output == ALL_STEPS
    assert effects.ran == ALL_STEPS
    state = await store.load_async("cut")
    assert_completed(state)
    _assert_history_once(state)
    assert state is not None
    assert state["version"] == STEPS
    assert await store.step_rows("cut") == list(range(STEPS))


async def test_a_connection_broken_by_a_server_kill_is_retried_and_the_run_completes(
    pg_store_async: PgStore, cut_checkpoint: Callable[..., list[str]]
) -> None:
    """When the server kills an idle pooled connection, asyncpg may read the server's FATAL
    message before noticing the socket closed; the next statement on that connection then
    fails with InternalClientError (seen in test_connections_terminated_after_every_step).
    This raises that error deterministically: the backend treats it as a lost connection (the
    write did not land, so it is written again) and the run completes, each step run once."""
    store = pg_store_async
    error = asyncpg.exceptions.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    )
    log = cut_checkpoint(3, "before", error)
    effects = Effects()
    async with store.backend() as backend:
        result = await _runner(effects, backend).run_async([], run_id="broken")

    assert log == ["cut before the statement"]
    assert result.status == "completed", result
    assert result.output == ALL_STEPS
    assert effects.ran == ALL_STEPS
    state = await store.load_async("broken")
    assert_completed(state)
    _assert_history_once(state)
    assert state is not None
    assert state["version"] == STEPS
    assert await store.step_rows("broken") == list(range(STEPS))


def _checkpoint(run_id: str, expected: int, *, updated_at: float, index: int) -> Checkpoint:
    header = None
    if expected == 0:
        header = RunHeader(
            pipeline_id="p",
            pipeline_name="p",
            pipeline_version="1",
            step_names=b'["a"]',
            initial_input=b"null",
            created_at=updated_at,
        )
    return Checkpoint(
        run_id=run_id,
        expected_version=expected,
        status="running",
        current_step_index=index,
        updated_at=updated_at,
        last_step_output=str(index).encode(),
        error=None,
        steps=[orjson.dumps({"index": index})],
        step_offset=index,
        header=header,
    )


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_lost_connection_around_a_direct_checkpoint(
    pg_store_async: PgStore, cut_checkpoint: Callable[..., list[str]], when: str
) -> None:
    """The same at the backend level: the version returned is the one stored."""
    async with pg_store_async.backend() as backend:
        await backend.write_checkpoint(_checkpoint("r", 0, updated_at=1000.0, index=0))
        log = cut_checkpoint(0, when)
        version = await backend.write_checkpoint(_checkpoint("r", 1, updated_at=1001.0, index=1))
        assert log
        assert version == 2
        state = await backend.load_state("r")
        assert state is not None
        assert state["version"] == 2
        assert state["step_history"] == [{"index": 0}, {"index": 1}]
        assert await backend.write_checkpoint(_checkpoint("r", 2, updated_at=1002.0, index=2)) == 3


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_lost_write_is_not_taken_for_a_landed_one_when_the_clock_stands_still(
    pg_store_async: PgStore, cut_checkpoint: Callable[..., list[str]], when: str
) -> None:
    """Two checkpoints with the same timestamp (a coarse clock, or one set back): a write that
    never reached the server must not pass for one that committed (it is written again), and
    one that committed is recognised (not written twice). Either way the version returned is
    the one stored."""
    async with pg_store_async.backend() as backend:
        await backend.write_checkpoint(_checkpoint("r", 0, updated_at=1000.0, index=0))
        log = cut_checkpoint(0, when)
        version = await backend.write_checkpoint(_checkpoint("r", 1, updated_at=1000.0, index=1))
        assert log
        state = await backend.load_state("r")
        assert state is not None
        assert state["version"] == version == 2, "write_checkpoint returned a version not stored"
        assert state["step_history"] == [{"index": 0}, {"index": 1}]
        assert await pg_store_async.step_rows("r") == [0, 1]


@pytest.fixture
def cut_transaction(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], list[str]]:
    """``cut_transaction(when)``: the next transaction the backend opens (a whole-state save or
    an unguarded write) loses its connection as it ends: ``"after"`` its COMMIT ran (the client
    never hears back), or ``"before"`` (it never commits; the server rolls it back when the
    backend drops the connection). Returns a log of the cuts."""
    real_aexit = asyncpg.transaction.Transaction.__aexit__
    plan: dict[str, Any] = {}
    log: list[str] = []

    async def aexit(self: Any, exc_type: Any, exc: Any, tb: Any) -> Any:
        if not plan or plan.get("done") or exc_type is not None:
            return await real_aexit(self, exc_type, exc, tb)
        plan["done"] = True
        if plan["when"] == "after":
            await real_aexit(self, exc_type, exc, tb)
        log.append(plan["when"])
        raise asyncpg.exceptions.ConnectionDoesNotExistError("connection lost (test)")

    monkeypatch.setattr(asyncpg.transaction.Transaction, "__aexit__", aexit)

    def arm(when: str) -> list[str]:
        plan["when"] = when
        return log

    return arm


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("kind", ["save_state", "unconditional_checkpoint"])
async def test_a_lost_connection_around_a_whole_state_write(
    pg_store_async: PgStore, cut_transaction: Callable[[str], list[str]], kind: str, when: str
) -> None:
    """Writes that run in a transaction of their own (save_state; a checkpoint without an
    expected version) get the same care as guarded checkpoints: one that did not land is
    written again, one that committed is recognised, so it is applied exactly once (its
    version grows by one) and the version returned is the one stored."""
    async with pg_store_async.backend() as backend:
        await backend.write_checkpoint(_checkpoint("r", 0, updated_at=1000.0, index=0))
        log = cut_transaction(when)
        if kind == "save_state":
            state = await backend.load_state("r")
            assert state is not None
            saved = {**state, "status": "paused", "version": 5, "pipeline_context": {"s": 1}}
            await backend.save_state("r", saved)
            assert await backend.load_state("r") == saved
            expected = 5
        else:
            returned = await backend.write_checkpoint(
                Checkpoint(
                    run_id="r",
                    expected_version=None,
                    status="running",
                    current_step_index=2,
                    updated_at=1001.0,
                    last_step_output=b"2",
                    error=None,
                    context={"u": b"1"},
                    steps=[orjson.dumps({"index": 1})],
                    step_offset=1,
                )
            )
            assert returned == 2, "applied twice (or not at all)"
            expected = 2
        assert log == [when]
        state = await backend.load_state("r")
        assert state is not None
        assert state["version"] == expected
        assert len(state["step_history"]) == len(await pg_store_async.step_rows("r"))
