"""Crash tests with real processes: RELIABILITY.md promises 1 (exactly-once progress), 2 (no torn
state) and 3 (one writer per run), on SQLiteBackend and FileBackend.

A child process (``_crash_child.py``) runs a 10-step pipeline; step ``i`` appends ``"i"`` to a
side-effect file and appends ``i`` to its input list (and to ``context.scratchpad["done"]``), so
the final output ``[0, ..., 9]`` proves every step ran, in order. The child SIGKILLs itself at a
chosen point (or the parent kills it at a random moment); a new child resumes the same run_id,
and the side-effect file tells how often each step ran.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import flujo
from flujo.state.backends.base import StateBackend
from flujo.state.backends.file import FileBackend
from flujo.state.backends.sqlite import SQLiteBackend

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("_crash_child.py")
STEPS = 10
ALL_STEPS = list(range(STEPS))
CHILD_TIMEOUT_S = 120
KILLED = -signal.SIGKILL
BACKENDS = ["sqlite", "file"]
# The children import the very flujo this process imported, however it was installed.
FLUJO_PATH = str(Path(flujo.__file__).resolve().parent.parent)


# -- helpers ---------------------------------------------------------------------------------------


@dataclass
class Child:
    """One child process and the config it was started with."""

    proc: subprocess.Popen[str]
    config: dict[str, Any]

    def finish(self) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"child {self.config} hung\nstdout: {out}\nstderr: {err}")
        return self.proc.returncode, out, err

    def killed(self) -> None:
        """Wait for the child; it must have died of SIGKILL."""
        code, out, err = self.finish()
        assert code == KILLED, f"child {self.config} exited {code}\nstdout: {out}\nstderr: {err}"

    def outcome(self) -> dict[str, Any]:
        """Wait for the child; it must have exited normally and printed its outcome."""
        code, out, err = self.finish()
        assert code == 0, f"child {self.config} exited {code}\nstdout: {out}\nstderr: {err}"
        lines = out.strip().splitlines()
        assert lines, f"child {self.config} printed nothing\nstderr: {err}"
        outcome: dict[str, Any] = json.loads(lines[-1])
        return outcome


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


def make_backend(backend: str, store: Path) -> StateBackend:
    return SQLiteBackend(store) if backend == "sqlite" else FileBackend(store)


def store_for(backend: str, directory: Path) -> Path:
    return directory / "runs.db" if backend == "sqlite" else directory / "runs"


async def _load(backend: str, store: Path, run_id: str) -> dict[str, Any] | None:
    async with make_backend(backend, store) as opened:
        return await opened.load_state(run_id)


def load(backend: str, store: Path, run_id: str) -> dict[str, Any] | None:
    """The run's stored state, read by this (the parent) process."""
    return asyncio.run(_load(backend, store, run_id))


async def _list(backend: str, store: Path) -> list[dict[str, Any]]:
    async with make_backend(backend, store) as opened:
        return await opened.list_runs()


def list_runs(backend: str, store: Path) -> list[dict[str, Any]]:
    return asyncio.run(_list(backend, store))


def effect_lines(path: Path) -> list[int]:
    """The step indexes in the side-effect file, in the order they were written."""
    if not path.exists():
        return []
    return [int(line) for line in path.read_text().splitlines()]


def committed_steps(state: dict[str, Any] | None) -> list[int]:
    """Indexes of the steps the store records as done, in history order."""
    if state is None:
        return []
    return [record["index"] for record in state["step_history"] if record["success"]]


def assert_consistent(state: dict[str, Any] | None, *, failures: int = 0) -> None:
    """``state`` is one whole checkpoint: every part of it tells the same progress."""
    if state is None:
        return
    done = committed_steps(state)
    progress = len(done)
    assert done == list(range(progress)), f"step history out of order: {done}"
    assert state["current_step_index"] == progress, state
    assert state["pipeline_context"]["scratchpad"].get("done", []) == done, state
    assert state["last_step_output"] == (done if progress else None), state
    assert state["version"] == progress + failures, state
    assert len(state["step_history"]) == progress + failures, state
    if progress == STEPS:
        assert state["status"] == "completed", state
    else:
        assert state["status"] in ("running", "failed"), state


def assert_completed(state: dict[str, Any] | None, *, failures: int = 0) -> None:
    assert state is not None
    assert state["status"] == "completed"
    assert committed_steps(state) == ALL_STEPS
    assert_consistent(state, failures=failures)


def assert_exactly_once_progress(
    effects: list[int], committed_before_resume: list[int], context: str
) -> None:
    """Promise 1: a committed step never runs again; the interrupted one at most twice."""
    counts = Counter(effects)
    for index in committed_before_resume:
        assert counts[index] == 1, f"{context}: committed step {index} ran {counts[index]}x"
    interrupted = len(committed_before_resume)
    for index in ALL_STEPS:
        limit = 2 if index == interrupted else 1
        assert 1 <= counts[index] <= limit, (
            f"{context}: step {index} ran {counts[index]}x (effects {effects})"
        )
    # In order: the file is 0..9 with at most the interrupted step repeated.
    assert [i for n, i in enumerate(effects) if n == 0 or effects[n - 1] != i] == ALL_STEPS, (
        f"{context}: steps ran out of order: {effects}"
    )


# -- promise 1 and 2: a kill at every step boundary and inside every checkpoint write -----------

# point -> (backend it applies to or None for both, does step k's checkpoint survive the kill?,
#           times step k's side effect happened once the run is resumed and done)
KILL_POINTS: dict[str, tuple[str | None, bool, int]] = {
    "enter": (None, False, 1),
    "after_effect": (None, False, 2),
    "after_commit": (None, True, 1),
    "sqlite_before_commit": ("sqlite", False, 2),
    "file_before_replace": ("file", False, 2),
    "file_after_replace": ("file", True, 1),
}
KILL_CASES = [
    pytest.param(backend, point, id=f"{backend}-{point}")
    for point, (only, _, _) in KILL_POINTS.items()
    for backend in BACKENDS
    if only in (None, backend)
]


@pytest.mark.parametrize(("backend", "point"), KILL_CASES)
def test_kill_at_every_step_then_resume(tmp_path: Path, backend: str, point: str) -> None:
    """For each step k: one child dies at ``point`` of step k, a second one resumes the run.

    The ten crashes (one per k, each with its own store) run side by side, then the ten
    resumes.
    """
    _, survives, runs_of_k = KILL_POINTS[point]
    dirs = [tmp_path / f"k{k}" for k in ALL_STEPS]
    for directory in dirs:
        directory.mkdir()

    def config(k: int) -> dict[str, Any]:
        return {
            "backend": backend,
            "store": str(store_for(backend, dirs[k])),
            "run_id": f"run-{k}",
            "effects": str(dirs[k] / "effects"),
        }

    crashes = [spawn(dirs[k], **config(k), kill=[point, k]) for k in ALL_STEPS]
    for child in crashes:
        child.killed()

    committed: dict[int, list[int]] = {}
    for k in ALL_STEPS:
        store = store_for(backend, dirs[k])
        state = load(backend, store, f"run-{k}")  # the old or the new checkpoint, readable
        assert_consistent(state)
        committed[k] = committed_steps(state)
        expected = list(range(k + 1 if survives else k))
        assert committed[k] == expected, f"k={k}: store holds steps {committed[k]}"
        if state is not None and backend == "file":
            # A temporary file left behind by the kill is not taken for a run.
            assert [run["run_id"] for run in list_runs(backend, store)] == [f"run-{k}"]
        effects = effect_lines(dirs[k] / "effects")
        assert effects == list(range(k if point == "enter" else k + 1)), f"k={k}: {effects}"

    resumes = [spawn(dirs[k], **config(k)) for k in ALL_STEPS]
    for k, child in enumerate(resumes):
        assert child.outcome() == {"status": "completed", "output": ALL_STEPS}, f"k={k}"

    for k in ALL_STEPS:
        assert_completed(load(backend, store_for(backend, dirs[k]), f"run-{k}"))
        effects = effect_lines(dirs[k] / "effects")
        assert_exactly_once_progress(effects, committed[k], f"{point} at step {k}")
        assert Counter(effects)[k] == runs_of_k, f"k={k}: {effects}"


# -- promise 3: one writer per run ---------------------------------------------------------------


@pytest.mark.parametrize("origin", ["interrupted", "failed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_processes_resuming_one_run_cannot_both_advance_it(
    tmp_path: Path, backend: str, origin: str
) -> None:
    """Both resumers load version v and run step 3; one commits, the other gets a conflict."""
    store = store_for(backend, tmp_path)
    base = {"backend": backend, "store": str(store), "run_id": "shared"}
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
    before = load(backend, store, "shared")
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

    # The loser ran the step it resumed at (at-least-once), then stopped: nothing further.
    assert effect_lines(tmp_path / f"effects-{loser}") == [start_step]
    assert effect_lines(tmp_path / f"effects-{winner}") == list(range(start_step, STEPS))
    # ... and wrote nothing: the store holds exactly the winner's checkpoints.
    after = load(backend, store, "shared")
    assert_completed(after, failures=failures)
    assert after is not None
    assert after["version"] == version + STEPS - start_step
    assert after["step_history"][: len(before["step_history"])] == before["step_history"]


# -- promise 1 under random kills ----------------------------------------------------------------

RANDOM_RUNS = 10
# About as long as the child's pipeline takes (10 steps of 1-3 ms plus their checkpoints), so
# most kills land mid-run, some in the middle of a checkpoint write. A kill that comes after
# the run finished is harmless: the invariant holds all the same.
KILL_WINDOW_S = 0.04


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_kills_never_repeat_a_committed_step(tmp_path: Path, backend: str) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for attempt in range(RANDOM_RUNS):
        directory = tmp_path / f"run{attempt}"
        directory.mkdir()
        config = {
            "backend": backend,
            "store": str(store_for(backend, directory)),
            "run_id": f"random-{attempt}",
            "effects": str(directory / "effects"),
            "sleep_ms": [1, 3],
            "seed": rng.randrange(2**32),
        }
        context = f"seed {seed}, attempt {attempt}"
        child = spawn(directory, **config, announce=True)
        assert child.proc.stdout is not None
        if child.proc.stdout.readline().strip() != "ready":
            code, out, err = child.finish()
            pytest.fail(f"{context}: child did not start (exit {code})\n{out}\n{err}")
        time.sleep(rng.uniform(0, KILL_WINDOW_S))
        child.proc.kill()
        code, _, err = child.finish()
        assert code in (0, KILLED), f"{context}: exited {code}\n{err}"

        state = load(backend, Path(config["store"]), config["run_id"])
        assert_consistent(state)
        committed = committed_steps(state)
        effects = effect_lines(directory / "effects")
        # Every committed step's side effect happened first; at most one more step started.
        assert effects[: len(committed)] == committed, f"{context}: {effects} vs {committed}"
        assert len(effects) - len(committed) <= 1, f"{context}: {effects} vs {committed}"

        outcome = spawn(directory, **config).outcome()
        assert outcome == {"status": "completed", "output": ALL_STEPS}, context
        assert_completed(load(backend, Path(config["store"]), config["run_id"]))
        assert_exactly_once_progress(effect_lines(directory / "effects"), committed, context)
