"""Worker processes on a shared store, one of them SIGKILLed while it holds runs: no run is lost
or done twice, no committed step runs again, and no two workers ever run one run at once.

Each test starts ``flujo worker`` processes (``python -m flujo.cli worker --app
_worker_app:registry``, short leases so that a dead worker's runs are taken over quickly),
queues runs of ``_worker_app``'s pipeline, SIGKILLs one worker once it holds runs in the middle
of their steps, restarts it once its runs were taken over, and waits for every run to complete.
Every step notes each of its executions (run, step, pid, start and end time) outside flujo's
store (``_worker_app.py`` says how). Then:

1. every run is completed with the output of all its steps, in order, and a step history of one
   record per step;
2. every step of every run ran exactly once, except at most one per run the killed worker held:
   the step after the run's last committed checkpoint at the kill (what the killed worker was
   running, or had run without committing), which ran at most once more, by another worker;
3. no run is lost or done twice (every run completed once, no other run in the store);
4. a run's step executions never overlap in time (the killed worker's unfinished one counts as
   lasting until it was dead), and a run changes hands at most once, from the killed worker:
   two workers never hold one run;
5. the runs the killed worker held were finished by other workers, and the restarted worker
   took runs.

The Postgres test (3 workers, 300 runs of 10 steps) has its own schema (``postgres_schema``);
without a server it fails under CI=true and skips elsewhere (``postgres_dsn``). The SQLite test
runs 2 workers on one database file (30 runs of 5 steps). The last test, in one process, pins
down a bug the Postgres test once showed now and then: a renewal racing a finished run's
release cancelled it and the worker never freed that run's slot.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from _worker_app import LOG_TABLE_SQL, PIPELINE, build_registry, expected_output

import flujo
from flujo import TaskClient
from flujo.state.backends.base import StateBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend
from flujo.worker import Worker

pytestmark = pytest.mark.slow

INTEGRATION = Path(__file__).resolve().parent
# The workers import the very flujo this process imported, however it was installed.
FLUJO_PATH = str(Path(flujo.__file__).resolve().parent.parent)
#: Bound on every wait (a hang fails, with the workers' output, instead of blocking).
GUARD_S = 120.0
#: Short leases, so that a dead worker's runs are taken over within about LEASE_S.
LEASE_S = 2.0
HEARTBEAT_S = 0.5
_READY = re.compile(r"worker (\S+): queues")
#: What a worker's stderr shows when it lost a run or a run failed (worker.py's log lines).
_TROUBLE = ("lost run", "could not renew", "stopped with an error", "Traceback")
_STOPPED = re.compile(r"stopped after (\d+) run\(s\)")


# -- worker processes ------------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """One ``flujo worker`` process; its output goes to files (a pipe could fill and block it)."""

    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    worker_id: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        text = self.err.read_text(errors="replace")
        return f"--- {self.name} (pid {self.pid}) stderr (its end):\n{text[-4000:]}"

    async def ready(self) -> str:
        """Wait for the worker's first line (it is about to register and claim); its id."""
        async with asyncio.timeout(GUARD_S):
            while True:
                found = _READY.search(self.err.read_text(errors="replace"))
                if found:
                    self.worker_id = found.group(1)
                    return self.worker_id
                assert self.proc.poll() is None, f"worker exited early\n{self.output()}"
                await asyncio.sleep(0.02)

    def kill(self) -> float:
        """SIGKILL the worker and reap it; the time by which it was dead."""
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=GUARD_S) == -signal.SIGKILL
        return time.time()

    def stop(self) -> int:
        """SIGTERM (graceful stop); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=GUARD_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@dataclass
class Cluster:
    """The worker processes of one test, started with one environment."""

    workdir: Path
    env: dict[str, str]
    concurrency: int
    workers: list[WorkerProcess] = field(default_factory=list)

    def start(self, name: str) -> WorkerProcess:
        out, err = self.workdir / f"{name}.out", self.workdir / f"{name}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flujo.cli",
                    "worker",
                    "--app",
                    "_worker_app:registry",
                    "--concurrency",
                    str(self.concurrency),
                    "--lease",
                    str(LEASE_S),
                    "--heartbeat",
                    str(HEARTBEAT_S),
                    "--grace",
                    "10",
                ],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )
        worker = WorkerProcess(name, proc, out, err)
        self.workers.append(worker)
        return worker

    def output(self) -> str:
        return "\n".join(worker.output() for worker in self.workers)

    def kill_all(self) -> None:
        for worker in self.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()


@contextmanager
def cluster(workdir: Path, concurrency: int, **env: str) -> Iterator[Cluster]:
    base = {k: v for k, v in os.environ.items() if k not in ("FLUJO_APP", "FLUJO_CONFIG_PATH")}
    python_path = os.pathsep.join(
        filter(None, [str(INTEGRATION), FLUJO_PATH, os.environ.get("PYTHONPATH")])
    )
    started = Cluster(
        workdir, {**base, "PYTHONPATH": python_path, "COLUMNS": "500", **env}, concurrency
    )
    try:
        yield started
    finally:
        started.kill_all()  # only what a failed test left running


# -- the step log ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Execution:
    """One execution of a step, as the step logged it (``ended`` None: it never finished)."""

    run_id: str
    step: int
    pid: int
    started: float
    ended: float | None


def read_file_log(directory: Path) -> list[Execution]:
    starts: dict[str, tuple[str, int, int, float]] = {}
    ends: dict[str, float] = {}
    for path in directory.glob("*.log"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if parts[0] == "S":
                starts[parts[1]] = (parts[2], int(parts[3]), int(parts[4]), float(parts[5]))
            else:
                ends[parts[1]] = float(parts[2])
    assert set(ends) <= set(starts)
    return [Execution(*start, ends.get(exec_id)) for exec_id, start in starts.items()]


async def read_postgres_log(dsn: str, schema: str) -> list[Execution]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        rows = await conn.fetch("SELECT run_id, step, pid, started, ended FROM step_log")
    finally:
        await conn.close()
    return [Execution(*row) for row in rows]


# -- the scenario ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the scenario saw; the invariants are checked on it afterwards."""

    steps: int
    inputs: dict[str, str]  # run id -> initial input
    victim_pid: int
    dead_at: float
    #: the runs the killed worker held when it died -> their current_step_index then
    held: dict[str, int]
    restarted_pid: int
    queued_at_restart: int
    states: dict[str, dict[str, Any]]
    stored_run_ids: list[str]
    exit_codes: dict[str, int]
    active_at_end: dict[str, int]  # worker id -> the runs it said it ran, all being done


async def wait_for(check: Callable[[], Awaitable[bool]], what: str, cl: Cluster) -> None:
    try:
        async with asyncio.timeout(GUARD_S):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}\n{cl.output()}")


async def run_scenario(
    cl: Cluster, backend: StateBackend, *, workers: int, runs: int, steps: int
) -> Outcome:
    """Start ``workers`` workers, queue ``runs`` runs, SIGKILL worker 0 mid-way while it holds
    runs in the middle of their steps, restart it once they were taken over, wait for all."""
    started = [cl.start(f"w{n}") for n in range(workers)]
    for worker in started:
        await worker.ready()
    victim = started[0]

    client = TaskClient(backend, build_registry(steps))
    inputs: dict[str, str] = {}
    for n in range(runs):
        inputs[await client.enqueue(PIPELINE, f"r{n}")] = f"r{n}"

    async def summaries(status: str | None = None) -> list[dict[str, Any]]:
        return await backend.list_runs(status=status, limit=runs * 2)

    async def victim_mid_run() -> bool:
        done = len(await summaries("completed"))
        held = [
            s
            for s in await summaries("running")
            if s["locked_by"] == victim.worker_id and 0 < s["current_step_index"] < steps
        ]
        assert victim.proc.poll() is None, f"the victim exited\n{cl.output()}"
        return done >= runs // 5 and len(held) >= 2  # a fifth of the way, runs half done

    await wait_for(victim_mid_run, "the victim to hold runs mid-way", cl)
    dead_at = victim.kill()
    # Nobody else can touch the victim's runs before their leases expire (at least
    # LEASE_S - HEARTBEAT_S after its last renewal): this is the committed state at its death.
    held_rows = [s for s in await summaries("running") if s["locked_by"] == victim.worker_id]
    snapshot_time = await backend.store_time()
    assert held_rows, "the killed worker held no run"
    assert all(s["lease_expires_at"].timestamp() > snapshot_time for s in held_rows), (
        "the snapshot of the killed worker's runs was taken too late (a lease had expired)",
        held_rows,
        snapshot_time,
    )
    held = {s["run_id"]: s["current_step_index"] for s in held_rows}

    async def taken_over() -> bool:
        rows = {s["run_id"]: s for s in await summaries()}
        return all(
            rows[run_id]["status"] == "completed" or rows[run_id]["locked_by"] != victim.worker_id
            for run_id in held
        )

    await wait_for(taken_over, "the killed worker's runs to be taken over", cl)
    restarted = cl.start("w0-restarted")
    await restarted.ready()
    queued_at_restart = len(await summaries("queued"))

    async def all_completed() -> bool:
        found = await summaries()
        return len(found) == runs and all(s["status"] == "completed" for s in found)

    await wait_for(all_completed, "every run to complete", cl)
    done_at = await backend.store_time()
    live = {worker.worker_id for worker in [*started[1:], restarted]}

    async def registered_since() -> bool:  # each live worker registered itself again since
        seen = {w["worker_id"]: w["heartbeat_at"] for w in await client.list_workers()}
        return all(seen[w].timestamp() > done_at for w in live)

    await wait_for(registered_since, "the workers' next heartbeats", cl)
    active_at_end = {w["worker_id"]: w["info"]["active"] for w in await client.list_workers()}
    exit_codes = {w.name: w.stop() for w in [*started[1:], restarted]}
    states: dict[str, dict[str, Any]] = {}
    for run_id in inputs:
        state = await backend.load_state(run_id)
        assert state is not None, run_id
        states[run_id] = state
    return Outcome(
        steps=steps,
        inputs=inputs,
        victim_pid=victim.pid,
        dead_at=dead_at,
        held=held,
        restarted_pid=restarted.pid,
        queued_at_restart=queued_at_restart,
        states=states,
        stored_run_ids=[s["run_id"] for s in await summaries()],
        exit_codes=exit_codes,
        active_at_end=active_at_end,
    )


# -- the invariants --------------------------------------------------------------------------------


def check_invariants(outcome: Outcome, log: list[Execution], cl: Cluster) -> None:
    steps, victim, held = outcome.steps, outcome.victim_pid, outcome.held
    names = [f"s{i}" for i in range(steps)]

    # Shown with a failure (pytest prints what a failed test printed). "Counted" is what each
    # stopped worker says it ran, "took" the runs it ran steps of, "active" what it last
    # registered as running once every run was completed (the last registration may be up to
    # a heartbeat old); test_a_finished_run_... below pins the slot bookkeeping down.
    accounts: dict[int, tuple[int | None, int, int | None]] = {}
    for worker in cl.workers:
        if worker.pid != victim:
            stopped = _STOPPED.search(worker.err.read_text(errors="replace"))
            accounts[worker.pid] = (
                stopped and int(stopped.group(1)),
                len({e.run_id for e in log if e.pid == worker.pid}),
                outcome.active_at_end.get(worker.worker_id),
            )
    print(
        f"{len(outcome.inputs)} runs of {steps} steps; {len(log)} step executions by pid "
        f"{dict(Counter(e.pid for e in log))}; killed pid {victim} holding runs at committed "
        f"indices {sorted(held.values())}; restarted pid {outcome.restarted_pid} with "
        f"{outcome.queued_at_restart} run(s) queued; (counted, took, active) by pid {accounts}"
    )

    # 1 and 3: every run completed once, with every step's output in order; nothing else stored.
    assert sorted(outcome.stored_run_ids) == sorted(outcome.inputs)
    outputs: Counter[str] = Counter()
    for run_id, state in outcome.states.items():
        expected = expected_output(outcome.inputs[run_id], steps)
        assert state["status"] == "completed", (run_id, state["status"], state["error"])
        assert state["last_step_output"] == expected, (run_id, state["last_step_output"])
        history = state["step_history"]
        assert [(r["name"], r["success"]) for r in history] == [(n, True) for n in names], (
            run_id,
            history,
        )
        assert [r["output"] for r in history] == [
            expected_output(outcome.inputs[run_id], i + 1) for i in range(steps)
        ], (run_id, history)
        outputs[state["last_step_output"]] += 1
    assert all(count == 1 for count in outputs.values())
    assert len(outputs) == len(outcome.inputs)
    assert all(code == 0 for code in outcome.exit_codes.values()), (
        outcome.exit_codes,
        cl.output(),
    )

    by_run: dict[str, list[Execution]] = defaultdict(list)
    for execution in log:
        by_run[execution.run_id].append(execution)
    assert set(by_run) == set(outcome.inputs), "runs without step executions, or unknown ones"

    problems = [
        problem
        for run_id, executions in by_run.items()
        for problem in run_problems(run_id, executions, outcome)
    ]
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problem(s) in all)"
    # No worker lost a lease, failed to renew one or saw a run fail (they would say so).
    for worker in cl.workers:
        text = worker.err.read_text(errors="replace")
        for sign in _TROUBLE:
            assert sign not in text, worker.output()

    # 5: the killed worker's runs were taken over; the restarted worker worked too.
    unfinished = [run_id for run_id, index in held.items() if index < steps]
    assert unfinished, f"the killed worker held no unfinished run: {held}"
    for run_id in unfinished:
        # The steps from the last committed one on were run (again) after the kill, elsewhere.
        after = [e for e in by_run[run_id] if e.step >= held[run_id] and e.pid != victim]
        assert sorted(e.step for e in after) == list(range(held[run_id], steps)), by_run[run_id]
        assert all(e.started > outcome.dead_at for e in after), by_run[run_id]
    handed_over = [r for r in unfinished if victim in {e.pid for e in by_run[r]}]
    assert handed_over, f"no run went from the killed worker (mid-run) to another one: {held}"
    if outcome.queued_at_restart > 0:
        assert any(e.pid == outcome.restarted_pid for e in log), (
            f"{outcome.queued_at_restart} runs were queued when the worker restarted, "
            "but it ran no step"
        )


def run_problems(run_id: str, executions: list[Execution], outcome: Outcome) -> list[str]:
    """What is wrong with one run's step executions (invariants 2 and 4)."""
    steps, victim, dead_at = outcome.steps, outcome.victim_pid, outcome.dead_at
    executions.sort(key=lambda e: e.started)
    again = outcome.held.get(run_id)  # the one step that may have run twice, if any
    found: list[str] = []
    # 2: each step once, but for the one the killed worker was on (at most twice).
    counts = Counter(e.step for e in executions)
    if set(counts) - set(range(steps)):
        found.append("steps that do not exist ran")
    for index in range(steps):
        limit = 2 if index == again else 1
        if not 1 <= counts[index] <= limit:
            found.append(f"step {index} ran {counts[index]}x")
        if counts[index] == 2:
            first, second = (e for e in executions if e.step == index)
            if first.pid != victim or second.pid == victim:
                found.append(f"step {index} ran twice, not first on the killed worker")
    for e in executions:
        if e.pid != victim:
            if e.ended is None:
                found.append(f"step {e.step} never finished on live worker {e.pid}")
            continue
        if e.started > dead_at:
            found.append(f"the killed worker started step {e.step} after it died")
        if e.ended is None and e.step != again:
            found.append(f"step {e.step} was unfinished on the killed worker, yet not in flight")
        if again is not None and e.step > again:
            found.append(f"the killed worker ran step {e.step} past the committed step {again}")
    # 4: one execution at a time; the run changed hands at most once, from the killed worker.
    busy_until = float("-inf")
    for e in executions:
        if e.started < busy_until:
            found.append(f"step {e.step} started while another execution of the run went on")
        busy_until = max(busy_until, dead_at if e.ended is None else e.ended)
    holders: list[int] = []
    for e in executions:
        if not holders or holders[-1] != e.pid:
            holders.append(e.pid)
    if len(holders) > 2 or (len(holders) == 2 and holders[0] != victim):
        found.append(f"the run went from pid to pid {holders}")
    if not found:
        return []
    shown = ", ".join(
        f"s{e.step}@{e.pid}[{e.started - dead_at:+.3f}.."
        f"{'never' if e.ended is None else f'{e.ended - dead_at:+.3f}'}]"
        for e in executions
    )
    return [
        f"run {run_id} (held by killed pid {victim}: {run_id in outcome.held}, committed "
        f"index then {again}): {'; '.join(found)}. Executions (s<step>@<pid>[start..end], "
        f"seconds from the kill): {shown}"
    ]


# -- the tests -------------------------------------------------------------------------------------


async def test_three_postgres_workers_one_killed_300_runs(
    tmp_path: Path, postgres_dsn: str, postgres_schema: str
) -> None:
    async with PostgresBackend(postgres_dsn, schema=postgres_schema, pool_min=0) as backend:
        assert await backend.migrate() == [1, 2]
        conn = await asyncpg.connect(postgres_dsn, server_settings={"search_path": postgres_schema})
        try:
            await conn.execute(LOG_TABLE_SQL)
        finally:
            await conn.close()
        with cluster(
            tmp_path,
            8,
            FLUJO_STATE_URI=f"{postgres_dsn}?schema={postgres_schema}",
            FLUJO_POSTGRES_POOL_MAX="4",
            FLUJO_TEST_STEPS="10",
            FLUJO_TEST_STEP_SLEEP="0.05",
            FLUJO_TEST_LOG_DSN=postgres_dsn,
            FLUJO_TEST_LOG_SCHEMA=postgres_schema,
        ) as cl:
            outcome = await run_scenario(cl, backend, workers=3, runs=300, steps=10)
            log = await read_postgres_log(postgres_dsn, postgres_schema)
            check_invariants(outcome, log, cl)


async def test_two_sqlite_workers_one_killed(tmp_path: Path) -> None:
    database = tmp_path / "runs.db"
    log_dir = tmp_path / "steps"
    log_dir.mkdir()
    async with SQLiteBackend(database) as backend:
        await backend.list_runs()  # creates the database before the workers open it
        with cluster(
            tmp_path,
            3,
            FLUJO_STATE_URI=f"sqlite:///{database}",
            FLUJO_TEST_STEPS="5",
            FLUJO_TEST_STEP_SLEEP="0.2",
            FLUJO_TEST_LOG_DIR=str(log_dir),
        ) as cl:
            outcome = await run_scenario(cl, backend, workers=2, runs=30, steps=5)
            check_invariants(outcome, read_file_log(log_dir), cl)


# -- found by the tests above ----------------------------------------------------------------------


class _ReleaseAfterRenewal(SQLiteBackend):
    """Releases a run only after the worker's next lease renewal, as a release that waits for
    a busy pool does (the Postgres test above sees it a few times per hundred runs)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.renewed = asyncio.Event()

    async def renew_leases(self, **kwargs: Any) -> dict[str, bool]:
        held = await super().renew_leases(**kwargs)
        self.renewed.set()
        return held

    async def release_runs(self, **kwargs: Any) -> None:
        self.renewed.clear()
        async with asyncio.timeout(GUARD_S):
            await self.renewed.wait()
        await super().release_runs(**kwargs)


async def test_a_finished_run_caught_by_a_renewal_while_released_frees_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One worker, one slot, two queued runs: the first run's release waits for a renewal."""
    monkeypatch.setenv("FLUJO_TEST_LOG_DIR", str(tmp_path))  # where the steps log (here)
    backend = _ReleaseAfterRenewal(tmp_path / "runs.db")
    registry = build_registry(1)
    client = TaskClient(SQLiteBackend(tmp_path / "runs.db"), registry)
    first = await client.enqueue(PIPELINE, "r0")
    second = await client.enqueue(PIPELINE, "r1")
    worker = Worker(
        registry,
        state_backend=backend,
        concurrency=1,
        lease_s=30.0,
        heartbeat_s=0.05,
        poll_s=0.02,
    )
    task = asyncio.ensure_future(worker.run())
    try:

        async def states() -> list[dict[str, Any] | None]:
            return [await client.backend.load_state(run_id) for run_id in (first, second)]

        async def settled() -> bool:
            done = all(state and state["status"] == "completed" for state in await states())
            return done and worker.completed == 2 and not worker.active

        try:
            async with asyncio.timeout(5.0):  # well over what it takes (a fraction of a second)
                while not await settled():
                    await asyncio.sleep(0.02)
        except TimeoutError:
            pass
        found = await states()
        assert [state and state["status"] for state in found] == ["completed"] * 2, (
            f"a run never ran; still active: {worker.active}"
        )
        assert (worker.completed, worker.active) == (2, []), "a finished run kept its slot"
        assert [state and state["locked_by"] for state in found] == [None, None], found
    finally:
        worker.stop()
        async with asyncio.timeout(GUARD_S):
            await task
        await client.backend.aclose()
        await backend.aclose()
