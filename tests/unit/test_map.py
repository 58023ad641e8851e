"""MapStep: run an item pipeline over each item of a list; outputs in input order."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from flujo import Flujo, MapStep, PipelineContext, PipelineResult, Step, StepResult, step
from flujo.exceptions import ConfigurationError

from .steplib_helpers import Calls, Store, shape, stored_paths


class Ctx(PipelineContext):
    seen: list[int] = []
    factor: int = 1


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return Store(request.param, tmp_path)


square = Step.from_callable(lambda x: x * x, name="square")


async def run(pipeline: Any, data: Any, **options: Any) -> PipelineResult[Any, Any]:
    return await Flujo(pipeline, persist_state=False, **options).run_async(data)


# -- mapping ---------------------------------------------------------------------------------------


async def test_sync_item_step() -> None:
    result = await run(MapStep("squares", square), [1, 2, 3])
    assert result.status == "completed"
    assert result.output == [1, 4, 9]


async def test_async_item_pipeline_of_several_steps() -> None:
    @step
    async def add_one(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    result = await run(MapStep("m", add_one >> square, max_concurrency=2), [0, 1, 2, 3])
    assert result.output == [1, 4, 9, 16]


@pytest.mark.parametrize("items", [(), [], (1, 2), range(3)])
async def test_any_sequence_of_items(items: Any) -> None:
    result = await run(MapStep("m", square), items)
    assert result.output == [x * x for x in items]


@pytest.mark.parametrize("max_concurrency", [1, 8])
async def test_outputs_in_input_order_even_when_items_finish_out_of_order(
    max_concurrency: int,
) -> None:
    finished: list[int] = []
    delays = [0.03, 0.0, 0.02, 0.0, 0.01, 0.025, 0.0, 0.015, 0.005, 0.0]

    @step
    async def slow(i: int) -> str:
        await asyncio.sleep(delays[i])
        finished.append(i)
        return f"item-{i}"

    result = await run(MapStep("m", slow, max_concurrency=max_concurrency), list(range(10)))
    assert result.output == [f"item-{i}" for i in range(10)]
    assert sorted(finished) == list(range(10))
    if max_concurrency > 1:
        assert finished != sorted(finished)  # they really did finish out of order
    item_results = result.step_history[0].step_history
    assert [r.path for r in item_results] == [(0, i, 0) for i in range(10)]
    assert [r.output for r in item_results] == result.output


async def test_max_concurrency_bounds_the_items_in_flight() -> None:
    in_flight = 0
    peak = 0

    @step
    async def track(x: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        return x

    result = await run(MapStep("m", track, max_concurrency=3), list(range(12)))
    assert result.output == list(range(12))
    assert peak == 3


async def test_items_can_read_and_write_the_context() -> None:
    def scale(x: int, *, context: Ctx) -> int:
        context.seen.append(x)
        return x * context.factor

    result = await run(
        MapStep("m", Step.from_callable(scale, name="scale")),
        [1, 2, 3],
        context_model=Ctx,
        initial_context_data={"factor": 10},
    )
    assert result.output == [10, 20, 30]
    assert result.final_pipeline_context.seen == [1, 2, 3]


@pytest.mark.parametrize("data", ["abc", b"abc", {"a": 1}, 5, None])
async def test_input_that_is_not_a_list_fails_the_step(data: Any) -> None:
    result = await run(MapStep("m", square), data)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "TypeError"
    assert result.failed_step == "m"


@pytest.mark.parametrize("max_concurrency", [1, 4])
async def test_a_failing_item_fails_the_map_with_its_error(max_concurrency: int) -> None:
    def check(x: int) -> int:
        if x == 5:
            raise ValueError("five is bad")
        return x

    after = Calls()
    pipeline = MapStep(
        "m", Step.from_callable(check, name="check"), max_concurrency=max_concurrency
    ) >> Step.from_callable(after.add, name="after")
    result = await run(pipeline, list(range(10)))
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "ValueError"
    assert result.error.message == "five is bad"
    assert result.failed_step == "m"
    assert after.log == []
    failed = [r for r in result.step_history[0].step_history if not r.success]
    assert [r.path for r in failed] == [(0, 5, 0)]


@pytest.mark.parametrize("max_concurrency", [0, -2, True, 1.5, "4", None])
def test_bad_max_concurrency(max_concurrency: Any) -> None:
    with pytest.raises(ConfigurationError):
        MapStep("m", square, max_concurrency=max_concurrency)


@pytest.mark.parametrize("item_pipeline", [lambda x: x, None, [square]])
def test_bad_item_pipeline(item_pipeline: Any) -> None:
    with pytest.raises(ConfigurationError):
        MapStep("m", item_pipeline)


# -- history and streaming -------------------------------------------------------------------------


async def test_history_is_per_item_with_paths() -> None:
    pipeline = Step.from_callable(lambda x: x, name="first") >> MapStep(
        "m", square >> Step.from_callable(str, name="text")
    )
    result = await run(pipeline, [2, 3])
    assert result.output == ["4", "9"]
    map_result = result.step_history[1]
    assert map_result.path is None
    assert [(r.name, r.path, r.output) for r in map_result.step_history] == [
        ("square", (1, 0, 0), 4),
        ("text", (1, 0, 1), "4"),
        ("square", (1, 1, 0), 9),
        ("text", (1, 1, 1), "9"),
    ]


async def test_run_stream_yields_each_item_before_the_map() -> None:
    runner = Flujo(MapStep("m", square, max_concurrency=1), persist_state=False)
    items = [item async for item in runner.run_stream([1, 2, 3])]
    assert isinstance(items[-1], PipelineResult)
    assert all(isinstance(i, StepResult) for i in items[:-1])
    assert [(r.name, r.path, r.output) for r in items[:-1]] == [
        ("square", (0, 0, 0), 1),
        ("square", (0, 1, 0), 4),
        ("square", (0, 2, 0), 9),
        ("m", None, [1, 4, 9]),
    ]


async def test_run_stream_with_concurrency_yields_every_item_first() -> None:
    @step
    async def slow(i: int) -> int:
        await asyncio.sleep(0.001 * (5 - i))
        return i

    runner = Flujo(MapStep("m", slow, max_concurrency=5), persist_state=False)
    items = [item async for item in runner.run_stream(list(range(5)))]
    nested = items[:-2]
    assert sorted(r.path for r in nested) == [(0, i, 0) for i in range(5)]
    assert items[-2].path is None
    assert items[-2].output == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("max_concurrency", [1, 2])
async def test_stored_history_rebuilds_the_same_tree(store: Store, max_concurrency: int) -> None:
    """Re-read from the store, the map's children are in input order, as in the live result."""
    text = Step.from_callable(str, name="text")
    pipeline = MapStep("m", square >> text, max_concurrency=max_concurrency)
    live = await store.run(pipeline, [1, 2, 3])
    again = await store.run(pipeline, [1, 2, 3], run_id=live.run_id)
    assert again.output == ["1", "4", "9"]
    assert shape(again.step_history) == shape(live.step_history)


# -- durability ------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_concurrency", [1, 8])
async def test_map_failing_at_item_700_re_runs_no_recorded_item(
    store: Store, max_concurrency: int
) -> None:
    calls = Calls()
    state = {"fail": True}

    @step
    async def work(i: int) -> int:
        calls.add(i)
        if i % 3 == 0:
            await asyncio.sleep(0)  # let items finish out of order
        if state["fail"] and i == 700:
            raise RuntimeError("crash at item 700")
        return i * 2

    items = list(range(1000))
    mapped = MapStep("m", work, max_concurrency=max_concurrency)
    first = await store.run(mapped, items)
    assert first.status == "failed"
    assert first.error is not None
    assert first.error.message == "crash at item 700"
    stored = await store.load(first.run_id)
    recorded = {path[1] for path in stored_paths(stored)}
    assert 700 not in recorded
    if max_concurrency == 1:
        assert recorded == set(range(700))
        assert calls.keys() == set(range(701))

    state["fail"] = False
    calls.clear()
    resumed = await store.run(mapped, items, run_id=first.run_id)
    assert resumed.status == "completed"
    assert resumed.output == [i * 2 for i in items]
    assert calls.keys() & recorded == set()
    assert calls.keys() == set(items) - recorded
    assert len(calls.log) == len(calls.keys())


async def test_resume_inside_an_item_skips_its_finished_steps(store: Store) -> None:
    calls = Calls()
    state = {"fail": True}

    def fetch(i: int) -> int:
        calls.add(("fetch", i))
        return i * 10

    def save(x: int) -> int:
        calls.add(("save", x))
        if state["fail"] and x == 20:
            raise RuntimeError("save is down")
        return x + 1

    mapped = MapStep("m", Step.from_callable(fetch, name="fetch") >> Step.from_callable(save))
    first = await store.run(mapped, [0, 1, 2, 3])
    assert first.status == "failed"
    state["fail"] = False
    calls.clear()
    resumed = await store.run(mapped, [0, 1, 2, 3], run_id=first.run_id)
    assert resumed.output == [1, 11, 21, 31]
    assert calls.log == [("save", 20), ("fetch", 3), ("save", 30)]


async def test_typed_item_outputs_come_back_typed_after_resume(store: Store) -> None:
    """Recorded outputs are validated into the item step's declared output type."""
    state = {"fail": True}

    def pair(i: int) -> tuple[int, int]:
        if state["fail"] and i == 2:
            raise RuntimeError("down")
        return (i, i * i)

    mapped = MapStep("m", Step.from_callable(pair, name="pair"))
    first = await store.run(mapped, [0, 1, 2])
    assert first.status == "failed"
    state["fail"] = False
    resumed = await store.run(mapped, [0, 1, 2], run_id=first.run_id)
    assert resumed.output == [(0, 0), (1, 1), (2, 4)]


async def test_resume_a_map_that_is_not_the_first_step(store: Store) -> None:
    calls = Calls()
    state = {"fail": True}

    def work(i: int) -> int:
        calls.add(i)
        if state["fail"] and i == 13:
            raise RuntimeError("13 is unlucky")
        return -i

    pipeline = (
        Step.from_callable(lambda n: list(range(10, 10 + n)), name="make")
        >> MapStep("m", Step.from_callable(work, name="work"), max_concurrency=2)
        >> Step.from_callable(sum, name="total")
    )
    first = await store.run(pipeline, 5)
    assert first.status == "failed"
    assert first.failed_step == "m"
    state["fail"] = False
    recorded = {path[1] for path in stored_paths(await store.load(first.run_id))}
    assert 3 not in recorded
    calls.clear()
    resumed = await store.run(pipeline, 5, run_id=first.run_id)
    assert resumed.output == -60
    assert calls.keys() == {10 + i for i in range(5)} - {10 + i for i in recorded}
    assert [r.name for r in resumed.step_history if r.success] == ["make", "m", "total"]
