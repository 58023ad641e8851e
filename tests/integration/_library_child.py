"""Child process of the step-library crash tests: runs (or resumes) one scenario, may kill itself.

Run as ``python _library_child.py '<json config>'``; it prints one JSON line with the outcome:
``{"status", "output", "error", "context", "history"}`` when the run returned, or
``{"error": "<class name>", "message"}`` when ``run_async`` raised. Every scenario is
``head >> <composite step> >> tail``, so the composite is top-level step 1 and its sub-steps
have paths ``[1, ...]``.

Config keys:

- ``backend``: ``"sqlite"``, ``"file"`` or ``"postgres"``; ``store``: the database file, the
  state directory, or the DSN; ``schema``: the Postgres schema (already migrated); ``run_id``.
- ``scenario``: ``loop``, ``loop_exit``, ``loop_mapper``, ``map``, ``parallel``,
  ``state_machine`` or ``nested`` (see the builders below).
- ``effects``: the side-effect file. Every step appends one JSON line ``[phase, label, seen]``
  with a single ``os.write`` on an ``O_APPEND`` descriptor (so a line is on disk the moment it
  is written): ``label`` names the step and where it ran (``"a 7"``: step ``a`` of loop
  iteration 7), ``seen`` is what the step saw of the context when it started.
- ``phase``: written into each effect line (``"ref"``, ``"crash"``, ``"resume"``).
- ``kill``: where to SIGKILL this process (absent: run to the end):
  ``{"before": label}`` (the step started, its effect not yet written) or ``{"after": label}``
  (effect written, the step's checkpoint not yet); with ``"wait_for": [path, ...]`` the step
  first waits until this process has committed records at those paths (a parallel branch
  waiting for its siblings). ``{"write": path, "kind": kind}``: inside the checkpoint write
  whose records include that path (``["top", i]``: top-level step ``i``): on SQLite after
  every statement and before COMMIT, on the file backend with the temporary file written but
  not yet renamed over the run's file, on Postgres with the statement sent to the server and
  its answer not yet read (in practice the server has committed it by then).
"""

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from pydantic import Field

from flujo import (
    ConditionalStep,
    Flujo,
    LoopStep,
    MapStep,
    ParallelStep,
    Pipeline,
    PipelineContext,
    StateMachineStep,
    Step,
    Transition,
)
from flujo.state.backends.base import Checkpoint, StateBackend
from flujo.state.backends.file import FileBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend

PIPELINE_NAME = "library-crash-test"
WAIT_S = 60.0
LOOPS = 10
MAP_ITEMS = 1000
MAP_CONCURRENCY = 8
STOP_AT = 3  # loop_exit: the iteration whose first step raises the exit flag
MAPPER_LOOPS = 5  # loop_mapper: iterations
NESTED_ITEMS = 4
NESTED_ROUNDS = 3

config: dict[str, Any] = json.loads(sys.argv[1])
kill: dict[str, Any] = config.get("kill") or {}
phase: str = config.get("phase", "run")
effects_fd = os.open(config["effects"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def die() -> None:
    """Die the way a crashed process dies: no cleanup, no flush, no atexit."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # pragma: no cover - SIGKILL cannot be caught
    os._exit(99)  # pragma: no cover


# -- what this process has committed, and the checkpoint being written ----------------------------

COMMITTED: set[tuple[Any, ...]] = set()
"""Paths of the records whose checkpoint write returned in this process."""
WRITING: list[Checkpoint] = []
"""The checkpoint being written (the runner writes one at a time per run)."""


def record_keys(checkpoint: Checkpoint) -> list[tuple[tuple[Any, ...], str]]:
    """(path, kind) of every record in ``checkpoint``; a top-level step's path is
    ``("top", index)``."""
    keys = []
    for raw in checkpoint.steps:
        record = orjson.loads(raw)
        path = record.get("path") or ["top", record["index"]]
        keys.append((tuple(path), record.get("kind", "step")))
    return keys


def is_kill_write(checkpoint: Checkpoint | None) -> bool:
    """True for the checkpoint that carries the record ``kill["write"]`` names."""
    if checkpoint is None or "write" not in kill:
        return False
    target = (tuple(kill["write"]), kill.get("kind", "step"))
    return target in record_keys(checkpoint)


class Tracking(StateBackend):
    """Notes which records committed; marks the checkpoint being written."""

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        WRITING.append(checkpoint)
        try:
            version = await super().write_checkpoint(checkpoint)
        finally:
            WRITING.remove(checkpoint)
        COMMITTED.update(path for path, _ in record_keys(checkpoint))
        return version


class KillingSQLiteBackend(Tracking, SQLiteBackend):
    """Dies inside the transaction of the chosen checkpoint, after its statements ran."""

    def _write(self, conn: sqlite3.Connection, cp: Checkpoint) -> int:
        version = super()._write(conn, cp)
        if is_kill_write(cp):
            assert conn.in_transaction
            die()
        return version


class KillingFileBackend(Tracking, FileBackend):
    """Dies before the rename that would publish the chosen checkpoint (see _replace)."""


class KillingPostgresBackend(Tracking, PostgresBackend):
    """Dies with the chosen checkpoint's statement sent and its answer not read."""

    async def _checkpoint_statement(self, pool: Any, sql: str, *args: Any) -> Any:
        if WRITING and is_kill_write(WRITING[-1]):
            sent = asyncio.ensure_future(super()._checkpoint_statement(pool, sql, *args))
            for _ in range(5):  # let the driver put the statement on the wire
                await asyncio.sleep(0)
            die()  # the server may have run it (it may even have answered): either is fine
            await sent  # pragma: no cover
        return await super()._checkpoint_statement(pool, sql, *args)


_real_replace = os.replace


def _replace(src: Any, dst: Any, **kwargs: Any) -> None:
    if WRITING and is_kill_write(WRITING[-1]):
        assert Path(src).stat().st_size > 0
        die()
    _real_replace(src, dst, **kwargs)


def make_backend() -> StateBackend:
    if config["backend"] == "sqlite":
        return KillingSQLiteBackend(config["store"])
    if config["backend"] == "postgres":
        return KillingPostgresBackend(
            config["store"], schema=config["schema"], pool_min=1, pool_max=2
        )
    if "write" in kill:
        os.replace = _replace  # the file backend calls os.replace through the os module
    return KillingFileBackend(config["store"])


# -- side effects and kill points ----------------------------------------------------------------


async def wait_for_commits() -> None:
    wanted = {tuple(path) for path in kill.get("wait_for", [])}
    deadline = time.monotonic() + WAIT_S
    while not wanted <= COMMITTED:
        if time.monotonic() > deadline:
            print(json.dumps({"error": "WaitTimeout", "committed": sorted(map(str, COMMITTED))}))
            sys.stdout.flush()
            os._exit(3)
        await asyncio.sleep(0.001)


async def effect(label: str, seen: Any = None) -> None:
    """The step's side effect: one line in the effects file (with kills around it)."""
    if kill.get("before") == label:
        await wait_for_commits()
        die()
    os.write(effects_fd, json.dumps([phase, label, seen]).encode() + b"\n")
    if kill.get("after") == label:
        await wait_for_commits()
        die()


class LibContext(PipelineContext):
    counter: int = 0
    trail: list[int] = Field(default_factory=list)
    stop: bool = False
    mapped: int = 0
    states: list[str] = Field(default_factory=list)
    n_a: int = 0
    n_b: int = 0
    n_c: int = 0


async def head(data: Any, context: LibContext) -> Any:
    context.scratchpad["head"] = True
    await effect("head")
    return data


async def tail(data: Any) -> Any:
    await effect("tail")
    return data


# -- scenarios -----------------------------------------------------------------------------------


def loop_scenario() -> tuple[Step[Any, Any], Any]:
    """10 iterations of ``a >> b``: ``a`` counts in the context, ``b`` appends to a list."""

    async def a(k: int, context: LibContext) -> int:
        seen = {"counter": context.counter, "trail": list(context.trail)}
        context.counter += 1
        await effect(f"a {k}", seen)
        return k

    async def b(k: int, context: LibContext) -> int:
        seen = {"counter": context.counter, "trail": list(context.trail)}
        context.trail = [*context.trail, k]
        await effect(f"b {k}", seen)
        return k + 1

    loop = LoopStep(
        "loop",
        Step.from_callable(a, name="a") >> Step.from_callable(b, name="b"),
        exit_condition_callable=lambda out, ctx: out >= LOOPS,
        max_loops=LOOPS,
    )
    return loop, 0


def loop_exit_scenario() -> tuple[Step[Any, Any], Any]:
    """The exit condition reads a context flag that ``flag`` raises in iteration STOP_AT."""

    async def flag(k: int, context: LibContext) -> int:
        seen = {"stop": context.stop}
        context.stop = k == STOP_AT
        await effect(f"flag {k}", seen)
        return k

    async def work(k: int, context: LibContext) -> int:
        await effect(f"work {k}", {"stop": context.stop})
        return k + 1

    loop = LoopStep(
        "loop",
        Step.from_callable(flag, name="flag") >> Step.from_callable(work, name="work"),
        exit_condition_callable=lambda out, ctx: ctx.stop,
        max_loops=LOOPS,
    )
    return loop, 0


def loop_mapper_scenario() -> tuple[Step[Any, Any], Any]:
    """An iteration_input_mapper that counts its calls in the context."""

    async def body(k: int, context: LibContext) -> int:
        await effect(f"body {k}", {"mapped": context.mapped})
        return k + 1

    def next_input(output: int, context: LibContext, iteration: int) -> int:
        context.mapped += 1
        return output

    loop = LoopStep(
        "loop",
        Step.from_callable(body, name="body"),
        exit_condition_callable=lambda out, ctx: out >= MAPPER_LOOPS,
        max_loops=LOOPS,
        iteration_input_mapper=next_input,
    )
    return loop, 0


def map_scenario() -> tuple[Step[Any, Any], Any]:
    """1,000 items, 8 at a time, each ``m0 >> m1`` (x -> 2x -> 2x + 1)."""

    async def m0(x: int) -> int:
        await effect(f"m0 {x}")
        return x * 2

    async def m1(y: int) -> int:
        await effect(f"m1 {y // 2}")
        return y + 1

    step = MapStep(
        "map",
        Step.from_callable(m0, name="m0") >> Step.from_callable(m1, name="m1"),
        max_concurrency=MAP_CONCURRENCY,
    )
    return step, list(range(MAP_ITEMS))


def parallel_scenario() -> tuple[Step[Any, Any], Any]:
    """Branches a, b, c: each counts in its own field and adds its key to the scratchpad."""

    def branch(name: str, value: int) -> Step[Any, Any]:
        async def run(data: str, context: LibContext) -> str:
            field = f"n_{name}"
            seen = {field: getattr(context, field), "scratchpad": dict(context.scratchpad)}
            setattr(context, field, getattr(context, field) + 1)
            context.scratchpad[name] = value
            await effect(name, seen)
            return f"{name}:{data}"

        return Step.from_callable(run, name=name)

    step = ParallelStep("par", {"a": branch("a", 1), "b": branch("b", 2), "c": branch("c", 3)})
    return step, "x"


def state_machine_scenario() -> tuple[Step[Any, Any], Any]:
    """Draft -> Critique -> Edit -> Critique -> Approval; Critique is two steps."""

    def seen(context: LibContext) -> dict[str, Any]:
        return {"states": list(context.states)}

    async def draft(doc: dict[str, Any], context: LibContext) -> Transition:
        before = seen(context)
        context.states.append("draft")
        await effect(f"draft {doc['turn']}", before)
        return Transition("critique", {"text": "v1", "rev": 1, "turn": doc["turn"] + 1})

    async def review(doc: dict[str, Any], context: LibContext) -> dict[str, Any]:
        await effect(f"review {doc['turn']}", seen(context))
        return {**doc, "notes": f"notes on {doc['text']}"}

    async def decide(doc: dict[str, Any], context: LibContext) -> Transition:
        before = seen(context)
        context.states.append("critique")
        await effect(f"decide {doc['turn']}", before)
        data = {"text": doc["text"], "rev": doc["rev"], "turn": doc["turn"] + 1}
        return Transition("edit" if doc["rev"] < 2 else "approval", data)

    async def edit(doc: dict[str, Any], context: LibContext) -> Transition:
        before = seen(context)
        context.states.append("edit")
        await effect(f"edit {doc['turn']}", before)
        return Transition(
            "critique", {"text": "v2", "rev": doc["rev"] + 1, "turn": doc["turn"] + 1}
        )

    async def approve(doc: dict[str, Any], context: LibContext) -> dict[str, Any]:
        before = seen(context)
        context.states.append("approval")
        await effect(f"approve {doc['turn']}", before)
        return {"text": doc["text"], "rev": doc["rev"], "approved": True}

    step = StateMachineStep(
        "review",
        states={
            "draft": Step.from_callable(draft, name="draft"),
            "critique": Step.from_callable(review, name="review")
            >> Step.from_callable(decide, name="decide"),
            "edit": Step.from_callable(edit, name="edit"),
            "approval": Step.from_callable(approve, name="approve"),
        },
        start_state="draft",
        end_states=["approval"],
    )
    return step, {"turn": 0}


def nested_scenario() -> tuple[Step[Any, Any], Any]:
    """A map (2 at a time) whose item is a loop whose body is a conditional on parity."""

    def side(name: str) -> Step[Any, Any]:
        async def run(pair: list[int]) -> list[int]:
            await effect(f"{name} {pair[0]} {pair[1]}")
            return [pair[0], pair[1] + 1]

        return Step.from_callable(run, name=name)

    parity = ConditionalStep(
        "parity",
        condition_callable=lambda pair, ctx: "even" if pair[1] % 2 == 0 else "odd",
        branches={"even": side("even"), "odd": side("odd")},
    )
    rounds = LoopStep(
        "rounds",
        parity,
        exit_condition_callable=lambda pair, ctx: pair[1] >= NESTED_ROUNDS,
        max_loops=NESTED_ROUNDS,
        initial_input_to_loop_body_mapper=lambda item, ctx: [item, 0],
    )
    return MapStep("items", rounds, max_concurrency=2), list(range(NESTED_ITEMS))


SCENARIOS = {
    "loop": loop_scenario,
    "loop_exit": loop_exit_scenario,
    "loop_mapper": loop_mapper_scenario,
    "map": map_scenario,
    "parallel": parallel_scenario,
    "state_machine": state_machine_scenario,
    "nested": nested_scenario,
}


async def main() -> None:
    composite, data = SCENARIOS[config["scenario"]]()
    pipeline: Pipeline[Any, Any] = Pipeline.from_steps(
        [Step.from_callable(head, name="head"), composite, Step.from_callable(tail, name="tail")]
    )
    runner = Flujo(
        pipeline,
        context_model=LibContext,
        state_backend=make_backend(),
        pipeline_name=f"{PIPELINE_NAME}-{config['scenario']}",
    )
    outcome: dict[str, Any]
    try:
        async with runner:
            result = await runner.run_async(data, run_id=config["run_id"])
        context = result.final_pipeline_context
        outcome = {
            "status": result.status,
            "output": result.output,
            "error": None if result.error is None else str(result.error),
            "context": None if context is None else context.model_dump(mode="json"),
            # Each top-level step with the paths of its sub-steps, as the result lists them.
            "history": [
                [top.name, [list(child.path or ()) for child in top.step_history]]
                for top in result.step_history
            ],
        }
        if outcome["context"] is not None:
            outcome["context"].pop("run_id")
    except Exception as exc:
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(outcome), flush=True)


asyncio.run(main())
