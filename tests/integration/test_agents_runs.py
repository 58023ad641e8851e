"""Issue 6: pydantic-ai agents inside real, stored runs (offline models only, no network).

Usage per step and per run (in the results and in the store), prices, usage limits that stop
a run before an agent call and hold across resumes, across a crashed process (SQLite and
Postgres), the tool allowlist (pydantic-ai tools and granular steps), structured output
coercion through a run (with ``[aros]`` read from flujo.toml), and a resumed run re-typing a
stored agent output.

Every model is pydantic-ai's ``TestModel`` (``"test"``) or a ``FunctionModel`` that counts its
requests; a counted request is one the model was really asked.

``test_a_response_that_crosses_the_token_limit_is_kept`` shows a bug and fails until it is
fixed (see its docstring).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_ai import Agent, ModelResponse, RunContext, TextPart, ToolCallPart
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

import flujo
from flujo import (
    AgentTurn,
    Flujo,
    GranularStep,
    MapStep,
    Pipeline,
    PipelineContext,
    PipelineRegistry,
    Step,
    StepConfig,
    TaskClient,
    ToolCall,
    Usage,
    UsageLimits,
    agents,
    governance,
)
from flujo.agents import (
    ModelPrice,
    PydanticAIAgent,
    configure_prices,
    configure_structured_output,
    make_agent,
)
from flujo.domain.events import HookEvent, PostRun, StepFailure
from flujo.exceptions import StructuredOutputError, UsageLimitExceededError
from flujo.governance import ENV_PII_SCRUB, ENV_PII_STRONG, ENV_TOOL_ALLOWLIST, REDACTED_EMAIL
from flujo.state.backends.base import StateBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend

# $10,000 per million input tokens and $50,000 per million output tokens: a response of 100
# input and 20 output tokens costs exactly $2.
PRICE = ModelPrice(input_per_million=10_000, output_per_million=50_000)
CALL_COST = 2.0
STEP_NAMES = ("draft", "review", "polish", "publish")
FLUJO_PATH = str(Path(flujo.__file__).resolve().parent.parent)


class City(BaseModel):
    name: str
    country: str


@pytest.fixture(autouse=True)
def _clean_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No governance variables; prices, [aros] defaults, the flujo.toml tables applied and the
    log record factory are put back afterwards."""
    for name in (ENV_PII_SCRUB, ENV_PII_STRONG, ENV_TOOL_ALLOWLIST, "FLUJO_CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(governance, "_log_scrubbing_installed", False)
    factory = logging.getLogRecordFactory()
    applied = set(agents._FROM_FILE)
    try:
        yield
    finally:
        logging.setLogRecordFactory(factory)
        configure_prices(None)
        configure_structured_output("auto", 1)
        agents._FROM_FILE.clear()
        agents._FROM_FILE.update(applied)


class Counted:
    """A FunctionModel that answers with ``text`` and counts its requests; every response
    reports 100 input and 20 output tokens."""

    def __init__(self, text: str = "done") -> None:
        self.text = text
        self.requests = 0

    def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.requests += 1
        return ModelResponse(
            parts=[TextPart(self.text)], usage=RequestUsage(input_tokens=100, output_tokens=20)
        )

    @property
    def model(self) -> FunctionModel:
        return FunctionModel(self, model_name="counted")


def priced_pipeline(model: Counted) -> Pipeline[Any, Any]:
    """Four agent steps, each one request costing $2."""
    steps = [Step(name, agent=make_agent(model.model, pricing=PRICE)) for name in STEP_NAMES]
    return Pipeline.from_steps(steps)


# --------------------------------------------------------------------------------------------
# usage in results and in the store
# --------------------------------------------------------------------------------------------


async def test_a_pydantic_ai_agent_step_reports_usage_to_the_run_and_the_store(
    tmp_path: Path,
) -> None:
    first: Step[Any, Any] = Step("first", agent=Agent("test"))
    second: Step[Any, Any] = Step("second", agent=Agent("test", output_type=City))
    assert isinstance(first.agent, PydanticAIAgent)
    assert second.output_type is City
    async with SQLiteBackend(tmp_path / "runs.db") as backend:
        result = await Flujo(first >> second, state_backend=backend).run_async("hi")
        state = await backend.load_state(result.run_id)
        client = TaskClient(backend)
        (summary,) = await client.list_tasks()
        detail = await client.get_task(result.run_id)
    assert result.status == "completed"
    assert isinstance(result.output, City)
    usages = [r.usage for r in result.step_history]
    for usage in usages:
        assert usage is not None
        assert usage.requests >= 1
        assert usage.input_tokens > 0
        assert usage.output_tokens > 0
        assert usage.cost_usd == 0.0  # the test model is free
    assert result.usage == usages[0] + usages[1]
    assert state is not None
    assert [r["usage"] for r in state["step_history"]] == [u.to_dict() for u in usages]
    assert state["usage"] == result.usage.to_dict()
    assert summary.usage == result.usage
    assert detail is not None
    assert detail.usage == result.usage


async def test_make_agent_with_a_price_costs_tokens_times_price(tmp_path: Path) -> None:
    price = ModelPrice(input_per_million=3.0, output_per_million=15.0)
    step: Step[Any, Any] = Step("answer", agent=make_agent("test", pricing=price))
    async with SQLiteBackend(tmp_path / "runs.db") as backend:
        result = await Flujo(step, state_backend=backend).run_async("hi")
        state = await backend.load_state(result.run_id)
    usage = result.step_history[0].usage
    assert usage is not None
    assert usage.cost_usd > 0
    assert usage.cost_usd == pytest.approx(
        (usage.input_tokens * 3.0 + usage.output_tokens * 15.0) / 1_000_000
    )
    assert state is not None
    assert state["usage"]["cost_usd"] == pytest.approx(usage.cost_usd)


async def test_a_price_from_flujo_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "flujo.toml").write_text(
        '[pricing]\n"counted" = { input_per_million = 10000, output_per_million = 50000 }\n'
        '"test" = { input_per_million = 1.0, output_per_million = 2.0 }\n'
    )
    monkeypatch.chdir(tmp_path)
    configure_prices(None)  # no table from an earlier test ...
    agents._FROM_FILE.clear()  # ... and flujo.toml is read at the next agent's construction
    model = Counted()
    pipeline = Step("counted", agent=make_agent(model.model)) >> Step(
        "test", agent=make_agent("test")
    )
    result = await Flujo(pipeline, persist_state=False).run_async("hi")
    counted, test = (r.usage for r in result.step_history)
    assert counted == Usage(1, 100, 20, CALL_COST)
    assert test is not None
    assert test.cost_usd == pytest.approx(
        (test.input_tokens * 1.0 + test.output_tokens * 2.0) / 1_000_000
    )
    assert result.usage.cost_usd == pytest.approx(CALL_COST + test.cost_usd)


# --------------------------------------------------------------------------------------------
# usage limits
# --------------------------------------------------------------------------------------------


async def test_a_cost_limit_stops_before_the_call_that_would_start_over_it(
    tmp_path: Path,
) -> None:
    model = Counted()
    pipeline = priced_pipeline(model)
    limits = UsageLimits(total_cost_usd_limit=5.0)  # $2, $4 (below), $6 (crossed by call 3)
    events: list[HookEvent] = []
    async with SQLiteBackend(tmp_path / "runs.db") as backend:
        runner = Flujo(pipeline, state_backend=backend, usage_limits=limits, hooks=[events.append])
        with pytest.raises(UsageLimitExceededError) as info:
            await runner.run_async("topic", run_id="budget-1")
        # The call that crossed the limit finished; the fourth was never made.
        assert model.requests == 3
        exc = info.value
        assert exc.limit == "total_cost_usd_limit"
        assert exc.usage == Usage(3, 300, 60, 3 * CALL_COST)
        assert exc.result is not None
        assert exc.result.status == "failed"
        assert exc.result.failed_step == "publish"
        assert exc.result.usage == exc.usage
        assert exc.limits == limits
        failures = [e for e in events if isinstance(e, StepFailure)]
        assert [e.step_result.name for e in failures] == ["publish"]
        assert isinstance(events[-1], PostRun)
        assert events[-1].result is exc.result
        state = await backend.load_state("budget-1")
        assert state is not None
        assert state["status"] == "failed"
        assert state["error"]["type"] == "UsageLimitExceededError"
        assert state["error"]["step"] == "publish"
        assert state["current_step_index"] == 3
        assert state["usage"] == exc.usage.to_dict()
        assert [(r["name"], r["success"]) for r in state["step_history"]] == [
            ("draft", True),
            ("review", True),
            ("polish", True),
            ("publish", False),
        ]
        assert state["step_history"][-1]["error"]["type"] == "UsageLimitExceededError"

        # A new runner with the same limits: the stored usage counts, no request is made.
        again = Flujo(pipeline, state_backend=backend, usage_limits=limits)
        with pytest.raises(UsageLimitExceededError) as info:
            await again.run_async("topic", run_id="budget-1")
        assert model.requests == 3
        assert info.value.usage == Usage(3, 300, 60, 3 * CALL_COST)

        # A larger limit lets the run finish; its usage counts every call, before and after.
        larger = Flujo(
            pipeline, state_backend=backend, usage_limits=UsageLimits(total_cost_usd_limit=100)
        )
        result = await larger.run_async("topic", run_id="budget-1")
        assert model.requests == 4
        assert result.status == "completed"
        assert result.usage == Usage(4, 400, 80, 4 * CALL_COST)
        state = await backend.load_state("budget-1")
        assert state is not None
        assert state["usage"] == result.usage.to_dict()


async def test_a_multi_request_agent_stops_itself_at_the_request_limit(tmp_path: Path) -> None:
    """The adapter passes the run's remaining requests to pydantic-ai: a tool loop that would
    go on forever stops inside the agent call, and the run stops with it."""
    requests = 0

    def loop(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        nonlocal requests
        requests += 1
        return ModelResponse(
            parts=[ToolCallPart("ping", {})],
            usage=RequestUsage(input_tokens=100, output_tokens=20),
        )

    def ping() -> str:
        """Ping."""
        return "pong"

    agent = make_agent(FunctionModel(loop), tools=[ping], pricing=PRICE)
    async with SQLiteBackend(tmp_path / "runs.db") as backend:
        runner = Flujo(
            Step("loop", agent=agent),
            state_backend=backend,
            usage_limits=UsageLimits(request_limit=3),
        )
        with pytest.raises(UsageLimitExceededError) as info:
            await runner.run_async("go", run_id="loop-1")
        state = await backend.load_state("loop-1")
    assert requests == 3
    assert info.value.limit == "request_limit"
    assert info.value.usage == Usage(3, 300, 60, 3 * CALL_COST)
    assert state is not None
    assert state["status"] == "failed"
    assert state["usage"] == info.value.usage.to_dict()
    assert state["step_history"][0]["usage"] == info.value.usage.to_dict()


async def test_budgets_from_flujo_toml_per_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "flujo.toml").write_text(
        "[budgets]\ntotal_cost_usd_limit = 100.0\n\n[budgets.pipelines.tight]\nrequest_limit = 1\n"
    )
    monkeypatch.chdir(tmp_path)
    model = Counted()
    tight = Flujo(priced_pipeline(model), persist_state=False, pipeline_name="tight")
    assert tight.usage_limits == UsageLimits(request_limit=1)
    with pytest.raises(UsageLimitExceededError) as info:
        await tight.run_async("topic")
    assert info.value.limit == "request_limit"
    assert model.requests == 1
    other = Flujo(priced_pipeline(model), persist_state=False, pipeline_name="roomy")
    assert other.usage_limits == UsageLimits(total_cost_usd_limit=100.0)
    assert (await other.run_async("topic")).status == "completed"
    assert model.requests == 5


async def test_a_task_client_resumes_under_the_budgets_of_flujo_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    toml = tmp_path / "flujo.toml"
    toml.write_text("[budgets.pipelines.articles]\ntotal_cost_usd_limit = 4.0\n")
    model = Counted()
    registry = PipelineRegistry()
    registry.register(priced_pipeline(model), "articles", "1.0.0")
    async with SQLiteBackend(tmp_path / "runs.db") as backend:
        runner = Flujo(registry=registry, pipeline_name="articles", state_backend=backend)
        with pytest.raises(UsageLimitExceededError):
            await runner.run_async("topic", run_id="article-1")
        assert model.requests == 2
        client = TaskClient(backend, registry=registry)
        (summary,) = await client.list_tasks(status="failed")
        assert summary.usage == Usage(2, 200, 40, 2 * CALL_COST)
        assert summary.error is not None
        assert summary.error["type"] == "UsageLimitExceededError"
        with pytest.raises(UsageLimitExceededError):
            await client.resume_task("article-1")
        assert model.requests == 2
        toml.write_text("[budgets.pipelines.articles]\ntotal_cost_usd_limit = 10.0\n")
        result = await client.resume_task("article-1")
    assert result.status == "completed"
    assert model.requests == 4
    assert result.usage == Usage(4, 400, 80, 4 * CALL_COST)


async def test_calls_side_by_side_each_check_the_limit_as_they_start() -> None:
    """Map items (and parallel branches) run their agent calls concurrently: each checks the
    limit when it starts, so together they can go over it (docs/budgets.md)."""
    model = Counted()
    items = Pipeline.from_steps([Step("ask", agent=make_agent(model.model, pricing=PRICE))])
    runner = Flujo(
        MapStep("each", items, max_concurrency=3),
        persist_state=False,
        usage_limits=UsageLimits(request_limit=2),
    )
    with pytest.raises(UsageLimitExceededError) as info:
        await runner.run_async(list(range(6)))
    # at most the limit plus the calls that were in flight (max_concurrency - 1) ...
    assert 2 <= model.requests <= 2 + 2
    # ... and no item started after the limit was reached
    assert model.requests < 6
    assert info.value.usage.requests == model.requests


async def test_a_response_that_crosses_the_token_limit_is_kept() -> None:
    """BUG (reported): "the call that crosses a limit finishes; the next one is refused"
    (flujo.domain.usage). For ``total_tokens_limit`` a pydantic-ai agent is given the tokens
    left, and pydantic-ai checks them *after* each response: the response that crosses the
    limit is paid for, then the call raises, its answer is dropped and the step fails. A cost
    limit keeps the crossing call's answer (see the cost-limit test above)."""
    model = Counted()
    pipeline = priced_pipeline(model)  # 120 tokens per step
    runner = Flujo(pipeline, persist_state=False, usage_limits=UsageLimits(total_tokens_limit=150))
    with pytest.raises(UsageLimitExceededError) as info:
        await runner.run_async("topic")
    assert model.requests == 2  # review started at 120 tokens (< 150) and crossed the limit
    history = info.value.result.step_history
    assert [(r.name, r.success) for r in history] == [
        ("draft", True),
        ("review", True),  # fails today: review's answer is dropped, the step failed
        ("polish", False),
    ]


# --------------------------------------------------------------------------------------------
# a budget across a crash
# --------------------------------------------------------------------------------------------

# The child runs the four priced steps and dies (os._exit) while the model answers step 3,
# after steps 1 and 2 were committed. argv: backend ("sqlite" or "postgres"), store (a path or
# a DSN), schema, run id.
CRASH_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys

    from pydantic_ai import ModelResponse, TextPart
    from pydantic_ai.models.function import FunctionModel
    from pydantic_ai.usage import RequestUsage

    from flujo import Flujo, Pipeline, Step
    from flujo.agents import ModelPrice, make_agent
    from flujo.state.backends.postgres import PostgresBackend
    from flujo.state.backends.sqlite import SQLiteBackend

    kind, store, schema, run_id = sys.argv[1:5]
    calls = 0

    def respond(messages, info):
        global calls
        calls += 1
        if calls == 3:
            os._exit(1)  # a crash inside step 3: its call's usage is never committed
        return ModelResponse(
            parts=[TextPart("done")], usage=RequestUsage(input_tokens=100, output_tokens=20)
        )

    price = ModelPrice(input_per_million=10_000, output_per_million=50_000)
    model = FunctionModel(respond, model_name="counted")
    pipeline = Pipeline.from_steps(
        [Step(name, agent=make_agent(model, pricing=price))
         for name in ("draft", "review", "polish", "publish")]
    )

    async def main():
        if kind == "sqlite":
            backend = SQLiteBackend(store)
        else:
            backend = PostgresBackend(store, schema=schema, pool_min=0)
        async with backend:
            await Flujo(pipeline, state_backend=backend).run_async("topic", run_id=run_id)

    asyncio.run(main())
    """
)


def crash_child(kind: str, store: str, schema: str, run_id: str, cwd: Path) -> None:
    python_path = os.pathsep.join(filter(None, [FLUJO_PATH, os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, kind, store, schema, run_id],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": python_path},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr


async def resume_after_the_crash(backend: StateBackend, run_id: str) -> None:
    state = await backend.load_state(run_id)
    assert state is not None
    assert state["status"] == "running"
    assert state["current_step_index"] == 2
    # steps 1 and 2 were committed with their usage; step 3's request died with the process
    assert state["usage"] == Usage(2, 200, 40, 2 * CALL_COST).to_dict()

    model = Counted()
    pipeline = priced_pipeline(model)
    at_limit = Flujo(
        pipeline, state_backend=backend, usage_limits=UsageLimits(total_cost_usd_limit=4.0)
    )
    with pytest.raises(UsageLimitExceededError) as info:
        await at_limit.run_async("topic", run_id=run_id)
    assert model.requests == 0
    assert info.value.usage == Usage(2, 200, 40, 2 * CALL_COST)
    stored = await backend.load_state(run_id)
    assert stored is not None
    assert stored["status"] == "failed"
    assert stored["error"]["type"] == "UsageLimitExceededError"

    # With room for the rest, the run finishes; its usage counts both processes' calls.
    roomy = Flujo(
        pipeline, state_backend=backend, usage_limits=UsageLimits(total_cost_usd_limit=8.0)
    )
    result = await roomy.run_async("topic", run_id=run_id)
    assert model.requests == 2
    assert result.status == "completed"
    assert result.usage == Usage(4, 400, 80, 4 * CALL_COST)


@pytest.mark.slow
async def test_a_budget_holds_across_a_crash_on_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    await asyncio.to_thread(crash_child, "sqlite", str(path), "", "crash-1", tmp_path)
    async with SQLiteBackend(path) as backend:
        await resume_after_the_crash(backend, "crash-1")


@pytest.mark.slow
async def test_a_budget_holds_across_a_crash_on_postgres(
    tmp_path: Path, postgres_dsn: str, postgres_schema: str
) -> None:
    async with PostgresBackend(postgres_dsn, schema=postgres_schema, pool_min=0) as backend:
        await backend.migrate()
        await asyncio.to_thread(
            crash_child, "postgres", postgres_dsn, postgres_schema, "crash-1", tmp_path
        )
        await resume_after_the_crash(backend, "crash-1")


# --------------------------------------------------------------------------------------------
# the tool allowlist
# --------------------------------------------------------------------------------------------


class ToolLog:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def tools(self) -> tuple[Any, Any]:
        def lookup(city: str) -> str:
            """Look a city up."""
            self.calls.append("lookup")
            return f"{city}: sunny"

        def delete_everything(confirm: bool) -> str:
            """Delete every record."""
            self.calls.append("delete_everything")
            return "deleted"

        return lookup, delete_everything


async def test_a_pydantic_ai_tool_outside_the_allowlist_fails_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_TOOL_ALLOWLIST, "lookup")
    log = ToolLog()
    agent = make_agent("test", tools=list(log.tools()))  # the test model calls every tool
    async with SQLiteBackend(tmp_path / "runs.db") as backend:
        result = await Flujo(Step("plan", agent=agent), state_backend=backend).run_async("go")
        state = await backend.load_state(result.run_id)
    assert result.status == "failed"
    assert "delete_everything" not in log.calls
    (record,) = result.step_history
    assert record.error is not None
    assert record.error.type == "ToolNotAllowedError"
    assert "'delete_everything' is not allowed" in record.error.message
    # the request that asked for the tool counts, for the step and the run
    assert record.usage is not None
    assert record.usage.requests == 1
    assert result.usage == record.usage
    assert state is not None
    assert state["step_history"][0]["error"]["type"] == "ToolNotAllowedError"
    assert state["error"]["type"] == "ToolNotAllowedError"
    assert state["usage"] == result.usage.to_dict()


async def test_allowed_pydantic_ai_tools_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_TOOL_ALLOWLIST, "lookup, delete_everything")
    log = ToolLog()
    agent = make_agent("test", tools=list(log.tools()))
    result = await Flujo(Step("plan", agent=agent), persist_state=False).run_async("go")
    assert result.status == "completed"
    assert sorted(log.calls) == ["delete_everything", "lookup"]
    usage = result.step_history[0].usage
    assert usage is not None
    assert usage.requests == 2  # the tool calls, then the answer


class AsksFor:
    """A granular agent: turn 0 asks for ``tool``, turn 1 answers."""

    def __init__(self, tool: str) -> None:
        self.tool = tool

    async def turn(self, transcript: list[dict[str, Any]]) -> AgentTurn:
        if not any(message["role"] == "tool" for message in transcript):
            return AgentTurn(None, tool_calls=(ToolCall(self.tool, {"city": "Lima"}),))
        return AgentTurn(transcript[-1].get("content"))


async def test_a_granular_tool_outside_the_allowlist_fails_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_TOOL_ALLOWLIST, "lookup")
    log = ToolLog()
    lookup, delete_everything = log.tools()
    step = GranularStep(
        "agent",
        AsksFor("delete_everything"),
        tools={"lookup": lookup, "delete_everything": delete_everything},
    )
    async with SQLiteBackend(tmp_path / "runs.db") as backend:
        result = await Flujo(step, state_backend=backend).run_async("go")
        state = await backend.load_state(result.run_id)
    assert result.status == "failed"
    assert log.calls == []
    assert result.error is not None
    assert result.error.type == "ToolNotAllowedError"
    assert state is not None
    assert state["error"]["type"] == "ToolNotAllowedError"
    assert result.step_history[0].error is not None
    assert result.step_history[0].error.type == "ToolNotAllowedError"
    (top,) = [r for r in state["step_history"] if "path" not in r]  # the model turn is nested
    assert top["name"] == "agent"
    assert top["error"]["type"] == "ToolNotAllowedError"


async def test_an_allowed_granular_tool_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_TOOL_ALLOWLIST, "lookup")
    log = ToolLog()
    lookup, delete_everything = log.tools()
    step = GranularStep(
        "agent", AsksFor("lookup"), tools={"lookup": lookup, "delete_everything": delete_everything}
    )
    result = await Flujo(step, persist_state=False).run_async("go")
    assert result.status == "completed"
    assert result.output == "Lima: sunny"
    assert log.calls == ["lookup"]


# --------------------------------------------------------------------------------------------
# structured output
# --------------------------------------------------------------------------------------------

SLOPPY = "```json\n{'name': 'Paris', 'country': 'FR',}\n```"


class Spy:
    """Passes a call to ``inner`` and keeps the StructuredOutputError it raised."""

    def __init__(self, inner: PydanticAIAgent) -> None:
        self.inner = inner
        self.output_type = inner.output_type
        self.errors: list[StructuredOutputError] = []

    async def run(self, data: Any) -> Any:
        try:
            return await self.inner.run(data)
        except StructuredOutputError as exc:
            self.errors.append(exc)
            raise


async def test_sloppy_json_is_repaired_at_level_2_in_a_run() -> None:
    model = Counted(SLOPPY)
    agent = make_agent(model.model, output_type=City, structured_output="text", coercion_level=2)
    result = await Flujo(Step("city", agent=agent), persist_state=False).run_async("capital?")
    assert result.status == "completed"
    assert result.output == City(name="Paris", country="FR")
    assert model.requests == 1


async def test_at_level_0_the_step_fails_with_the_scrubbed_raw_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PII_SCRUB, "1")
    text = "```json\n{'name': 'Paris', 'country': 'FR', 'mayor': 'mayor@paris.example.fr',}\n```"
    spy = Spy(
        make_agent(
            Counted(text).model, output_type=City, structured_output="text", coercion_level=0
        )
    )
    async with SQLiteBackend(tmp_path / "runs.db") as backend:
        result = await Flujo(Step("city", agent=spy), state_backend=backend).run_async("x")
        state = await backend.load_state(result.run_id)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "StructuredOutputError"
    assert "not a valid City at coercion level 0" in result.error.message
    (error,) = spy.errors
    assert error.output_type == "City"
    assert "mayor@paris.example.fr" not in error.raw_text
    assert f"'mayor': '{REDACTED_EMAIL}'" in error.raw_text
    assert state is not None
    assert state["error"]["type"] == "StructuredOutputError"
    assert "mayor@paris.example.fr" not in json.dumps(state, default=str)


async def test_aros_settings_come_from_flujo_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "flujo.toml").write_text(
        '[aros]\ncoercion_tolerant_level = 2\nstructured_output_default = "text"\n'
    )
    monkeypatch.chdir(tmp_path)
    agents._FROM_FILE.clear()
    model = Counted(SLOPPY)
    agent = make_agent(model.model, output_type=City)  # neither mode nor level given
    assert agent.coercion_level == 2
    assert agent.structured_output == "text"
    result = await Flujo(Step("city", agent=agent), persist_state=False).run_async("capital?")
    assert result.output == City(name="Paris", country="FR")
    # An agent's own setting wins over the file.
    strict = make_agent(Counted(SLOPPY).model, output_type=City, coercion_level=0)
    failed = await Flujo(Step("city", agent=strict), persist_state=False).run_async("capital?")
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.type == "StructuredOutputError"


# --------------------------------------------------------------------------------------------
# the run's context as the agent's deps
# --------------------------------------------------------------------------------------------


class Notes(PipelineContext):
    bumps: int = 0
    notes: list[str] = []


def bumping_agent() -> PydanticAIAgent:
    """A test-model agent whose tool changes the run's context through ``ctx.deps``."""
    agent = Agent("test", deps_type=Notes)

    @agent.tool
    def bump(ctx: RunContext[Notes]) -> str:
        """Count a bump."""
        ctx.deps.bumps += 1
        ctx.deps.notes = [*ctx.deps.notes, "bumped"]
        return "bumped"

    return PydanticAIAgent(agent)


class FailsFirst:
    """Runs ``inner`` (passing the context on), then fails its first call."""

    def __init__(self, inner: PydanticAIAgent) -> None:
        self.inner = inner
        self.calls = 0

    async def run(self, data: Any, *, context: Notes) -> Any:
        self.calls += 1
        output = await self.inner.run(data, context=context)
        if self.calls == 1:
            raise RuntimeError("failed after the tool ran")
        return output


async def test_context_changes_made_by_tools_are_checkpointed(tmp_path: Path) -> None:
    async with SQLiteBackend(tmp_path / "runs.db") as backend:
        plain = Flujo(
            Step("bump", agent=bumping_agent()), context_model=Notes, state_backend=backend
        )
        done = await plain.run_async("go", run_id="plain")
        # Retried: the second attempt starts from the context as it was before the step.
        agent = FailsFirst(bumping_agent())
        retried = Flujo(
            Step("bump", agent=agent, config=StepConfig(retries=1)),
            context_model=Notes,
            state_backend=backend,
        )
        again = await retried.run_async("go", run_id="retried")
        # Failed: the context goes back to what was last committed.
        failing = Flujo(
            Step("bump", agent=FailsFirst(bumping_agent())),
            context_model=Notes,
            state_backend=backend,
        )
        failed = await failing.run_async("go", run_id="failed")
        stored = {
            run_id: (await backend.load_state(run_id)) or {}
            for run_id in ("plain", "retried", "failed")
        }
    assert done.final_pipeline_context.bumps == 1
    assert stored["plain"]["pipeline_context"]["notes"] == ["bumped"]
    assert again.step_history[0].attempts == 2
    assert again.final_pipeline_context.bumps == 1
    assert stored["retried"]["pipeline_context"]["bumps"] == 1
    assert stored["retried"]["pipeline_context"]["notes"] == ["bumped"]
    assert failed.status == "failed"
    assert failed.final_pipeline_context.bumps == 0
    assert stored["failed"]["pipeline_context"]["bumps"] == 0
    assert stored["failed"]["pipeline_context"]["notes"] == []


# --------------------------------------------------------------------------------------------
# resume re-types a stored agent output
# --------------------------------------------------------------------------------------------


async def test_a_resumed_run_retypes_the_stored_agent_output(tmp_path: Path) -> None:
    seen: list[Any] = []
    fail = [True]

    async def describe(city):  # type: ignore[no-untyped-def]  # no annotation: typed from geo
        seen.append(city)
        if fail[0]:
            raise RuntimeError("not yet")
        return f"{city.name} is in {city.country}"

    model = Counted('{"name": "Lima", "country": "PE"}')
    geo: Step[Any, Any] = Step("geo", agent=Agent(model.model, output_type=City))
    assert geo.output_type is City
    pipeline = geo >> Step.from_callable(describe, name="describe")
    async with SQLiteBackend(tmp_path / "runs.db") as backend:
        first = await Flujo(pipeline, state_backend=backend).run_async("x", run_id="retype")
        fail[0] = False
        resumed = await Flujo(pipeline, state_backend=backend).run_async("x", run_id="retype")
    assert first.status == "failed"
    assert resumed.status == "completed"
    assert model.requests == 1  # geo was not asked again
    assert seen == [City(name="Lima", country="PE")] * 2
    assert all(type(value) is City for value in seen)
    assert resumed.output == "Lima is in PE"
