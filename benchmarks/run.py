"""flujo's benchmarks: the workloads of shared/design/PERFORMANCE.md, one JSON line each.

    python benchmarks/run.py                      # every workload
    python benchmarks/run.py --workload sqlite    # one of them

Each workload runs in a fresh process, after one untimed warm-up run, as 20 timed runs with
distinct run ids; medians are reported. Durability settings are stated in each line's notes.
Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RUNS = 20
N_STEPS = 50
WORKLOADS = (
    "memory",
    "sqlite",
    "file",
    "postgres",
    "resume",
    "big_context",
    "growth",
    "list_tasks",
    "map",
    "import",
    "routines_memory",
    "routines_sqlite",
)
POSTGRES_DSN = os.environ.get(
    "FLUJO_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
HERE = Path(__file__).resolve()


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def line(
    workload: str, n_steps: int, times: list[float], correct: bool, notes: str
) -> dict[str, Any]:
    median = statistics.median(times)
    return {
        "framework": "flujo",
        "workload": workload,
        "n_steps": n_steps,
        "runs": len(times),
        "run_ms_median": round(median * 1e3, 3),
        "per_step_us_median": round(median / n_steps * 1e6, 2),
        "peak_rss_mb": peak_rss_mb(),
        "correct": correct,
        "notes": notes,
    }


def linear_pipeline(n: int) -> Any:
    from flujo import Pipeline, Step

    async def add_one(x: int) -> int:
        return x + 1

    return Pipeline.from_steps([Step.from_callable(add_one, name=f"s{i}") for i in range(n)])


async def timed_runs(runner: Any, n: int, *, expected: int) -> tuple[list[float], bool]:
    await runner.run_async(0, run_id="warmup")
    times = []
    correct = True
    for i in range(RUNS):
        start = time.perf_counter()
        result = await runner.run_async(0, run_id=f"run-{i}")
        times.append(time.perf_counter() - start)
        correct = correct and result.success and result.output == expected
    return times, correct


def bench_linear(workload: str, directory: Path) -> dict[str, Any]:
    from flujo import Flujo
    from flujo.state import FileBackend, SQLiteBackend

    pipeline = linear_pipeline(N_STEPS)
    if workload == "memory":
        runner = Flujo(pipeline, persist_state=False)
        notes = "no store (persist_state=False)"
    elif workload == "sqlite":
        runner = Flujo(pipeline, state_backend=SQLiteBackend(directory / "bench.db"))
        notes = "SQLite WAL, synchronous=NORMAL, one committed checkpoint per step"
    else:
        runner = Flujo(pipeline, state_backend=FileBackend(directory / "runs"))
        notes = "one JSON file per run; temp file + fsync + rename + directory fsync per step"
    times, correct = asyncio.run(timed_runs(runner, N_STEPS, expected=N_STEPS))
    asyncio.run(runner.aclose())
    return line(workload, N_STEPS, times, correct, notes)


def stamped_pipeline(n: int, stamps: list[float]) -> Any:
    """``n`` steps ``x -> x + 1`` that note when each starts (step-to-step time)."""
    from flujo import Pipeline, Step

    async def add_one(x: int) -> int:
        stamps.append(time.perf_counter())
        return x + 1

    return Pipeline.from_steps([Step.from_callable(add_one, name=f"s{i}") for i in range(n)])


def step_gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


def bench_big_context(directory: Path) -> dict[str, Any]:
    """A context with a 1 MiB field that no step changes, against an empty context."""
    from flujo import Flujo, PipelineContext
    from flujo.state import SQLiteBackend

    class BigContext(PipelineContext):
        document: str = ""

    stamps: list[float] = []
    pipeline = stamped_pipeline(N_STEPS, stamps)
    plain = Flujo(pipeline, state_backend=SQLiteBackend(directory / "plain.db"))
    heavy = Flujo(
        pipeline,
        context_model=BigContext,
        initial_context_data={"document": "x" * (1024 * 1024)},
        state_backend=SQLiteBackend(directory / "big.db"),
    )

    async def measure(runner: Any, run_id: str) -> tuple[float, float, bool]:
        stamps.clear()
        start = time.perf_counter()
        result = await runner.run_async(0, run_id=run_id)
        total = time.perf_counter() - start
        # Steps 2-50: each gap is one step plus one committed checkpoint.
        return total, statistics.median(step_gaps(stamps)), result.output == N_STEPS

    async def both() -> tuple[list[float], list[float], list[float], list[float], bool]:
        await measure(plain, "warmup")
        await measure(heavy, "warmup")
        plain_steps, heavy_steps, plain_runs, heavy_runs, correct = [], [], [], [], True
        for i in range(RUNS):  # interleaved, so machine noise hits both alike
            total, gap, ok = await measure(plain, f"run-{i}")
            plain_runs.append(total)
            plain_steps.append(gap)
            total, gap, ok2 = await measure(heavy, f"run-{i}")
            heavy_runs.append(total)
            heavy_steps.append(gap)
            correct = correct and ok and ok2
        return plain_steps, heavy_steps, plain_runs, heavy_runs, correct

    plain_steps, heavy_steps, plain_runs, heavy_runs, correct = asyncio.run(both())
    empty_us = statistics.median(plain_steps) * 1e6
    big_us = statistics.median(heavy_steps) * 1e6
    result = line("big_context", N_STEPS, heavy_runs, correct, "")
    result["per_step_us_median"] = round(big_us, 2)
    result["notes"] = (
        "SQLite WAL, synchronous=NORMAL; context holds a 1 MiB str field that no step changes. "
        f"per_step_us_median is step-to-step time (step + committed checkpoint, steps 2-50): "
        f"{big_us:.1f} us vs {empty_us:.1f} us with an empty context (ratio "
        f"{big_us / empty_us:.2f}, goal <= 2). The field is stored once, with the run's first "
        f"checkpoint: whole run {statistics.median(heavy_runs) * 1e3:.2f} ms vs "
        f"{statistics.median(plain_runs) * 1e3:.2f} ms"
    )
    return result


def bench_growth(directory: Path) -> dict[str, Any]:
    """A 200-step run: does a checkpoint cost more late in the run than early?"""
    from flujo import Flujo
    from flujo.state import SQLiteBackend

    n = 200
    stamps: list[float] = []
    pipeline = stamped_pipeline(n, stamps)
    runner = Flujo(pipeline, state_backend=SQLiteBackend(directory / "growth.db"))

    async def go() -> tuple[list[float], list[float], list[float], bool]:
        await runner.run_async(0, run_id="warmup")
        firsts, lasts, totals, correct = [], [], [], True
        for i in range(RUNS):
            stamps.clear()
            start = time.perf_counter()
            result = await runner.run_async(0, run_id=f"run-{i}")
            totals.append(time.perf_counter() - start)
            gaps = step_gaps(stamps)
            firsts.append(statistics.median(gaps[:20]))
            lasts.append(statistics.median(gaps[-20:]))
            correct = correct and result.success and result.output == n
        return firsts, lasts, totals, correct

    firsts, lasts, totals, correct = asyncio.run(go())
    first_us = statistics.median(firsts) * 1e6
    last_us = statistics.median(lasts) * 1e6
    notes = (
        "SQLite WAL, synchronous=NORMAL; step-to-step time (step + checkpoint) over steps "
        f"1-20: {first_us:.1f} us, over steps 181-200: {last_us:.1f} us "
        f"(ratio {last_us / first_us:.2f})"
    )
    return line("growth", n, totals, correct, notes)


RESUME_CHILD = """
import asyncio, os, sys
from flujo import Flujo, Pipeline, Step
from flujo.state import SQLiteBackend

db, effects, run_id, crash = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "crash"

def make(i):
    async def work(x: int) -> int:
        if crash and i == 5:
            os._exit(1)
        fd = os.open(effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{run_id} {i}\\n".encode())
        os.close(fd)
        return x + 1
    return Step.from_callable(work, name=f"step{i + 1}")

pipeline = Pipeline.from_steps([make(i) for i in range(10)])
runner = Flujo(pipeline, state_backend=SQLiteBackend(db))
asyncio.run(runner.run_async(0, run_id=run_id))
"""


def bench_resume(directory: Path) -> dict[str, Any]:
    db = directory / "resume.db"
    effects = directory / "effects.txt"
    script = directory / "child.py"
    script.write_text(RESUME_CHILD)
    ids = ["warmup"] + [f"run-{i}" for i in range(RUNS)]
    for run_id in ids:  # each child dies with os._exit on entering step 6
        subprocess.run(
            [sys.executable, str(script), str(db), str(effects), run_id, "crash"], check=False
        )
    from flujo import Flujo, Pipeline
    from flujo.state import SQLiteBackend

    def make(i: int) -> Any:
        from flujo import Step

        async def work(x: int) -> int:
            fd = os.open(effects, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.write(fd, f"{current} {i}\n".encode())
            os.close(fd)
            return x + 1

        return Step.from_callable(work, name=f"step{i + 1}")

    current = ""
    runner = Flujo(
        Pipeline.from_steps([make(i) for i in range(10)]), state_backend=SQLiteBackend(db)
    )
    times = []
    correct = True
    for run_id in ids:
        current = run_id
        start = time.perf_counter()
        result = asyncio.run(runner.run_async(0, run_id=run_id))
        elapsed = time.perf_counter() - start
        if run_id != "warmup":
            times.append(elapsed)
        correct = correct and result.success and result.output == 10
    lines = effects.read_text().split()
    counts: dict[tuple[str, str], int] = {}
    for run_id, index in zip(lines[::2], lines[1::2], strict=True):
        counts[(run_id, index)] = counts.get((run_id, index), 0) + 1
    reruns = sum(
        1 for (rid, idx), c in counts.items() if rid != "warmup" and int(idx) < 5 and c > 1
    )
    correct = correct and reruns == 0 and all(c == 1 for c in counts.values())
    result = line("resume", 10, times, correct, "")
    result["per_step_us_median"] = None
    result["reruns_of_steps_1_to_5"] = reruns
    result["notes"] = (
        "SQLite WAL, synchronous=NORMAL; child killed with os._exit on entering step 6; "
        "run_ms_median is the resume call in a new process (load + validate + steps 6-10 "
        f"with their side effects, each via asyncio.run); steps 1-5 re-run: {reruns}"
    )
    return result


async def fresh_postgres(schema: str, **options: Any) -> Any:
    import asyncpg

    from flujo.state.backends.postgres import PostgresBackend

    conn = await asyncpg.connect(POSTGRES_DSN)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await conn.close()
    backend = PostgresBackend(POSTGRES_DSN, schema=schema, **options)
    await backend.migrate()
    return backend


async def drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_DSN)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await conn.close()


async def bare_upsert_us(synchronous_commit: str) -> float:
    """The floor: one prepared upsert per step on one connection."""
    import asyncpg

    conn = await asyncpg.connect(
        POSTGRES_DSN, server_settings={"synchronous_commit": synchronous_commit}
    )
    # A regular (WAL-logged) table: a temporary one would skip the WAL and its flush.
    await conn.execute("DROP TABLE IF EXISTS flujo_bench_floor")
    await conn.execute("CREATE TABLE flujo_bench_floor (k text PRIMARY KEY, v int)")
    times = []
    for run in range(RUNS):
        start = time.perf_counter()
        for i in range(N_STEPS):
            await conn.execute(
                "INSERT INTO flujo_bench_floor VALUES ($1, $2) "
                "ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                f"k{run}",
                i,
            )
        times.append((time.perf_counter() - start) / N_STEPS)
    await conn.execute("DROP TABLE flujo_bench_floor")
    await conn.close()
    return statistics.median(times) * 1e6


def bench_postgres() -> dict[str, Any]:
    from flujo import Flujo

    async def go() -> tuple[list[float], bool, float, float]:
        backend = await fresh_postgres("flujo_bench")
        runner = Flujo(linear_pipeline(N_STEPS), state_backend=backend)
        try:
            times, correct = await timed_runs(runner, N_STEPS, expected=N_STEPS)
        finally:
            await runner.aclose()
            await drop_schema("flujo_bench")
        return times, correct, await bare_upsert_us("on"), await bare_upsert_us("off")

    times, correct, floor_on, floor_off = asyncio.run(go())
    result = line("postgres", N_STEPS, times, correct, "")
    result["notes"] = (
        "Postgres 15 on 127.0.0.1, synchronous_commit=on, one committed checkpoint per step "
        "(one statement: guarded UPDATE of the run + INSERT of the step record, on the "
        "backend's kept checkpoint connection); floor measured "
        f"in the same process: a bare prepared upsert per step {floor_on:.0f} us "
        f"(synchronous_commit=on), {floor_off:.0f} us (off)"
    )
    return result


LIST_RUNS = 100_000


async def populate(backend: Any) -> None:
    """100,000 stored runs, each with metadata: env (all), tenant (1 in 10), user (1 in 1,000)."""
    from flujo.state.backends.base import Checkpoint, RunHeader

    dumps = backend.serializer.dumps
    names = dumps(["s0"])
    base = time.time() - LIST_RUNS

    def checkpoint(i: int) -> Checkpoint:
        meta = {"env": "prod", "tenant": f"t{i % 10}", "user_id": f"u{i % 1000}"}
        return Checkpoint(
            run_id=f"run-{i:06d}",
            expected_version=0,
            status="completed" if i % 3 else "failed",
            current_step_index=1,
            updated_at=base + i,
            last_step_output=b"1",
            error=None,
            context={"run_id": dumps(f"run-{i:06d}"), "scratchpad": b"{}"},
            steps=[b'{"index":0,"name":"s0","success":true,"output":1}'],
            header=RunHeader("p", "p", "1.0.0", names, b"0", base + i, dumps(meta)),
        )

    batch = 200
    for start in range(0, LIST_RUNS, batch):
        await asyncio.gather(
            *(backend.write_checkpoint(checkpoint(i)) for i in range(start, start + batch))
        )


async def time_listing(backend: Any) -> dict[str, float]:
    from flujo import TaskClient

    client = TaskClient(backend)
    cases = {
        "user_id (0.1% of runs)": {"user_id": "u417"},
        "tenant (10%)": {"tenant": "t3"},
        "env (100%)": {"env": "prod"},
        "tenant + status (3.3%)": None,
    }
    out = {}
    for label, wanted in cases.items():
        times = []
        for _ in range(RUNS + 1):
            start = time.perf_counter()
            if wanted is None:
                rows = await client.list_tasks(status="failed", metadata_filter={"tenant": "t3"})
            else:
                rows = await client.list_tasks(metadata_filter=wanted)
            times.append(time.perf_counter() - start)
            if not rows:
                raise SystemExit(f"list_tasks found nothing for {label}")
        out[label] = statistics.median(times[1:]) * 1e3
    return out


def bench_list_tasks(directory: Path) -> dict[str, Any]:
    from flujo.state import SQLiteBackend

    async def go() -> tuple[dict[str, float], dict[str, float]]:
        sqlite = SQLiteBackend(directory / "list.db")
        await populate(sqlite)
        sqlite_ms = await time_listing(sqlite)
        await sqlite.aclose()
        postgres = await fresh_postgres("flujo_bench_list", pool_max=20)
        try:
            await populate(postgres)
            pool = await postgres._get_pool()
            await pool.execute("ANALYZE")
            postgres_ms = await time_listing(postgres)
        finally:
            await postgres.aclose()
            await drop_schema("flujo_bench_list")
        return sqlite_ms, postgres_ms

    sqlite_ms, postgres_ms = asyncio.run(go())
    worst = max([*sqlite_ms.values(), *postgres_ms.values()])
    result = line("list_tasks", 1, [worst / 1e3], True, "")
    result["per_step_us_median"] = None
    result["sqlite_ms"] = {k: round(v, 2) for k, v in sqlite_ms.items()}
    result["postgres_ms"] = {k: round(v, 2) for k, v in postgres_ms.items()}
    result["notes"] = (
        f"TaskClient.list_tasks(limit=50) over {LIST_RUNS:,} stored runs with a metadata "
        "filter; median of 20 calls per filter; run_ms_median is the worst case of all; "
        "SQLite WAL synchronous=NORMAL, Postgres synchronous_commit=on"
    )
    return result


MAP_ITEMS = 10_000


def bench_map(directory: Path) -> dict[str, Any]:
    """A 10,000-item MapStep on SQLite: does an item's checkpoint cost more late than early?"""
    from flujo import Flujo, MapStep, Step
    from flujo.state import SQLiteBackend

    stamps: list[float] = []

    async def add_one(x: int) -> int:
        stamps.append(time.perf_counter())
        return x + 1

    mapped = MapStep("map", item_pipeline=Step.from_callable(add_one, name="add_one"))
    runner = Flujo(mapped, state_backend=SQLiteBackend(directory / "map.db"))
    items = list(range(MAP_ITEMS))
    runs = 5

    async def go() -> tuple[list[float], list[float], list[float], bool]:
        await runner.run_async(items, run_id="warmup")
        firsts, lasts, totals, correct = [], [], [], True
        for i in range(runs):
            stamps.clear()
            start = time.perf_counter()
            result = await runner.run_async(items, run_id=f"run-{i}")
            totals.append(time.perf_counter() - start)
            gaps = step_gaps(stamps)
            firsts.append(statistics.median(gaps[:500]))
            lasts.append(statistics.median(gaps[-500:]))
            correct = correct and result.success and result.output == [x + 1 for x in items]
        return firsts, lasts, totals, correct

    firsts, lasts, totals, correct = asyncio.run(go())
    first_us = statistics.median(firsts) * 1e6
    last_us = statistics.median(lasts) * 1e6
    result = line("map", MAP_ITEMS, totals, correct, "")
    result["runs"] = runs
    result["notes"] = (
        f"MapStep over {MAP_ITEMS:,} items (one async step each), SQLite WAL "
        "synchronous=NORMAL, each item's result committed as it finishes; item-to-item time "
        f"over items 1-500: {first_us:.1f} us, over items 9,501-10,000: {last_us:.1f} us "
        f"(ratio {last_us / first_us:.2f}); {runs} timed runs"
    )
    return result


def bench_import() -> dict[str, Any]:
    times = []
    for _ in range(RUNS + 1):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import flujo"], check=True)
        times.append(time.perf_counter() - start)
    times = times[1:]
    count = subprocess.run(
        [sys.executable, "-c", "import sys, flujo; print(len(sys.modules))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    memory = subprocess.run(
        [sys.executable, str(HERE), "--child", "memory"], check=True, capture_output=True, text=True
    )
    rss = json.loads(memory.stdout)["peak_rss_mb"]
    python = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        python.append(time.perf_counter() - start)
    result = line("import", 1, times, True, "")
    result["per_step_us_median"] = None
    result["peak_rss_mb"] = rss
    result["notes"] = (
        f"python -c 'import flujo' wall time, whole process ({count} modules loaded; "
        f"bare interpreter start {statistics.median(python) * 1e3:.1f} ms); "
        "peak_rss_mb is the memory workload's peak RSS (50-step run, 21 runs)"
    )
    return result


def routines_chain(n: int, stamps: list[float]) -> Any:
    """A flow of ``n`` routines ``x -> x + 1``, each one's output connected to the next one's
    input; each notes when its logic starts, and the last keeps its result in its state."""
    from flujo.routines import Flow, Routine

    class AddOne(Routine):
        def __init__(self) -> None:
            super().__init__()
            self.add_slot("input")
            self.add_event("output", ["x"])

            def add_one(slot_data: Any, policy_message: Any, job_state: Any) -> None:
                stamps.append(time.perf_counter())
                self.emit("output", x=slot_data["input"][0]["x"] + 1)

            self.set_logic(add_one)

    class Last(Routine):
        def __init__(self) -> None:
            super().__init__()
            self.add_slot("input")

            def keep(slot_data: Any, policy_message: Any, job_state: Any) -> None:
                stamps.append(time.perf_counter())
                job_state.update_routine_state("last", {"x": slot_data["input"][0]["x"] + 1})
                stamps.append(time.perf_counter())

            self.set_logic(keep)

    flow = Flow("bench_chain")
    for i in range(n - 1):
        flow.add_routine(AddOne(), f"r{i}")
        if i:
            flow.connect(f"r{i - 1}", "output", f"r{i}", "input")
    flow.add_routine(Last(), "last")
    flow.connect(f"r{n - 2}", "output", "last", "input")
    return flow


def bench_routines(workload: str, directory: Path) -> dict[str, Any]:
    """flujo.routines: a chain of 50 routines, ``exec(wait=True)`` per run (a new job each)."""
    from flujo.routines import FlowRegistry, Runtime
    from flujo.state import SQLiteBackend

    stamps: list[float] = []
    registry = FlowRegistry()
    registry.register(routines_chain(N_STEPS, stamps))
    backend = SQLiteBackend(directory / "routines.db") if workload == "routines_sqlite" else None
    runtime = Runtime(thread_pool_size=4, state_backend=backend, registry=registry)
    times, gaps, settle, correct = [], [], [], True
    for i in range(RUNS + 1):
        stamps.clear()
        start = time.perf_counter()
        job = runtime.exec("bench_chain", {"x": 0}, job_id=f"run-{i}")
        end = time.perf_counter()
        correct = correct and job.status == "completed"
        correct = correct and job.get_routine_state("last") == {"x": N_STEPS}
        if i == 0:  # the warm-up run
            continue
        times.append(end - start)
        gaps.append(statistics.median(step_gaps(stamps[:-1])))
        settle.append(end - stamps[-1])
    runtime.shutdown()
    gap_us = statistics.median(gaps) * 1e6
    settle_us = statistics.median(settle) * 1e6
    result = line(workload, N_STEPS, times, correct, "")
    store = (
        "SQLite WAL, synchronous=NORMAL, one committed checkpoint per activation"
        if backend is not None
        else "no store"
    )
    result["hop_to_hop_us_median"] = round(gap_us, 2)
    result["completion_noticed_us_median"] = round(settle_us, 1)
    result["notes"] = (
        f"flujo.routines, a chain of {N_STEPS} routines x -> x + 1, Runtime(thread_pool_size=4), "
        f"exec(wait=True) per run; {store}. per_step_us_median is the whole exec call / "
        f"{N_STEPS} (job start, first hand-off to a pool thread, the hops, the final status, "
        f"waking the caller); hop_to_hop_us_median the time from one routine's logic to the "
        f"next's ({gap_us:.1f} us); completion_noticed_us_median from the end of the last "
        f"routine's logic to exec returning ({settle_us:.0f} us: its commit, the final status, "
        "the caller woken by an Event, no polling)"
    )
    return result


def child(workload: str) -> None:
    with tempfile.TemporaryDirectory(prefix="flujo-bench-") as tmp:
        directory = Path(tmp)
        if workload in ("memory", "sqlite", "file"):
            result = bench_linear(workload, directory)
        elif workload == "postgres":
            result = bench_postgres()
        elif workload == "list_tasks":
            result = bench_list_tasks(directory)
        elif workload == "map":
            result = bench_map(directory)
        elif workload == "big_context":
            result = bench_big_context(directory)
        elif workload == "growth":
            result = bench_growth(directory)
        elif workload == "resume":
            result = bench_resume(directory)
        elif workload == "import":
            result = bench_import()
        elif workload in ("routines_memory", "routines_sqlite"):
            result = bench_routines(workload, directory)
        else:
            raise SystemExit(f"unknown workload {workload!r}")
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=WORKLOADS, action="append")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    for workload in args.workload or WORKLOADS:
        out = subprocess.run(
            [sys.executable, str(HERE), "--child", workload],
            check=True,
            capture_output=True,
            text=True,
        )
        print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
