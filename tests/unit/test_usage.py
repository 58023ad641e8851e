"""Usage accounting and usage limits: per step, per run, across resumes, inside every step type."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from flujo import (
    Flujo,
    GranularStep,
    LoopStep,
    MapStep,
    ParallelStep,
    PipelineContext,
    Step,
    TaskClient,
    Usage,
    UsageLimits,
    step,
)
from flujo.domain.granular import AgentTurn, ToolCall
from flujo.domain.parallel import BranchFailureStrategy
from flujo.domain.usage import RunMeter, check_usage_limits, report_usage
from flujo.exceptions import ConfigurationError, UsageLimitExceededError
from flujo.state import InMemoryBackend, SQLiteBackend

CALL = Usage(requests=1, input_tokens=100, output_tokens=20, cost_usd=0.01)


class CountingAgent:
    """An agent that reports one request per call and counts its calls."""

    def __init__(self, usage: Usage = CALL) -> None:
        self.calls = 0
        self.usage = usage

    async def run(self, data: Any) -> Any:
        self.calls += 1
        report_usage(self.usage)
        return f"{data}+"


def agents_pipeline(agent: CountingAgent, n: int = 5) -> Any:
    pipeline = Step("s0", agent=agent)
    for i in range(1, n):
        pipeline = pipeline >> Step(f"s{i}", agent=agent)
    return pipeline


# -- the values ---------------------------------------------------------------------------------


def test_usage_adds_and_round_trips() -> None:
    total = CALL + CALL
    assert total == Usage(2, 200, 40, 0.02)
    assert total.total_tokens == 240
    assert Usage.from_dict(total.to_dict()) == total
    assert not Usage()
    assert bool(CALL)
    assert total - CALL == CALL


@pytest.mark.parametrize(
    "stored",
    [None, {}, {"requests": "3"}, {"requests": -1, "cost_usd": math.inf}, {"cost_usd": True}],
)
def test_unreadable_stored_usage_counts_as_zero(stored: Any) -> None:
    assert Usage.from_dict(stored) == Usage()


@pytest.mark.parametrize(
    "bad",
    [
        {"total_cost_usd_limit": -1},
        {"total_cost_usd_limit": math.nan},
        {"total_tokens_limit": -5},
        {"request_limit": True},
        {"request_limit": 1.5},
        {"unknown_limit": 3},
    ],
)
def test_bad_limits_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        UsageLimits(**bad)


def test_limits_name_the_limit_reached() -> None:
    limits = UsageLimits(total_cost_usd_limit=0.05, total_tokens_limit=1000, request_limit=3)
    assert limits.reached(Usage()) is None
    assert limits.reached(Usage(cost_usd=0.05)) == "total_cost_usd_limit"
    assert limits.reached(Usage(input_tokens=999, output_tokens=1)) == "total_tokens_limit"
    assert limits.reached(Usage(requests=3)) == "request_limit"
    assert UsageLimits().reached(Usage(10**9, 10**9, 10**9, 1e9)) is None


def test_the_runner_refuses_limits_of_the_wrong_type() -> None:
    with pytest.raises(ConfigurationError, match="UsageLimits"):
        Flujo(Step("a", agent=CountingAgent()), usage_limits={"request_limit": 1})  # type: ignore[arg-type]


def test_outside_a_run_reporting_and_checking_do_nothing() -> None:
    report_usage(CALL)
    check_usage_limits()


def test_a_meter_can_be_fed_from_threads() -> None:
    meter = RunMeter()
    step_meter = meter.step_meter(None)

    async def main() -> None:
        await asyncio.gather(*(asyncio.to_thread(step_meter.add, CALL) for _ in range(50)))

    asyncio.run(main())
    assert meter.total == Usage(50, 5000, 1000, pytest.approx(0.5))  # type: ignore[arg-type]


# -- counting -----------------------------------------------------------------------------------


def test_each_step_and_the_run_carry_their_usage(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "runs.db")
    agent = CountingAgent()

    @step
    async def plain(x: str) -> str:
        return x

    result = Flujo(agents_pipeline(agent, 2) >> plain, state_backend=backend).run("in", run_id="r")

    assert result.success
    assert [r.usage for r in result.step_history] == [CALL, CALL, None]
    assert result.usage == CALL + CALL
    stored = asyncio.run(backend.load_state("r"))
    assert stored is not None
    assert stored["usage"] == (CALL + CALL).to_dict()
    assert [rec.get("usage") for rec in stored["step_history"]] == [
        CALL.to_dict(),
        CALL.to_dict(),
        None,
    ]
    again = Flujo(agents_pipeline(agent, 2) >> plain, state_backend=backend).run("x", run_id="r")
    assert again.usage == CALL + CALL  # the stored result carries the stored usage
    assert again.step_history[0].usage == CALL


def test_a_run_without_agents_stores_no_usage() -> None:
    backend = InMemoryBackend()

    @step
    async def plain(x: int) -> int:
        return x + 1

    result = Flujo(plain >> plain, state_backend=backend).run(1, run_id="r")
    assert result.usage == Usage()
    stored = asyncio.run(backend.load_state("r"))
    assert stored is not None
    assert stored["usage"] is None
    assert all("usage" not in record for record in stored["step_history"])


def test_functions_that_call_agents_count_too_even_in_a_worker_thread() -> None:
    @step
    async def calls_async(x: str) -> str:
        report_usage(CALL)
        return x

    def calls_sync(x: str) -> str:  # runs in a worker thread by default
        report_usage(CALL)
        return x

    pipeline = calls_async >> Step.from_callable(calls_sync, name="sync")
    result = Flujo(pipeline, persist_state=False).run("x")
    assert [r.usage for r in result.step_history] == [CALL, CALL]
    assert result.usage == CALL + CALL


def test_every_attempt_of_a_retried_step_counts() -> None:
    attempts = []

    async def flaky(x: str) -> str:
        attempts.append(x)
        report_usage(CALL)
        if len(attempts) < 3:
            raise RuntimeError("model hiccup")
        return x

    pipeline = Step.from_callable(flaky, name="flaky", retries=2, backoff_s=0)
    result = Flujo(pipeline, persist_state=False).run("x")
    assert result.success
    assert result.step_history[0].usage == Usage(3, 300, 60, pytest.approx(0.03))  # type: ignore[arg-type]
    assert result.usage.requests == 3


def test_failed_steps_keep_their_usage() -> None:
    backend = InMemoryBackend()

    async def fails(x: str) -> str:
        report_usage(CALL)
        raise ValueError("bad answer")

    result = Flujo(Step.from_callable(fails, name="f"), state_backend=backend).run("x", run_id="r")
    assert result.status == "failed"
    assert result.step_history[0].usage == CALL
    assert result.usage == CALL
    stored = asyncio.run(backend.load_state("r"))
    assert stored is not None
    assert stored["usage"] == CALL.to_dict()


def test_composite_steps_sum_their_sub_steps() -> None:
    agent = CountingAgent()
    loop = LoopStep(
        "loop",
        Step("body", agent=agent),
        lambda output, context: output.count("+") >= 3,
        max_loops=5,
    )
    mapped = MapStep("map", Step("item", agent=agent), max_concurrency=2)
    parallel = ParallelStep("par", {"a": Step("a", agent=agent), "b": Step("b", agent=agent)})

    @step
    async def to_list(x: str) -> list[str]:
        return [x, x]

    pipeline = loop >> to_list >> mapped >> parallel
    result = Flujo(pipeline, persist_state=False).run("go")

    assert result.success, result.error
    loop_result, _, map_result, par_result = result.step_history
    assert loop_result.usage == Usage(3, 300, 60, pytest.approx(0.03))  # type: ignore[arg-type]
    assert map_result.usage is not None
    assert map_result.usage.requests == 2
    assert par_result.usage is not None
    assert par_result.usage.requests == 2
    assert [child.usage for child in par_result.step_history] == [CALL, CALL]
    assert result.usage.requests == 7
    assert agent.calls == 7


def test_a_resumed_composite_shows_what_it_used_before(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "runs.db")
    agent = CountingAgent()
    state = {"fail": True}

    async def item(x: int) -> int:
        report_usage(CALL)
        if x == 3 and state["fail"]:
            raise RuntimeError("crash-like failure at item 3")
        return x

    mapped = MapStep("map", Step.from_callable(item, name="item"))
    first = Flujo(mapped, state_backend=backend).run([1, 2, 3], run_id="r")
    assert first.status == "failed"
    assert first.usage.requests == 3
    state["fail"] = False
    second = Flujo(mapped, state_backend=backend).run([1, 2, 3], run_id="r")
    assert second.success
    assert second.usage.requests == 4  # items 1 and 2 ran once, item 3 twice
    # the map's own usage shows all three items (two of them recorded by the first attempt)
    assert second.step_history[-1].usage is not None
    assert second.step_history[-1].usage.requests == 3
    assert agent.calls == 0


# -- limits -------------------------------------------------------------------------------------


def test_a_limit_stops_the_run_before_the_next_agent_call(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "runs.db")
    agent = CountingAgent()
    events: list[str] = []
    runner = Flujo(
        agents_pipeline(agent),
        state_backend=backend,
        usage_limits=UsageLimits(request_limit=3),
        hooks=[lambda event: events.append(event.event_name)],
    )

    with pytest.raises(UsageLimitExceededError) as info:
        runner.run("in", run_id="r")

    error = info.value
    assert agent.calls == 3
    assert error.limit == "request_limit"
    assert error.usage == Usage(3, 300, 60, pytest.approx(0.03))  # type: ignore[arg-type]
    assert error.limits == UsageLimits(request_limit=3)
    assert "request_limit=3" in str(error)
    assert error.result is not None
    assert error.result.status == "failed"
    assert error.result.failed_step == "s3"
    assert error.result.usage == error.usage
    assert [r.success for r in error.result.step_history] == [True, True, True, False]
    assert "on_step_failure" in events
    assert events[-1] == "post_run"
    stored = asyncio.run(backend.load_state("r"))
    assert stored is not None
    assert stored["status"] == "failed"
    assert stored["current_step_index"] == 3
    assert stored["error"]["type"] == "UsageLimitExceededError"
    assert stored["usage"]["requests"] == 3


def test_a_resumed_run_cannot_escape_its_budget(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "runs.db")
    agent = CountingAgent()
    limits = UsageLimits(total_cost_usd_limit=0.025)
    with pytest.raises(UsageLimitExceededError):
        Flujo(agents_pipeline(agent), state_backend=backend, usage_limits=limits).run(
            "in", run_id="r"
        )
    assert agent.calls == 3

    # The same budget in another runner (another process, later): no agent call starts.
    with pytest.raises(UsageLimitExceededError) as info:
        Flujo(agents_pipeline(agent), state_backend=backend, usage_limits=limits).run(
            "in", run_id="r"
        )
    assert agent.calls == 3
    assert info.value.usage.requests == 3

    # A larger budget lets it finish; the usage counts both processes.
    bigger = UsageLimits(total_cost_usd_limit=1.0)
    result = Flujo(agents_pipeline(agent), state_backend=backend, usage_limits=bigger).run(
        "in", run_id="r"
    )
    assert result.success
    assert agent.calls == 5
    assert result.usage.requests == 5
    assert result.output == "in+++++"


def test_the_call_that_crosses_a_limit_finishes(tmp_path: Path) -> None:
    agent = CountingAgent(Usage(requests=1, input_tokens=600, output_tokens=0))
    runner = Flujo(
        agents_pipeline(agent, 3),
        persist_state=False,
        usage_limits=UsageLimits(total_tokens_limit=1000),
    )
    with pytest.raises(UsageLimitExceededError) as info:
        runner.run("x")
    assert agent.calls == 2  # 600 < 1000: the second call starts; 1200 >= 1000: no third
    assert info.value.usage.total_tokens == 1200


def test_a_limit_is_not_retried_and_not_a_branch_failure() -> None:
    agent = CountingAgent()
    retried = Step("retried", agent=agent, retries=3, backoff_s=0)
    parallel = ParallelStep(
        "par",
        {"a": Step("a", agent=agent), "b": Step("b", agent=agent)},
        on_branch_failure=BranchFailureStrategy.IGNORE,
    )
    runner = Flujo(
        retried >> parallel, persist_state=False, usage_limits=UsageLimits(request_limit=1)
    )
    with pytest.raises(UsageLimitExceededError) as info:
        runner.run("x")
    assert agent.calls == 1
    assert info.value.result.failed_step == "par"


def test_a_limit_inside_a_map_stops_the_run(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "runs.db")
    agent = CountingAgent()
    mapped = MapStep("map", Step("item", agent=agent), max_concurrency=2)
    limits = UsageLimits(request_limit=4)
    with pytest.raises(UsageLimitExceededError):
        Flujo(mapped, state_backend=backend, usage_limits=limits).run(list(range(10)), run_id="r")
    assert 4 <= agent.calls <= 5  # two items run side by side: both may pass the check
    stored = asyncio.run(backend.load_state("r"))
    assert stored is not None
    assert stored["status"] == "failed"
    assert stored["usage"]["requests"] == agent.calls


def test_a_granular_step_checks_before_each_turn_and_keeps_turn_usage(tmp_path: Path) -> None:
    class Looper:
        def __init__(self) -> None:
            self.turns = 0

        async def turn(self, transcript: list[dict[str, Any]]) -> AgentTurn:
            self.turns += 1
            report_usage(CALL)
            return AgentTurn(None, (ToolCall("noop", {}),))

    def noop() -> str:
        return "ok"

    looper = Looper()
    backend = SQLiteBackend(tmp_path / "runs.db")
    granular = GranularStep("agent", looper, tools={"noop": noop}, max_turns=10)
    with pytest.raises(UsageLimitExceededError):
        Flujo(granular, state_backend=backend, usage_limits=UsageLimits(request_limit=2)).run(
            "go", run_id="r"
        )
    assert looper.turns == 2
    stored = asyncio.run(backend.load_state("r"))
    assert stored is not None
    model_records = [r for r in stored["step_history"] if r.get("kind") == "model"]
    assert [r["usage"]["requests"] for r in model_records] == [1, 1]


def test_budgets_come_from_flujo_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flujo.toml").write_text(
        "[budgets]\nrequest_limit = 2\n\n[budgets.pipelines.cheap]\nrequest_limit = 1\n"
    )
    assert Flujo(Step("a", agent=CountingAgent()), persist_state=False).usage_limits == (
        UsageLimits(request_limit=2)
    )
    cheap = Flujo(Step("a", agent=CountingAgent()), persist_state=False, pipeline_name="cheap")
    assert cheap.usage_limits == UsageLimits(request_limit=1)
    explicit = UsageLimits(request_limit=9)
    given = Flujo(Step("a", agent=CountingAgent()), persist_state=False, usage_limits=explicit)
    assert given.usage_limits is explicit

    agent = CountingAgent()
    with pytest.raises(UsageLimitExceededError):
        Flujo(agents_pipeline(agent), persist_state=False).run("x")
    assert agent.calls == 2


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[budgets]\nrequest_limit = -1\n", r"\[budgets\] request_limit"),
        ("[budgets]\ncost = 1\n", r"\[budgets\] cost"),
        ("budgets = 3\n", "must be a table"),
        ("[budgets]\npipelines = 3\n", "pipelines must be a table"),
        ("[budgets.pipelines]\ndefault = 3\n", r"\[budgets.pipelines.default\] must be a table"),
    ],
)
def test_bad_budgets_are_typed_errors_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, match: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flujo.toml").write_text(text)
    with pytest.raises(ConfigurationError, match=match):
        Flujo(Step("a", agent=CountingAgent()), persist_state=False)


async def test_task_client_shows_usage(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "runs.db")
    agent = CountingAgent()
    await Flujo(agents_pipeline(agent, 2), state_backend=backend).run_async("x", run_id="r")
    client = TaskClient(backend)
    [summary] = await client.list_tasks()
    assert summary.usage == CALL + CALL
    detail = await client.get_task("r")
    assert detail is not None
    assert detail.usage == CALL + CALL
    assert [r.usage for r in detail.step_history] == [CALL, CALL]


class Ctx(PipelineContext):
    notes: list[str] = []


def test_a_run_nested_in_a_step_counts_its_own_usage() -> None:
    inner_agent = CountingAgent()
    inner = Flujo(agents_pipeline(inner_agent, 2), persist_state=False)

    @step
    async def outer(x: str) -> str:
        result = await inner.run_async(x)
        assert result.usage.requests == 2
        return str(result.output)

    result = Flujo(outer, persist_state=False, usage_limits=UsageLimits(request_limit=1)).run("x")
    assert result.success
    assert result.usage == Usage()
