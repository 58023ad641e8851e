"""Crash tests of GranularStep with real processes (issue 5): SIGKILL at every point of an agent
loop, then a new process resumes the run, on SQLiteBackend and PostgresBackend.

A child (``_granular_child.py``) runs ``head >> agent``, a granular step whose scripted model
calls a tool twice in turn 0 and twice in turn 1, then answers. The tool's side effect is one
line in an append-only file per call, carrying the call's idempotency key; every model turn
asked is one line too. The child SIGKILLs itself while the model takes a turn, in a tool call
before or after its effect, or right after the checkpoint holding a model, tool or turn record
was committed. The parent reads what the store holds, then a new child resumes the run.

What must hold after the resume:

- every tool call whose result was recorded (a "tool" record with ``enforce_idempotency``, or a
  finished "turn" record) appears exactly once in the file;
- a call appears twice only if it was the one running at the kill (with ``enforce_idempotency``)
  or belongs to the unfinished turn (without it) - and then both lines carry the same key;
- a model turn that was recorded is never asked again;
- the run completes with the crash-free run's output, and the model's last turn sees the
  crash-free run's transcript.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_crash_recovery import FLUJO_PATH, Child

from flujo.state.backends.base import StateBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("_granular_child.py")
CALLS = (2, 2)  # as in the child
ALL_CALLS = [(t, c) for t, n in enumerate(CALLS) for c in range(n)]
TOP = 1  # the granular step is top-level step 1
PARALLEL = 8  # children at once


@dataclass
class Case:
    name: str
    enforce: bool
    kill: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    after_kill: dict[str, Any] | None = field(default=None, repr=False)
    outcome: dict[str, Any] = field(default_factory=dict, repr=False)
    lines: list[list[Any]] = field(default_factory=list, repr=False)

    def key(self, turn: int, call: int) -> str:
        return f"{self.config['run_id']}:{TOP}:{turn}:{call}"


def all_cases(enforce: bool) -> list[Case]:
    tag = "e" if enforce else "n"
    cases = [Case(f"{tag}-model-{t}", enforce, {"model": t}) for t in range(3)]
    cases += [
        Case(f"{tag}-after-model-{t}", enforce, {"committed": [[TOP, t], "model"]})
        for t in range(3)
    ]
    for where in ("tool_before", "tool_after"):
        cases += [
            Case(f"{tag}-{where.replace('_', '-')}-{t}-{c}", enforce, {where: [t, c]})
            for t, c in ALL_CALLS
        ]
    if enforce:
        cases += [
            Case(f"{tag}-after-tool-{t}-{c}", enforce, {"committed": [[TOP, t, c], "tool"]})
            for t, c in ALL_CALLS
        ]
    cases += [
        Case(f"{tag}-after-turn-{t}", enforce, {"committed": [[TOP, t], "turn"]})
        for t in range(len(CALLS))
    ]
    return cases


# -- stores and children ---------------------------------------------------------------------------


@dataclass
class Store:
    kind: str
    root: Path
    dsn: str = ""
    schema: str = ""

    def config(self, name: str) -> dict[str, Any]:
        base = {"run_id": name, "effects": str(self.root / f"{name}.effects")}
        if self.kind == "postgres":
            return {**base, "backend": "postgres", "store": self.dsn, "schema": self.schema}
        return {**base, "backend": "sqlite", "store": str(self.root / f"{name}.db")}

    def open(self, config: dict[str, Any]) -> StateBackend:
        if self.kind == "postgres":
            return PostgresBackend(self.dsn, schema=self.schema, pool_min=0, pool_max=2)
        return SQLiteBackend(config["store"])

    def load(self, config: dict[str, Any]) -> dict[str, Any] | None:
        async def load() -> dict[str, Any] | None:
            async with self.open(config) as backend:
                return await backend.load_state(config["run_id"])

        return asyncio.run(load())


def spawn(cwd: Path, **config: Any) -> Child:
    python_path = os.pathsep.join(filter(None, [FLUJO_PATH, os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), json.dumps(config)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": python_path},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return Child(proc, config)


def in_batches(cwd: Path, configs: list[dict[str, Any]]) -> list[Child]:
    """Start the children ``PARALLEL`` at a time; each batch is waited for by the caller."""
    children: list[Child] = []
    for start in range(0, len(configs), PARALLEL):
        batch = [spawn(cwd, **config) for config in configs[start : start + PARALLEL]]
        for child in batch:
            child.proc.wait(timeout=120)
        children.extend(batch)
    return children


def read_lines(path: Path) -> list[list[Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cases(store: Store, cases: list[Case]) -> dict[bool, dict[str, Any]]:
    """Crash every case, read the stores, resume every case; return the crash-free reference
    outcome for each ``enforce`` value (run alongside)."""
    references = {
        enforce: {**store.config(f"ref-{enforce}"), "enforce": enforce, "phase": "ref"}
        for enforce in sorted({case.enforce for case in cases})
    }
    for case in cases:
        case.config = {**store.config(case.name), "enforce": case.enforce}
    crashes = in_batches(
        store.root,
        [*references.values()]
        + [{**case.config, "kill": case.kill, "phase": "crash"} for case in cases],
    )
    done = {enforce: child.outcome() for enforce, child in zip(references, crashes, strict=False)}
    for case, child in zip(cases, crashes[len(references) :], strict=True):
        child.killed()
        case.after_kill = store.load(case.config)
    resumes = in_batches(store.root, [{**case.config, "phase": "resume"} for case in cases])
    for case, child in zip(cases, resumes, strict=True):
        case.outcome = child.outcome()
        case.lines = read_lines(Path(case.config["effects"]))
    return done


# -- the checks ------------------------------------------------------------------------------------


def recorded_calls(case: Case) -> set[str]:
    """The keys of the tool calls whose result the store held after the kill."""
    keys: set[str] = set()
    for record in (case.after_kill or {}).get("step_history", []):
        if record.get("kind") == "tool":
            keys.add(record["output"]["idempotency_key"])
        elif record.get("kind") == "turn":
            keys.update(o["idempotency_key"] for o in record["output"])
    return keys


def recorded_turns(case: Case) -> set[int]:
    return {
        record["path"][1]
        for record in (case.after_kill or {}).get("step_history", [])
        if record.get("kind") == "model"
    }


def check_case(case: Case, reference: dict[str, Any]) -> None:
    where = f"{case.name} (kill {case.kill})"
    tools = [line for line in case.lines if line[1] == "tool"]
    models = [line for line in case.lines if line[1] == "model"]
    counts = Counter(line[2] for line in tools)
    # Every call ran, each with the item the model asked for under its key.
    assert set(counts) == {case.key(t, c) for t, c in ALL_CALLS}, where
    for key in counts:
        assert len({line[3] for line in tools if line[2] == key}) == 1, (where, key)
    # Recorded calls ran exactly once; a call ran twice only if it may (see the module docs).
    recorded = recorded_calls(case)
    for key in recorded:
        assert counts[key] == 1, f"{where}: recorded call {key} ran {counts[key]} times"
    twice = {key for key, n in counts.items() if n > 1}
    assert all(n <= 2 for n in counts.values()), (where, counts)
    crashed_calls = {line[2] for line in tools if line[0] == "crash"}
    if case.enforce:
        running = {case.key(*case.kill["tool_after"])} if "tool_after" in case.kill else set()
        assert twice == running, f"{where}: ran twice: {twice}"
    else:
        unfinished = {key for key in crashed_calls if key not in recorded}
        assert twice == unfinished, f"{where}: ran twice: {twice}, unfinished {unfinished}"
    # Model turns recorded before the kill were not asked again.
    asked = Counter(line[2] for line in models)
    for turn in recorded_turns(case):
        assert asked[turn] == 1, f"{where}: recorded model turn {turn} asked {asked[turn]} times"
    if "model" in case.kill:
        assert asked[case.kill["model"]] == 2, where
    assert set(asked) == {0, 1, 2}, where
    # The resumed run finished like the crash-free one.
    outcome = case.outcome
    assert outcome["status"] == "completed", (where, outcome)
    assert outcome["output"] == reference["output"], where
    if outcome["transcript"] is not None:
        got = json.dumps(outcome["transcript"]).replace(case.config["run_id"], "RUN")
        want = json.dumps(reference["transcript"]).replace(reference_run_id(case), "RUN")
        assert got == want, where
    else:  # the final turn was recorded before the kill
        assert 2 in recorded_turns(case), where


def reference_run_id(case: Case) -> str:
    return f"ref-{case.enforce}"


def expected_twice(case: Case) -> set[str]:
    """Exactly which calls run twice, from the kill point alone."""
    if "tool_after" in case.kill:
        t, c = case.kill["tool_after"]
        if case.enforce:
            return {case.key(t, c)}
        return {case.key(t, i) for i in range(c + 1)}
    if "tool_before" in case.kill and not case.enforce:
        t, c = case.kill["tool_before"]
        return {case.key(t, i) for i in range(c)}
    return set()


def check_all(cases: list[Case], references: dict[bool, dict[str, Any]]) -> None:
    for reference in references.values():
        assert reference["status"] == "completed", reference
        assert reference["output"] == {"charged": [f"charged t{t}c{c}" for t, c in ALL_CALLS]}
    for case in cases:
        check_case(case, references[case.enforce])
        counts = Counter(line[2] for line in case.lines if line[1] == "tool")
        twice = {key for key, n in counts.items() if n == 2}
        assert twice == expected_twice(case), case.name


# -- the tests -------------------------------------------------------------------------------------


def test_sigkill_at_every_point_of_an_agent_loop_on_sqlite(tmp_path: Path) -> None:
    cases = all_cases(True) + all_cases(False)
    references = run_cases(Store("sqlite", tmp_path), cases)
    check_all(cases, references)


async def _migrate(dsn: str, schema: str) -> None:
    async with PostgresBackend(dsn, schema=schema, pool_min=0) as backend:
        await backend.migrate()


def test_sigkill_at_every_kind_of_point_on_postgres(
    tmp_path: Path, postgres_dsn: str, postgres_schema: str
) -> None:
    asyncio.run(_migrate(postgres_dsn, postgres_schema))
    wanted = {
        "e-model-1",
        "e-after-model-0",
        "e-tool-after-0-1",
        "e-after-tool-1-0",
        "e-after-turn-0",
        "n-tool-after-1-1",
        "n-tool-before-0-1",
        "n-after-turn-1",
    }
    cases = [case for case in all_cases(True) + all_cases(False) if case.name in wanted]
    assert len(cases) == len(wanted)
    references = run_cases(Store("postgres", tmp_path, postgres_dsn, postgres_schema), cases)
    check_all(cases, references)
