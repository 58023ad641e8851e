"""Human in the loop across real processes (issue 5), on SQLiteBackend and PostgresBackend.

A child process (``_hitl_child.py``) starts, answers or resumes one run of a pipeline with a
HumanInTheLoopStep (top-level, or inside a loop): every step writes one line per execution to an
append-only effects file, so the parent knows what ran where and how often.

- A run pauses in process A; process B answers it (``TaskClient.resume_task`` with a registry)
  and completes it.
- Two processes answer the same pause at once: exactly one wins, the other gets
  StateConflictError, and the step after the HITL step runs once. Two races: both have read the
  paused run before either commits (a file barrier in front of the answer's commit: the
  compare-and-swap decides), and one answers while the other's run is already in the step
  after the HITL step (held there by a file barrier: the run is no longer paused).
- A process is SIGKILLed right after its answer committed (nothing after it ran), or inside
  the step after the HITL step (its effect written, its checkpoint not): a later
  ``Flujo.run(run_id=...)`` completes the run with the committed answer and asks nothing
  again; answering once more is a conflict. The step after the HITL step runs once more in the
  second case (its checkpoint never committed: at-least-once, as for any step).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_crash_recovery import CHILD_TIMEOUT_S, FLUJO_PATH, Child

from flujo.state.backends.base import StateBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("_hitl_child.py")
BACKENDS = ["sqlite", "postgres"]
SCENARIOS = ["top", "loop"]
#: Where the pause is, by scenario, and the question asked there.
PAUSE = {"top": ([1], "Approve 2?"), "loop": ([1, 0, 1], "Approve 20?")}


# -- stores ----------------------------------------------------------------------------------------


@dataclass
class Store:
    kind: str
    root: Path
    dsn: str = ""
    schema: str = ""

    def config(self) -> dict[str, Any]:
        if self.kind == "postgres":
            return {"backend": "postgres", "store": self.dsn, "schema": self.schema}
        return {"backend": "sqlite", "store": str(self.root / "runs.db")}

    def open(self) -> StateBackend:
        if self.kind == "postgres":
            return PostgresBackend(self.dsn, schema=self.schema, pool_min=0, pool_max=2)
        return SQLiteBackend(self.root / "runs.db")

    def load(self, run_id: str) -> dict[str, Any]:
        async def load() -> dict[str, Any] | None:
            async with self.open() as backend:
                return await backend.load_state(run_id)

        state = asyncio.run(load())
        assert state is not None
        return state


async def _migrate(dsn: str, schema: str) -> None:
    async with PostgresBackend(dsn, schema=schema, pool_min=0) as backend:
        await backend.migrate()


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "sqlite":
        return Store("sqlite", tmp_path)
    dsn = request.getfixturevalue("postgres_dsn")
    schema = request.getfixturevalue("postgres_schema")
    asyncio.run(_migrate(dsn, schema))
    return Store("postgres", tmp_path, dsn, schema)


# -- children --------------------------------------------------------------------------------------


@dataclass
class Run:
    """One paused run and how to start children on it."""

    store: Store
    scenario: str
    run_id: str
    effects: Path

    def spawn(self, action: str, tag: str, **extra: Any) -> Child:
        config = {
            **self.store.config(),
            "scenario": self.scenario,
            "run_id": self.run_id,
            "effects": str(self.effects),
            "action": action,
            "tag": tag,
            **extra,
        }
        python_path = os.pathsep.join(filter(None, [FLUJO_PATH, os.environ.get("PYTHONPATH")]))
        proc = subprocess.Popen(
            [sys.executable, str(CHILD), json.dumps(config)],
            cwd=self.store.root,
            env={**os.environ, "PYTHONPATH": python_path},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return Child(proc, config)

    def answer(self, tag: str, approved: bool = True, **extra: Any) -> Child:
        return self.spawn("answer", tag, answer={"approved": approved, "by": tag}, **extra)

    def effects_of(self, tag: str | None = None) -> list[str]:
        lines = self.effects.read_text().splitlines() if self.effects.exists() else []
        return [label for who, label in map(json.loads, lines) if tag is None or who == tag]

    def counts(self) -> Counter[str]:
        return Counter(self.effects_of())


def start_paused(store: Store, scenario: str) -> Run:
    """Process A: start a run, which pauses at its HITL step."""
    run = Run(store, scenario, f"hitl-{uuid.uuid4().hex[:12]}", store.root / "effects.jsonl")
    outcome = run.spawn("start", "A").outcome()
    assert outcome["status"] == "paused", outcome
    assert outcome["failed_step"] == "ask"
    path, question = PAUSE[scenario]
    state = store.load(run.run_id)
    assert state["status"] == "paused"
    assert state["error"]["path"] == path
    assert state["error"]["message"] == question
    assert run.effects_of("A").count("asked") == 1
    assert "after A" not in run.effects_of()
    return run


def wait_for_file(path: Path, child: Child) -> None:
    """Wait until ``child`` creates ``path`` (it must not exit first)."""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not path.exists():
        if child.proc.poll() is not None:
            pytest.fail(f"child exited before creating {path.name}: {child.finish()}")
        if time.monotonic() > deadline:
            child.proc.kill()
            pytest.fail(f"child never created {path.name}: {child.finish()}")
        time.sleep(0.01)


def check_completed(run: Run, winner: str, outcome: dict[str, Any]) -> None:
    """The run completed with ``winner``'s answer; the question was asked once, by A."""
    assert outcome["status"] == "completed", outcome
    assert outcome["output"] == f"done by {winner}"
    state = run.store.load(run.run_id)
    assert state["status"] == "completed"
    assert state["error"] is None
    [answered] = [r for r in state["step_history"] if r["name"] == "ask"]
    assert answered["output"] == {"approved": True, "by": winner}
    assert answered.get("path") == (None if run.scenario == "top" else PAUSE["loop"][0])
    counts = run.counts()
    assert counts["asked"] == 1  # nobody asked again
    assert counts["prep"] == 1
    assert counts["finish"] == 1
    assert counts["work"] == (1 if run.scenario == "loop" else 0)
    assert outcome["context"][-1] == f"after {winner}"


# -- one process pauses, another answers -----------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_pause_in_one_process_is_answered_in_another(store: Store, scenario: str) -> None:
    run = start_paused(store, scenario)
    outcome = run.answer("B").outcome()
    check_completed(run, "B", outcome)
    assert run.effects_of("B") == ["after B", "finish"]


def test_a_late_answer_from_another_process_is_a_conflict(store: Store) -> None:
    """The pause was answered and the run completed: another answer is refused, not dropped
    silently (the second answerer must learn its answer was not taken)."""
    run = start_paused(store, "top")
    check_completed(run, "B", run.answer("B").outcome())
    after = store.load(run.run_id)
    late = run.answer("C").outcome()
    assert run.effects_of("C") == []
    assert store.load(run.run_id) == after
    assert late.get("raised") == "StateConflictError", late


def test_a_wrong_answer_from_another_process_leaves_the_run_paused(store: Store) -> None:
    run = start_paused(store, "top")
    before = store.load(run.run_id)
    refused = run.spawn("answer", "B", answer={"approved": "perhaps", "by": "B"}).outcome()
    assert refused.get("raised") == "HumanInputError", refused
    assert store.load(run.run_id) == before
    check_completed(run, "C", run.answer("C").outcome())


# -- two processes answer the same pause at once ---------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_processes_answering_at_once_both_read_the_pause(
    store: Store, scenario: str, tmp_path: Path
) -> None:
    """Both read the paused run and validated their answer before either commits."""
    run = start_paused(store, scenario)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    gate = {"commit_barrier": {"dir": str(barrier), "parties": 2}}
    first, second = run.answer("B", **gate), run.answer("C", **gate)
    outcomes = {"B": first.outcome(), "C": second.outcome()}
    assert sorted(barrier.iterdir()) == [barrier / "B", barrier / "C"]
    winners = [tag for tag, out in outcomes.items() if "raised" not in out]
    assert len(winners) == 1, outcomes
    [winner] = winners
    [loser] = {"B", "C"} - {winner}
    assert outcomes[loser]["raised"] == "StateConflictError", outcomes
    check_completed(run, winner, outcomes[winner])
    counts = run.counts()
    assert counts[f"after {winner}"] == 1
    assert counts[f"after {loser}"] == 0
    assert run.effects_of(loser) == []


def test_an_answer_while_the_answered_run_goes_on_is_a_conflict(
    store: Store, tmp_path: Path
) -> None:
    """C answers while B's run is inside the step after the HITL step (held there)."""
    run = start_paused(store, "top")
    hold = tmp_path / "hold"
    hold.mkdir()
    first = run.answer("B", hold_after={"dir": str(hold)})
    try:
        wait_for_file(hold / "holding", first)
        assert store.load(run.run_id)["status"] == "running"
        late = run.answer("C").outcome()
    finally:
        (hold / "release").touch()
    held = first.outcome()
    outcomes = {"B (held)": held, "C (late)": late, "effects": run.effects_of()}
    assert late.get("raised") == "StateConflictError", outcomes
    assert run.effects_of("C") == [], outcomes
    assert run.counts()["after B"] == 1, outcomes
    check_completed(run, "B", held)


# -- killed after the answer committed -------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kill", ["committed", "in_after"])
def test_killed_after_the_answer_committed_resumes_without_asking_again(
    store: Store, scenario: str, kill: str
) -> None:
    run = start_paused(store, scenario)
    run.answer("B", kill=kill).killed()
    state = store.load(run.run_id)
    assert state["status"] == "running"  # answered, not finished, no longer paused
    assert state["error"] is None
    assert [r["output"] for r in state["step_history"] if r["name"] == "ask"] == [
        {"approved": True, "by": "B"}
    ]
    assert "after" not in [r["name"] for r in state["step_history"]]
    assert run.effects_of("B") == ([] if kill == "committed" else ["after B"])
    # A later run(run_id) completes the run with B's answer and asks nothing.
    resumed = run.spawn("run", "D").outcome()
    check_completed(run, "B", resumed)
    assert run.effects_of("D") == ["after B", "finish"]
    # The step after the HITL step ran once more only if it had started before the kill.
    assert run.counts()["after B"] == (1 if kill == "committed" else 2)


def test_answering_again_after_the_answering_process_died_is_a_conflict(store: Store) -> None:
    """B's answer committed, then B died: the run is unfinished but no longer paused. Another
    answer is refused and runs nothing (finishing the run is run(run_id)'s job)."""
    run = start_paused(store, "top")
    run.answer("B", kill="committed").killed()
    before = store.load(run.run_id)
    again = run.answer("C").outcome()
    outcomes = {"C": again, "effects": run.effects_of()}
    assert again.get("raised") == "StateConflictError", outcomes
    assert run.effects_of("C") == [], outcomes
    assert store.load(run.run_id) == before
