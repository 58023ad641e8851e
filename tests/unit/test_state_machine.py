"""StateMachineStep: states (pipelines) that name the next state with a Transition."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from flujo import (
    Flujo,
    PipelineContext,
    PipelineResult,
    StateMachineStep,
    Step,
    StepResult,
    Transition,
    step,
)
from flujo.exceptions import ConfigurationError

from .steplib_helpers import Calls, Crash, CrashingMemoryBackend, Store, shape, stored_paths


class Ctx(PipelineContext):
    critiques: int = 0
    trail: list[str] = []


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return Store(request.param, tmp_path)


async def run(pipeline: Any, data: Any, **options: Any) -> PipelineResult[Any, Any]:
    options.setdefault("context_model", Ctx)
    return await Flujo(pipeline, persist_state=False, **options).run_async(data)


def review_machine(calls: Calls, fail: dict[str, Any] | None = None) -> StateMachineStep[Any, Any]:
    """Draft -> Critique -> Edit -> Critique -> Edit -> Critique -> Approval."""
    fail = fail if fail is not None else {}

    def draft(topic: str, *, context: Ctx) -> Transition:
        calls.add(("draft", topic))
        context.trail.append("draft")
        return Transition("critique", {"text": topic, "rev": 0})

    async def critique(doc: dict[str, Any], *, context: Ctx) -> Transition:
        calls.add(("critique", doc["rev"]))
        context.critiques += 1
        context.trail.append(f"critique{doc['rev']}")
        return Transition("edit" if doc["rev"] < 2 else "approval", doc)

    def edit(doc: dict[str, Any], *, context: Ctx) -> Transition:
        calls.add(("edit", doc["rev"]))
        if fail.get("edit") == doc["rev"]:
            fail.pop("edit")
            raise RuntimeError(f"edit {doc['rev']} crashed")
        context.trail.append(f"edit{doc['rev']}")
        return Transition("critique", {"text": doc["text"] + "+", "rev": doc["rev"] + 1})

    def approval(doc: dict[str, Any]) -> str:
        calls.add(("approval", doc["rev"]))
        return f"approved:{doc['text']}"

    return StateMachineStep(
        "review",
        states={
            "draft": Step.from_callable(draft, name="draft"),
            "critique": Step.from_callable(critique, name="critique"),
            "edit": Step.from_callable(edit, name="edit"),
            "approval": Step.from_callable(approval, name="approval"),
        },
        start_state="draft",
        end_states=["approval"],
    )


EXPECTED_PATHS = [
    (0, 0, "draft", 0),
    (0, 1, "critique", 0),
    (0, 2, "edit", 0),
    (0, 3, "critique", 0),
    (0, 4, "edit", 0),
    (0, 5, "critique", 0),
    (0, 6, "approval", 0),
]


# -- running states --------------------------------------------------------------------------------


async def test_draft_critique_edit_approval() -> None:
    calls = Calls()
    result = await run(review_machine(calls), "essay")
    assert result.status == "completed"
    assert result.output == "approved:essay++"
    assert [c[0] for c in calls.log] == [
        "draft",
        "critique",
        "edit",
        "critique",
        "edit",
        "critique",
        "approval",
    ]
    assert result.final_pipeline_context.critiques == 3
    assert result.final_pipeline_context.trail == [
        "draft",
        "critique0",
        "edit0",
        "critique1",
        "edit1",
        "critique2",
    ]


async def test_each_state_receives_the_previous_states_output() -> None:
    seen: list[tuple[str, Any]] = []

    def state(name: str, nxt: str | None) -> Step[Any, Any]:
        def go(data: Any) -> Any:
            seen.append((name, data))
            return Transition(nxt, f"{data}>{name}") if nxt else f"{data}>{name}"

        return Step.from_callable(go, name=name)

    machine = StateMachineStep(
        "m", {"a": state("a", "b"), "b": state("b", "c"), "c": state("c", None)}, "a", ["c"]
    )
    result = await run(machine, "in")
    assert result.output == "in>a>b>c"
    assert seen == [("a", "in"), ("b", "in>a"), ("c", "in>a>b")]


async def test_an_end_state_returning_a_transition_outputs_its_output() -> None:
    machine = StateMachineStep(
        "m",
        {
            "start": Step.from_callable(lambda x: Transition("end", x + 1), name="start"),
            "end": Step.from_callable(lambda x: Transition("ignored", x * 10), name="end"),
        },
        "start",
        ["end"],
    )
    assert (await run(machine, 1)).output == 20


async def test_a_start_state_that_is_an_end_state_runs_once() -> None:
    calls = Calls()
    only = Step.from_callable(lambda x: calls.add(x) or f"done:{x}", name="only")
    result = await run(StateMachineStep("m", {"only": only}, "only", ["only"]), "x")
    assert result.output == "done:x"
    assert calls.log == ["x"]


async def test_a_state_may_be_a_pipeline_of_async_steps() -> None:
    @step
    async def prepare(x: int) -> int:
        return x * 2

    @step
    async def decide(x: int) -> Transition:
        return Transition("done" if x > 10 else "work", x)

    finish = Step.from_callable(lambda x: f"result={x}", name="finish")
    machine = StateMachineStep("m", {"work": prepare >> decide, "done": finish}, "work", ["done"])
    result = await run(machine, 1)
    assert result.output == "result=16"
    assert [r.path for r in result.step_history[0].step_history] == [
        (0, t, "work", j) for t in range(4) for j in range(2)
    ] + [(0, 4, "done", 0)]


async def test_transition_is_a_small_frozen_value() -> None:
    t = Transition("next")
    assert (t.to, t.output) == ("next", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.to = "other"  # type: ignore[misc]


# -- failures --------------------------------------------------------------------------------------


async def test_more_than_max_transitions_is_an_iteration_limit_error() -> None:
    calls = Calls()
    ping = Step.from_callable(lambda x: calls.add("ping") or Transition("pong", x), name="ping")
    pong = Step.from_callable(lambda x: calls.add("pong") or Transition("ping", x), name="pong")
    done = Step.from_callable(lambda x: x, name="done")
    machine = StateMachineStep(
        "m", {"ping": ping, "pong": pong, "done": done}, "ping", ["done"], max_transitions=5
    )
    result = await run(machine, 0)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "IterationLimitError"
    assert "5" in result.error.message
    assert result.failed_step == "m"
    assert calls.log == ["ping", "pong", "ping", "pong", "ping"]


async def test_naming_an_unknown_state_is_an_unknown_branch_error() -> None:
    machine = StateMachineStep(
        "m",
        {
            "a": Step.from_callable(lambda x: Transition("nowhere", x), name="a"),
            "b": Step.from_callable(lambda x: x, name="b"),
        },
        "a",
        ["b"],
    )
    result = await run(machine, 0)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "UnknownBranchError"
    assert "nowhere" in result.error.message


async def test_a_non_end_state_must_return_a_transition() -> None:
    machine = StateMachineStep(
        "m",
        {
            "a": Step.from_callable(lambda x: "b", name="a"),
            "b": Step.from_callable(lambda x: x, name="b"),
        },
        "a",
        ["b"],
    )
    result = await run(machine, 0)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "UnknownBranchError"


async def test_a_failing_state_fails_the_machine_with_its_error() -> None:
    calls = Calls()
    result = await run(review_machine(calls, {"edit": 1}), "essay")
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "RuntimeError"
    assert result.error.message == "edit 1 crashed"
    assert result.failed_step == "review"


A = Step.from_callable(lambda x: x, name="a")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"states": {}, "start_state": "a", "end_states": ["a"]},
        {"states": [A], "start_state": "a", "end_states": ["a"]},
        {"states": {"a": lambda x: x}, "start_state": "a", "end_states": ["a"]},
        {"states": {"a": A}, "start_state": "b", "end_states": ["a"]},
        {"states": {"a": A}, "start_state": "a", "end_states": []},
        {"states": {"a": A}, "start_state": "a", "end_states": ["z"]},
        {"states": {"a": A}, "start_state": "a", "end_states": ["a"], "max_transitions": 0},
        {"states": {"a": A}, "start_state": "a", "end_states": ["a"], "max_transitions": True},
        {"states": {"a": A}, "start_state": "a", "end_states": ["a"], "max_transitions": "9"},
    ],
)
def test_bad_arguments_raise_configuration_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        StateMachineStep(name="m", **kwargs)


# -- history and streaming -------------------------------------------------------------------------


async def test_history_is_per_turn_and_state() -> None:
    result = await run(review_machine(Calls()), "essay")
    machine = result.step_history[0]
    assert machine.path is None
    assert [r.path for r in machine.step_history] == EXPECTED_PATHS


async def test_run_stream_yields_each_state_before_the_machine() -> None:
    runner = Flujo(review_machine(Calls()), context_model=Ctx, persist_state=False)
    items = [item async for item in runner.run_stream("essay")]
    assert isinstance(items[-1], PipelineResult)
    assert all(isinstance(i, StepResult) for i in items[:-1])
    assert [r.path for r in items[:-2]] == EXPECTED_PATHS
    assert (items[-2].name, items[-2].path, items[-2].output) == (
        "review",
        None,
        "approved:essay++",
    )


async def test_stored_history_rebuilds_the_same_tree(store: Store) -> None:
    machine = review_machine(Calls())
    live = await store.run(machine, "essay", context_model=Ctx)
    again = await store.run(machine, "essay", run_id=live.run_id, context_model=Ctx)
    assert again.output == "approved:essay++"
    assert shape(again.step_history) == shape(live.step_history)


# -- durability ------------------------------------------------------------------------------------


async def test_resumes_in_the_state_it_was_in(store: Store) -> None:
    calls = Calls()
    fail = {"edit": 1}
    first = await store.run(review_machine(calls, fail), "essay", context_model=Ctx)
    assert first.status == "failed"
    stored = await store.load(first.run_id)
    assert stored_paths(stored) == EXPECTED_PATHS[:4]
    assert stored["pipeline_context"]["critiques"] == 2

    calls.clear()
    resumed = await store.run(
        review_machine(calls, fail), "essay", run_id=first.run_id, context_model=Ctx
    )
    assert resumed.status == "completed"
    assert resumed.output == "approved:essay++"
    assert calls.log == [("edit", 1), ("critique", 2), ("approval", 2)]
    context = resumed.final_pipeline_context
    assert context.critiques == 3
    assert context.trail == ["draft", "critique0", "edit0", "critique1", "edit1", "critique2"]


async def test_resume_inside_a_state_skips_its_finished_steps(store: Store) -> None:
    calls = Calls()
    state = {"fail": True}

    def look(x: int) -> int:
        calls.add(("look", x))
        return x

    def move(x: int) -> Transition:
        calls.add(("move", x))
        if state["fail"] and x == 2:
            raise RuntimeError("move down")
        return Transition("walk" if x < 3 else "stop", x + 1)

    walk = Step.from_callable(look, name="look") >> Step.from_callable(move, name="move")
    stop = Step.from_callable(lambda x: f"stopped at {x}", name="stop")
    machine = StateMachineStep("m", {"walk": walk, "stop": stop}, "walk", ["stop"])
    first = await store.run(machine, 0)
    assert first.status == "failed"
    state["fail"] = False
    calls.clear()
    resumed = await store.run(machine, 0, run_id=first.run_id)
    assert resumed.output == "stopped at 4"
    assert calls.log == [("move", 2), ("look", 3), ("move", 3)]


async def test_a_machine_whose_end_state_finished_before_a_crash_outputs_the_same() -> None:
    """The end state's recorded Transition is unwrapped on resume as it is live."""
    machine = StateMachineStep(
        "m",
        {
            "draft": Step.from_callable(lambda x: Transition("done", x + "d"), name="draft"),
            "done": Step.from_callable(lambda x: Transition("x", x + "!"), name="finish"),
        },
        "draft",
        ["done"],
    )
    backend = CrashingMemoryBackend()
    backend.crash_after = "finish"  # the process dies right after the end state's checkpoint
    with pytest.raises(Crash):
        await Flujo(machine, state_backend=backend).run_async("", run_id="sm-run")
    resumed = await Flujo(machine, state_backend=backend).run_async("", run_id="sm-run")
    assert resumed.status == "completed"
    assert resumed.output == "d!"
