"""flujo's worker benchmarks: `flujo worker` processes on Postgres, one JSON line per workload.

    python benchmarks/workers.py                          # all workloads
    python benchmarks/workers.py --workload takeover      # one of them
    python benchmarks/workers.py --workload workers --concurrency 32

``workers``: throughput of 1, 2 and 4 ``flujo worker`` processes (``--concurrency 8`` unless
told) running 10-step runs of trivial steps, in durable steps (committed checkpoints) per second.
``workers_io``: the same with steps that wait 20 ms (a model or HTTP call) before returning.
``takeover``: worker A (lease 3 s, heartbeat 1 s) holds runs in a slow step, worker B idles;
A is killed with SIGKILL; how long until B claims the runs and runs their step again.

Postgres on 127.0.0.1 (``FLUJO_BENCH_POSTGRES_DSN``), ``synchronous_commit`` on; each workload
gets a fresh schema, dropped at its end. Each workload runs in a fresh process. Timings belong
here, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

WORKLOADS = ("workers", "workers_io", "takeover")
POSTGRES_DSN = os.environ.get(
    "FLUJO_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
HERE = Path(__file__).resolve()

#: workers: 10-step runs, this many per setting, each setting a number of worker processes.
N_STEPS = 10
RUNS = 1500
BATCHES = 5
WORKER_COUNTS = (1, 2, 4)
CONCURRENCY = 8
#: workers_io: the same 10-step runs, each step waiting IO_WAIT_S first (a model or HTTP call).
IO_RUNS = 400
IO_BATCHES = 3
IO_WAIT_S = 0.02
#: takeover: runs held by worker A per repetition, repetitions, A's and B's lease settings.
HELD = 4
REPETITIONS = 5
LEASE_S = 3.0
HEARTBEAT_S = 1.0
#: Bound on every wait (a hang fails instead of blocking).
GUARD_S = 300.0

FLOWS = '''
"""The benchmark's pipelines (written to a temporary directory; workers load it with --app)."""
import asyncio
import os
import time

from flujo import Pipeline, PipelineContext, PipelineRegistry, Step


async def add_one(x: int) -> int:
    return x + 1


async def wait_then_add_one(x: int) -> int:
    await asyncio.sleep(float(os.environ.get("BENCH_IO_WAIT_S", "0.02")))  # a model call
    return x + 1


def noted(name: str) -> Step:
    """A step that notes when it starts (time, pid, run id); step s1 then sleeps SLOW_S."""

    async def work(x: int, *, context: PipelineContext) -> int:
        line = f"{time.time():.6f} {os.getpid()} {context.run_id} {name}\\n"
        fd = os.open(os.environ["BENCH_STEP_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, line.encode())
        os.close(fd)
        if name == "s1":
            await asyncio.sleep(float(os.environ.get("BENCH_SLOW_S", "0")))
        return x + 1

    return Step.from_callable(work, name=name)


registry = PipelineRegistry()
registry.register(
    Pipeline.from_steps([Step.from_callable(add_one, name=f"s{i}") for i in range(10)]),
    "trivial",
    "1.0.0",
)
registry.register(
    Pipeline.from_steps([Step.from_callable(wait_then_add_one, name=f"s{i}") for i in range(10)]),
    "waiting",
    "1.0.0",
)
registry.register(Pipeline.from_steps([noted(f"s{i}") for i in range(3)]), "slow", "1.0.0")
'''


# -- the store -------------------------------------------------------------------------------------


class Store:
    """A fresh schema on the benchmark's Postgres, one plain connection to look at it."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        # The workers' connections are named after the schema (their server processes are
        # found by it).
        self.uri = f"{POSTGRES_DSN}?schema={schema}&application_name={schema}"
        self.conn: Any = None
        self.backend: Any = None

    async def open(self) -> None:
        import asyncpg

        from flujo.state.backends.postgres import PostgresBackend

        await self.drop()
        self.backend = PostgresBackend(POSTGRES_DSN, schema=self.schema)
        await self.backend.migrate()
        self.conn = await asyncpg.connect(
            POSTGRES_DSN, server_settings={"search_path": self.schema}
        )

    async def drop(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_DSN)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        await conn.close()

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.aclose()
        if self.conn is not None:
            await self.conn.close()
        await self.drop()

    async def clear(self) -> None:
        await self.conn.execute(
            "TRUNCATE flujo_runs, flujo_run_steps, flujo_run_context, flujo_queues, flujo_workers"
        )

    async def listeners(self) -> int:
        """How many connections LISTEN on this schema's channel (one per idle worker)."""
        return int(
            await self.conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query = $1",
                f'LISTEN "{self.backend.channel}"',
            )
        )

    async def workers(self) -> list[str]:
        rows = await self.conn.fetch("SELECT worker_id FROM flujo_workers")
        return [str(row[0]) for row in rows]


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, every: float = 0.02) -> None:
    deadline = time.monotonic() + GUARD_S
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(every)


# -- worker processes ------------------------------------------------------------------------------


def spawn_worker(
    directory: Path, store: Store, *options: str, **env: str
) -> subprocess.Popen[bytes]:
    """``flujo worker --app bench_flows:registry ...`` on the benchmark's schema."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FLUJO_")}
    environment.update(
        FLUJO_STATE_URI=store.uri,
        PYTHONPATH=str(directory),
        BENCH_STEP_LOG=str(directory / "steps.log"),
        **env,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "flujo.cli", "worker", "--app", "bench_flows:registry", *options],
        cwd=directory,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (graceful), then wait; SIGKILL if it does not stop."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def stopped_at_exit(processes: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


async def idle(store: Store, count: int) -> None:
    """Wait until ``count`` workers are registered and listening (idle)."""

    async def ready() -> bool:
        return len(await store.workers()) == count and await store.listeners() >= count

    await wait_until(ready, f"{count} idle worker(s)")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def postgres_cpu(store: Store) -> dict[int, float]:
    """CPU seconds of each server process serving the workers' connections (found by their
    application_name; the server is local)."""
    rows = await store.conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", store.schema
    )
    found = {}
    for row in rows:
        with contextlib.suppress(OSError):
            found[int(row[0])] = cpu_seconds(int(row[0]))
    return found


def all_postgres_cpu() -> dict[int, float]:
    """CPU seconds of every ``postgres`` process of this machine (the server is local)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if (entry / "comm").read_text().strip() == "postgres":
                    found[int(entry.name)] = cpu_seconds(int(entry.name))
    return found


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    # user nice system idle iowait irq softirq steal (guest time is counted in user already)
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle_time = values[3] + values[4]  # idle + iowait
    return sum(values) - idle_time, sum(values)


# -- workload: throughput with 1, 2, 4 workers -----------------------------------------------------


async def one_setting(
    directory: Path,
    store: Store,
    client: Any,
    n_workers: int,
    concurrency: int,
    prefix: str,
    load: Load,
) -> dict[str, Any]:
    """One timed batch of ``load.runs`` runs on ``n_workers`` fresh worker processes."""
    await store.clear()
    processes = [
        spawn_worker(directory, store, "--concurrency", str(concurrency)) for _ in range(n_workers)
    ]
    with stopped_at_exit(processes):
        await idle(store, n_workers)
        # Warm-up: a few runs per worker (imports, connections, prepared statements).
        for i in range(concurrency * n_workers):
            await client.enqueue(load.pipeline, 0, run_id=f"warm-{i}")
        await wait_until(
            lambda: finished(store, "warm-%", concurrency * n_workers), "the warm-up", every=0.05
        )
        pids = [process.pid for process in processes]
        batch = await one_batch(store, client, n_workers, pids, prefix, load)
        for process in processes:
            stop(process)
        if not all(process.returncode == 0 for process in processes):
            batch["correct"] = False
    return batch


async def one_batch(
    store: Store, client: Any, n_workers: int, pids: list[int], prefix: str, load: Load
) -> dict[str, Any]:
    """Enqueue ``load.runs`` runs while the queue is held (limit 0), release them at once, and time
    them from the release to the last run's final checkpoint (store clock)."""
    await client.set_queue_limit("default", 0)
    start = time.perf_counter()
    for i in range(load.runs):
        await client.enqueue(load.pipeline, i, run_id=f"{prefix}{i:05d}")
    enqueue_s = time.perf_counter() - start
    await asyncio.sleep(0.5)  # the workers, woken by each enqueue, are idle again
    await idle(store, n_workers)
    workers_before = sum(cpu_seconds(pid) for pid in pids)
    postgres_before = await postgres_cpu(store)
    server_before = all_postgres_cpu()
    self_before = time.process_time()
    machine_before = machine_cpu()
    t0 = await store.backend.store_time()
    await client.set_queue_limit("default", None)
    await store.backend.notify_work("default")
    await wait_until(lambda: finished(store, f"{prefix}%", load.runs), "the timed runs", every=0.02)
    machine_after = machine_cpu()
    self_after = time.process_time()
    postgres_after = await postgres_cpu(store)
    server_after = all_postgres_cpu()
    workers_after = sum(cpu_seconds(pid) for pid in pids)
    end = float(
        await store.conn.fetchval(
            "SELECT max(updated_at) FROM flujo_runs WHERE run_id LIKE $1", f"{prefix}%"
        )
    )
    elapsed = end - t0
    steps = load.runs * N_STEPS
    ticks = os.sysconf("SC_CLK_TCK")
    machine_s = (machine_after[1] - machine_before[1]) / ticks
    busy_s = (machine_after[0] - machine_before[0]) / ticks
    workers_s = workers_after - workers_before
    postgres_s = sum(cpu - postgres_before.get(pid, 0.0) for pid, cpu in postgres_after.items())
    server_s = sum(cpu - server_before.get(pid, 0.0) for pid, cpu in server_after.items())
    others_s = busy_s - workers_s - server_s - (self_after - self_before)
    return {
        "seconds": elapsed,
        "steps_per_s": steps / elapsed,
        "runs_per_s": load.runs / elapsed,
        "enqueue_runs_per_s": load.runs / enqueue_s,
        "worker_cpu_us_per_step": workers_s / steps * 1e6,
        "postgres_cpu_us_per_step": postgres_s / steps * 1e6,
        "machine_cpu_busy": busy_s / max(machine_s, 1e-9),
        # The rest of the server (its background processes, and its backends serving others).
        "postgres_rest_cpu_share": max(0.0, server_s - postgres_s) / max(machine_s, 1e-9),
        # Everything else that ran meanwhile on this shared machine, as a share of all cores.
        "other_cpu_share": max(0.0, others_s) / max(machine_s, 1e-9),
        "correct": await batch_correct(store, prefix, load.runs),
    }


async def finished(store: Store, pattern: str, count: int) -> bool:
    """Whether ``count`` runs whose id is LIKE ``pattern`` have a final status."""
    done = await store.conn.fetchval(
        "SELECT count(*) FROM flujo_runs WHERE run_id LIKE $1 "
        "AND status IN ('completed', 'failed', 'cancelled')",
        pattern,
    )
    return int(done) >= count


async def batch_correct(store: Store, prefix: str, runs: int) -> bool:
    """Every run completed with output input + 10, ten step records each, no lease left."""
    good = await store.conn.fetchval(
        "SELECT count(*) FROM flujo_runs WHERE run_id LIKE $2 AND status = 'completed' "
        "AND current_step_index = $1 AND locked_by IS NULL "
        "AND last_step_output::text::int = initial_input::text::int + $1",
        N_STEPS,
        f"{prefix}%",
    )
    records = await store.conn.fetchval(
        "SELECT count(*) FROM flujo_run_steps WHERE run_id LIKE $1", f"{prefix}%"
    )
    return int(good) == runs and int(records) == runs * N_STEPS


@dataclasses.dataclass(frozen=True)
class Load:
    """What a workers workload runs: its pipeline, runs per batch, batches, what a step does."""

    workload: str
    pipeline: str
    runs: int
    batches: int
    step: str


TRIVIAL = Load("workers", "trivial", RUNS, BATCHES, "trivial async steps (x -> x + 1)")
WAITING = Load(
    "workers_io",
    "waiting",
    IO_RUNS,
    IO_BATCHES,
    f"async steps that wait {IO_WAIT_S * 1000:g} ms (a model or HTTP call), then x -> x + 1",
)


def bench_workers(directory: Path, concurrency: int, load: Load = TRIVIAL) -> dict[str, Any]:
    from flujo import TaskClient

    sys.path.insert(0, str(directory))
    import bench_flows  # type: ignore[import-not-found]

    async def go() -> dict[int, list[dict[str, Any]]]:
        store = Store("flujo_bench_workers")
        await store.open()
        client = TaskClient(store.backend, bench_flows.registry)
        try:
            # Rounds of every setting in turn, so that the shared machine's noise hits all alike.
            settings: dict[int, list[dict[str, Any]]] = {n: [] for n in WORKER_COUNTS}
            for batch in range(load.batches):
                for n in WORKER_COUNTS:
                    prefix = f"b{batch}-w{n}-"
                    settings[n].append(
                        await one_setting(directory, store, client, n, concurrency, prefix, load)
                    )
            return settings
        finally:
            await store.close()

    settings = asyncio.run(go())
    cores = os.cpu_count()
    loadavg = os.getloadavg()[0]

    def median(key: str, digits: int = 0) -> dict[str, Any]:
        return {
            str(n): round(statistics.median(b[key] for b in batches), digits or None)
            for n, batches in settings.items()
        }

    steps = median("steps_per_s")
    busy = median("machine_cpu_busy", 2)
    others = median("other_cpu_share", 2)
    server_rest = median("postgres_rest_cpu_share", 2)
    worker_cpu = median("worker_cpu_us_per_step", 1)
    postgres_cpu = median("postgres_cpu_us_per_step", 1)
    best = max(steps, key=lambda n: steps[n])
    return {
        "framework": "flujo",
        "workload": load.workload,
        "n_steps": N_STEPS,
        "runs": load.runs,
        "batches": load.batches,
        "concurrency": concurrency,
        "cpu_count": cores,
        "steps_per_s": steps,
        "steps_per_s_each": {
            str(n): [round(b["steps_per_s"]) for b in batches] for n, batches in settings.items()
        },
        "runs_per_s": median("runs_per_s", 1),
        "seconds": median("seconds", 3),
        "worker_cpu_us_per_step": worker_cpu,
        "postgres_cpu_us_per_step": postgres_cpu,
        "machine_cpu_busy": busy,
        "postgres_rest_cpu_share": server_rest,
        "other_cpu_share": others,
        "enqueue_runs_per_s": median("enqueue_runs_per_s")[str(WORKER_COUNTS[0])],
        "loadavg_1m_at_end": round(loadavg, 2),
        "correct": all(b["correct"] for batches in settings.values() for b in batches),
        "notes": (
            f"{load.runs} runs of {N_STEPS} {load.step} per batch; {load.batches} "
            "batches per setting (medians), the settings taking turns round by round; each "
            f"batch on 1, 2 or 4 fresh `flujo worker --concurrency {concurrency}` processes "
            f"(started, warmed up with {concurrency} runs each, idle), enqueued while the queue "
            "is held at limit 0, then released (limit removed + NOTIFY); timed from the release "
            "to the last run's final checkpoint (store clock). Postgres 15 on 127.0.0.1, "
            "synchronous_commit=on, one committed checkpoint per step. The workers, Postgres "
            f"and this benchmark share {cores} cores: machine CPU busy "
            + ", ".join(f"{busy[n]:.0%} with {n}" for n in busy)
            + " (of which the rest of the Postgres server: "
            + ", ".join(f"{server_rest[n]:.0%}" for n in server_rest)
            + "; other programs: "
            + ", ".join(f"{others[n]:.0%}" for n in others)
            + "); CPU per step in the workers "
            + ", ".join(f"{worker_cpu[n]:.0f} us" for n in worker_cpu)
            + ", in the Postgres backends serving them "
            + ", ".join(f"{postgres_cpu[n]:.0f} us" for n in postgres_cpu)
            + f". Best: {steps[best]} steps/s with {best} worker(s)"
        ),
    }


# -- workload: takeover after a worker is killed ---------------------------------------------------


def step_log(directory: Path) -> list[tuple[float, int, str, str]]:
    path = directory / "steps.log"
    if not path.exists():
        return []
    lines = [line.split() for line in path.read_text().splitlines()]
    return [(float(t), int(pid), run_id, name) for t, pid, run_id, name in lines]


async def one_takeover(directory: Path, store: Store, client: Any, rep: int) -> dict[str, Any]:
    await store.clear()
    (directory / "steps.log").unlink(missing_ok=True)
    lease = ("--lease", str(LEASE_S), "--heartbeat", str(HEARTBEAT_S))
    a = spawn_worker(directory, store, "--concurrency", str(HELD), *lease, BENCH_SLOW_S="600")
    processes = [a]
    with stopped_at_exit(processes):
        await idle(store, 1)
        run_ids = [await client.enqueue("slow", 0, run_id=f"r{rep}-{i}") for i in range(HELD)]

        async def a_in_slow_step() -> bool:
            started = {
                r for _, pid, r, name in step_log(directory) if pid == a.pid and name == "s1"
            }
            return started == set(run_ids)

        await wait_until(a_in_slow_step, "worker A in the slow step of every run")
        [a_id] = await store.workers()
        b = spawn_worker(directory, store, "--concurrency", str(HELD), *lease, BENCH_SLOW_S="0")
        processes.append(b)
        await idle(store, 2)
        b_id = next(w for w in await store.workers() if w != a_id)

        # Spread the kill over A's heartbeat period (how much lease A has left varies).
        await asyncio.sleep(HEARTBEAT_S * rep / REPETITIONS)
        killed_at = time.time()
        a.kill()
        a.wait()
        await asyncio.sleep(0.05)  # a renewal in flight at the kill has landed (or not) by now
        rows = await store.conn.fetch(
            "SELECT run_id, locked_by, lease_expires_at FROM flujo_runs WHERE run_id = ANY($1)",
            run_ids,
        )
        expiry = {row["run_id"]: float(row["lease_expires_at"]) for row in rows}
        held_by_a = all(row["locked_by"] == a_id for row in rows)

        claimed: dict[str, float] = {}
        deadline = time.monotonic() + GUARD_S
        while len(claimed) < len(run_ids) and time.monotonic() < deadline:
            rows = await store.conn.fetch(
                "SELECT run_id, locked_by, lease_expires_at, "
                "extract(epoch FROM clock_timestamp()) AS seen FROM flujo_runs "
                "WHERE run_id = ANY($1)",
                run_ids,
            )
            for row in rows:
                if row["run_id"] not in claimed and row["locked_by"] == b_id:
                    # The claim set the lease to claim time + lease (store clock); a renewal
                    # since can only move it later, and the claim was no later than "seen".
                    at_claim = float(row["lease_expires_at"]) - LEASE_S
                    claimed[row["run_id"]] = min(at_claim, float(row["seen"]))
            await asyncio.sleep(0.005)

        await wait_until(lambda: finished(store, f"r{rep}-%", HELD), "the taken-over runs")
        log = step_log(directory)
        stop(b)
        correct = held_by_a and len(claimed) == HELD and b.returncode == 0
        for run_id in run_ids:
            state = await store.backend.load_state(run_id)
            names = [record["name"] for record in state["step_history"]]
            ran = Counter((pid, name) for _, pid, r, name in log if r == run_id)
            correct = correct and state["status"] == "completed" and state["last_step_output"] == 3
            correct = correct and names == ["s0", "s1", "s2"]
            # s0 committed by A is not run again; s1 (in flight at the kill) runs again on B.
            correct = correct and ran == {
                (a.pid, "s0"): 1,
                (a.pid, "s1"): 1,
                (b.pid, "s1"): 1,
                (b.pid, "s2"): 1,
            }
    b_steps = {r: t for t, pid, r, name in log if pid == b.pid and name == "s1"}
    return {
        "kill_to_first_step_s": min(b_steps.values()) - killed_at,
        "kill_to_expiry_s": min(expiry.values()) - killed_at,
        "expiry_to_claim_s": max(claimed[r] - expiry[r] for r in run_ids),
        "claim_to_step_s": max(b_steps[r] - claimed[r] for r in run_ids),
        "correct": correct,
    }


def bench_takeover(directory: Path) -> dict[str, Any]:
    from flujo import TaskClient

    sys.path.insert(0, str(directory))
    import bench_flows

    async def go() -> list[dict[str, Any]]:
        store = Store("flujo_bench_takeover")
        await store.open()
        client = TaskClient(store.backend, bench_flows.registry)
        try:
            return [await one_takeover(directory, store, client, rep) for rep in range(REPETITIONS)]
        finally:
            await store.close()

    reps = asyncio.run(go())

    def summary(key: str) -> dict[str, Any]:
        values = [rep[key] for rep in reps]
        return {
            "median": round(statistics.median(values), 3),
            "max": round(max(values), 3),
            "each": [round(v, 3) for v in values],
        }

    after_expiry = summary("expiry_to_claim_s")
    met = after_expiry["max"] <= 5.0
    return {
        "framework": "flujo",
        "workload": "takeover",
        "n_steps": 3,
        "runs": HELD * REPETITIONS,
        "repetitions": REPETITIONS,
        "lease_s": LEASE_S,
        "heartbeat_s": HEARTBEAT_S,
        "kill_to_first_step_s": summary("kill_to_first_step_s"),
        "expiry_to_claim_s": after_expiry,
        "kill_to_expiry_s": summary("kill_to_expiry_s"),
        "claim_to_step_s": summary("claim_to_step_s"),
        "correct": all(rep["correct"] for rep in reps),
        "notes": (
            f"worker A (`flujo worker --lease {LEASE_S:g} --heartbeat {HEARTBEAT_S:g}`) holds "
            f"{HELD} runs (3 steps each) in their slow step s1; idle worker B (same settings) "
            "waits; A gets SIGKILL. kill_to_first_step_s: from the kill to B starting s1 of "
            "the first taken-over run; expiry_to_claim_s: from the lease expiry (A's last "
            "lease_expires_at, store clock) to B's claim (locked_by becomes B; worst run of "
            "each repetition); kill_to_expiry_s: the lease A had left (its last renewal was at "
            f"most {HEARTBEAT_S:g} s before the kill); claim_to_step_s: from the claim to B "
            "starting s1 (worst run). Postgres 15 on 127.0.0.1. Correct: s0 (committed by A) "
            "never ran again, s1 ran once more on B, every run completed with 3 step records. "
            f"Goal (takeover within 5 s of lease expiry): {'met' if met else 'NOT met'}"
        ),
    }


def child(workload: str, concurrency: int) -> None:
    with tempfile.TemporaryDirectory(prefix="flujo-bench-workers-") as tmp:
        directory = Path(tmp)
        (directory / "bench_flows.py").write_text(FLOWS)
        if workload == "workers":
            result = bench_workers(directory, concurrency)
        elif workload == "workers_io":
            result = bench_workers(directory, concurrency, WAITING)
        elif workload == "takeover":
            result = bench_takeover(directory)
        else:
            raise SystemExit(f"unknown workload {workload!r}")
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=WORKLOADS, action="append")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=CONCURRENCY,
        help=f"--concurrency of each worker in the workers workload (default {CONCURRENCY})",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.concurrency)
        return
    for workload in args.workload or WORKLOADS:
        out = subprocess.run(
            [
                sys.executable,
                str(HERE),
                "--child",
                workload,
                "--concurrency",
                str(args.concurrency),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
