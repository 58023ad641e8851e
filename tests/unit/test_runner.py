"""The runner: run / run_async / run_result_async / run_stream, results, the default store."""

import asyncio
import gc
import os
import warnings
from pathlib import Path

import pytest

from flujo import (
    Flujo,
    PipelineContext,
    PipelineRegistry,
    PipelineResult,
    StepError,
    StepResult,
    step,
)
from flujo.exceptions import (
    ConfigurationError,
    ContextValidationError,
    FlujoError,
    InvalidRunIdError,
    PipelineNotFoundError,
)
from flujo.state import InMemoryBackend, SQLiteBackend


@step
async def inc(x: int) -> int:
    return x + 1


@step
def double(x: int) -> int:
    return x * 2


@step
async def explode(x: int) -> int:
    raise ValueError(f"bad input {x}")


class StrictContext(PipelineContext):
    user_id: str


# -- the four ways to run --------------------------------------------------------------------


def test_run_sync() -> None:
    result = Flujo(inc >> double, persist_state=False).run(1)
    assert isinstance(result, PipelineResult)
    assert result.status == "completed"
    assert result.output == 4


async def test_run_async() -> None:
    result = await Flujo(inc >> double, persist_state=False).run_async(1)
    assert result.output == 4


async def test_run_result_async() -> None:
    result = await Flujo(inc >> double, persist_state=False).run_result_async(1)
    assert result.success
    assert result.output == 4


async def test_run_stream_yields_each_step_then_the_result() -> None:
    runner = Flujo(inc >> double >> inc, persist_state=False)
    items = [item async for item in runner.run_stream(1)]
    assert len(items) == 4
    assert all(isinstance(item, StepResult) for item in items[:3])
    assert [item.name for item in items[:3]] == ["inc", "double", "inc"]
    assert [item.output for item in items[:3]] == [2, 4, 5]
    final = items[-1]
    assert isinstance(final, PipelineResult)
    assert final.output == 5
    assert final.step_history == items[:3]


async def test_run_stream_step_results_are_checkpointed_when_yielded() -> None:
    backend = InMemoryBackend()
    runner = Flujo(inc >> double >> inc, state_backend=backend)
    seen: list[int] = []
    async for item in runner.run_stream(1, run_id="streamed"):
        if isinstance(item, StepResult):
            state = await backend.load_state("streamed")
            assert state is not None
            seen.append(state["current_step_index"])
    assert seen == [1, 2, 3]


async def test_run_stream_with_a_failing_step() -> None:
    runner = Flujo(inc >> explode >> inc, persist_state=False)
    items = [item async for item in runner.run_stream(1)]
    assert [type(item) for item in items] == [StepResult, StepResult, PipelineResult]
    failed = items[1]
    assert isinstance(failed, StepResult)
    assert (failed.name, failed.success) == ("explode", False)
    final = items[2]
    assert isinstance(final, PipelineResult)
    assert final.status == "failed"


async def test_run_inside_a_running_loop_is_a_configuration_error() -> None:
    runner = Flujo(inc, persist_state=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ConfigurationError, match="run_async"):
            runner.run(1)
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_run_can_be_called_repeatedly() -> None:
    runner = Flujo(inc, persist_state=False)
    assert [runner.run(i).output for i in range(3)] == [1, 2, 3]


# -- results ---------------------------------------------------------------------------------


async def test_pipeline_result_fields_on_success() -> None:
    result = await Flujo(inc >> double, persist_state=False).run_async(3, run_id="r-ok")
    assert result.run_id == "r-ok"
    assert result.status == "completed"
    assert result.success is True
    assert result.output == 8
    assert result.error is None
    assert result.failed_step is None
    assert isinstance(result.final_pipeline_context, PipelineContext)
    assert result.final_pipeline_context.run_id == "r-ok"
    history = result.step_history
    assert [(r.name, r.output, r.success, r.attempts, r.error, r.index) for r in history] == [
        ("inc", 4, True, 1, None, 0),
        ("double", 8, True, 1, None, 1),
    ]
    for record in history:
        assert isinstance(record.latency_s, float)
        assert record.latency_s >= 0


async def test_pipeline_result_fields_on_failure() -> None:
    result = await Flujo(inc >> explode >> double, persist_state=False).run_async(1)
    assert result.status == "failed"
    assert result.success is False
    assert result.output is None
    assert result.failed_step == "explode"
    assert result.error == StepError("ValueError", "bad input 2")
    assert str(result.error) == "ValueError: bad input 2"
    assert [(r.name, r.success) for r in result.step_history] == [
        ("inc", True),
        ("explode", False),
    ]
    failed = result.step_history[1]
    assert failed.output is None
    assert failed.error == StepError("ValueError", "bad input 2")
    assert failed.index == 1


async def test_step_failure_is_returned_not_raised() -> None:
    @step
    async def type_error(x: int) -> int:
        return x + "a"  # type: ignore[operator]

    result = await Flujo(type_error, persist_state=False).run_async(1)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "TypeError"


def test_step_result_round_trips_through_its_dict_form() -> None:
    record = StepResult("s", {"a": 1}, False, 3, 0.25, StepError("KeyError", "k"), 2)
    assert StepResult.from_dict(record.to_dict()) == record


def test_errors_raised_by_run_are_not_chained_to_an_internal_runtime_error() -> None:
    """run() should raise flujo's error as is; the 'no running event loop' RuntimeError used
    internally to detect a loop must not appear as its __context__ (it shows up as a confusing
    'During handling of the above exception, another exception occurred' traceback)."""
    runner = Flujo(registry=PipelineRegistry(), pipeline_name="missing", persist_state=False)
    with pytest.raises(PipelineNotFoundError) as info:
        runner.run(1)
    assert not isinstance(info.value.__context__, RuntimeError), repr(info.value.__context__)


# -- configuration errors --------------------------------------------------------------------


def test_context_model_must_be_a_pipeline_context_subclass() -> None:
    with pytest.raises(ConfigurationError):
        Flujo(inc, context_model=dict, persist_state=False)  # type: ignore[type-var]


def test_state_backend_must_be_a_state_backend() -> None:
    with pytest.raises(ConfigurationError):
        Flujo(inc, state_backend=object())  # type: ignore[arg-type]


def test_persist_state_false_with_a_backend_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        Flujo(inc, persist_state=False, state_backend=InMemoryBackend())


@pytest.mark.parametrize("run_id", ["", "../etc/passwd", "a/b", "..", "x" * 500, "nul\x00"])
def test_invalid_run_id_is_refused(run_id: str) -> None:
    with pytest.raises(InvalidRunIdError) as info:
        Flujo(inc, state_backend=InMemoryBackend()).run(1, run_id=run_id)
    assert isinstance(info.value, FlujoError)


def test_run_level_context_data_is_validated() -> None:
    runner = Flujo(inc, context_model=StrictContext, persist_state=False)
    with pytest.raises(ContextValidationError):
        runner.run(1)
    result = runner.run(1, initial_context_data={"user_id": "u1"})
    assert result.final_pipeline_context.user_id == "u1"


# -- the default store, persist_state=False, closing -----------------------------------------

ALLOWED = {"flujo_ops.db", "flujo_ops.db-wal", "flujo_ops.db-shm"}


def test_default_store_is_flujo_ops_db_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runner = Flujo(inc >> double)
    try:
        result = runner.run(1, run_id="default-store")
        assert result.output == 4
        files = set(os.listdir(tmp_path))
        assert "flujo_ops.db" in files
        assert files <= ALLOWED
        assert isinstance(runner.state_backend, SQLiteBackend)
        state = asyncio.run(runner.state_backend.load_state("default-store"))
        assert state is not None
        assert state["status"] == "completed"
    finally:
        asyncio.run(runner.aclose())
    assert set(os.listdir(tmp_path)) <= ALLOWED


def test_persist_state_false_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    runner = Flujo(inc >> double, persist_state=False)
    assert runner.state_backend is None
    assert runner.run(1).output == 4
    assert runner.run(1, run_id="given").output == 4
    asyncio.run(runner.aclose())
    assert os.listdir(tmp_path) == []


def test_persist_state_false_never_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    calls: list[int] = []

    @step
    def count(x: int) -> int:
        calls.append(x)
        return x

    runner = Flujo(count, persist_state=False)
    runner.run(1, run_id="same")
    runner.run(2, run_id="same")
    assert calls == [1, 2]


async def test_aclose_closes_a_passed_in_backend(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "runs.db")
    runner = Flujo(inc, state_backend=backend)
    await runner.run_async(1)
    assert backend._conn is not None
    await runner.aclose()
    assert backend._conn is None


async def test_async_with_closes_the_backend(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "runs.db")
    async with Flujo(inc, state_backend=backend) as runner:
        assert isinstance(runner, Flujo)
        result = await runner.run_async(1, run_id="ctx-managed")
        assert backend._conn is not None
    assert backend._conn is None
    assert result.output == 2
    # The closed backend reopens on use: the stored run is still there.
    state = await backend.load_state("ctx-managed")
    assert state is not None
    assert state["status"] == "completed"
    await backend.aclose()


async def test_async_with_closes_the_default_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with Flujo(inc) as runner:
        await runner.run_async(1)
        backend = runner.state_backend
        assert isinstance(backend, SQLiteBackend)
        assert backend._conn is not None
    assert backend._conn is None


async def test_async_with_closes_the_backend_when_the_body_raises(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "runs.db")

    async def use_and_fail() -> None:
        async with Flujo(inc, state_backend=backend) as runner:
            await runner.run_async(1)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await use_and_fail()
    assert backend._conn is None


async def test_aclose_without_a_backend_is_fine() -> None:
    runner = Flujo(inc, persist_state=False)
    await runner.aclose()
    await runner.aclose()


async def test_delete_on_completion_removes_state_after_success() -> None:
    backend = InMemoryBackend()
    result = await Flujo(inc, state_backend=backend, delete_on_completion=True).run_async(
        1, run_id="gone"
    )
    assert result.status == "completed"
    assert result.output == 2
    assert await backend.load_state("gone") is None


async def test_delete_on_completion_keeps_state_after_failure() -> None:
    backend = InMemoryBackend()
    runner = Flujo(inc >> explode, state_backend=backend, delete_on_completion=True)
    result = await runner.run_async(1, run_id="kept")
    assert result.status == "failed"
    state = await backend.load_state("kept")
    assert state is not None
    assert state["status"] == "failed"
