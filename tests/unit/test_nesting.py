"""Step types inside one another: outputs, hierarchical history, and resuming deep inside."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flujo import (
    BranchFailureStrategy,
    CacheStep,
    ConditionalStep,
    Flujo,
    LoopStep,
    MapStep,
    ParallelStep,
    PipelineContext,
    PipelineResult,
    StateMachineStep,
    Step,
    StepResult,
    Transition,
)

from .steplib_helpers import (
    Calls,
    Store,
    flat_paths,
    shape,
    steps_only,
    stored_paths,
    wait_for_records,
)


class Ctx(PipelineContext):
    seen: list[int] = []
    n: int = 0
    notes: dict[str, Any] = {}


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return Store(request.param, tmp_path)


async def run(pipeline: Any, data: Any, **options: Any) -> PipelineResult[Any, Any]:
    options.setdefault("context_model", Ctx)
    return await Flujo(pipeline, persist_state=False, **options).run_async(data)


def map_in_loop_in_conditional(calls: Calls, fail: dict[str, Any]) -> ConditionalStep[Any, Any]:
    """cond -> "grow": loop { map(item + 1) } until max >= 5; "empty": a constant."""

    def bump(x: int, *, context: Ctx) -> int:
        calls.add(x)
        if fail.get("at") == x:
            fail.pop("at")
            raise RuntimeError(f"crash at {x}")
        context.seen.append(x)
        return x + 1

    def choose(data: list[int], ctx: Ctx) -> str:
        calls.add("condition")
        return fail.get("choice", "grow") if data else "empty"

    each = MapStep("each", Step.from_callable(bump, name="bump"))
    rounds = LoopStep("rounds", each, lambda out, ctx: max(out) >= 5, max_loops=10)
    empty = Step.from_callable(lambda x: [], name="empty")
    return ConditionalStep("route", choose, {"grow": rounds, "empty": empty})


# -- outputs and history ---------------------------------------------------------------------------


async def test_map_inside_loop_inside_conditional() -> None:
    calls = Calls()
    result = await run(map_in_loop_in_conditional(calls, {}), [1, 2, 3])
    assert result.status == "completed"
    assert result.output == [3, 4, 5]
    assert result.final_pipeline_context.seen == [1, 2, 3, 2, 3, 4]
    route = result.step_history[0]
    [loop] = steps_only(route.step_history)
    assert (loop.name, loop.path, loop.output) == ("rounds", (0, "grow", 0), [3, 4, 5])
    assert [(m.name, m.path) for m in steps_only(loop.step_history)] == [
        ("each", (0, "grow", 0, 0, 0)),
        ("each", (0, "grow", 0, 1, 0)),
    ]
    second_round = steps_only(loop.step_history)[1]
    assert [(r.path, r.output) for r in second_round.step_history] == [
        ((0, "grow", 0, 1, 0, i, 0), out) for i, out in enumerate([3, 4, 5])
    ]


async def test_parallel_inside_map() -> None:
    def count(x: str, *, context: Ctx) -> int:
        context.n += 1
        return context.n

    def note(x: str, *, context: Ctx) -> str:
        context.notes = {**context.notes, x: len(x)}
        return x.upper()

    per_item = ParallelStep(
        "both", {"count": Step.from_callable(count), "note": Step.from_callable(note)}
    )
    result = await run(MapStep("items", per_item), ["a", "bb", "ccc"])
    assert result.output == [
        {"count": 1, "note": "A"},
        {"count": 2, "note": "BB"},
        {"count": 3, "note": "CCC"},
    ]
    context = result.final_pipeline_context
    assert (context.n, context.notes) == (3, {"a": 1, "bb": 2, "ccc": 3})
    item_two = result.step_history[0].step_history[2]
    assert (item_two.name, item_two.path) == ("both", (0, 2, 0))
    assert [(r.name, r.path) for r in item_two.step_history] == [
        ("count", (0, 2, 0, "count")),
        ("note", (0, 2, 0, "note")),
    ]
    assert [r.path for r in item_two.step_history[0].step_history] == [(0, 2, 0, "count", 0)]


async def test_loop_inside_a_parallel_branch() -> None:
    inc = Step.from_callable(lambda x: x + 1, name="inc")
    par = ParallelStep(
        "p",
        {
            "to_ten": LoopStep("to_ten", inc, lambda out, ctx: out >= 10, max_loops=20),
            "double": Step.from_callable(lambda x: x * 2, name="double"),
        },
    )
    result = await run(par, 3)
    assert result.output == {"to_ten": 10, "double": 6}
    branch = next(r for r in result.step_history[0].step_history if r.name == "to_ten")
    loop = branch.step_history[0]
    assert loop.path == (0, "to_ten", 0)
    assert [r.path for r in loop.step_history] == [(0, "to_ten", 0, k, 0) for k in range(7)]


def machine_with_a_loop(calls: Calls, fail: dict[str, Any]) -> StateMachineStep[Any, Any]:
    """count: loop { +1 } until a multiple of 3, then -> count or done (at 9)."""

    def plus_one(x: int, *, context: Ctx) -> int:
        calls.add(x)
        if fail.get("at") == x:
            fail.pop("at")
            raise RuntimeError(f"crash at {x}")
        context.n += 1
        return x + 1

    climb = LoopStep(
        "climb", Step.from_callable(plus_one, name="plus_one"), lambda o, c: o % 3 == 0, 10
    )
    decide = Step.from_callable(
        lambda x: Transition("done" if x >= 9 else "count", x), name="decide"
    )
    done = Step.from_callable(lambda x: f"reached {x}", name="finish")
    return StateMachineStep("machine", {"count": climb >> decide, "done": done}, "count", ["done"])


async def test_state_machine_whose_state_contains_a_loop() -> None:
    calls = Calls()
    result = await run(machine_with_a_loop(calls, {}), 1)
    assert result.output == "reached 9"
    assert calls.log == [1, 2, 3, 4, 5, 6, 7, 8]
    assert result.final_pipeline_context.n == 8
    machine = result.step_history[0]
    assert [(r.name, r.path) for r in machine.step_history] == [
        ("climb", (0, 0, "count", 0)),
        ("decide", (0, 0, "count", 1)),
        ("climb", (0, 1, "count", 0)),
        ("decide", (0, 1, "count", 1)),
        ("climb", (0, 2, "count", 0)),
        ("decide", (0, 2, "count", 1)),
        ("finish", (0, 3, "done", 0)),
    ]
    assert [r.path for r in machine.step_history[2].step_history] == [
        (0, 1, "count", 0, k, 0) for k in range(3)
    ]


async def test_cached_step_inside_a_map_hits_for_an_equal_item() -> None:
    calls = Calls()

    def expensive(x: str) -> str:
        calls.add(x)
        return x * 2

    cached = CacheStep.cached(Step.from_callable(expensive, name="expensive"))
    result = await run(MapStep("m", cached), ["a", "b", "a", "c", "b"])
    assert result.output == ["aa", "bb", "aa", "cc", "bb"]
    assert calls.log == ["a", "b", "c"]
    children = result.step_history[0].step_history
    assert [(r.path, r.cache_hit) for r in children] == [
        ((0, 0, 0), False),
        ((0, 1, 0), False),
        ((0, 2, 0), True),
        ((0, 3, 0), False),
        ((0, 4, 0), True),
    ]


async def test_a_cached_composite_step() -> None:
    calls = Calls()
    body = Step.from_callable(lambda x: calls.add(x) or x + 1, name="body")
    cached = CacheStep.cached(LoopStep("loop", body, lambda o, c: o >= 3, 5))  # type: ignore[arg-type]
    first = await run(cached, 0)
    second = await run(cached, 0)
    assert first.output == second.output == 3
    assert calls.log == [0, 1, 2]
    assert second.step_history[0].cache_hit is True
    assert [r.path for r in first.step_history[0].step_history[0].step_history] == [
        (0, 0, k, 0) for k in range(3)
    ]


async def test_every_type_in_one_pipeline() -> None:
    """state machine -> conditional -> parallel -> map -> cached step, with a loop at the end."""
    calls = Calls()
    cached_len = CacheStep.cached(
        Step.from_callable(lambda s: calls.add(s) or len(s), name="length")
    )
    per_word = MapStep("per_word", cached_len, max_concurrency=4)
    analyse = ParallelStep(
        "analyse",
        {"lengths": per_word, "upper": Step.from_callable(lambda ws: [w.upper() for w in ws])},
    )
    route = ConditionalStep(
        "route",
        lambda words, ctx: "many" if len(words) > 2 else "few",
        {"many": analyse, "few": Step.from_callable(lambda ws: {"lengths": [], "upper": ws})},
    )
    to_end = Step.from_callable(lambda out: Transition("end", out), name="to_end")
    machine = StateMachineStep(
        "machine",
        {"start": route >> to_end, "end": Step.from_callable(lambda o: o["lengths"], name="end")},
        "start",
        ["end"],
    )
    total = LoopStep(
        "total",
        Step.from_callable(lambda xs: [sum(xs)], name="sum"),
        lambda out, ctx: len(out) == 1,
        max_loops=3,
    )
    result = await run(machine >> total, ["to", "be", "or", "not", "to", "be"])
    assert result.status == "completed"
    assert result.output == [13]
    assert calls.keys() == {"to", "be", "or", "not"}  # concurrent equal items may both miss
    paths = flat_paths(result.step_history)
    assert (0, 0, "start", 0, "many", 0, "lengths", 0, 4, 0) in paths
    assert (1, 0, 0) in paths


# -- the stored tree -------------------------------------------------------------------------------


async def test_stored_history_of_a_map_inside_a_loop_rebuilds_the_same_tree(store: Store) -> None:
    inc = Step.from_callable(lambda x: x + 1, name="inc")
    loop = LoopStep("rounds", MapStep("each", inc), lambda out, ctx: out[0] >= 3, 5)
    live = await store.run(loop, [0, 10])
    again = await store.run(loop, [0, 10], run_id=live.run_id)
    assert again.output == [3, 13]
    assert shape(again.step_history) == shape(live.step_history)


async def test_stored_history_of_a_loop_inside_a_state_machine(store: Store) -> None:
    machine = machine_with_a_loop(Calls(), {})
    live = await store.run(machine, 1, context_model=Ctx)
    again = await store.run(machine, 1, run_id=live.run_id, context_model=Ctx)
    assert again.output == "reached 9"
    assert shape(again.step_history) == shape(live.step_history)


async def test_stored_history_of_a_conditional_inside_a_loop(store: Store) -> None:
    """The decision record goes under its conditional, as in the live result."""
    parity = ConditionalStep(
        "parity",
        lambda x, ctx: x % 2,
        {
            0: Step.from_callable(lambda x: x + 1, name="odd_it"),
            1: Step.from_callable(lambda x: x + 3, name="even_it"),
        },
    )
    loop = LoopStep("l", parity, lambda out, ctx: out >= 6, 10)
    live = await store.run(loop, 0)
    assert live.output == 8  # 0 -> 1 -> 4 -> 5 -> 8
    again = await store.run(loop, 0, run_id=live.run_id)
    assert shape(again.step_history) == shape(live.step_history)


# -- durability ------------------------------------------------------------------------------------


async def test_resume_deep_inside_map_in_loop_in_conditional(store: Store) -> None:
    calls = Calls()
    fail: dict[str, Any] = {"at": 4}
    route = map_in_loop_in_conditional(calls, fail)
    first = await store.run(route, [1, 2, 3], context_model=Ctx)
    assert first.status == "failed"
    assert first.error is not None
    assert first.error.message == "crash at 4"
    assert calls.log == ["condition", 1, 2, 3, 2, 3, 4]
    state = await store.load(first.run_id)
    assert (0, "grow", 0, 1, 0, 1, 0) in stored_paths(state)

    calls.clear()
    fail["choice"] = "empty"  # the recorded decision must win
    resumed = await store.run(route, [1, 2, 3], run_id=first.run_id, context_model=Ctx)
    assert resumed.status == "completed"
    assert resumed.output == [3, 4, 5]
    assert calls.log == [4]
    assert resumed.final_pipeline_context.seen == [1, 2, 3, 2, 3, 4]


async def test_resume_a_parallel_step_inside_a_map_item(store: Store) -> None:
    calls = Calls()
    state = {"fail": True}

    def left(x: int) -> int:
        calls.add(("left", x))
        return x * 10

    async def right(x: int, *, context: Ctx) -> int:
        calls.add(("right", x))
        if state["fail"] and x == 2:  # crash once left of item 2 has been checkpointed
            await wait_for_records(store, context.run_id, (0, 2, 0, "left"))
            raise RuntimeError("right crashed on item 2")
        return -x

    per_item = ParallelStep(
        "pair",
        {"left": Step.from_callable(left, name="left"), "right": Step.from_callable(right)},
        on_branch_failure=BranchFailureStrategy.PROPAGATE,
    )
    mapped = MapStep("items", per_item)
    first = await store.run(mapped, [0, 1, 2, 3], context_model=Ctx)
    assert first.status == "failed"
    state["fail"] = False
    calls.clear()
    resumed = await store.run(mapped, [0, 1, 2, 3], run_id=first.run_id, context_model=Ctx)
    assert resumed.output == [{"left": x * 10, "right": -x} for x in range(4)]
    assert sorted(calls.log) == [("left", 3), ("right", 2), ("right", 3)]


async def test_resume_a_loop_inside_a_state_machine(store: Store) -> None:
    calls = Calls()
    fail: dict[str, Any] = {"at": 5}
    first = await store.run(machine_with_a_loop(calls, fail), 1, context_model=Ctx)
    assert first.status == "failed"
    assert calls.log == [1, 2, 3, 4, 5]
    calls.clear()
    resumed = await store.run(
        machine_with_a_loop(calls, fail), 1, run_id=first.run_id, context_model=Ctx
    )
    assert resumed.status == "completed"
    assert resumed.output == "reached 9"
    assert calls.log == [5, 6, 7, 8]
    assert resumed.final_pipeline_context.n == 8


async def test_resume_a_map_of_cached_steps(store: Store) -> None:
    calls = Calls()
    state = {"fail": True}

    def work(x: str) -> str:
        calls.add(x)
        if state["fail"] and x == "c":
            raise RuntimeError("c crashed")
        return x.upper()

    mapped = MapStep("m", CacheStep.cached(Step.from_callable(work, name="work")))
    items = ["a", "b", "a", "c", "b"]
    first = await store.run(mapped, items)
    assert first.status == "failed"
    assert calls.log == ["a", "b", "c"]
    state["fail"] = False
    calls.clear()
    resumed = await store.run(mapped, items, run_id=first.run_id)
    assert resumed.output == ["A", "B", "A", "C", "B"]
    assert calls.log == ["c"]
    item_results: list[StepResult] = resumed.step_history[-1].step_history
    assert [r.cache_hit for r in item_results if r.path == (0, 4, 0)] == [True]


async def test_run_stream_yields_the_nested_results_the_history_shows() -> None:
    """Each nested result the history holds is streamed once, before its composite's own
    result, and nothing else is (no bookkeeping records such as a branch decision)."""
    inc = Step.from_callable(lambda x: x + 1, name="inc")
    pipeline = (
        LoopStep("loop", inc, lambda out, ctx: out >= 2, 5)
        >> ConditionalStep("cond", lambda d, c: "a", {"a": inc})
        >> ParallelStep("par", {"a": inc, "b": inc})
        >> Step.from_callable(lambda d: [d["a"], d["b"]], name="pair")
        >> MapStep("map", inc)
        >> StateMachineStep(
            "sm",
            {
                "s": Step.from_callable(lambda x: Transition("e", x), name="go"),
                "e": Step.from_callable(list, name="end"),
            },
            "s",
            ["e"],
        )
    )
    runner = Flujo(pipeline, context_model=Ctx, persist_state=False)
    items = [item async for item in runner.run_stream(0)]
    final = items[-1]
    assert isinstance(final, PipelineResult)
    assert final.output == [5, 5]

    def nested(results: list[StepResult]) -> list[tuple[str, Any]]:
        found = []
        for r in results:
            found.extend(nested(r.step_history))
            found.extend((c.name, c.path) for c in r.step_history)
        return found

    streamed = [(i.name, i.path) for i in items[:-1] if i.path is not None]
    assert sorted(streamed, key=repr) == sorted(nested(final.step_history), key=repr)
    first_seen: dict[tuple[str, Any], int] = {}
    for k, item in enumerate(items[:-1]):
        first_seen.setdefault((item.name, item.path), k)
    for top in final.step_history:  # nested results come before their composite's own
        position = next(k for k, item in enumerate(items) if item is top)
        assert all(first_seen[name_path] < position for name_path in nested([top]))
