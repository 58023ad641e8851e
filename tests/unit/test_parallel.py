"""ParallelStep and DynamicParallelRouterStep: branches on the same input, contexts merged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from flujo import (
    BranchFailureStrategy,
    DynamicParallelRouterStep,
    Flujo,
    MergeStrategy,
    ParallelStep,
    PipelineContext,
    PipelineResult,
    Step,
    StepResult,
)
from flujo.application.core.executor_core import ExecutorCore
from flujo.application.core.frame import Frame, RunScope
from flujo.exceptions import ConfigurationError, MergeConflictError

from .steplib_helpers import Calls, Store, wait_for_records


class Ctx(PipelineContext):
    a: int = 0
    b: int = 0
    shared: str = ""
    tags: dict[str, Any] = {}
    items: list[str] = []


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return Store(request.param, tmp_path)


def writer(name: str, delay: float = 0.0, **changes: Any) -> Step[Any, Any]:
    """An async step that waits ``delay``, applies ``changes`` to the context, returns a label."""

    async def write(data: Any, *, context: Ctx) -> str:
        await asyncio.sleep(delay)
        for field, value in changes.items():
            if field == "tags":
                context.tags = {**context.tags, **value}
            else:
                setattr(context, field, value)
        return f"{name}({data})"

    return Step.from_callable(write, name=name)


async def run(pipeline: Any, data: Any = "in", **options: Any) -> PipelineResult[Any, Any]:
    options.setdefault("context_model", Ctx)
    return await Flujo(pipeline, persist_state=False, **options).run_async(data)


def fields(result: PipelineResult[Any, Any]) -> dict[str, Any]:
    context = result.final_pipeline_context
    assert context is not None
    return context.model_dump(exclude={"run_id"})


# -- running branches ------------------------------------------------------------------------------


async def test_output_is_keyed_by_branch_in_declaration_order() -> None:
    finished: list[str] = []

    def branch(name: str, delay: float) -> Step[Any, Any]:
        async def go(data: str) -> str:
            await asyncio.sleep(delay)
            finished.append(name)
            return f"{name}:{data}"

        return Step.from_callable(go, name=name)

    par = ParallelStep("p", {"z": branch("z", 0.02), "a": branch("a", 0.0), "m": branch("m", 0.01)})
    result = await run(par, "x")
    assert result.status == "completed"
    assert list(result.output) == ["z", "a", "m"]
    assert result.output == {"z": "z:x", "a": "a:x", "m": "m:x"}
    assert finished == ["a", "m", "z"]


async def test_sync_and_pipeline_branches_get_the_same_input() -> None:
    upper = Step.from_callable(str.upper, name="upper")
    twice = Step.from_callable(lambda s: s * 2, name="twice")
    par = ParallelStep("p", {"up": upper, "both": upper >> twice, "len": Step.from_callable(len)})
    result = await run(par, "ab")
    assert result.output == {"up": "AB", "both": "ABAB", "len": 2}


async def test_each_branch_works_on_its_own_copy_of_the_context() -> None:
    async def mutate(data: Any, *, context: Ctx) -> list[str]:
        context.items.append("from-mutate")
        context.a = 1
        return list(context.items)

    async def read(data: Any, *, context: Ctx) -> tuple[list[str], int]:
        await asyncio.sleep(0.01)  # mutate has finished by now
        return (list(context.items), context.a)

    par = ParallelStep(
        "p", {"mutate": Step.from_callable(mutate), "read": Step.from_callable(read)}
    )
    result = await run(par)
    assert result.output == {"mutate": ["from-mutate"], "read": ([], 0)}
    assert fields(result)["items"] == ["from-mutate"]
    assert fields(result)["a"] == 1


# -- merging: CONTEXT_UPDATE -----------------------------------------------------------------------


async def test_changes_to_different_fields_all_survive() -> None:
    par = ParallelStep("p", {"l": writer("l", a=1), "r": writer("r", b=2, shared="r")})
    result = await run(par)
    assert fields(result) == {
        "scratchpad": {},
        "a": 1,
        "b": 2,
        "shared": "r",
        "tags": {},
        "items": [],
    }


async def test_the_same_value_written_by_two_branches_is_no_conflict() -> None:
    par = ParallelStep("p", {"l": writer("l", shared="same"), "r": writer("r", shared="same")})
    result = await run(par)
    assert result.status == "completed"
    assert fields(result)["shared"] == "same"


async def test_one_field_changed_differently_by_two_branches_is_a_merge_conflict() -> None:
    after = Calls()
    par = ParallelStep(
        "p", {"l": writer("l", shared="left", a=1), "r": writer("r", shared="right")}
    )
    result = await run(par >> Step.from_callable(after.add, name="after"))
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "MergeConflictError"
    assert "shared" in result.error.message
    assert "'l'" in result.error.message
    assert "'r'" in result.error.message
    assert result.failed_step == "p"
    assert after.log == []
    assert fields(result)["a"] == 0  # nothing of the failed merge leaked into the context


async def test_merge_conflict_error_names_the_field_and_the_branches() -> None:
    par = ParallelStep(
        "p", {"l": writer("l", shared="left"), "m": writer("m", a=3), "r": writer("r", shared="r")}
    )
    context = Ctx()
    frame = Frame(RunScope(ExecutorCore(), None, context, None, "run-1"), (0,))
    with pytest.raises(MergeConflictError) as caught:
        await par._run("in", frame)
    assert caught.value.step_name == "p"
    assert caught.value.field == "shared"
    assert caught.value.branches == ["l", "r"]


async def test_field_mapping_settles_a_conflict() -> None:
    par = ParallelStep(
        "p",
        {"l": writer("l", shared="left", a=1), "r": writer("r", shared="right", b=2)},
        field_mapping={"l": ["shared", "a"], "r": ["b"]},
    )
    result = await run(par)
    assert result.status == "completed"
    assert (fields(result)["shared"], fields(result)["a"], fields(result)["b"]) == ("left", 1, 2)


async def test_field_mapping_limits_what_a_listed_branch_merges_back() -> None:
    par = ParallelStep(
        "p",
        {"l": writer("l", a=1, shared="l"), "r": writer("r", b=2)},
        field_mapping={"l": ["a"]},
    )
    result = await run(par)
    assert (fields(result)["a"], fields(result)["b"], fields(result)["shared"]) == (1, 2, "")


async def test_dict_fields_merge_key_by_key() -> None:
    par = ParallelStep("p", {"l": writer("l", tags={"x": 1}), "r": writer("r", tags={"y": 2})})
    result = await run(par, initial_context_data={"tags": {"keep": 0}})
    assert result.status == "completed"
    assert fields(result)["tags"] == {"keep": 0, "x": 1, "y": 2}


async def test_dict_key_changed_differently_by_two_branches_is_a_conflict() -> None:
    par = ParallelStep("p", {"l": writer("l", tags={"x": 1}), "r": writer("r", tags={"x": 2})})
    result = await run(par)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "MergeConflictError"
    assert "tags" in result.error.message


async def test_a_dict_key_removed_by_one_branch_and_added_by_another() -> None:
    async def drop(data: Any, *, context: Ctx) -> str:
        context.tags = {k: v for k, v in context.tags.items() if k != "old"}
        return "dropped"

    par = ParallelStep("p", {"drop": Step.from_callable(drop), "add": writer("add", tags={"n": 1})})
    result = await run(par, initial_context_data={"tags": {"old": 1, "keep": 2}})
    assert fields(result)["tags"] == {"keep": 2, "n": 1}


# -- merging: other strategies ---------------------------------------------------------------------


async def test_overwrite_applies_branches_in_declaration_order() -> None:
    par = ParallelStep(
        "p",
        {
            "first": writer("first", 0.02, shared="first", a=1),
            "second": writer("second", shared="2"),
        },
        merge_strategy=MergeStrategy.OVERWRITE,
    )
    result = await run(par)
    assert result.status == "completed"
    assert (fields(result)["shared"], fields(result)["a"]) == ("2", 1)


async def test_no_merge_drops_every_change_but_keeps_the_outputs() -> None:
    par = ParallelStep(
        "p",
        {"l": writer("l", a=1, shared="x"), "r": writer("r", shared="y")},
        merge_strategy=MergeStrategy.NO_MERGE,
    )
    result = await run(par)
    assert result.output == {"l": "l(in)", "r": "r(in)"}
    assert fields(result) == fields(await run(Step.from_callable(lambda x: x, name="noop")))


@pytest.mark.parametrize("is_async", [False, True])
async def test_custom_merge_callable(is_async: bool) -> None:
    received: dict[str, Any] = {}

    def merge(context: Ctx, branches: dict[str, Ctx]) -> None:
        received.update(branches)
        context.shared = "+".join(f"{name}:{ctx.shared}" for name, ctx in branches.items())
        context.a = sum(ctx.a for ctx in branches.values())

    async def amerge(context: Ctx, branches: dict[str, Ctx]) -> None:
        merge(context, branches)

    par = ParallelStep(
        "p",
        {"l": writer("l", 0.01, shared="L", a=1), "r": writer("r", shared="R", a=2)},
        merge_strategy=amerge if is_async else merge,
    )
    result = await run(par)
    assert result.status == "completed"
    assert (fields(result)["shared"], fields(result)["a"]) == ("l:L+r:R", 3)
    assert list(received) == ["l", "r"]
    assert all(isinstance(ctx, Ctx) for ctx in received.values())


@pytest.mark.parametrize(
    "strategy",
    [MergeStrategy.CONTEXT_UPDATE, MergeStrategy.OVERWRITE, "custom"],
    ids=["context_update", "overwrite", "custom"],
)
async def test_merged_context_never_depends_on_completion_order(strategy: Any) -> None:
    def custom(context: Ctx, branches: dict[str, Ctx]) -> None:
        context.items = list(branches)
        context.a = next(iter(branches.values())).a

    def build(delays: tuple[float, float, float]) -> ParallelStep[Any, Any]:
        one, two, three = delays
        if strategy is MergeStrategy.CONTEXT_UPDATE:  # no conflict: equal values, distinct keys
            first, second = {"a": 1, "shared": "x"}, {"a": 1, "shared": "x"}
        else:
            first, second = {"a": 1, "shared": "one"}, {"a": 2, "shared": "two"}
        return ParallelStep(
            "p",
            {
                "one": writer("one", one, tags={"one": 1}, **first),
                "two": writer("two", two, tags={"two": 2}, **second),
                "three": writer("three", three, b=3, tags={"three": 3}),
            },
            merge_strategy=custom if strategy == "custom" else strategy,
        )

    forward = await run(build((0.0, 0.01, 0.02)))
    backward = await run(build((0.02, 0.01, 0.0)))
    assert forward.status == backward.status == "completed"
    assert fields(forward) == fields(backward)
    assert list(forward.output) == list(backward.output) == ["one", "two", "three"]
    if strategy is not MergeStrategy.CONTEXT_UPDATE:
        assert fields(forward)["a"] == (1 if strategy == "custom" else 2)


# -- failing branches ------------------------------------------------------------------------------


def broken(name: str, delay: float = 0.0) -> Step[Any, Any]:
    async def fail(data: Any, *, context: Ctx) -> str:
        await asyncio.sleep(delay)
        context.a = 99
        raise LookupError(f"{name} failed")

    return Step.from_callable(fail, name=name)


async def test_propagate_fails_the_step_with_the_branch_error() -> None:
    par = ParallelStep(
        "p",
        {"ok": writer("ok", b=1), "bad": broken("bad", 0.005)},
        on_branch_failure=BranchFailureStrategy.PROPAGATE,
    )
    result = await run(par)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "LookupError"
    assert result.error.message == "bad failed"
    assert result.failed_step == "p"
    assert (fields(result)["a"], fields(result)["b"]) == (0, 0)


async def test_propagate_is_the_default() -> None:
    result = await run(ParallelStep("p", {"ok": writer("ok"), "bad": broken("bad")}))
    assert result.status == "failed"


async def test_ignore_leaves_the_failed_branch_out() -> None:
    par = ParallelStep(
        "p",
        {"ok": writer("ok", b=1), "bad": broken("bad"), "also": writer("also", shared="s")},
        on_branch_failure=BranchFailureStrategy.IGNORE,
    )
    result = await run(par)
    assert result.status == "completed"
    assert result.output == {"ok": "ok(in)", "also": "also(in)"}
    assert (fields(result)["a"], fields(result)["b"], fields(result)["shared"]) == (0, 1, "s")
    children = result.step_history[0].step_history
    # The history lists branches by path (names in text order), as the stored history does.
    assert [(r.name, r.path, r.success) for r in children] == [
        ("also", (0, "also"), True),
        ("bad", (0, "bad"), False),
        ("ok", (0, "ok"), True),
    ]
    assert children[1].error is not None
    assert children[1].error.type == "LookupError"


async def test_max_concurrency_bounds_the_branches_in_flight() -> None:
    in_flight = 0
    peak = 0

    def tracked(name: str) -> Step[Any, Any]:
        async def go(data: Any) -> str:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.001)
            in_flight -= 1
            return name

        return Step.from_callable(go, name=name)

    names = [f"b{i}" for i in range(6)]
    par = ParallelStep("p", {n: tracked(n) for n in names}, max_concurrency=2)
    result = await run(par)
    assert list(result.output) == names
    assert peak == 2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"branches": {}},
        {"branches": [writer("a")]},
        {"branches": {"a": lambda x: x}},
        {"branches": {"a": writer("a")}, "merge_strategy": "overwrite"},
        {"branches": {"a": writer("a")}, "field_mapping": {"nope": ["a"]}},
        {"branches": {"a": writer("a")}, "on_branch_failure": "ignore"},
        {"branches": {"a": writer("a")}, "max_concurrency": 0},
        {"branches": {"a": writer("a")}, "max_concurrency": True},
    ],
)
def test_bad_arguments_raise_configuration_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ParallelStep(name="p", **kwargs)


# -- history and streaming -------------------------------------------------------------------------


async def test_history_has_one_record_per_branch_with_its_steps() -> None:
    two = writer("two_a") >> Step.from_callable(str.upper, name="two_b")
    par = ParallelStep("p", {"one": writer("one", 0.01), "two": two})
    result = await run(Step.from_callable(lambda x: x, name="first") >> par)
    assert result.output == {"one": "one(in)", "two": "TWO_A(IN)"}
    par_result = result.step_history[1]
    assert par_result.path is None
    assert [(r.name, r.path, r.output) for r in par_result.step_history] == [
        ("one", (1, "one"), "one(in)"),
        ("two", (1, "two"), "TWO_A(IN)"),
    ]
    assert [r.path for r in par_result.step_history[0].step_history] == [(1, "one", 0)]
    assert [r.path for r in par_result.step_history[1].step_history] == [
        (1, "two", 0),
        (1, "two", 1),
    ]


async def test_run_stream_yields_branch_results_before_the_parallel_step() -> None:
    par = ParallelStep("p", {"one": writer("one", 0.01), "two": writer("two")})
    runner = Flujo(par, context_model=Ctx, persist_state=False)
    items = [item async for item in runner.run_stream("in")]
    assert isinstance(items[-1], PipelineResult)
    assert all(isinstance(i, StepResult) for i in items[:-1])
    nested = [(r.name, r.path) for r in items[:-2]]
    assert sorted(nested, key=str) == sorted(
        [("one", (0, "one", 0)), ("one", (0, "one")), ("two", (0, "two", 0)), ("two", (0, "two"))],
        key=str,
    )
    assert nested.index(("two", (0, "two", 0))) < nested.index(("two", (0, "two")))
    assert (items[-2].name, items[-2].path) == ("p", None)


@pytest.mark.parametrize("delays", [(0.0, 0.01), (0.01, 0.0)], ids=["in_order", "reversed"])
async def test_stored_history_rebuilds_the_branch_records(
    store: Store, delays: tuple[float, float]
) -> None:
    """Re-read from the store, the branches are listed in declaration order, as live.

    (Steps inside a branch are not durable, so the stored tree stops at the branch records.)
    """
    par = ParallelStep("p", {"one": writer("one", delays[0]), "two": writer("two", delays[1])})
    live = await store.run(par, "in", context_model=Ctx)
    again = await store.run(par, "in", run_id=live.run_id, context_model=Ctx)
    assert again.output == live.output == {"one": "one(in)", "two": "two(in)"}

    def branches(result: PipelineResult[Any, Any]) -> list[Any]:
        return [(r.name, r.path, r.success, r.output) for r in result.step_history[0].step_history]

    assert branches(again) == branches(live)


# -- durability ------------------------------------------------------------------------------------


async def test_only_the_failed_branch_runs_again_and_the_merge_is_complete(store: Store) -> None:
    calls = Calls()
    state = {"fail": True}

    async def one(data: str, *, context: Ctx) -> str:
        calls.add("one")
        context.a = 1
        context.tags = {**context.tags, "one": 1}
        return "1"

    async def two(data: str, *, context: Ctx) -> str:
        calls.add("two")
        context.b = 2
        context.tags = {**context.tags, "two": 2}
        return "2"

    async def three(data: str, *, context: Ctx) -> str:
        calls.add("three")
        if state["fail"]:  # crash once one and two have been checkpointed
            await wait_for_records(store, context.run_id, (0, "one"), (0, "two"))
            raise RuntimeError("three crashed")
        context.shared = "three"
        context.tags = {**context.tags, "three": 3}
        return "3"

    par = ParallelStep(
        "p",
        {
            "one": Step.from_callable(one),
            "two": Step.from_callable(two),
            "three": Step.from_callable(three),
        },
        on_branch_failure=BranchFailureStrategy.PROPAGATE,
    )
    first = await store.run(par, "in", context_model=Ctx)
    assert first.status == "failed"
    assert first.error is not None
    assert first.error.message == "three crashed"
    stored = await store.load(first.run_id)
    finished = {tuple(r["path"]) for r in stored["step_history"] if r["success"]}
    assert finished == {(0, "one"), (0, "two")}

    state["fail"] = False
    calls.clear()
    resumed = await store.run(par, "in", run_id=first.run_id, context_model=Ctx)
    assert resumed.status == "completed"
    assert calls.log == ["three"]
    assert resumed.output == {"one": "1", "two": "2", "three": "3"}
    merged = fields(resumed)
    assert (merged["a"], merged["b"], merged["shared"]) == (1, 2, "three")
    assert merged["tags"] == {"one": 1, "two": 2, "three": 3}


async def test_an_unfinished_branch_runs_again_from_its_start(store: Store) -> None:
    calls = Calls()
    state = {"fail": True}

    def step_a(x: str) -> str:
        calls.add("a")
        return x + "a"

    def step_b(x: str) -> str:
        calls.add("b")
        if state["fail"]:
            raise RuntimeError("b down")
        return x + "b"

    branch = Step.from_callable(step_a, name="step_a") >> Step.from_callable(step_b, name="step_b")
    par = ParallelStep("p", {"solo": branch})
    first = await store.run(par, "x", context_model=Ctx)
    assert first.status == "failed"
    state["fail"] = False
    calls.clear()
    resumed = await store.run(par, "x", run_id=first.run_id, context_model=Ctx)
    assert resumed.output == {"solo": "xab"}
    assert calls.log == ["a", "b"]


# -- DynamicParallelRouterStep ---------------------------------------------------------------------


BRANCHES = {"a": writer("a", a=1), "b": writer("b", b=2), "c": writer("c", shared="c")}


async def test_router_callable_returning_one_name() -> None:
    router = DynamicParallelRouterStep("r", lambda data, ctx: "b", BRANCHES)
    result = await run(router)
    assert result.output == {"b": "b(in)"}
    assert (fields(result)["a"], fields(result)["b"]) == (0, 2)


async def test_async_router_returning_names_in_any_order() -> None:
    async def route(data: str, ctx: Ctx) -> list[str]:
        return ["c", "a"]

    result = await run(DynamicParallelRouterStep("r", route, BRANCHES))
    assert list(result.output) == ["a", "c"]
    assert (fields(result)["a"], fields(result)["shared"]) == (1, "c")


async def test_router_reads_the_input_and_the_context() -> None:
    def route(data: str, ctx: Ctx) -> list[str]:
        return [data, ctx.shared]

    result = await run(
        DynamicParallelRouterStep("r", route, BRANCHES),
        "a",
        initial_context_data={"shared": "b"},
    )
    assert result.output == {"a": "a(a)", "b": "b(a)"}


async def test_router_agent_with_and_without_context() -> None:
    class ContextAgent:
        async def run(self, data: str, *, context: Ctx) -> list[str]:
            return ["a", context.shared]

    class PlainAgent:
        async def run(self, data: str) -> str:
            return data

    result = await run(
        DynamicParallelRouterStep("r", ContextAgent(), BRANCHES),
        initial_context_data={"shared": "c"},
    )
    assert list(result.output) == ["a", "c"]
    result = await run(DynamicParallelRouterStep("r", PlainAgent(), BRANCHES), "b")
    assert list(result.output) == ["b"]


async def test_router_choosing_an_unknown_branch_fails_with_a_typed_error() -> None:
    result = await run(DynamicParallelRouterStep("r", lambda d, c: ["a", "zzz"], BRANCHES))
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "UnknownBranchError"
    assert "zzz" in result.error.message


async def test_router_choosing_nothing_runs_nothing() -> None:
    result = await run(DynamicParallelRouterStep("r", lambda d, c: [], BRANCHES))
    assert result.status == "completed"
    assert result.output == {}


async def test_router_options_are_those_of_a_parallel_step() -> None:
    router = DynamicParallelRouterStep(
        "r",
        lambda d, c: ["a", "bad"],
        {"a": writer("a", a=1), "bad": broken("bad")},
        on_branch_failure=BranchFailureStrategy.IGNORE,
        merge_strategy=MergeStrategy.NO_MERGE,
    )
    result = await run(router)
    assert result.output == {"a": "a(in)"}
    assert fields(result)["a"] == 0


@pytest.mark.parametrize("router", [None, 5, "a", object()])
def test_router_must_be_callable_or_an_agent(router: Any) -> None:
    with pytest.raises(ConfigurationError):
        DynamicParallelRouterStep("r", router, BRANCHES)


async def test_router_choice_is_recorded_and_kept_on_resume(store: Store) -> None:
    calls = Calls()
    state = {"choice": ["a", "b"], "fail": True}

    def route(data: Any, ctx: Any) -> list[str]:
        calls.add("router")
        return state["choice"]

    def branch(name: str) -> Step[Any, Any]:
        def go(data: str) -> str:
            calls.add(name)
            if name == "b" and state["fail"]:
                raise RuntimeError("b down")
            return name

        return Step.from_callable(go, name=name)

    router = DynamicParallelRouterStep("r", route, {n: branch(n) for n in "abc"})
    first = await store.run(router, "in", context_model=Ctx)
    assert first.status == "failed"
    assert sorted(calls.log) == ["a", "b", "router"]

    state.update(choice=["c"], fail=False)  # the router would now choose differently
    calls.clear()
    resumed = await store.run(router, "in", run_id=first.run_id, context_model=Ctx)
    assert resumed.status == "completed"
    assert resumed.output == {"a": "a", "b": "b"}
    assert calls.log == ["b"]
