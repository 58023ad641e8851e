"""LoopStep: repeat a body pipeline until ``exit_condition_callable(output, context)`` holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flujo import (
    Flujo,
    LoopStep,
    PipelineContext,
    PipelineResult,
    Step,
    StepConfig,
    StepResult,
    step,
)
from flujo.exceptions import ConfigurationError
from flujo.state import InMemoryBackend

from .steplib_helpers import Calls, Store, flat_paths, shape, steps_only, stored_paths


class Ctx(PipelineContext):
    count: int = 0
    log: list[int] = []
    score: int = 0


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return Store(request.param, tmp_path)


inc = Step.from_callable(lambda x: x + 1, name="inc")


async def run(pipeline: Any, data: Any, **options: Any) -> PipelineResult[Any, Any]:
    return await Flujo(pipeline, persist_state=False, **options).run_async(data)


# -- iterating -------------------------------------------------------------------------------------


async def test_each_output_feeds_the_next_iteration_and_the_last_is_the_output() -> None:
    loop = LoopStep("count", inc, lambda out, ctx: out >= 3, max_loops=10)
    result = await run(loop, 0)
    assert result.status == "completed"
    assert result.output == 3
    assert len(result.step_history[0].step_history) == 3


async def test_async_body_and_async_exit_condition() -> None:
    @step
    async def double(x: int) -> int:
        return x * 2

    async def big_enough(out: int, ctx: Any) -> bool:
        return out > 20

    loop = LoopStep("grow", double >> inc, big_enough, max_loops=10)
    result = await run(loop, 1)
    assert result.output == 31  # 1 -> 3 -> 7 -> 15 -> 31


async def test_exit_condition_is_checked_after_the_first_iteration() -> None:
    calls = Calls()
    body = Step.from_callable(lambda x: calls.add(x) or x, name="body")
    result = await run(LoopStep("once", body, lambda out, ctx: True, max_loops=5), "v")
    assert result.output == "v"
    assert calls.log == ["v"]


async def test_exit_condition_sees_the_context() -> None:
    def bump(x: int, *, context: Ctx) -> int:
        context.count += 1
        context.log.append(x)
        return x * 10

    loop = LoopStep(
        "bump", Step.from_callable(bump, name="bump"), lambda out, ctx: ctx.count == 3, 10
    )
    result = await run(loop, 1, context_model=Ctx)
    assert result.output == 1000
    assert result.final_pipeline_context.count == 3
    assert result.final_pipeline_context.log == [1, 10, 100]


async def test_mappers_shape_the_inputs_and_the_output() -> None:
    seen: list[tuple[str, Any]] = []

    def first_input(data: str, ctx: Ctx) -> int:
        seen.append(("initial", data))
        return len(data)

    async def next_input(out: int, ctx: Ctx, iteration: int) -> int:
        seen.append(("next", (out, iteration)))
        return out + 100

    def final(out: int, ctx: Ctx) -> dict[str, int]:
        seen.append(("final", out))
        return {"value": out, "count": ctx.count}

    def body(x: int, *, context: Ctx) -> int:
        context.count += 1
        return x + 1

    loop = LoopStep(
        "mapped",
        Step.from_callable(body, name="body"),
        lambda out, ctx: out > 200,
        max_loops=5,
        initial_input_to_loop_body_mapper=first_input,
        iteration_input_mapper=next_input,
        loop_output_mapper=final,
    )
    result = await run(loop, "abc", context_model=Ctx)
    assert result.output == {"value": 206, "count": 3}  # 3 -> 4, 104 -> 105, 205 -> 206
    assert seen == [
        ("initial", "abc"),
        ("next", (4, 0)),
        ("next", (105, 1)),
        ("final", 206),
    ]


async def test_max_loops_reached_is_a_failure_stated_in_the_result() -> None:
    calls = Calls()
    after = Step.from_callable(lambda x: calls.add("after"), name="after")
    loop = LoopStep("forever", inc, lambda out, ctx: False, max_loops=4)
    result = await run(loop >> after, 0)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "IterationLimitError"
    assert "4" in result.error.message
    assert result.failed_step == "forever"
    assert result.output is None
    assert calls.log == []
    loop_result = result.step_history[0]
    assert not loop_result.success
    assert [r.path for r in loop_result.step_history] == [(0, k, 0) for k in range(4)]


async def test_failing_body_step_fails_the_loop_with_its_error() -> None:
    def boom(x: int) -> int:
        if x == 2:
            raise ZeroDivisionError("no")
        return x + 1

    loop = LoopStep("l", Step.from_callable(boom, name="boom"), lambda out, ctx: False, 10)
    result = await run(loop, 0)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "ZeroDivisionError"
    assert result.failed_step == "l"


# -- constructor checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("max_loops", [0, -1, True, 2.5, "3", None])
def test_bad_max_loops(max_loops: Any) -> None:
    with pytest.raises(ConfigurationError):
        LoopStep("l", inc, lambda out, ctx: True, max_loops=max_loops)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"loop_body_pipeline": lambda x: x, "exit_condition_callable": lambda o, c: True},
        {"loop_body_pipeline": inc, "exit_condition_callable": None},
        {
            "loop_body_pipeline": inc,
            "exit_condition_callable": lambda o, c: True,
            "iteration_input_mapper": 3,
        },
        {
            "loop_body_pipeline": inc,
            "exit_condition_callable": lambda o, c: True,
            "initial_input_to_loop_body_mapper": "x",
        },
        {
            "loop_body_pipeline": inc,
            "exit_condition_callable": lambda o, c: True,
            "loop_output_mapper": object(),
        },
    ],
)
def test_bad_arguments_raise_configuration_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        LoopStep(name="l", **kwargs)


# -- history and streaming -------------------------------------------------------------------------


async def test_history_is_per_iteration_with_paths() -> None:
    double = Step.from_callable(lambda x: x * 2, name="double")
    pipeline = Step.from_callable(lambda x: x, name="first") >> LoopStep(
        "l", double >> inc, lambda out, ctx: out > 10, max_loops=10
    )
    result = await run(pipeline, 1)
    assert result.output == 15  # 1 -> 3 -> 7 -> 15
    loop_result = result.step_history[1]
    assert loop_result.path is None
    assert [(r.name, r.path, r.output) for r in loop_result.step_history] == [
        ("double", (1, 0, 0), 2),
        ("inc", (1, 0, 1), 3),
        ("double", (1, 1, 0), 6),
        ("inc", (1, 1, 1), 7),
        ("double", (1, 2, 0), 14),
        ("inc", (1, 2, 1), 15),
    ]


async def test_run_stream_yields_each_iteration_before_the_loop() -> None:
    runner = Flujo(LoopStep("l", inc, lambda out, ctx: out >= 3, 5), persist_state=False)
    items = [item async for item in runner.run_stream(0)]
    assert isinstance(items[-1], PipelineResult)
    assert items[-1].output == 3
    streamed = items[:-1]
    assert all(isinstance(i, StepResult) for i in streamed)
    assert all(i.path is not None for i in streamed[:-1])
    assert [(r.name, r.path, r.output) for r in steps_only(streamed)] == [
        ("inc", (0, 0, 0), 1),
        ("inc", (0, 1, 0), 2),
        ("inc", (0, 2, 0), 3),
        ("l", None, 3),
    ]


async def test_stored_history_rebuilds_the_same_tree(store: Store) -> None:
    pipeline = Step.from_callable(lambda x: x, name="first") >> LoopStep(
        "l", inc >> Step.from_callable(lambda x: x, name="same"), lambda o, c: o >= 3, 5
    )
    live = await store.run(pipeline, 0)
    again = await store.run(pipeline, 0, run_id=live.run_id)
    assert again.status == "completed"
    assert again.output == 3
    assert shape(again.step_history) == shape(live.step_history)
    state = await store.load(live.run_id)
    assert stored_paths(state) == [(1, k, j) for k in range(3) for j in range(2)]


# -- durability ------------------------------------------------------------------------------------


def crashing_counter(calls: Calls, fail_in: dict[str, int | None]) -> Step[int, int]:
    """A body step that counts in the context and fails once in iteration ``fail_in["at"]``."""

    def body(x: int, *, context: Ctx) -> int:
        iteration = context.count
        calls.add((iteration, context.count, tuple(context.log)))
        if fail_in["at"] == iteration:
            fail_in["at"] = None
            raise RuntimeError(f"crash in iteration {iteration}")
        context.count += 1
        context.log.append(x)
        return x + 1

    return Step.from_callable(body, name="body")


async def test_loop_failing_in_iteration_7_resumes_there(store: Store) -> None:
    calls = Calls()
    fail_in: dict[str, int | None] = {"at": 7}
    loop = LoopStep("ten", crashing_counter(calls, fail_in), lambda o, c: c.count == 10, 20)

    first = await store.run(loop, 100, context_model=Ctx)
    assert first.status == "failed"
    assert first.error is not None
    assert first.error.type == "RuntimeError"
    assert [c[0] for c in calls.log] == list(range(8))
    state = await store.load(first.run_id)
    assert state["status"] == "failed"
    assert state["pipeline_context"]["count"] == 7
    assert stored_paths(state) == [(0, k, 0) for k in range(7)]

    calls.clear()
    resumed = await store.run(loop, 100, run_id=first.run_id, context_model=Ctx)
    assert resumed.status == "completed"
    assert resumed.output == 110
    # Iterations 0-6 did not run again; iteration 7 saw the context as after iteration 6.
    assert calls.log[0] == (7, 7, tuple(range(100, 107)))
    assert [c[0] for c in calls.log] == [7, 8, 9]
    context = resumed.final_pipeline_context
    assert context.count == 10
    assert context.log == list(range(100, 110))


async def test_resume_inside_an_iteration_skips_its_finished_steps(store: Store) -> None:
    calls = Calls()
    state = {"fail": True}

    def prepare(x: int, *, context: Ctx) -> int:
        calls.add(("prepare", x))
        context.log.append(x)
        return x + 1

    def finish(x: int) -> int:
        calls.add(("finish", x))
        if state["fail"] and x == 7:
            raise RuntimeError("finish is down")
        return x

    body = Step.from_callable(prepare, name="prepare") >> Step.from_callable(finish, name="finish")
    loop = LoopStep("l", body, lambda out, ctx: out >= 9, 20)
    first = await store.run(loop, 0, context_model=Ctx)
    assert first.status == "failed"
    assert calls.count(("prepare", 6)) == 1

    state["fail"] = False
    calls.clear()
    resumed = await store.run(loop, 0, run_id=first.run_id, context_model=Ctx)
    assert resumed.status == "completed"
    assert resumed.output == 9
    assert calls.log == [
        ("finish", 7),
        ("prepare", 7),
        ("finish", 8),
        ("prepare", 8),
        ("finish", 9),
    ]
    assert resumed.final_pipeline_context.log == list(range(9))


async def test_resumed_loop_keeps_its_exit_decisions(store: Store) -> None:
    """A crash between two body steps must not make an earlier iteration look like the last.

    The first body step of iteration 7 was checkpointed with a context that satisfies the exit
    condition; on resume, the finished iterations 0-6 must not be re-judged against it.
    """
    state = {"fail": False}

    def score(x: int, *, context: Ctx) -> int:
        context.score = x + 1
        return x + 1

    def revise(x: int) -> int:
        if state["fail"] and x == 8:
            raise RuntimeError("revise is down")
        return x

    body = Step.from_callable(score, name="score") >> Step.from_callable(revise, name="revise")
    loop = LoopStep("l", body, lambda out, ctx: ctx.score >= 8, max_loops=20)
    uninterrupted = await run(loop, 0, context_model=Ctx)
    assert uninterrupted.output == 8

    state["fail"] = True
    first = await store.run(loop, 0, context_model=Ctx)
    assert first.status == "failed"
    state["fail"] = False
    resumed = await store.run(loop, 0, run_id=first.run_id, context_model=Ctx)
    assert resumed.status == "completed"
    assert resumed.output == uninterrupted.output


async def test_resumed_history_lists_every_body_step_of_every_iteration(store: Store) -> None:
    """After a resume the loop's history still holds every step of the finished iterations."""
    state = {"fail": True}

    def check(x: int) -> int:
        if state["fail"] and x == 3:
            raise RuntimeError("check is down")
        return x

    body = inc >> Step.from_callable(check, name="check")
    loop = LoopStep("l", body, lambda out, ctx: out >= 5, 10)
    first = await store.run(loop, 0)
    assert first.status == "failed"
    state["fail"] = False
    resumed = await store.run(loop, 0, run_id=first.run_id)
    assert resumed.output == 5
    final = resumed.step_history[-1]
    assert final.success
    expected = [(0, k, j) for k in range(5) for j in range(2)]
    assert [r.path for r in final.step_history if r.success] == expected


async def test_a_completed_loop_is_read_back_not_run(store: Store) -> None:
    calls = Calls()
    body = Step.from_callable(lambda x: calls.add(x) or x + 1, name="body")
    loop = LoopStep("l", body, lambda o, c: o >= 3, 5)
    live = await store.run(loop, 0)
    again = await store.run(loop, 0, run_id=live.run_id)
    assert again.output == 3
    assert calls.log == [0, 1, 2]
    assert flat_paths(again.step_history) == flat_paths(live.step_history)


async def test_a_loop_resumed_twice(store: Store) -> None:
    calls = Calls()
    fail_in: dict[str, int | None] = {"at": 3}
    loop = LoopStep("ten", crashing_counter(calls, fail_in), lambda o, c: c.count == 10, 20)
    pipeline = Step.from_callable(lambda x: x * 100, name="scale") >> loop
    first = await store.run(pipeline, 1, context_model=Ctx)
    assert first.status == "failed"
    fail_in["at"] = 6
    second = await store.run(pipeline, 1, run_id=first.run_id, context_model=Ctx)
    assert second.status == "failed"
    calls.clear()
    third = await store.run(pipeline, 1, run_id=first.run_id, context_model=Ctx)
    assert third.status == "completed"
    assert third.output == 110
    assert [c[0] for c in calls.log] == [6, 7, 8, 9]
    assert third.final_pipeline_context.log == list(range(100, 110))


def once_failing_counter(calls: Calls, state: dict[str, bool]) -> Step[int, int]:
    """A body step that changes the context, then fails (once) in the iteration with input 2."""

    def body(x: int, *, context: Ctx) -> int:
        calls.add(x)
        context.count += 1
        if state["fail"] and x == 2:
            state["fail"] = False
            raise RuntimeError("once")
        return x + 1

    return Step.from_callable(body, name="body")


async def test_a_retried_loop_continues_where_it_failed() -> None:
    calls = Calls()
    loop = LoopStep(
        "l",
        once_failing_counter(calls, {"fail": True}),
        lambda out, ctx: out >= 5,
        max_loops=10,
        config=StepConfig(retries=1, backoff_s=0),
    )
    result = await run(loop, 0, context_model=Ctx)
    assert result.status == "completed"
    assert result.output == 5
    assert result.step_history[0].attempts == 2
    assert calls.log == [0, 1, 2, 2, 3, 4]


@pytest.mark.parametrize("persist", [False, True])
async def test_a_retried_loop_drops_the_failed_attempts_context_changes(persist: bool) -> None:
    """The failed attempt's half-done change (count += 1 before raising) must not stay, as it
    does not stay when a failed run is resumed. Without a store there is no recorded context to
    go back to: the change stays (documented in docs/steps/index.md)."""
    loop = LoopStep(
        "l",
        once_failing_counter(Calls(), {"fail": True}),
        lambda out, ctx: out >= 5,
        max_loops=10,
        config=StepConfig(retries=1, backoff_s=0),
    )
    options: dict[str, Any] = (
        {"state_backend": InMemoryBackend()} if persist else {"persist_state": False}
    )
    result = await Flujo(loop, context_model=Ctx, **options).run_async(0)
    assert result.output == 5
    # five iterations that succeeded (+1 from the failed attempt when nothing is recorded)
    assert result.final_pipeline_context.count == (5 if persist else 6)
