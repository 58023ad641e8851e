"""PausedException and PipelineAbortSignal: control-flow signals, not errors."""

import logging
from typing import Any

import pytest

from flujo import Flujo, FlujoError, PausedException, PipelineAbortSignal, PipelineContext, step
from flujo import exceptions as exc_mod
from flujo.exceptions import ContextValidationError, FlujoSignal
from flujo.state import InMemoryBackend

logger = logging.getLogger(__name__)


@step
async def inc(x: int) -> int:
    return x + 1


@pytest.mark.parametrize("signal", [PausedException, PipelineAbortSignal])
def test_signals_are_not_errors(signal: type[BaseException]) -> None:
    assert issubclass(signal, FlujoSignal)
    assert issubclass(signal, BaseException)
    assert not issubclass(signal, Exception)
    assert not issubclass(signal, FlujoError)


@pytest.mark.parametrize("signal", [PausedException, PipelineAbortSignal])
def test_except_exception_does_not_catch_signals(signal: type[BaseException]) -> None:
    def careless() -> None:
        try:
            raise signal()
        except Exception:  # the manual's "fatal anti-pattern" cannot swallow them
            pytest.fail("a signal was caught by except Exception")

    with pytest.raises(signal):
        careless()


@pytest.mark.parametrize(
    "error",
    [
        exc_mod.ConfigurationError,
        exc_mod.ContextValidationError,
        exc_mod.SerializationError,
        exc_mod.PayloadTooLargeError,
        exc_mod.InvalidRunIdError,
        exc_mod.StateConflictError,
        exc_mod.PipelineMismatchError,
        exc_mod.PipelineNotFoundError,
        exc_mod.CorruptStateError,
        exc_mod.StateBackendError,
        exc_mod.SchemaVersionError,
        exc_mod.StepTimeoutError,
    ],
)
def test_every_error_is_a_flujo_error(error: type[Exception]) -> None:
    assert issubclass(error, FlujoError)
    assert issubclass(error, Exception)


def test_signal_messages() -> None:
    assert PausedException().message == "Paused"
    assert PausedException("wait").message == "wait"
    assert PipelineAbortSignal("stop").message == "stop"
    assert str(PipelineAbortSignal("stop")) == "stop"


async def test_paused_step_is_stored_and_returned_not_raised() -> None:
    backend = InMemoryBackend()
    after: list[int] = []

    @step
    async def ask_human(x: int) -> int:
        raise PausedException("need approval")

    @step
    async def later(x: int) -> int:
        after.append(x)
        return x

    result = await Flujo(inc >> ask_human >> later, state_backend=backend).run_async(
        1, run_id="hitl"
    )
    assert after == []
    assert result.status == "paused"
    assert result.success is False
    assert result.output is None
    assert result.failed_step == "ask_human"
    assert result.error is not None
    assert (result.error.type, result.error.message) == ("PausedException", "need approval")
    assert [r.name for r in result.step_history] == ["inc"]
    state = await backend.load_state("hitl")
    assert state is not None
    assert state["status"] == "paused"
    assert state["current_step_index"] == 1
    assert state["error"]["type"] == "PausedException"
    assert state["error"]["step"] == "ask_human"


async def test_step_with_except_exception_cannot_swallow_a_pause() -> None:
    @step
    async def careless(x: int) -> int:
        try:
            raise PausedException("human needed")
        except Exception:
            return -1

    result = await Flujo(careless, persist_state=False).run_async(1)
    assert result.status == "paused"


async def test_abort_signal_from_a_step_cancels_the_run() -> None:
    backend = InMemoryBackend()

    @step
    async def stop(x: int) -> int:
        raise PipelineAbortSignal("budget exceeded")

    result = await Flujo(inc >> stop >> inc, state_backend=backend).run_async(1, run_id="stop")
    assert result.status == "cancelled"
    assert result.failed_step == "stop"
    state = await backend.load_state("stop")
    assert state is not None
    assert state["status"] == "cancelled"
    assert state["error"]["type"] == "PipelineAbortSignal"


class UserContext(PipelineContext):
    user_id: str


async def process_request(runner: Flujo[Any, Any, Any], data: Any, ctx: dict[str, Any]) -> Any:
    """The production manual's exception-handling pattern."""
    try:
        result = await runner.run_result_async(initial_input=data, initial_context_data=ctx)
        if result.success:
            return result.output
        return f"Processing {result.status}"
    except (PausedException, PipelineAbortSignal):
        raise
    except FlujoError as e:
        logger.debug("Execution Error: %s", e)
        return f"error: {type(e).__name__}"


async def test_manual_pattern_handles_flujo_errors() -> None:
    runner = Flujo(inc, context_model=UserContext, persist_state=False)
    assert await process_request(runner, 1, {}) == "error: ContextValidationError"
    assert await process_request(runner, 1, {"user_id": "u"}) == 2


async def test_manual_pattern_lets_a_paused_run_through() -> None:
    @step
    async def wait(x: int) -> int:
        raise PausedException()

    runner = Flujo(wait, context_model=UserContext, persist_state=False)
    assert await process_request(runner, 1, {"user_id": "u"}) == "Processing paused"


def test_manual_pattern_reraises_signals() -> None:
    def guarded(signal: BaseException) -> None:
        try:
            raise signal
        except (PausedException, PipelineAbortSignal):
            raise
        except FlujoError:
            pytest.fail("signal handled as an error")

    with pytest.raises(PausedException):
        guarded(PausedException())
    with pytest.raises(PipelineAbortSignal):
        guarded(PipelineAbortSignal())
    assert issubclass(ContextValidationError, FlujoError)
