"""Resuming runs by run_id. Each call uses a fresh Flujo and a fresh SQLiteBackend on the same
file, as a new process would."""

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from flujo import (
    Flujo,
    PausedException,
    Pipeline,
    PipelineAbortSignal,
    PipelineContext,
    PipelineRegistry,
    PipelineResult,
    PreRun,
    Step,
    step,
)
from flujo.exceptions import PipelineMismatchError
from flujo.state import SQLiteBackend


class Counter(PipelineContext):
    total: int = 0
    seen: list[str] = []


class Point(BaseModel):
    x: int
    y: int


class Crash(BaseException):
    """Stands in for the process dying in the middle of a step."""


class World:
    """Call counts and failure switches shared by the steps of one test."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_at: str | None = None
        self.crash_at: str | None = None

    def visit(self, name: str, data: Any) -> None:
        self.calls.append((name, data))
        if self.crash_at == name:
            raise Crash(name)
        if self.fail_at == name:
            raise RuntimeError(f"{name} is broken")


def make_steps(world: World) -> Pipeline[str, str]:
    @step
    async def first(x: str, *, context: Counter) -> str:
        world.visit("first", x)
        context.total += 1
        context.seen.append("first")
        return x + "1"

    @step
    async def second(x: str, *, context: Counter) -> str:
        world.visit("second", x)
        context.total += 10
        context.seen.append("second")
        return x + "2"

    @step
    async def third(x: str, *, context: Counter) -> str:
        world.visit("third", x)
        context.total += 100
        context.seen.append("third")
        return x + "3"

    return first >> second >> third


async def run_fresh(
    db: Path, pipeline: Any, data: Any, run_id: str | None = None, **kwargs: Any
) -> PipelineResult[Any, Any]:
    """One 'process': a new backend and runner, closed afterwards."""
    kwargs.setdefault("context_model", Counter)
    async with Flujo(pipeline, state_backend=SQLiteBackend(db), **kwargs) as runner:
        return await runner.run_async(data, run_id=run_id)


async def load(db: Path, run_id: str) -> dict[str, Any] | None:
    backend = SQLiteBackend(db)
    try:
        return await backend.load_state(run_id)
    finally:
        await backend.aclose()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "runs.db"


async def test_absent_run_id_starts_a_new_run_under_that_id(db: Path) -> None:
    world = World()
    result = await run_fresh(db, make_steps(world), "a", run_id="brand-new")
    assert result.run_id == "brand-new"
    assert result.status == "completed"
    assert result.output == "a123"
    state = await load(db, "brand-new")
    assert state is not None
    assert state["run_id"] == "brand-new"
    assert state["status"] == "completed"
    assert state["current_step_index"] == 3
    assert state["initial_input"] == "a"
    assert state["last_step_output"] == "a123"
    assert state["step_names"] == ["first", "second", "third"]


async def test_completed_run_returns_stored_result_and_runs_nothing(db: Path) -> None:
    world = World()
    pipeline = make_steps(world)
    first = await run_fresh(db, pipeline, "a", run_id="done")
    assert first.status == "completed"
    world.calls.clear()
    before = await load(db, "done")

    again = await run_fresh(db, pipeline, "different input", run_id="done")
    assert world.calls == []
    assert again.status == "completed"
    assert again.run_id == "done"
    assert again.output == "a123"
    assert [(r.name, r.output, r.success) for r in again.step_history] == [
        ("first", "a1", True),
        ("second", "a12", True),
        ("third", "a123", True),
    ]
    assert again.final_pipeline_context.total == 111
    assert again.final_pipeline_context.seen == ["first", "second", "third"]
    after = await load(db, "done")
    assert after == before


async def test_completed_run_output_is_restored_as_the_declared_type(db: Path) -> None:
    calls: list[int] = []

    @step
    async def make_point(x: int) -> Point:
        calls.append(x)
        return Point(x=x, y=x + 1)

    await run_fresh(db, make_point, 3, run_id="pt")
    again = await run_fresh(db, make_point, 3, run_id="pt")
    assert calls == [3]
    assert again.output == Point(x=3, y=4)


async def test_failed_run_resumes_from_the_failed_step(db: Path) -> None:
    world = World()
    pipeline = make_steps(world)
    world.fail_at = "second"
    failed = await run_fresh(db, pipeline, "a", run_id="fix-me")
    assert failed.status == "failed"
    assert failed.failed_step == "second"
    state = await load(db, "fix-me")
    assert state is not None
    assert state["status"] == "failed"
    assert state["current_step_index"] == 1
    assert state["pipeline_context"]["total"] == 1

    world.calls.clear()
    world.fail_at = None  # the cause is fixed
    resumed = await run_fresh(db, pipeline, "ignored input", run_id="fix-me")
    # first is not run again; second gets first's stored output.
    assert world.calls == [("second", "a1"), ("third", "a12")]
    assert resumed.status == "completed"
    assert resumed.output == "a123"
    ctx = resumed.final_pipeline_context
    assert isinstance(ctx, Counter)
    assert ctx.total == 111
    assert ctx.seen == ["first", "second", "third"]
    assert ctx.run_id == "fix-me"
    assert [(r.name, r.success) for r in resumed.step_history] == [
        ("first", True),
        ("second", False),
        ("second", True),
        ("third", True),
    ]
    state = await load(db, "fix-me")
    assert state is not None
    assert state["status"] == "completed"
    assert state["error"] is None
    assert len(state["step_history"]) == 4


async def test_failed_first_step_resumes_with_the_stored_initial_input(db: Path) -> None:
    world = World()
    pipeline = make_steps(world)
    world.fail_at = "first"
    await run_fresh(db, pipeline, "original", run_id="first-fails")
    world.fail_at = None
    world.calls.clear()
    resumed = await run_fresh(db, pipeline, "other", run_id="first-fails")
    assert world.calls[0] == ("first", "original")
    assert resumed.output == "original123"


async def test_resume_ignores_new_initial_context_data(db: Path) -> None:
    world = World()
    pipeline = make_steps(world)
    world.fail_at = "third"
    await run_fresh(db, pipeline, "a", run_id="ctx", initial_context_data={"total": 1000})
    world.fail_at = None
    resumed = await run_fresh(db, pipeline, "a", run_id="ctx", initial_context_data={"total": 5})
    assert resumed.final_pipeline_context.total == 1111


async def test_run_interrupted_mid_step_resumes_from_last_checkpoint(db: Path) -> None:
    world = World()
    pipeline = make_steps(world)
    world.crash_at = "third"
    with pytest.raises(Crash):
        await run_fresh(db, pipeline, "a", run_id="crashed")
    state = await load(db, "crashed")
    assert state is not None
    assert state["status"] == "running"
    assert state["current_step_index"] == 2

    world.crash_at = None
    world.calls.clear()
    events: list[PreRun] = []
    resumed = await run_fresh(
        db,
        pipeline,
        "a",
        run_id="crashed",
        hooks=[lambda e: events.append(e) if isinstance(e, PreRun) else None],
    )
    assert world.calls == [("third", "a12")]
    assert resumed.output == "a123"
    assert resumed.final_pipeline_context.total == 111
    assert [e.resumed for e in events] == [True]


async def test_getting_started_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    calls: list[str] = []

    @step
    async def greet(name: str) -> str:
        calls.append(name)
        return f"Hello, {name}!"

    pipeline = greet
    registry = PipelineRegistry()
    registry.register(pipeline, "hello", "1.0.0")
    backend = SQLiteBackend(Path("workflow.db"))

    runner = Flujo(
        registry=registry,
        pipeline_name="hello",
        pipeline_version="1.0.0",
        state_backend=backend,
    )
    result = await runner.run_async("world", run_id="run1")

    runner2 = Flujo(
        registry=registry,
        pipeline_name="hello",
        pipeline_version="1.0.0",
        state_backend=backend,
    )
    resumed = await runner2.run_async("world", run_id="run1")
    await backend.aclose()

    assert result.status == "completed"
    assert result.output == "Hello, world!"
    assert resumed.status == "completed"
    assert resumed.output == "Hello, world!"
    assert calls == ["world"]
    assert (tmp_path / "workflow.db").exists()
    state = await load(tmp_path / "workflow.db", "run1")
    assert state is not None
    assert (state["pipeline_name"], state["pipeline_version"]) == ("hello", "1.0.0")


def test_getting_started_example_sync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The spec's example uses the synchronous run(); it must run exactly as written."""
    monkeypatch.chdir(tmp_path)

    @step
    async def greet(name: str) -> str:
        return f"Hello, {name}!"

    pipeline = greet
    registry = PipelineRegistry()
    registry.register(pipeline, "hello", "1.0.0")
    backend = SQLiteBackend(Path("workflow.db"))
    runner = Flujo(
        registry=registry,
        pipeline_name="hello",
        pipeline_version="1.0.0",
        state_backend=backend,
    )
    result = runner.run("world", run_id="run1")
    runner2 = Flujo(
        registry=registry,
        pipeline_name="hello",
        pipeline_version="1.0.0",
        state_backend=backend,
    )
    resumed = runner2.run("world", run_id="run1")
    assert result.output == resumed.output == "Hello, world!"
    asyncio.run(backend.aclose())


# -- refusing a changed pipeline -------------------------------------------------------------


async def test_changed_version_is_refused_before_any_step_runs(db: Path) -> None:
    world = World()
    pipeline = make_steps(world)
    world.fail_at = "second"
    await run_fresh(db, pipeline, "a", run_id="v", pipeline_version="1.0.0")
    before = await load(db, "v")
    world.fail_at = None
    world.calls.clear()
    with pytest.raises(PipelineMismatchError) as info:
        await run_fresh(db, pipeline, "a", run_id="v", pipeline_version="2.0.0")
    assert info.value.run_id == "v"
    assert world.calls == []
    assert await load(db, "v") == before


async def test_changed_step_names_are_refused_before_any_step_runs(db: Path) -> None:
    world = World()
    world.fail_at = "second"
    await run_fresh(db, make_steps(world), "a", run_id="renamed")
    before = await load(db, "renamed")
    world.fail_at = None
    world.calls.clear()

    @step
    async def first(x: str) -> str:
        world.visit("first", x)
        return x

    @step
    async def renamed_second(x: str) -> str:
        world.visit("renamed_second", x)
        return x

    with pytest.raises(PipelineMismatchError):
        await run_fresh(db, first >> renamed_second, "a", run_id="renamed")
    assert world.calls == []
    assert await load(db, "renamed") == before


async def test_added_step_is_refused(db: Path) -> None:
    world = World()
    world.fail_at = "second"
    pipeline = make_steps(world)
    await run_fresh(db, pipeline, "a", run_id="grown")

    @step
    async def fourth(x: str) -> str:
        return x

    with pytest.raises(PipelineMismatchError):
        await run_fresh(db, pipeline >> fourth, "a", run_id="grown")


async def test_other_pipeline_name_is_refused(db: Path) -> None:
    world = World()
    world.fail_at = "second"
    pipeline = make_steps(world)
    await run_fresh(db, pipeline, "a", run_id="named", pipeline_name="alpha")
    world.calls.clear()
    with pytest.raises(PipelineMismatchError):
        await run_fresh(db, pipeline, "a", run_id="named", pipeline_name="beta")
    assert world.calls == []


async def test_resume_uses_the_recorded_registered_version_even_when_asked_for_latest(
    db: Path,
) -> None:
    world = World()
    old = make_steps(world)
    registry = PipelineRegistry()
    registry.register(old, "flow", "1.0.0")
    world.fail_at = "second"
    failed = await run_fresh(
        db, None, "a", run_id="pinned", registry=registry, pipeline_name="flow"
    )
    assert failed.status == "failed"
    state = await load(db, "pinned")
    assert state is not None
    assert state["pipeline_version"] == "1.0.0"

    new_calls: list[str] = []

    @step
    async def other(x: str) -> str:
        new_calls.append(x)
        return "v2"

    registry.register(other, "flow", "2.0.0")
    world.fail_at = None
    world.calls.clear()
    resumed = await run_fresh(
        db, None, "a", run_id="pinned", registry=registry, pipeline_name="flow"
    )
    assert new_calls == []
    assert world.calls == [("second", "a1"), ("third", "a12")]
    assert resumed.output == "a123"

    # A new run on the same runner configuration takes the latest version.
    fresh = await run_fresh(db, None, "a", run_id="fresh", registry=registry, pipeline_name="flow")
    assert fresh.output == "v2"
    fresh_state = await load(db, "fresh")
    assert fresh_state is not None
    assert fresh_state["pipeline_version"] == "2.0.0"


async def test_recorded_version_missing_from_registry_is_refused(db: Path) -> None:
    world = World()
    world.fail_at = "second"
    registry = PipelineRegistry()
    registry.register(make_steps(world), "flow", "1.0.0")
    await run_fresh(db, None, "a", run_id="lost", registry=registry, pipeline_name="flow")

    other_registry = PipelineRegistry()
    other_registry.register(make_steps(world), "flow", "1.1.0")
    world.calls.clear()
    with pytest.raises(PipelineMismatchError):
        await run_fresh(db, None, "a", run_id="lost", registry=other_registry, pipeline_name="flow")
    assert world.calls == []


# -- ids, deletion, typed inputs -------------------------------------------------------------


async def test_without_run_id_a_fresh_id_is_generated_each_time(db: Path) -> None:
    world = World()
    pipeline = make_steps(world)
    one = await run_fresh(db, pipeline, "a")
    two = await run_fresh(db, pipeline, "b")
    assert one.run_id
    assert two.run_id
    assert one.run_id != two.run_id
    assert len(world.calls) == 6
    for result in (one, two):
        state = await load(db, result.run_id)
        assert state is not None
        assert state["status"] == "completed"
        assert result.final_pipeline_context.run_id == result.run_id


async def test_delete_on_completion_after_success(db: Path) -> None:
    world = World()
    result = await run_fresh(db, make_steps(world), "a", run_id="tmp", delete_on_completion=True)
    assert result.status == "completed"
    assert await load(db, "tmp") is None


async def test_delete_on_completion_keeps_a_failed_run_resumable(db: Path) -> None:
    world = World()
    pipeline = make_steps(world)
    world.fail_at = "third"
    failed = await run_fresh(db, pipeline, "a", run_id="keep", delete_on_completion=True)
    assert failed.status == "failed"
    state = await load(db, "keep")
    assert state is not None
    assert state["status"] == "failed"
    world.fail_at = None
    done = await run_fresh(db, pipeline, "a", run_id="keep", delete_on_completion=True)
    assert done.output == "a123"
    assert await load(db, "keep") is None


async def test_resumed_input_is_validated_into_the_declared_type(db: Path) -> None:
    received: list[Any] = []
    broken = {"on": True}

    @step
    async def make_point(x: int) -> Point:
        return Point(x=x, y=2 * x)

    @step
    async def use_point(p: Point) -> int:
        received.append(p)
        if broken["on"]:
            raise RuntimeError("not yet")
        return p.x + p.y

    pipeline = make_point >> use_point
    await run_fresh(db, pipeline, 2, run_id="typed")
    broken["on"] = False
    resumed = await run_fresh(db, pipeline, 2, run_id="typed")
    assert resumed.output == 6
    assert isinstance(received[-1], Point)
    assert received[-1] == Point(x=2, y=4)


async def test_stored_input_that_no_longer_fits_is_refused(db: Path) -> None:
    broken = {"on": True}

    @step
    async def produce(x: int) -> str:
        return "not a number"

    @step
    async def consume(x: str) -> str:
        if broken["on"]:
            raise RuntimeError("not yet")
        return x

    await run_fresh(db, produce >> consume, 1, run_id="shape")
    broken["on"] = False
    ran: list[int] = []

    async def consume_int(x: int) -> int:
        ran.append(x)
        return x

    # Same step names, a different declared input type.
    consume_step = Step.from_callable(consume_int, name="consume")
    with pytest.raises(PipelineMismatchError):
        await run_fresh(db, produce >> consume_step, 1, run_id="shape")
    assert ran == []


async def test_paused_run_returns_stored_result_and_runs_nothing(db: Path) -> None:
    calls: list[str] = []

    @step
    async def ask(x: str) -> str:
        calls.append(x)
        raise PausedException("waiting for a human")

    paused = await run_fresh(db, ask, "q", run_id="paused")
    assert paused.status == "paused"
    again = await run_fresh(db, ask, "q", run_id="paused")
    assert calls == ["q"]
    assert again.status == "paused"
    assert again.failed_step == "ask"
    assert again.error is not None
    assert again.error.message == "waiting for a human"


async def test_cancelled_run_returns_stored_result_and_runs_nothing(db: Path) -> None:
    world = World()

    @step
    async def stop(x: str) -> str:
        raise PipelineAbortSignal("operator said stop")

    first = make_steps(world).steps[0]
    cancelled = await run_fresh(db, first >> stop, "a", run_id="cancelled")
    assert cancelled.status == "cancelled"
    world.calls.clear()
    again = await run_fresh(db, first >> stop, "a", run_id="cancelled")
    assert world.calls == []
    assert again.status == "cancelled"
    assert again.final_pipeline_context.total == 1


async def test_run_stream_of_a_completed_run_yields_only_the_stored_result(db: Path) -> None:
    world = World()
    pipeline = make_steps(world)
    await run_fresh(db, pipeline, "a", run_id="streamed")
    world.calls.clear()
    async with Flujo(pipeline, context_model=Counter, state_backend=SQLiteBackend(db)) as runner:
        items = [item async for item in runner.run_stream("a", run_id="streamed")]
    assert world.calls == []
    assert len(items) == 1
    assert isinstance(items[0], PipelineResult)
    assert items[0].output == "a123"
