"""Crash tests of the step library with real processes: loops, maps, parallel branches and state
machines resume where they stopped after a SIGKILL (issue 4; RELIABILITY.md promises 1 and 2
inside composite steps), on SQLiteBackend, FileBackend and PostgresBackend.

A child process (``_library_child.py``) runs ``head >> <composite> >> tail``; every step writes
one line per execution to an append-only side-effect file: a label naming the step and where it
ran (``"a 7"``: step ``a`` of loop iteration 7) and what it saw of the context. The child
SIGKILLs itself at a chosen point (or the parent kills it at a random moment); the parent reads
which sub-steps the store holds as done, then a new child resumes the same run_id.

Every case is checked against a crash-free reference run of the same scenario:

- the resumed run's outcome (output and final context) is the reference's;
- the resumed process runs exactly the steps the store did not hold as done after the kill: no
  checkpointed sub-step runs again, every other one runs once more;
- every step the resumed process runs sees the context the reference's step saw (so a loop
  resumed in iteration 7 sees the context as it was after iteration 6);
- the store never holds two successful records for one path.

Besides the four promises of issue 4 (sections 1-4) and kills inside nested checkpoint writes
(section 5), two tests cover what a resumed loop's callbacks see and what the resumed run's
result lists (sections 1 and 6).

The crashes of one test run side by side (one store each; one schema per test on Postgres),
then the resumes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_crash_recovery import FLUJO_PATH, KILLED, Child

from flujo.state.backends.base import StateBackend
from flujo.state.backends.file import FileBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("_library_child.py")
BACKENDS = ["sqlite", "file", "postgres"]
LOOPS = 10
MAP_ITEMS = 1000
COMPOSITE = 1  # the composite step is top-level step 1 in every scenario: paths start with 1
#: Step names whose records stand for a side effect; the path positions that go into the label.
EFFECT_STEPS = {
    "loop": ({"a", "b"}, (1,)),
    "loop_exit": ({"flag", "work"}, (1,)),
    "loop_mapper": ({"body"}, (1,)),
    "map": ({"m0", "m1"}, (1,)),
    "parallel": (set(), ()),  # a branch's record ("kind": "branch") stands for its step
    "state_machine": ({"draft", "review", "decide", "edit", "approve"}, (1,)),
    "nested": ({"even", "odd"}, (1, 3)),
}


# -- stores ----------------------------------------------------------------------------------------


@dataclass
class Store:
    """Where one test's runs live: a directory of stores, or a Postgres schema."""

    kind: str
    root: Path
    dsn: str = ""
    schema: str = ""

    def config(self, case: str) -> dict[str, Any]:
        """The child config naming the store of ``case`` (its own file or directory)."""
        if self.kind == "postgres":
            return {"backend": "postgres", "store": self.dsn, "schema": self.schema}
        directory = self.root / case
        directory.mkdir(exist_ok=True)
        name = "runs.db" if self.kind == "sqlite" else "runs"
        return {"backend": self.kind, "store": str(directory / name)}

    def open(self, config: dict[str, Any]) -> StateBackend:
        if self.kind == "postgres":
            return PostgresBackend(self.dsn, schema=self.schema, pool_min=0, pool_max=2)
        if self.kind == "sqlite":
            return SQLiteBackend(config["store"])
        return FileBackend(config["store"])

    def load(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """The run's stored state, read by this (the parent) process."""

        async def load() -> dict[str, Any] | None:
            async with self.open(config) as backend:
                return await backend.load_state(config["run_id"])

        return asyncio.run(load())


async def _migrate(dsn: str, schema: str) -> None:
    async with PostgresBackend(dsn, schema=schema, pool_min=0) as backend:
        await backend.migrate()


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param != "postgres":
        return Store(request.param, tmp_path)
    dsn = request.getfixturevalue("postgres_dsn")
    schema = request.getfixturevalue("postgres_schema")
    asyncio.run(_migrate(dsn, schema))
    return Store("postgres", tmp_path, dsn, schema)


# -- children and their side effects -------------------------------------------------------------


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


@dataclass
class Effect:
    phase: str
    label: str
    seen: Any


def read_effects(path: Path) -> list[Effect]:
    if not path.exists():
        return []
    return [Effect(*json.loads(line)) for line in path.read_text().splitlines()]


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def label_of(scenario: str, record: dict[str, Any]) -> str | None:
    """The side-effect label a stored record stands for (None: a record with no effect)."""
    name, path, kind = record["name"], record.get("path"), record.get("kind", "step")
    if path is None:
        return name if name in ("head", "tail") else None
    if kind == "branch":
        return str(name)
    steps, positions = EFFECT_STEPS[scenario]
    if kind != "step" or name not in steps:
        return None
    return " ".join([name, *(str(path[i]) for i in positions)])


def done_labels(scenario: str, state: dict[str, Any] | None) -> set[str]:
    """Labels of the steps the store holds as done (successful records)."""
    if state is None:
        return set()
    labels = (label_of(scenario, r) for r in state["step_history"] if r["success"])
    return {label for label in labels if label is not None}


def record_key(record: dict[str, Any]) -> tuple[str, str]:
    """Where a record was made, as JSON (``["top", i]`` for top-level step i), and its kind."""
    return json.dumps(record.get("path") or ["top", record["index"]]), record.get("kind", "step")


def has_record(state: dict[str, Any] | None, path: list[Any], kind: str) -> bool:
    return state is not None and (json.dumps(path), kind) in map(record_key, state["step_history"])


def assert_no_record_twice(state: dict[str, Any] | None, context: str) -> None:
    """No path holds two successful records of one kind: nothing was recorded twice."""
    if state is None:
        return
    keys = Counter(record_key(r) for r in state["step_history"] if r["success"])
    twice = [key for key, n in keys.items() if n > 1]
    assert not twice, f"{context}: recorded more than once: {twice}"


# -- one batch of crashes and resumes --------------------------------------------------------------


@dataclass
class Reference:
    """A crash-free run of a scenario: its outcome, what ran, and what each step saw."""

    outcome: dict[str, Any] = field(repr=False)
    labels: list[str] = field(repr=False)
    seen: dict[str, Any] = field(repr=False)


@dataclass
class Case:
    """One crash (at ``kill``, or by the parent after ``kill_after_lines`` effects) + resume."""

    name: str
    scenario: str
    kill: dict[str, Any] | None = None
    kill_after_lines: int | None = None
    # Filled in by run_cases (left out of the repr pytest prints for a failure):
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    after_kill: dict[str, Any] | None = field(default=None, repr=False)  # stored after the kill
    done: set[str] = field(default_factory=set, repr=False)  # labels the store held as done then
    crashed: list[Effect] = field(default_factory=list, repr=False)  # the killed child's effects
    resumed: list[Effect] = field(default_factory=list, repr=False)  # the resuming child's
    outcome: dict[str, Any] = field(default_factory=dict, repr=False)  # the resuming child's
    final: dict[str, Any] | None = field(default=None, repr=False)  # stored after the resume
    killed: bool = True  # False: a random kill that came after the run finished

    @property
    def resumed_labels(self) -> list[str]:
        return [effect.label for effect in self.resumed]


def run_cases(store: Store, cases: list[Case]) -> dict[str, Reference]:
    """Crash every case (side by side), read the stores, resume every case (side by side).

    Returns the crash-free reference run of each scenario the cases use (run alongside).
    """
    references: dict[str, Child] = {}
    for scenario in sorted({case.scenario for case in cases}):
        name = f"ref-{scenario.replace('_', '-')}"
        config = {
            **store.config(name),
            "run_id": name,
            "scenario": scenario,
            "effects": str(store.root / f"{name}.effects"),
        }
        references[scenario] = spawn(store.root, **config, phase="ref")
    crashes: dict[str, Child] = {}
    for case in cases:
        case.config = {
            **store.config(case.name),
            "run_id": case.name,
            "scenario": case.scenario,
            "effects": str(store.root / f"{case.name}.effects"),
        }
        crashes[case.name] = spawn(store.root, **case.config, kill=case.kill, phase="crash")
    # Random kills: each child dies once its effects file has the chosen number of lines.
    waiting = [case for case in cases if case.kill_after_lines is not None]
    while waiting:
        for case in list(waiting):
            child = crashes[case.name]
            effects = Path(case.config["effects"])
            if child.proc.poll() is not None or count_lines(effects) >= case.kill_after_lines:
                child.proc.kill()  # nothing happens if the child already exited
                waiting.remove(case)
        time.sleep(0.0005)
    for case in cases:
        child = crashes[case.name]
        if case.kill_after_lines is None:
            child.killed()
            continue
        code, out, err = child.finish()
        assert code in (0, KILLED), f"{case.name}: exited {code}\n{out}\n{err}"
        case.killed = code == KILLED
    for case in cases:
        case.after_kill = store.load(case.config)
        case.done = done_labels(case.scenario, case.after_kill)
        case.crashed = read_effects(Path(case.config["effects"]))
    resumes = {case.name: spawn(store.root, **case.config, phase="resume") for case in cases}
    for case in cases:
        case.outcome = resumes[case.name].outcome()
        case.resumed = [
            e for e in read_effects(Path(case.config["effects"])) if e.phase == "resume"
        ]
        case.final = store.load(case.config)
    done: dict[str, Reference] = {}
    for scenario, child in references.items():
        effects = read_effects(Path(child.config["effects"]))
        done[scenario] = Reference(
            child.outcome(),
            [effect.label for effect in effects],
            {effect.label: effect.seen for effect in effects},
        )
        assert done[scenario].outcome["status"] == "completed", done[scenario].outcome
        assert len(set(done[scenario].labels)) == len(done[scenario].labels), scenario
    return done


def outcome_differences(got: dict[str, Any], want: dict[str, Any]) -> dict[str, Any]:
    """What differs between two outcomes, but their history: ``{key: (got, want)}``, with
    context fields as ``context.<field>``."""
    found = {
        key: (got.get(key), want.get(key))
        for key in sorted((set(got) | set(want)) - {"history", "context"})
        if got.get(key) != want.get(key)
    }
    got_context, want_context = got.get("context") or {}, want.get("context") or {}
    for name in sorted(set(got_context) | set(want_context)):
        if got_context.get(name) != want_context.get(name):
            found[f"context.{name}"] = (got_context.get(name), want_context.get(name))
    return found


def check_resumed_exactly_once(case: Case, reference: Reference) -> None:
    """The checks every case shares (see the module docstring)."""
    where = f"{case.name} (killed at {case.kill or case.kill_after_lines})"
    after = case.after_kill
    crashed = [effect.label for effect in case.crashed]
    if case.killed:
        assert after is not None, f"{where}: nothing stored"
        assert after["status"] == "running", f"{where}: {after['status']}"
        # Progress stays at the composite step until its own record is stored.
        progress = COMPOSITE + has_record(after, ["top", COMPOSITE], "step")
        assert after["current_step_index"] == progress, f"{where}: {after['current_step_index']}"
    assert_no_record_twice(after, f"{where}, after the kill")
    # Every step the store holds as done had run (its effect precedes its checkpoint).
    assert case.done <= set(crashed), (
        f"{where}: recorded without running: {case.done - set(crashed)}"
    )
    assert len(set(crashed)) == len(crashed), f"{where}: a step ran twice before the kill"
    # The resumed run ends as a run that never crashed (its history is checked apart).
    differences = outcome_differences(case.outcome, reference.outcome)
    assert not differences, (
        f"{where}: the resumed run ended unlike the crash-free run; (resumed, crash-free): "
        f"{differences}"
    )
    # It ran every step the store did not hold as done, once, and none of the others.
    resumed = case.resumed_labels
    rerun = sorted(set(resumed) & case.done, key=resumed.index)
    assert not rerun, f"{where}: checkpointed steps ran again: {rerun}"
    assert len(set(resumed)) == len(resumed), f"{where}: a step ran twice after the resume"
    assert set(resumed) == set(reference.labels) - case.done, (
        f"{where}: resumed {sorted(set(resumed))}, expected "
        f"{sorted(set(reference.labels) - case.done)}"
    )
    # Each step it ran saw the context the same step saw in the crash-free run.
    for effect in case.resumed:
        assert effect.seen == reference.seen[effect.label], (
            f"{where}: after the resume {effect.label!r} saw {effect.seen}, "
            f"not {reference.seen[effect.label]}"
        )
    final = case.final
    assert final is not None
    assert final["status"] == "completed", f"{where}: {final['status']}"
    assert_no_record_twice(final, f"{where}, at the end")
    assert done_labels(case.scenario, final) == set(reference.labels), where
    # Counted over both processes: a checkpointed step's effect happened exactly once.
    counts = Counter(crashed + resumed)
    assert all(counts[label] == 1 for label in case.done), where


# -- 1. loop ---------------------------------------------------------------------------------------

LOOP_KILLS = {
    "loop-enter-7": {"before": "a 7"},  # entering iteration 7: nothing of it ran
    "loop-a7-effect": {"after": "a 7"},  # a ran (counted in the context), not checkpointed
    "loop-a7-committed": {"before": "b 7"},  # a of iteration 7 checkpointed, b starting
    "loop-b7-effect": {"after": "b 7"},  # b ran, not checkpointed
}


def test_loop_killed_in_iteration_7_resumes_in_iteration_7(store: Store) -> None:
    cases = [Case(name, "loop", kill) for name, kill in LOOP_KILLS.items()]
    reference = run_cases(store, cases)["loop"]
    assert reference.outcome["output"] == LOOPS
    assert reference.outcome["context"]["counter"] == LOOPS
    assert reference.outcome["context"]["trail"] == list(range(LOOPS))
    iterations_0_to_6 = {f"{step} {k}" for step in "ab" for k in range(7)}
    for case in cases:
        check_resumed_exactly_once(case, reference)
        a7_done = case.name in ("loop-a7-committed", "loop-b7-effect")
        assert case.done == {"head"} | iterations_0_to_6 | ({"a 7"} if a7_done else set())
        # The resumed process starts in iteration 7, with the context iteration 6 left
        # (counter 7, trail 0..6), plus a's increment if a of iteration 7 was checkpointed.
        first = case.resumed[0]
        assert first.label == ("b 7" if a7_done else "a 7"), case.name
        assert first.seen == {"counter": 8 if a7_done else 7, "trail": list(range(7))}
        assert not set(case.resumed_labels) & iterations_0_to_6, case.name


# Loop callbacks see the context of the iteration they belong to, after a resume too.
LOOP_CALLBACK_KILLS = {
    # The exit condition reads a context flag that the first step of iteration 3 raises; the
    # kill comes in the second step, after the first one's checkpoint (flag raised, stored).
    "loop_exit": {"before": "work 3"},
    # The iteration_input_mapper counts its calls in the context; killed in iteration 3.
    "loop_mapper": {"before": "body 3"},
}


@pytest.mark.parametrize("scenario", list(LOOP_CALLBACK_KILLS))
def test_loop_callbacks_after_a_resume_see_their_own_iteration(store: Store, scenario: str) -> None:
    """Iterations finished before the crash are not re-run; neither are their exit condition
    and mappers evaluated again against the (later) restored context."""
    case = Case(scenario.replace("_", "-"), scenario, LOOP_CALLBACK_KILLS[scenario])
    reference = run_cases(store, [case])[scenario]
    check_resumed_exactly_once(case, reference)


# -- 2. map ----------------------------------------------------------------------------------------

MAP_RANDOM_KILLS = 2


def test_map_of_1000_items_reruns_no_checkpointed_item(store: Store) -> None:
    """Concurrency 8, killed when item 500 runs (m0 of item 500 checkpointed) and, in other
    runs, by the parent at a random moment (possibly inside a checkpoint write)."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    effect_lines = 2 * MAP_ITEMS + 2
    cases = [Case("map-item-500", "map", {"before": "m1 500"})] + [
        Case(f"map-random-{n}", "map", kill_after_lines=rng.randrange(50, effect_lines - 100))
        for n in range(MAP_RANDOM_KILLS)
    ]
    reference = run_cases(store, cases)["map"]
    assert reference.outcome["output"] == [2 * i + 1 for i in range(MAP_ITEMS)]
    for case in cases:
        check_resumed_exactly_once(case, reference)
        assert case.outcome["output"] == [2 * i + 1 for i in range(MAP_ITEMS)], f"seed {seed}"
        # "checkpointed", as the store tells it: records at [1, item, j] that succeeded.
        assert case.after_kill is not None
        checkpointed = {
            (r["path"][1], r["name"])
            for r in case.after_kill["step_history"]
            if r["success"] and r.get("path") and len(r["path"]) == 3
        }
        counts = Counter(effect.label for effect in case.crashed + case.resumed)
        for item, name in checkpointed:
            assert counts[f"{name} {item}"] == 1, f"{case.name}, seed {seed}: {name} {item}"
    item_500 = cases[0]
    assert "m0 500" in item_500.done
    assert "m1 500" not in item_500.done
    assert 0 < len(item_500.done) < effect_lines


# -- 3. parallel -----------------------------------------------------------------------------------

PARALLEL_KILLS = {
    # The third branch ran, then waited until the other two were checkpointed, then died.
    "par-c-last": {"after": "c", "wait_for": [[COMPOSITE, "a"], [COMPOSITE, "b"]]},
    # The same with the middle branch unfinished.
    "par-b-last": {"after": "b", "wait_for": [[COMPOSITE, "a"], [COMPOSITE, "c"]]},
}


def test_parallel_reruns_only_the_unfinished_branch(store: Store) -> None:
    cases = [Case(name, "parallel", kill) for name, kill in PARALLEL_KILLS.items()]
    reference = run_cases(store, cases)["parallel"]
    merged = reference.outcome["context"]
    assert reference.outcome["output"] == {"a": "a:x", "b": "b:x", "c": "c:x"}
    assert (merged["n_a"], merged["n_b"], merged["n_c"]) == (1, 1, 1)
    assert merged["scratchpad"] == {"head": True, "a": 1, "b": 2, "c": 3}
    for case in cases:
        check_resumed_exactly_once(case, reference)
        unfinished = case.kill["after"] if case.kill else ""
        assert case.done == {"head", "a", "b", "c"} - {unfinished}, case.name
        assert case.resumed_labels == [unfinished, "tail"], case.name
        assert list(case.outcome["output"]) == ["a", "b", "c"], case.name  # declaration order
        # The branch ran twice, on a fresh copy each time: its change is merged once.
        assert Counter(e.label for e in case.crashed + case.resumed)[unfinished] == 2
        assert case.outcome["context"] == merged, case.name


# -- 4. state machine ------------------------------------------------------------------------------

# Draft (turn 0) -> Critique (1: review, decide) -> Edit (2) -> Critique (3) -> Approval (4)
STATE_MACHINE_KILLS = {
    "sm-in-draft": ({"before": "draft 0"}, "draft"),
    "sm-in-critique-1": ({"before": "review 1"}, "critique"),
    "sm-in-edit": ({"before": "edit 2"}, "edit"),
    "sm-edit-effect": ({"after": "edit 2"}, "edit"),
    "sm-in-critique-3": ({"before": "review 3"}, "critique"),
    "sm-critique-3-half": ({"before": "decide 3"}, "critique"),  # review of turn 3 checkpointed
    "sm-in-approval": ({"before": "approve 4"}, "approval"),
}


def test_state_machine_resumes_in_its_state(store: Store) -> None:
    cases = [Case(name, "state_machine", kill) for name, (kill, _) in STATE_MACHINE_KILLS.items()]
    reference = run_cases(store, cases)["state_machine"]
    assert reference.outcome["output"] == {"text": "v2", "rev": 2, "approved": True}
    assert reference.outcome["context"]["states"] == [
        "draft",
        "critique",
        "edit",
        "critique",
        "approval",
    ]
    order = reference.labels
    for case in cases:
        check_resumed_exactly_once(case, reference)
        kill, state = STATE_MACHINE_KILLS[case.name]
        label = kill.get("before") or kill["after"]
        # Everything before the state's interrupted step is done, nothing after it.
        assert case.done == set(order[: order.index(label)]), case.name
        assert case.resumed_labels == order[order.index(label) :], case.name
        turn = int(label.split()[1])
        # The resumed process ran that turn in that state.
        assert case.final is not None
        paths = [r.get("path") for r in case.final["step_history"]]
        assert any(p and p[1:3] == [turn, state] for p in paths), case.name


# -- 5. a kill inside a nested checkpoint write ----------------------------------------------------

# case -> (scenario, the record whose checkpoint write is cut, its kind, its label)
WRITE_KILLS: dict[str, tuple[str, list[Any], str, str | None]] = {
    "write-loop-a7": ("loop", [COMPOSITE, 7, 0], "step", "a 7"),
    "write-map-500": ("map", [COMPOSITE, 500, 1], "step", "m1 500"),
    "write-parallel-b": ("parallel", [COMPOSITE, "b"], "branch", "b"),
    "write-sm-decide-3": ("state_machine", [COMPOSITE, 3, "critique", 1], "step", "decide 3"),
    "write-nested-branch": ("nested", [COMPOSITE, 2, 0, 1, 0, "odd", 0], "step", "odd 2 1"),
    "write-nested-decision": ("nested", [COMPOSITE, 2, 0, 1, 0], "decision", None),
    # The composite's own record, written once every sub-step is done.
    "write-loop-done": ("loop", ["top", COMPOSITE], "step", None),
    "write-parallel-done": ("parallel", ["top", COMPOSITE], "step", None),
    "write-sm-done": ("state_machine", ["top", COMPOSITE], "step", None),
}


def test_kill_inside_a_nested_checkpoint_write(store: Store) -> None:
    """SQLite: every statement of the sub-step's checkpoint ran, no COMMIT. File: the
    temporary file is written and fsynced, not renamed. Postgres: the statement is on its way
    to the server, its answer not read (it may or may not commit). Either way the store holds
    the old checkpoint or the new one, and the resume is exactly-once for what it holds."""
    cases = [
        Case(name, scenario, {"write": path, "kind": kind})
        for name, (scenario, path, kind, _) in WRITE_KILLS.items()
    ]
    references = run_cases(store, cases)
    for case in cases:
        check_resumed_exactly_once(case, references[case.scenario])
        _, path, kind, label = WRITE_KILLS[case.name]
        if label is not None:
            assert label in [effect.label for effect in case.crashed], case.name
        if store.kind != "postgres":  # the write was cut before it could commit
            assert not has_record(case.after_kill, path, kind), case.name
            if label is not None:
                assert label not in case.done, case.name
                assert label in case.resumed_labels, case.name


# -- 6. the resumed run's result -----------------------------------------------------------------

HISTORY_KILLS = {
    "history-loop": ("loop", {"before": "b 7"}),
    "history-sm": ("state_machine", {"before": "decide 3"}),
}


def test_resumed_result_lists_the_sub_steps_of_earlier_processes(store: Store) -> None:
    """PipelineResult.step_history holds "every step execution of the run, including those of
    earlier processes"; for the composite step that was in progress, that means the sub-steps
    the killed process checkpointed as well as those the resumed one ran."""
    cases = [Case(name, scenario, kill) for name, (scenario, kill) in HISTORY_KILLS.items()]
    references = run_cases(store, cases)
    for case in cases:
        check_resumed_exactly_once(case, references[case.scenario])
        expected = references[case.scenario].outcome["history"]
        history = case.outcome["history"]
        name, sub_steps = expected[COMPOSITE]
        listed = dict(history).get(name, [])
        problems = []
        if [top for top, _ in history] != [top for top, _ in expected]:
            problems.append(f"top-level steps {[top for top, _ in history]}")
        missing = [path for path in sub_steps if path not in listed]
        if missing:
            problems.append(f"{name!r} does not list its sub-steps {missing}")
        assert not problems, f"{case.name}: the resumed result lists " + "; ".join(problems)
