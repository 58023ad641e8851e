"""StepConfig: retries with exponential backoff, context rollback between attempts, timeouts."""

import asyncio
import math
import threading
from typing import Any

import pytest
from pydantic import Field

from flujo import Flujo, PausedException, PipelineContext, Step, StepConfig, StepError, step
from flujo.exceptions import ConfigurationError, StepTimeoutError
from flujo.state import InMemoryBackend


class NotesContext(PipelineContext):
    notes: list[str] = Field(default_factory=list)
    count: int = 0


class Flaky:
    """Fails the first ``failures`` calls, then returns its input."""

    def __init__(self, failures: int, exc: type[Exception] = ValueError) -> None:
        self.failures = failures
        self.exc = exc
        self.calls = 0

    async def __call__(self, x: Any) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc(f"failure {self.calls}")
        return x


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record the backoff waits (tenacity sleeps through asyncio.sleep) without waiting."""
    recorded: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(delay: float, *args: Any, **kwargs: Any) -> Any:
        recorded.append(delay)
        return await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return recorded


# -- retries ---------------------------------------------------------------------------------


async def test_retries_until_success_and_counts_attempts() -> None:
    flaky = Flaky(failures=2)
    s = Step.from_callable(flaky, name="flaky", retries=3, backoff_s=0)
    result = await Flujo(s, persist_state=False).run_async("ok")
    assert result.status == "completed"
    assert result.output == "ok"
    assert flaky.calls == 3
    assert result.step_history[0].attempts == 3
    assert result.step_history[0].success is True
    assert result.step_history[0].error is None


async def test_attempts_is_one_without_retries() -> None:
    @step
    async def fine(x: int) -> int:
        return x

    result = await Flujo(fine >> fine, persist_state=False).run_async(1)
    assert [r.attempts for r in result.step_history] == [1, 1]


async def test_attempts_per_step_in_history() -> None:
    first = Step.from_callable(Flaky(1), name="first", retries=2, backoff_s=0)
    second = Step.from_callable(Flaky(2), name="second", retries=2, backoff_s=0)
    result = await Flujo(first >> second, persist_state=False).run_async(0)
    assert [(r.name, r.attempts) for r in result.step_history] == [("first", 2), ("second", 3)]


async def test_backoff_is_exponential_and_capped(sleeps: list[float]) -> None:
    flaky = Flaky(failures=4)
    s = Step.from_callable(flaky, name="f", retries=4, backoff_s=0.5, backoff_max_s=1.5)
    result = await Flujo(s, persist_state=False).run_async(1)
    assert result.status == "completed"
    assert result.step_history[0].attempts == 5
    assert sleeps == pytest.approx([0.5, 1.0, 1.5, 1.5])


async def test_no_wait_without_a_retry(sleeps: list[float]) -> None:
    s = Step.from_callable(Flaky(0), name="f", retries=3, backoff_s=0.5)
    await Flujo(s, persist_state=False).run_async(1)
    assert sleeps == []


async def test_step_failing_after_its_retries_fails_the_run() -> None:
    backend = InMemoryBackend()
    flaky = Flaky(failures=10, exc=KeyError)

    @step
    async def before(x: int) -> int:
        return x + 1

    s = Step.from_callable(flaky, name="always_fails", retries=2, backoff_s=0)
    after_calls: list[int] = []

    @step
    async def after(x: int) -> int:
        after_calls.append(x)
        return x

    runner = Flujo(before >> s >> after, state_backend=backend)
    result = await runner.run_async(1, run_id="fails")
    assert result.status == "failed"
    assert result.success is False
    assert result.output is None
    assert flaky.calls == 3
    assert after_calls == []
    assert result.failed_step == "always_fails"
    assert result.error == StepError("KeyError", str(KeyError("failure 3")))
    failed = result.step_history[-1]
    assert (failed.name, failed.success, failed.attempts) == ("always_fails", False, 3)
    assert failed.error == result.error

    state = await backend.load_state("fails")
    assert state is not None
    assert state["status"] == "failed"
    assert state["current_step_index"] == 1
    assert state["error"]["type"] == "KeyError"
    assert state["error"]["message"] == str(KeyError("failure 3"))
    assert state["error"]["step"] == "always_fails"
    record = state["step_history"][-1]
    assert record["name"] == "always_fails"
    assert record["success"] is False
    assert record["attempts"] == 3
    assert record["error"] == {"type": "KeyError", "message": str(KeyError("failure 3"))}


async def test_failed_attempt_context_changes_are_rolled_back_before_retry() -> None:
    seen: list[tuple[list[str], int, dict[str, Any]]] = []
    calls = {"n": 0}

    @step(retries=2, backoff_s=0)
    async def mutating(x: str, *, context: NotesContext) -> str:
        calls["n"] += 1
        seen.append((list(context.notes), context.count, dict(context.scratchpad)))
        context.notes.append(f"attempt {calls['n']}")
        context.count += 1
        context.scratchpad.setdefault("log", []).append(calls["n"])
        if calls["n"] < 3:
            raise RuntimeError("try again")
        return x

    result = await Flujo(
        mutating,
        context_model=NotesContext,
        initial_context_data={"notes": ["start"]},
        state_backend=InMemoryBackend(),
    ).run_async("x")
    assert result.status == "completed"
    # Every attempt starts from the context as it was before the step.
    assert seen == [(["start"], 0, {})] * 3
    ctx = result.final_pipeline_context
    assert ctx.notes == ["start", "attempt 3"]
    assert ctx.count == 1
    assert ctx.scratchpad == {"log": [3]}


async def test_context_of_a_failed_run_matches_what_was_stored() -> None:
    """The returned context of a failed run is the stored one: the failed attempt's changes
    are not committed, so they should not show up in the result either."""
    backend = InMemoryBackend()

    @step(retries=1, backoff_s=0)
    async def half_done(x: str, *, context: NotesContext) -> str:
        context.notes.append("half")
        raise RuntimeError("nope")

    result = await Flujo(half_done, context_model=NotesContext, state_backend=backend).run_async(
        "x", run_id="half"
    )
    assert result.status == "failed"
    state = await backend.load_state("half")
    assert state is not None
    assert state["pipeline_context"]["notes"] == []
    assert result.final_pipeline_context.notes == state["pipeline_context"]["notes"]


async def test_paused_exception_is_not_retried() -> None:
    calls = {"n": 0}

    @step(retries=3, backoff_s=0)
    async def wait_for_human(x: str) -> str:
        calls["n"] += 1
        raise PausedException("need approval")

    result = await Flujo(wait_for_human, persist_state=False).run_async("x")
    assert result.status == "paused"
    assert calls["n"] == 1


# -- timeouts --------------------------------------------------------------------------------


async def test_timeout_fails_the_step_with_step_timeout_error() -> None:
    backend = InMemoryBackend()

    @step(timeout_s=0.01)
    async def slow(x: int) -> int:
        await asyncio.sleep(30)
        return x

    result = await Flujo(slow, state_backend=backend).run_async(1, run_id="slow")
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "StepTimeoutError"
    assert "slow" in result.error.message
    assert result.step_history[0].error == result.error
    state = await backend.load_state("slow")
    assert state is not None
    assert state["status"] == "failed"
    assert state["error"]["type"] == "StepTimeoutError"
    assert state["step_history"][0]["error"]["type"] == "StepTimeoutError"


async def test_timeout_of_a_sync_step_in_a_thread() -> None:
    release = threading.Event()

    @step(timeout_s=0.01)
    def blocking(x: int) -> int:
        release.wait(10)
        return x

    try:
        result = await Flujo(blocking, persist_state=False).run_async(1)
    finally:
        release.set()
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "StepTimeoutError"


async def test_timeout_applies_to_each_attempt() -> None:
    calls = {"n": 0}

    @step(timeout_s=0.01, retries=2, backoff_s=0)
    async def slow_then_fast(x: int) -> int:
        calls["n"] += 1
        if calls["n"] < 3:
            await asyncio.sleep(30)
        return x

    result = await Flujo(slow_then_fast, persist_state=False).run_async(5)
    assert result.status == "completed"
    assert result.output == 5
    assert result.step_history[0].attempts == 3


async def test_a_steps_own_timeout_error_is_not_reported_as_a_step_timeout() -> None:
    @step(timeout_s=30)
    async def raises_timeout(x: int) -> int:
        raise TimeoutError("upstream timed out")

    result = await Flujo(raises_timeout, persist_state=False).run_async(1)
    assert result.error == StepError("TimeoutError", "upstream timed out")


def test_step_timeout_error_attributes() -> None:
    exc = StepTimeoutError("late", step_name="s", timeout_s=1.5)
    assert isinstance(exc, TimeoutError)
    assert (exc.step_name, exc.timeout_s) == ("s", 1.5)


# -- StepConfig validation -------------------------------------------------------------------


def test_step_config_defaults() -> None:
    config = StepConfig()
    assert config.retries == 0
    assert config.timeout_s is None
    assert config.backoff_s >= 0
    assert config.backoff_max_s >= config.backoff_s
    assert config.run_in_thread is True


@pytest.mark.parametrize(
    "kwargs",
    [
        {"retries": -1},
        {"retries": 1.5},
        {"retries": True},
        {"retries": "3"},
        {"timeout_s": 0},
        {"timeout_s": -1},
        {"timeout_s": math.nan},
        {"timeout_s": math.inf},
        {"timeout_s": "5"},
        {"backoff_s": -0.1},
        {"backoff_s": math.nan},
        {"backoff_s": math.inf},
        {"backoff_max_s": -1},
        {"backoff_max_s": math.inf},
    ],
)
def test_invalid_step_config_is_a_configuration_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        StepConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"retries": -1}, {"timeout_s": 0}, {"backoff_s": -1}])
def test_invalid_keywords_on_step_and_decorator(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Step.from_callable(lambda x: x, name="s", **kwargs)
    with pytest.raises(ConfigurationError):

        @step(**kwargs)
        def f(x: int) -> int:
            return x


def test_valid_step_config_values() -> None:
    config = StepConfig(retries=5, timeout_s=0.5, backoff_s=0, backoff_max_s=0, run_in_thread=False)
    assert (config.retries, config.timeout_s, config.backoff_s) == (5, 0.5, 0)
    assert StepConfig(timeout_s=3).timeout_s == 3
