"""flujo.routines crash tests with real process kills, on SQLite and on Postgres.

For every routine of a flow and every kill point (``enter``, ``after_effect``,
``after_commit``, see ``_routines_flows.py``), a process runs a job of the flow and dies by
SIGKILL at that point of that routine's activation. Then this process resumes the job
(``Runtime.resume``) and checks, from the side-effect file (written by the routines' logic
before and after the crash) and from the store:

- every routine whose activation had committed before the kill ran exactly once, and never
  again after the resume (exactly-once progress);
- a routine whose activation had not committed ran at most once before the kill and exactly
  once after it (at-least-once for the activation the crash interrupted);
- the messages pending at the crash (emitted, not consumed) were delivered by the resume;
- the job completed with the right result, and its history holds one activation per routine.

The flows: a chain of 10 routines, and a fan-out/fan-in (``source`` -> ``a``, ``b``, ``c`` ->
``join`` with ``all_slots_ready_policy`` -> ``sink``), whose workers run concurrently.

The child (``_routines_child.py``) imports flujo once and forks one process per scenario, so the
30 (chain) or 18 (fan-in) crashes of a test cost one interpreter start.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from _routines_flows import CHAIN, FANIN, FANIN_RESULT, FLOWS, POINTS

import flujo
from flujo.routines import FlowRegistry, JobStatus, Runtime
from flujo.routines.store import derive_pending
from flujo.state.backends.base import StateBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("_routines_child.py")
FLUJO_PATH = str(Path(flujo.__file__).resolve().parent.parent)
CHILD_TIMEOUT_S = 300


class Store:
    """Where one test's jobs live: a SQLite file or a migrated Postgres schema."""

    def __init__(self, kind: str, location: str, schema: str | None = None) -> None:
        self.kind = kind
        self.location = location
        self.schema = schema

    def backend(self) -> StateBackend:
        if self.kind == "sqlite":
            return SQLiteBackend(self.location)
        return PostgresBackend(self.location, schema=self.schema, pool_min=0, pool_max=2)

    def load(self, job_id: str) -> dict[str, Any]:
        async def load() -> dict[str, Any] | None:
            async with self.backend() as backend:
                return await backend.load_state(job_id)

        state = asyncio.run(load())
        assert state is not None, f"job {job_id} was never stored"
        return state

    def child_config(self) -> dict[str, Any]:
        return {"backend": self.kind, "store": self.location, "schema": self.schema}


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return Store("sqlite", str(tmp_path / "jobs.db"))
    dsn = request.getfixturevalue("postgres_dsn")
    schema = request.getfixturevalue("postgres_schema")
    created = Store("postgres", dsn, schema)

    async def migrate() -> None:
        async with created.backend() as backend:
            await backend.migrate()

    asyncio.run(migrate())
    return created


def crash_all(
    store: Store, flow: str, routines: list[str], directory: Path
) -> list[dict[str, Any]]:
    """One scenario per (routine, kill point), all run (and killed) by one child process."""
    scenarios = [
        {
            "job_id": f"{flow}-{rid}-{point}",
            "effects": str(directory / f"effects-{flow}-{rid}-{point}"),
            "kill": [rid, point],
        }
        for rid in routines
        for point in POINTS
    ]
    config = {**store.child_config(), "flow": flow, "scenarios": scenarios}
    python_path = os.pathsep.join(filter(None, [FLUJO_PATH, os.environ.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, str(CHILD), json.dumps(config)],
        cwd=directory,
        env={**os.environ, "PYTHONPATH": python_path},
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert out.returncode == 0, f"child failed\nstdout: {out.stdout}\nstderr: {out.stderr}"
    outcomes = json.loads(out.stdout.strip().splitlines()[-1])
    for scenario in scenarios:
        assert outcomes[scenario["job_id"]] == "killed", (scenario, outcomes, out.stderr)
    return scenarios


def effects(path: Path) -> Counter[str]:
    return Counter(path.read_text().split()) if path.exists() else Counter()


def check_resume(
    store: Store, flow: str, routines: list[str], scenario: dict[str, Any]
) -> dict[str, Any]:
    """Resume one crashed job; assert exactly-once progress; return facts for more checks."""
    job_id = scenario["job_id"]
    rid, point = scenario["kill"]
    effects_file = Path(scenario["effects"])
    before = effects(effects_file)
    stored = store.load(job_id)
    assert stored["status"] == "running", stored["status"]
    records = stored["step_history"]
    committed = [r["routine"] for r in records if r.get("kind") == "activation"]
    assert len(committed) == len(set(committed)), committed
    pending, _, _ = derive_pending(job_id, records)
    pending_targets = sorted({delivery.dst for delivery in pending.values()})

    # the kill point: the killed activation committed only when killed after its commit
    assert (rid in committed) == (point == "after_commit"), (scenario, committed)
    if point != "enter":
        assert before[rid] == 1, (scenario, before)
    for routine in routines:
        if routine in committed:
            assert before[routine] == 1, (scenario, routine, before)
        else:
            assert before[routine] <= 1, (scenario, routine, before)

    build, _, _ = FLOWS[flow]
    registry = FlowRegistry()
    registry.register_by_name(flow, build(str(effects_file)))
    with Runtime(thread_pool_size=4, state_backend=store.backend(), registry=registry) as runtime:
        state = runtime.resume(job_id)
    assert state.status is JobStatus.COMPLETED, (scenario, state.error)
    after = effects(effects_file) - before

    for routine in routines:
        if routine in committed:  # committed before the crash: never again
            assert after[routine] == 0, (scenario, routine, after)
        else:  # interrupted or not reached: exactly once now
            assert after[routine] == 1, (scenario, routine, after)
    for target in pending_targets:  # what was pending at the crash was delivered
        assert after[target] == 1, (scenario, target, pending_targets)
    assert state.pending == []
    final = store.load(job_id)
    assert final["status"] == "completed"
    activations = [r["routine"] for r in final["step_history"] if r.get("kind") == "activation"]
    assert sorted(activations) == sorted(routines), activations
    assert final["current_step_index"] == len(routines)
    return {
        "state": state,
        "committed": committed,
        "pending_targets": pending_targets,
        "final": final,
    }


def test_kill_at_every_hop_of_a_chain_then_resume(store: Store, tmp_path: Path) -> None:
    for scenario in crash_all(store, "chain", CHAIN, tmp_path):
        rid, point = scenario["kill"]
        k = CHAIN.index(rid)
        facts = check_resume(store, "chain", CHAIN, scenario)
        done = k + 1 if point == "after_commit" else k
        assert facts["committed"] == CHAIN[:done], (scenario, facts["committed"])
        expected_pending = CHAIN[done : done + 1]  # the message to the next routine
        assert facts["pending_targets"] == expected_pending, (scenario, facts)
        state = facts["state"]
        assert state.get_routine_state("r9") == {"x": 10}
        assert facts["final"]["pipeline_context"]["routine.r9"] == {"x": 10}


def test_kill_at_every_activation_of_a_fan_in_then_resume(store: Store, tmp_path: Path) -> None:
    for scenario in crash_all(store, "fanin", FANIN, tmp_path):
        facts = check_resume(store, "fanin", FANIN, scenario)
        state = facts["state"]
        assert state.get_routine_state("join") == {"x": FANIN_RESULT}
        assert state.get_routine_state("sink") == {"x": FANIN_RESULT}
        rid, point = scenario["kill"]
        if rid == "join" and point == "enter":
            # all three workers committed; the join's three inputs were pending
            assert set(facts["committed"]) == {"source", "a", "b", "c"}
            assert facts["pending_targets"] == ["join"]
