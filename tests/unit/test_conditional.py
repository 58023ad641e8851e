"""ConditionalStep: one branch per run, chosen by ``condition_callable(output, context)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flujo import ConditionalStep, Flujo, PipelineContext, PipelineResult, Step, StepResult, step
from flujo.exceptions import ConfigurationError

from .steplib_helpers import Calls, Store, shape, steps_only


class Ctx(PipelineContext):
    mode: str = "fast"
    visited: list[str] = []


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return Store(request.param, tmp_path)


def tag(label: str) -> Step[Any, Any]:
    return Step.from_callable(lambda x: f"{x}:{label}", name=f"tag_{label}")


async def run(pipeline: Any, data: Any, **options: Any) -> PipelineResult[Any, Any]:
    return await Flujo(pipeline, persist_state=False, **options).run_async(data)


# -- choosing a branch -----------------------------------------------------------------------------


async def test_sync_condition_picks_the_branch() -> None:
    route = ConditionalStep(
        "route",
        lambda data, ctx: "big" if data > 10 else "small",
        {"big": tag("big"), "small": tag("small")},
    )
    assert (await run(route, 50)).output == "50:big"
    assert (await run(route, 5)).output == "5:small"


async def test_async_condition_and_async_branch_steps() -> None:
    async def choose(data: str, ctx: Any) -> str:
        return data[0]

    @step
    async def shout(x: str) -> str:
        return x.upper()

    @step
    async def whisper(x: str) -> str:
        return x.lower()

    route = ConditionalStep("route", choose, {"L": shout, "U": whisper})
    assert (await run(route, "Lo")).output == "LO"
    assert (await run(route, "Up")).output == "up"


async def test_condition_receives_previous_output_and_context() -> None:
    seen: list[tuple[Any, Any]] = []

    def choose(data: Any, ctx: Ctx) -> str:
        seen.append((data, ctx.mode))
        return ctx.mode

    def set_mode(x: int, *, context: Ctx) -> int:
        context.mode = "slow"
        return x * 2

    pipeline = Step.from_callable(set_mode, name="set_mode") >> ConditionalStep(
        "route", choose, {"fast": tag("fast"), "slow": tag("slow")}
    )
    result = await run(pipeline, 4, context_model=Ctx)
    assert result.output == "8:slow"
    assert seen == [(8, "slow")]


async def test_branch_pipeline_runs_every_step_and_may_write_context() -> None:
    def visit(x: str, *, context: Ctx) -> str:
        context.visited.append(x)
        return x + "!"

    branch = Step.from_callable(visit, name="visit") >> tag("done")
    route = ConditionalStep("route", lambda d, c: "go", {"go": branch, "stop": tag("stop")})
    result = await run(route, "a", context_model=Ctx)
    assert result.output == "a!:done"
    assert result.final_pipeline_context.visited == ["a"]


async def test_non_string_branch_keys() -> None:
    route = ConditionalStep(
        "route", lambda d, c: d % 3, {0: tag("zero"), 1: tag("one")}, default_branch=tag("other")
    )
    assert (await run(route, 3)).output == "3:zero"
    assert (await run(route, 4)).output == "4:one"
    assert (await run(route, 5)).output == "5:other"


async def test_default_branch_for_an_unknown_key() -> None:
    route = ConditionalStep("route", lambda d, c: "nope", {"a": tag("a")}, default_branch=tag("d"))
    assert (await run(route, "x")).output == "x:d"


async def test_unknown_key_without_default_fails_with_a_typed_error() -> None:
    after = Calls()
    pipeline = ConditionalStep("route", lambda d, c: "nope", {"a": tag("a")}) >> Step.from_callable(
        after.add, name="after"
    )
    result = await run(pipeline, "x")
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "UnknownBranchError"
    assert "nope" in result.error.message
    assert result.failed_step == "route"
    assert after.log == []


async def test_default_branch_is_not_confused_with_a_branch_named_default() -> None:
    """An unknown key must run ``default_branch``, even when a branch is keyed "default"."""
    route = ConditionalStep(
        "route",
        lambda d, c: "unknown",
        {"default": tag("named_default")},
        default_branch=tag("the_default"),
    )
    assert (await run(route, "x")).output == "x:the_default"


async def test_failing_branch_step_fails_the_conditional_with_its_error() -> None:
    def broken(x: Any) -> Any:
        raise KeyError("missing")

    route = ConditionalStep("route", lambda d, c: "a", {"a": Step.from_callable(broken)})
    result = await run(route, 1)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "KeyError"
    assert result.failed_step == "route"


async def test_condition_that_raises_fails_the_step() -> None:
    def choose(data: Any, ctx: Any) -> str:
        raise ValueError("cannot decide")

    result = await run(ConditionalStep("route", choose, {"a": tag("a")}), 1)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "ValueError"


# -- constructor checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"condition_callable": "not callable", "branches": {"a": tag("a")}},
        {"condition_callable": lambda d, c: "a", "branches": {}},
        {"condition_callable": lambda d, c: "a", "branches": [tag("a")]},
        {"condition_callable": lambda d, c: "a", "branches": {"a": lambda x: x}},
        {"condition_callable": lambda d, c: "a", "branches": {"a": tag("a")}, "default_branch": 3},
    ],
)
def test_bad_arguments_raise_configuration_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ConditionalStep("route", **kwargs)


# -- history and streaming -------------------------------------------------------------------------


async def test_history_has_the_branch_steps_with_paths(store: Store) -> None:
    first = Step.from_callable(lambda x: x, name="first")
    route = ConditionalStep("route", lambda d, c: "b", {"a": tag("a"), "b": tag("b") >> tag("c")})
    result = await store.run(first >> route, "x")
    assert result.output == "x:b:c"
    top = result.step_history[1]
    assert top.name == "route"
    assert top.path is None
    assert [(r.name, r.path, r.output) for r in steps_only(top.step_history)] == [
        ("tag_b", (1, "b", 0), "x:b"),
        ("tag_c", (1, "b", 1), "x:b:c"),
    ]
    # The choice is stored (as a "decision" record at the conditional's own path).
    state = await store.load(result.run_id)
    decisions = [r for r in state["step_history"] if r.get("kind") == "decision"]
    assert [(r["path"], r["output"]) for r in decisions] == [([1], "b")]


async def test_run_stream_yields_nested_results_before_the_conditional() -> None:
    route = ConditionalStep("route", lambda d, c: "a", {"a": tag("a") >> tag("b")})
    runner = Flujo(route, persist_state=False)
    items = [item async for item in runner.run_stream("x")]
    assert isinstance(items[-1], PipelineResult)
    assert items[-1].output == "x:a:b"
    assert all(isinstance(i, StepResult) for i in items[:-1])
    assert all(i.path is not None for i in items[:-2])
    assert [(r.name, r.path) for r in steps_only(items[:-1])] == [
        ("tag_a", (0, "a", 0)),
        ("tag_b", (0, "a", 1)),
        ("route", None),
    ]


async def test_stored_history_rebuilds_the_same_tree(store: Store) -> None:
    pipeline = Step.from_callable(lambda x: x, name="first") >> ConditionalStep(
        "route", lambda d, c: "a", {"a": tag("a") >> tag("b")}
    )
    live = await store.run(pipeline, "x")
    assert live.status == "completed"
    again = await store.run(pipeline, "x", run_id=live.run_id)
    assert again.output == live.output
    assert shape(again.step_history) == shape(live.step_history)


async def test_stored_history_of_a_top_level_conditional_has_no_placeholder(store: Store) -> None:
    route = ConditionalStep("route", lambda d, c: "a", {"a": tag("a")})
    live = await store.run(route, "x")
    again = await store.run(route, "x", run_id=live.run_id)
    assert [r.name for r in again.step_history] == ["route"]
    assert all(r.success for r in again.step_history)
    assert shape(again.step_history) == shape(live.step_history)


# -- durability ------------------------------------------------------------------------------------


async def test_resume_takes_the_recorded_branch_and_skips_finished_steps(store: Store) -> None:
    calls = Calls()
    state = {"choice": "a", "fail": True}

    def choose(data: Any, ctx: Any) -> str:
        calls.add("condition")
        return state["choice"]

    def a1(x: str, *, context: Ctx) -> str:
        calls.add("a1")
        context.visited.append("a1")
        return x + "1"

    def a2(x: str, *, context: Ctx) -> str:
        calls.add("a2")
        if state["fail"]:
            raise RuntimeError("a2 is down")
        context.visited.append("a2")
        return x + "2"

    def b(x: str) -> str:
        calls.add("b")
        return x + "b"

    route = ConditionalStep(
        "route",
        choose,
        {
            "a": Step.from_callable(a1, name="a1") >> Step.from_callable(a2, name="a2"),
            "b": Step.from_callable(b, name="b"),
        },
    )
    first = await store.run(route, "x", context_model=Ctx)
    assert first.status == "failed"
    assert calls.log == ["condition", "a1", "a2"]

    state.update(choice="b", fail=False)  # the condition would now pick another branch
    calls.clear()
    resumed = await store.run(route, "x", run_id=first.run_id, context_model=Ctx)
    assert resumed.status == "completed"
    assert resumed.output == "x12"
    assert calls.log == ["a2"]
    assert resumed.final_pipeline_context.visited == ["a1", "a2"]


async def test_a_completed_conditional_is_not_run_again(store: Store) -> None:
    calls = Calls()

    def choose(data: Any, ctx: Any) -> str:
        calls.add("condition")
        return "a"

    route = ConditionalStep("route", choose, {"a": tag("a")})
    live = await store.run(route, "x")
    again = await store.run(route, "x", run_id=live.run_id)
    assert again.status == "completed"
    assert again.output == "x:a"
    assert calls.log == ["condition"]
