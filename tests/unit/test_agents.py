"""flujo.agents: the pydantic-ai adapter, usage and cost, structured output, tool allowlist.

Everything runs offline with pydantic-ai's TestModel ("test") and FunctionModel.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from pydantic_ai import (
    Agent,
    ImageUrl,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    NativeOutput,
    RequestUsage,
    RunContext,
    TextPart,
    ToolCallPart,
    ToolOutput,
    UserPromptPart,
)
from pydantic_ai.exceptions import UnexpectedModelBehavior, UsageLimitExceeded
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel

from flujo import AppResources, Flujo, PipelineContext, Step
from flujo.agents import (
    RAW_TEXT_LIMIT,
    ModelPrice,
    PydanticAIAgent,
    as_agent,
    coerce_output,
    configure_prices,
    configure_structured_output,
    make_agent,
    price_of,
)
from flujo.domain.usage import _CURRENT, RunMeter, StepMeter, Usage, UsageLimits
from flujo.exceptions import (
    ConfigurationError,
    StructuredOutputError,
    ToolNotAllowedError,
    UsageLimitExceededError,
)

ALLOWLIST = "FLUJO_GOVERNANCE_TOOL_ALLOWLIST"


class City(BaseModel):
    name: str
    population: int


GOOD = '{"name": "Lima", "population": 10}'
LIMA = City(name="Lima", population=10)


@pytest.fixture(autouse=True)
def _clean_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ALLOWLIST, raising=False)
    monkeypatch.delenv("FLUJO_GOVERNANCE_PII_SCRUB", raising=False)
    monkeypatch.delenv("FLUJO_GOVERNANCE_PII_STRONG", raising=False)
    yield
    configure_prices(None)
    configure_structured_output("auto", 1)


@contextmanager
def metered(limits: UsageLimits | None = None, stored: Usage | None = None) -> Iterator[StepMeter]:
    """Run the body as if inside a flujo step (what the executor does for every step)."""
    step = StepMeter(RunMeter(limits, stored))
    token = _CURRENT.set(step)
    try:
        yield step
    finally:
        _CURRENT.reset(token)


class Script:
    """A FunctionModel that answers with the given texts in turn (the last one repeats) and
    counts its requests; every response reports 100 input and 20 output tokens."""

    def __init__(self, *texts: str) -> None:
        self.texts = texts
        self.calls = 0
        self.infos: list[AgentInfo] = []
        self.prompts: list[Any] = []

    def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.calls += 1
        self.infos.append(info)
        first = messages[0]
        if isinstance(first, ModelRequest):
            self.prompts.extend(p.content for p in first.parts if isinstance(p, UserPromptPart))
        text = self.texts[min(self.calls, len(self.texts)) - 1]
        return ModelResponse(
            parts=[TextPart(text)], usage=RequestUsage(input_tokens=100, output_tokens=20)
        )

    @property
    def model(self) -> FunctionModel:
        return FunctionModel(self)


def tool_looper(tool: str = "ping") -> tuple[FunctionModel, dict[str, int]]:
    """A model that calls ``tool`` on every request, forever (100 + 20 tokens each)."""
    counts = {"requests": 0}

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        counts["requests"] += 1
        return ModelResponse(
            parts=[ToolCallPart(tool, {})],
            usage=RequestUsage(input_tokens=100, output_tokens=20),
        )

    return FunctionModel(respond), counts


def pong() -> str:
    """Answer a ping."""
    return "pong"


def unique_model() -> str:
    return f"acme:model-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------------------------
# make_agent / PydanticAIAgent basics
# --------------------------------------------------------------------------------------------


async def test_make_agent_with_test_model_returns_text() -> None:
    agent = make_agent("test", system_prompt="Be brief.", name="brief")
    assert isinstance(agent, PydanticAIAgent)
    assert agent.output_type is str
    assert agent.model_name == "test"
    assert agent.name == "brief"
    assert await agent.run("hi") == "success (no tool calls)"


async def test_make_agent_with_a_pydantic_output_type() -> None:
    agent = make_agent("test", output_type=City)
    assert agent.output_type is City
    out = await agent.run("a city")
    assert isinstance(out, City)


async def test_tools_are_called() -> None:
    calls: list[int] = []

    def lookup(n: int) -> str:
        """Look something up."""
        calls.append(n)
        return "found"

    agent = make_agent("test", tools=[lookup])
    out = await agent.run("go")
    assert calls == [0]
    assert json.loads(out) == {"lookup": "found"}


async def test_wrapping_an_agent_keeps_its_output_type_and_name() -> None:
    base = Agent(TestModel(), output_type=City, name="geo")
    agent = PydanticAIAgent(base)
    assert (agent.output_type, agent.name, agent.model_name) == (City, "geo", "test")
    assert isinstance(await agent.run("x"), City)
    # the user's agent is not changed by running it through flujo
    assert base.output_type is City


def test_a_model_whose_provider_is_not_installed_is_a_configuration_error() -> None:
    if importlib.util.find_spec("openai") is not None:
        pytest.skip("the openai package is installed here")
    with pytest.raises(ConfigurationError, match="openai"):
        make_agent("openai:gpt-4o")


def test_wrapping_something_else_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"pydantic_ai\.Agent"):
        PydanticAIAgent(object())


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="structured output mode"):
        make_agent("test", structured_output="json")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="coercion level"):
        make_agent("test", coercion_level=3)
    with pytest.raises(ConfigurationError, match="coercion level"):
        configure_structured_output(coercion_level=True)


@pytest.mark.parametrize(
    ("data", "prompt"),
    [
        ("plain text", "plain text"),
        (LIMA, LIMA.model_dump_json()),
        ({"b": 1, "a": [1, 2]}, '{"b":1,"a":[1,2]}'),
        ({1: {"x"}}, '{"1":["x"]}'),
        (None, "null"),
    ],
)
async def test_prompt_from_data(data: Any, prompt: str) -> None:
    script = Script("ok")
    assert await PydanticAIAgent(Agent(script.model)).run(data) == "ok"
    assert script.prompts == [prompt]


async def test_multimodal_content_is_passed_as_it_is() -> None:
    script = Script("a cat")
    image = ImageUrl(url="https://example.com/cat.png")
    await PydanticAIAgent(Agent(script.model)).run(["What is this?", image])
    assert script.prompts == [["What is this?", image]]


async def test_prompt_falls_back_to_str_for_data_json_cannot_hold() -> None:
    class Thing:
        def __str__(self) -> str:
            return "a thing"

    script = Script("ok")
    await PydanticAIAgent(Agent(script.model)).run(Thing())
    assert script.prompts == ["a thing"]


# --------------------------------------------------------------------------------------------
# deps
# --------------------------------------------------------------------------------------------


class ShopContext(PipelineContext):
    customer: str = "ana"


class ShopResources(AppResources):
    store: str = "lima-1"


def _echo_deps_agent(deps_type: type, attribute: str) -> Agent[Any, str]:
    seen: dict[str, Any] = {}

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("who", {})])
        return ModelResponse(parts=[TextPart(str(seen["value"]))])

    agent: Agent[Any, str] = Agent(FunctionModel(respond), deps_type=deps_type)

    @agent.tool
    def who(ctx: RunContext[Any]) -> str:
        seen["value"] = getattr(ctx.deps, attribute)
        return "noted"

    return agent


async def test_deps_are_the_run_context_for_a_pipeline_context_deps_type() -> None:
    agent = _echo_deps_agent(ShopContext, "customer")
    runner = Flujo(
        Step("who", agent=PydanticAIAgent(agent)),
        context_model=ShopContext,
        initial_context_data={"customer": "bea"},
        persist_state=False,
    )
    result = await runner.run_async("x")
    assert result.status == "completed"
    assert result.output == "bea"


async def test_deps_are_the_resources_for_an_app_resources_deps_type() -> None:
    agent = _echo_deps_agent(ShopResources, "store")
    runner = Flujo(
        Step("who", agent=PydanticAIAgent(agent)),
        resources=ShopResources(store="cusco-2"),
        persist_state=False,
    )
    result = await runner.run_async("x")
    assert result.output == "cusco-2"


async def test_missing_deps_are_a_configuration_error() -> None:
    agent = PydanticAIAgent(_echo_deps_agent(ShopContext, "customer"))
    with pytest.raises(ConfigurationError, match=r"context_model"):
        await agent.run("x", context=PipelineContext())


async def test_other_deps_types_get_no_deps() -> None:
    script = Script("ok")
    agent = PydanticAIAgent(Agent(script.model, deps_type=dict))
    assert await agent.run("x", context=ShopContext(), resources=ShopResources()) == "ok"


# --------------------------------------------------------------------------------------------
# coerce_output
# --------------------------------------------------------------------------------------------

FENCED = f"Here you go:\n```json\n{GOOD}\n```\nAnything else?"
PROSE = f"Sure! The city is {GOOD}. Hope this helps."
TRAILING = '{"name": "Lima", "population": 10,}'
SINGLE_QUOTES = "{'name': 'Lima', 'population': 10}"
UNQUOTED = "{name: 'Lima', population: 10"
FENCED_BROKEN = f"```json\n{TRAILING}\n```"


@pytest.mark.parametrize(
    ("text", "lowest_level"),
    [
        (GOOD, 0),
        (f"  {GOOD}\n", 0),
        (FENCED, 1),
        (PROSE, 1),
        ("[1] is a footnote. " + GOOD, 1),
        (TRAILING, 2),
        (SINGLE_QUOTES, 2),
        (UNQUOTED, 2),
        (FENCED_BROKEN, 2),
        ("Result: " + TRAILING + " (done)", 2),
    ],
)
@pytest.mark.parametrize("level", [0, 1, 2])
def test_coerce_output_levels(text: str, lowest_level: int, level: int) -> None:
    if level >= lowest_level:
        assert coerce_output(text, City, level) == LIMA
    else:
        with pytest.raises(StructuredOutputError) as info:
            coerce_output(text, City, level)
        assert info.value.raw_text == text
        assert info.value.output_type == "City"


def test_coerce_output_default_level_is_1() -> None:
    assert coerce_output(FENCED, City) == LIMA
    with pytest.raises(StructuredOutputError, match="coercion level 2"):
        coerce_output(TRAILING, City)


def test_level_1_never_changes_the_content() -> None:
    # an inner object alone is not taken when the outer one is broken
    text = '{"city": {"name": "Lima", "population": 10},}'
    with pytest.raises(StructuredOutputError):
        coerce_output(text, dict[str, Any], 1)
    assert coerce_output(text, dict[str, Any], 2) == {"city": {"name": "Lima", "population": 10}}


def test_coerce_output_other_types() -> None:
    assert coerce_output("```\n[1, 2, 3]\n```", list[int]) == [1, 2, 3]
    assert coerce_output("[1, 2, 3,]", list[int], 2) == [1, 2, 3]
    assert coerce_output("42", int, 0) == 42
    assert coerce_output("not json at all", str, 0) == "not json at all"


def test_coerce_output_failure_is_typed_and_says_why() -> None:
    with pytest.raises(StructuredOutputError) as info:
        coerce_output('{"name": "Lima"}', City, 2)
    err = info.value
    assert isinstance(err, ValueError)
    assert "population" in str(err)
    assert err.raw_text == '{"name": "Lima"}'


def test_raw_text_is_truncated() -> None:
    text = "x" * (RAW_TEXT_LIMIT + 500)
    with pytest.raises(StructuredOutputError) as info:
        coerce_output(text, City, 2)
    raw = info.value.raw_text
    assert raw.startswith("x" * RAW_TEXT_LIMIT)
    assert raw.endswith("[500 more characters]")
    assert len(raw) < RAW_TEXT_LIMIT + 50


def test_raw_text_is_scrubbed_when_pii_scrubbing_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUJO_GOVERNANCE_PII_SCRUB", "1")
    with pytest.raises(StructuredOutputError) as info:
        coerce_output("mail ana@example.com about it", City, 2)
    assert "ana@example.com" not in info.value.raw_text
    assert "[REDACTED_EMAIL]" in info.value.raw_text


def test_coerce_output_rejects_a_bad_level() -> None:
    with pytest.raises(ConfigurationError):
        coerce_output(GOOD, City, 5)


# --------------------------------------------------------------------------------------------
# structured output through the adapter
# --------------------------------------------------------------------------------------------


async def test_level_2_repairs_model_text_without_asking_again() -> None:
    script = Script(f"```json\n{SINGLE_QUOTES[:-1]}, }}\n```")
    agent = make_agent(script.model, output_type=City, coercion_level=2)
    with metered() as meter:
        assert await agent.run("x") == LIMA
    assert script.calls == 1
    assert meter.usage.requests == 1


@pytest.mark.parametrize("text", [TRAILING, SINGLE_QUOTES, FENCED_BROKEN])
async def test_level_0_fails_with_the_raw_text(text: str) -> None:
    script = Script(text)
    agent = make_agent(script.model, output_type=City, coercion_level=0)
    with pytest.raises(StructuredOutputError) as info:
        await agent.run("x")
    assert info.value.raw_text == text
    assert info.value.output_type == "City"


async def test_level_1_strips_fences_and_prose_but_does_not_repair() -> None:
    script = Script(PROSE)
    agent = make_agent(script.model, output_type=City, coercion_level=1)
    assert await agent.run("x") == LIMA
    assert script.calls == 1

    script = Script(FENCED_BROKEN)
    agent = make_agent(script.model, output_type=City, coercion_level=1)
    with pytest.raises(StructuredOutputError) as info:
        await agent.run("x")
    assert info.value.raw_text == FENCED_BROKEN


async def test_configured_level_applies_to_agents_without_one() -> None:
    script = Script(TRAILING)
    agent = make_agent(script.model, output_type=City)
    assert agent.coercion_level == 1
    configure_structured_output(coercion_level=2)
    assert agent.coercion_level == 2
    assert await agent.run("x") == LIMA


async def test_text_that_pydantic_ai_gives_up_on_is_coerced() -> None:
    # With an output tool and no text allowed, pydantic-ai asks again and then gives up
    # (UnexpectedModelBehavior); flujo still reads the value from the model's last text.
    script = Script(FENCED)
    base = Agent(script.model, output_type=ToolOutput(City))
    agent = PydanticAIAgent(base, coercion_level=1)
    assert agent.output_type is City
    assert await agent.run("x") == LIMA
    assert script.calls == 2  # pydantic-ai's own output retry

    script = Script(f"City: {TRAILING}")
    agent = PydanticAIAgent(Agent(script.model, output_type=ToolOutput(City)), coercion_level=1)
    with pytest.raises(StructuredOutputError) as info:
        await agent.run("x")
    assert info.value.raw_text == f"City: {TRAILING}"
    assert type(info.value.__cause__).__name__ == "UnexpectedModelBehavior"


async def test_a_failing_tool_loop_is_not_an_output_error() -> None:
    # pydantic-ai gives up on a tool the model keeps calling wrongly: not a structured output
    # problem, so its own error passes through
    model, _ = tool_looper("no_such_tool")
    agent = make_agent(model, output_type=City, coercion_level=2)
    with pytest.raises(UnexpectedModelBehavior, match="no_such_tool"):
        await agent.run("x")


@pytest.mark.parametrize(
    ("mode", "output_mode"),
    [("auto", "tool"), ("native", "native"), ("openai_json", "native"), ("prompted", "prompted")],
)
async def test_structured_output_modes(mode: Any, output_mode: str) -> None:
    script = Script(GOOD)
    agent = make_agent(script.model, output_type=City, structured_output=mode)
    assert await agent.run("x") == LIMA
    assert script.infos[0].model_request_parameters.output_mode == output_mode


async def test_text_mode_asks_for_json_text_and_coerces_it() -> None:
    script = Script(PROSE)
    agent = make_agent(script.model, output_type=City, structured_output="text")
    assert await agent.run("x") == LIMA
    params = script.infos[0].model_request_parameters
    assert params.output_mode == "text"
    assert "JSON schema" in (script.infos[0].instructions or "")
    assert '"population"' in (script.infos[0].instructions or "")

    script = Script("no idea")
    agent = make_agent(script.model, output_type=City, structured_output="text")
    with pytest.raises(StructuredOutputError) as info:
        await agent.run("x")
    assert info.value.raw_text == "no idea"


async def test_text_mode_for_a_str_output_is_plain_text() -> None:
    script = Script("just words")
    agent = make_agent(script.model, structured_output="text")
    assert await agent.run("x") == "just words"
    assert not script.infos[0].instructions


async def test_configured_mode_applies_and_an_agents_own_marker_is_kept() -> None:
    configure_structured_output("prompted")
    script = Script(GOOD)
    assert await make_agent(script.model, output_type=City).run("x") == LIMA
    assert script.infos[0].model_request_parameters.output_mode == "prompted"

    # an agent built with its own output marker keeps it under a configured default
    script = Script(GOOD)
    agent = PydanticAIAgent(Agent(script.model, output_type=NativeOutput(City)))
    assert agent.output_type is City
    assert await agent.run("x") == LIMA
    assert script.infos[0].model_request_parameters.output_mode == "native"


async def test_native_mode_with_the_test_model_falls_back_to_an_output_tool(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # TestModel does not support native structured output (pydantic-ai raises UserError).
    agent = make_agent("test", output_type=City, structured_output="native")
    with caplog.at_level(logging.WARNING, logger="flujo.agents"):
        assert isinstance(await agent.run("x"), City)
    assert caplog.records == []


async def test_prompted_mode_with_the_test_model_needs_custom_output_text() -> None:
    # TestModel's default text is not JSON; custom_output_text makes it answer JSON.
    agent = make_agent(
        TestModel(custom_output_text=GOOD), output_type=City, structured_output="prompted"
    )
    assert await agent.run("x") == LIMA


async def test_an_output_type_different_from_the_agents_is_asked_for_per_run() -> None:
    script = Script(GOOD)
    base = Agent(script.model)
    agent = PydanticAIAgent(base, output_type=City)
    assert await agent.run("x") == LIMA
    assert base.output_type is str


# --------------------------------------------------------------------------------------------
# usage and cost
# --------------------------------------------------------------------------------------------


async def test_usage_is_reported_to_the_step() -> None:
    script = Script(GOOD)
    agent = make_agent(
        script.model,
        output_type=City,
        pricing=ModelPrice(input_per_million=2.0, output_per_million=10.0),
    )
    with metered() as meter:
        await agent.run("x")
        await agent.run("y")
    assert meter.usage.requests == 2
    assert meter.usage.input_tokens == 200
    assert meter.usage.output_tokens == 40
    assert meter.usage.cost_usd == pytest.approx((200 * 2.0 + 40 * 10.0) / 1e6)
    assert meter.run.total == meter.usage


async def test_usage_of_a_failed_call_is_reported() -> None:
    script = Script("not json")
    agent = make_agent(script.model, output_type=City, coercion_level=0)
    with metered() as meter, pytest.raises(StructuredOutputError):
        await agent.run("x")
    assert meter.usage.requests == script.calls == 2


async def test_test_model_usage_costs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flujo.agents"), metered() as meter:
        await make_agent("test").run("hi")
        await PydanticAIAgent(Agent(Script("x").model)).run("hi")
    assert meter.usage.requests == 2
    assert meter.usage.total_tokens > 0
    assert meter.usage.cost_usd == 0.0
    assert caplog.records == []


async def test_cost_of_a_named_model_comes_from_the_price_table() -> None:
    model = unique_model()
    configure_prices({model: {"input_per_million": 1.0, "output_per_million": 1.0}})

    class Named(FunctionModel):
        @property
        def model_name(self) -> str:
            return model.split(":", 1)[1]

        @property
        def system(self) -> str:
            return "acme"

    agent = make_agent(Named(Script("ok")))
    assert agent.model_name == model
    with metered() as meter:
        await agent.run("x")
    assert meter.usage.cost_usd == pytest.approx(120 / 1e6)


def test_price_lookup_order(caplog: pytest.LogCaptureFixture) -> None:
    # genai-prices knows gpt-4o (bundled data): $2.50 / $10 per million tokens
    assert price_of("openai:gpt-4o", 1_000_000, 1_000_000) == pytest.approx(12.5)
    assert price_of("gpt-4o", 1_000_000, 0) == pytest.approx(2.5)
    # the configured table wins over genai-prices (bare name, then the exact name)
    configure_prices({"gpt-4o": ModelPrice(input_per_million=1, output_per_million=1)})
    assert price_of("openai:gpt-4o", 1_000_000, 1_000_000) == pytest.approx(2.0)
    configure_prices(
        {
            "gpt-4o": {"input_per_million": 1, "output_per_million": 1},
            "openai:gpt-4o": {"input_per_million": 3, "output_per_million": 3},
        }
    )
    assert price_of("openai:gpt-4o", 1_000_000, 1_000_000) == pytest.approx(6.0)
    # an explicit price wins over the table
    explicit = {"input_per_million": 0.5, "output_per_million": 0}
    assert price_of("openai:gpt-4o", 1_000_000, 1_000_000, pricing=explicit) == 0.5
    configure_prices(None)
    assert price_of("openai:gpt-4o", 1_000_000, 0) == pytest.approx(2.5)
    assert caplog.records == []


def test_google_gla_models_are_found_by_name() -> None:
    assert price_of("google-gla:gemini-1.5-flash", 1_000_000, 0) > 0


def test_unknown_models_cost_nothing_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = unique_model()
    with caplog.at_level(logging.WARNING, logger="flujo.agents"):
        assert price_of(model, 1000, 1000) == 0.0
        assert price_of(model, 5, 5) == 0.0
    warnings = [r for r in caplog.records if r.name == "flujo.agents"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert model in message
    assert "[pricing]" in message
    assert "$0" in message


def test_offline_models_cost_nothing_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flujo.agents"):
        assert price_of("test", 10**6, 10**6) == 0.0
        assert price_of("function:respond:", 10**6, 10**6) == 0.0
    assert caplog.records == []
    # ... unless a price is given (to try cost limits offline)
    assert price_of("test", 10**6, 0, pricing=ModelPrice(input_per_million=1, output_per_million=0))
    configure_prices({"test": {"input_per_million": 4, "output_per_million": 0}})
    assert price_of("test", 10**6, 0) == 4.0


def test_a_price_table_must_be_a_table() -> None:
    with pytest.raises(ConfigurationError, match="table"):
        configure_prices(["gpt-4o"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        {"input_per_million": -1, "output_per_million": 1},
        {"input_per_million": math.inf, "output_per_million": 1},
        {"input_per_million": 1},
        {"input_per_million": 1, "output_per_million": 1, "currency": "EUR"},
        "cheap",
    ],
)
def test_invalid_prices_are_refused(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"\[pricing\] 'm'"):
        configure_prices({"m": bad})
    if isinstance(bad, dict):
        with pytest.raises(ValidationError):
            ModelPrice(**bad)


# --------------------------------------------------------------------------------------------
# usage limits
# --------------------------------------------------------------------------------------------


async def test_a_run_at_its_limit_makes_no_request() -> None:
    script = Script("ok")
    agent = make_agent(script.model)
    with (
        metered(UsageLimits(request_limit=3), stored=Usage(requests=3)),
        pytest.raises(UsageLimitExceededError) as info,
    ):
        await agent.run("x")
    assert script.calls == 0
    assert info.value.limit == "request_limit"
    assert info.value.usage == Usage(requests=3)


async def test_remaining_tokens_stop_a_multi_request_run() -> None:
    model, counts = tool_looper()
    pings: list[int] = []

    def ping() -> str:
        """Ping."""
        pings.append(1)
        return "pong"

    agent = make_agent(model, tools=[ping])
    limits = UsageLimits(total_tokens_limit=500)
    # 150 tokens used before: 350 left, so the third request (360 tokens) crosses the limit
    with metered(limits, stored=Usage(requests=1, input_tokens=100, output_tokens=50)) as meter:
        with pytest.raises(UsageLimitExceededError) as info:
            await agent.run("x")
    # The third response takes the run to 510 tokens: it is kept (its tool call runs), and
    # the fourth request is never made.
    assert counts["requests"] == 3
    assert len(pings) == 3
    err = info.value
    assert err.limit == "total_tokens_limit"
    assert err.limits == limits
    assert err.usage.requests == 4
    assert err.usage.total_tokens == 150 + 3 * 120
    assert meter.run.total == err.usage
    assert meter.usage.requests == 3


async def test_remaining_requests_stop_a_multi_request_run() -> None:
    model, counts = tool_looper("pong")
    agent = make_agent(model, tools=[pong])
    with metered(UsageLimits(request_limit=4), stored=Usage(requests=1)) as meter:
        with pytest.raises(UsageLimitExceededError) as info:
            await agent.run("x")
    assert counts["requests"] == 3
    assert info.value.limit == "request_limit"
    assert meter.run.total.requests == 4


async def test_pydantic_ais_own_request_limit_is_not_a_run_limit() -> None:
    model, counts = tool_looper("pong")
    agent = make_agent(model, tools=[pong])
    with metered(UsageLimits(total_cost_usd_limit=5.0)) as meter, pytest.raises(UsageLimitExceeded):
        await agent.run("x")
    assert counts["requests"] == 50  # pydantic-ai's default request_limit
    assert meter.usage.requests == 50


async def test_outside_a_run_nothing_is_metered() -> None:
    assert await make_agent("test").run("hi") == "success (no tool calls)"


# --------------------------------------------------------------------------------------------
# tool allowlist
# --------------------------------------------------------------------------------------------


def _tools() -> tuple[list[str], list[Callable[..., str]]]:
    ran: list[str] = []

    def search(q: str) -> str:
        """Search."""
        ran.append("search")
        return "results"

    def delete_all() -> str:
        """Delete everything."""
        ran.append("delete_all")
        return "deleted"

    return ran, [search, delete_all]


async def test_a_tool_outside_the_allowlist_is_refused_before_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ALLOWLIST, "search")
    ran, tools = _tools()
    agent = make_agent(TestModel(call_tools=["delete_all"]), tools=tools)
    with metered() as meter, pytest.raises(ToolNotAllowedError) as info:
        await agent.run("x")
    assert ran == []
    assert info.value.tool == "delete_all"
    assert info.value.allowed == frozenset({"search"})
    assert meter.usage.requests == 1  # the request that asked for the tool is counted


async def test_allowed_tools_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ALLOWLIST, "search, delete_all")
    ran, tools = _tools()
    await make_agent("test", tools=tools).run("x")
    assert sorted(ran) == ["delete_all", "search"]


async def test_no_allowlist_allows_every_tool() -> None:
    ran, tools = _tools()
    await make_agent("test", tools=tools).run("x")
    assert sorted(ran) == ["delete_all", "search"]


async def test_a_refused_tool_fails_the_step_with_the_typed_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ALLOWLIST, "search")
    ran, tools = _tools()
    agent = make_agent(TestModel(call_tools=["delete_all"]), tools=tools)
    result = await Flujo(Step("act", agent=agent), persist_state=False).run_async("x")
    assert result.status == "failed"
    assert result.step_history[0].error is not None
    assert result.step_history[0].error.type == "ToolNotAllowedError"
    assert ran == []


async def test_output_tools_are_not_subject_to_the_allowlist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ALLOWLIST, "search")
    assert isinstance(await make_agent("test", output_type=City).run("x"), City)


# --------------------------------------------------------------------------------------------
# as_agent, imports
# --------------------------------------------------------------------------------------------


def test_as_agent() -> None:
    base = Agent("test")
    wrapped = as_agent(base)
    assert isinstance(wrapped, PydanticAIAgent)
    assert wrapped.agent is base
    assert as_agent(wrapped) is wrapped

    class Mine:
        async def run(self, data: Any) -> Any:
            return data

    mine = Mine()
    assert as_agent(mine) is mine


IMPORT_PROBE = """
import json, sys
import flujo
from flujo import Flujo, Step
light = "pydantic_ai" not in sys.modules
sys.modules["pydantic_ai"] = None  # as if the extra were not installed
import flujo.agents as agents
marker = object()
same = agents.as_agent(marker) is marker
try:
    agents.make_agent("test")
    message = None
except flujo.FlujoError as exc:
    message = f"{type(exc).__name__}: {exc}"
coerced = agents.coerce_output('```json\\n{"a": 1}\\n```', dict)
print(json.dumps({"light": light, "same": same, "message": message, "coerced": coerced}))
"""


def test_flujo_imports_without_pydantic_ai(tmp_path: Any) -> None:
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    data = json.loads(out.stdout)
    assert data["light"] is True
    assert data["same"] is True
    assert data["message"].startswith("ConfigurationError")
    assert "pip install 'flujo[ai]'" in data["message"]
    assert data["coerced"] == {"a": 1}


# --------------------------------------------------------------------------------------------
# in a flujo pipeline
# --------------------------------------------------------------------------------------------

PRICE = ModelPrice(input_per_million=1_000, output_per_million=2_000)


def test_an_agent_runs_as_a_pipeline_step() -> None:
    result = Flujo(
        Step("answer", agent=make_agent("test", system_prompt="Answer.")), persist_state=False
    ).run("hi")
    assert result.status == "completed"
    assert result.output == "success (no tool calls)"


def test_a_pydantic_ai_agent_is_wrapped_by_step() -> None:
    step: Step[Any, Any] = Step("geo", agent=Agent("test", output_type=City))
    assert isinstance(step.agent, PydanticAIAgent)
    assert step.output_type is City
    result = Flujo(step, persist_state=False).run("x")
    assert isinstance(result.output, City)


def test_pipeline_usage_is_in_the_step_history_and_the_result() -> None:
    one: Step[Any, Any] = Step("one", agent=make_agent("test", pricing=PRICE))
    two: Step[Any, Any] = Step("two", agent=make_agent("test", pricing=PRICE))
    pipeline = one >> two
    result = Flujo(pipeline, persist_state=False).run("hi")
    first, second = (r.usage for r in result.step_history)
    assert first is not None
    assert second is not None
    assert first.requests == second.requests == 1
    assert first.cost_usd == pytest.approx(
        (first.input_tokens * 1_000 + first.output_tokens * 2_000) / 1e6
    )
    assert result.usage == first + second


def test_a_run_limit_stops_the_pipeline_before_the_next_agent_call() -> None:
    script = Script("second")
    one: Step[Any, Any] = Step("one", agent=make_agent("test"))
    two: Step[Any, Any] = Step("two", agent=make_agent(script.model))
    pipeline = one >> two
    runner = Flujo(pipeline, persist_state=False, usage_limits=UsageLimits(request_limit=1))
    with pytest.raises(UsageLimitExceededError) as info:
        runner.run("hi")
    assert script.calls == 0
    assert info.value.usage.requests == 1


# -- granular steps with pydantic-ai agents --------------------------------------------------------


class Forecast(BaseModel):
    city: str
    sky: str


def lookup(city: str) -> str:
    """The sky over a city."""
    return f"sunny in {city}"


def weather_model(seen: list[list[ModelMessage]], final: str) -> FunctionModel:
    """Asks for lookup(city="Lima") first; answers ``final`` once it has the tool's result."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(list(messages))
        offered = {tool.name: tool.parameters_json_schema for tool in info.function_tools}
        assert "idempotency_key" not in offered["lookup"]["properties"]  # the step's, hidden
        returned = [p for m in messages for p in m.parts if p.part_kind == "tool-return"]
        if not returned:
            return ModelResponse(parts=[ToolCallPart("lookup", {"city": "Lima"})])
        return ModelResponse(parts=[TextPart(final)])

    return FunctionModel(respond)


def test_a_pydantic_ai_agent_runs_as_a_granular_step() -> None:
    keys: list[str] = []

    def lookup(city: str, idempotency_key: str = "") -> str:
        """The sky over a city."""
        keys.append(idempotency_key)
        return f"sunny in {city}"

    seen: list[list[ModelMessage]] = []
    agent = Agent(weather_model(seen, "It is sunny."), system_prompt="Be brief.", tools=[lookup])
    granular = Step.granular("ask", agent, max_turns=3, enforce_idempotency=True)
    result = Flujo(granular, persist_state=False).run("Weather in Lima?", run_id="wx")
    assert result.status == "completed", result.error
    assert result.output == "It is sunny."
    assert keys == ["wx:0:0:0"]  # run, step path, turn, call
    assert result.usage is not None
    assert result.usage.requests == 2
    first = seen[0][0]
    assert isinstance(first, ModelRequest)
    assert [p.part_kind for p in first.parts] == ["system-prompt", "user-prompt"]
    assert [p.part_kind for p in seen[1][-1].parts] == ["tool-return"]  # the tool's result


def test_a_granular_pydantic_ai_turn_gives_the_output_type() -> None:
    seen: list[list[ModelMessage]] = []
    agent = make_agent(
        weather_model(seen, '```json\n{"city": "Lima", "sky": "sunny"}\n```'),
        output_type=Forecast,
        tools=[lookup],
    )
    granular = Step.granular("ask", agent)
    result = Flujo(granular, persist_state=False).run("Weather in Lima?")
    assert result.status == "completed", result.error
    assert result.output == Forecast(city="Lima", sky="sunny")


def test_a_granular_pydantic_ai_step_stops_at_a_usage_limit() -> None:
    seen: list[list[ModelMessage]] = []
    agent = Agent(weather_model(seen, "done"), tools=[lookup])
    granular = Step.granular("ask", agent)
    runner = Flujo(granular, persist_state=False, usage_limits=UsageLimits(request_limit=1))
    with pytest.raises(UsageLimitExceededError):
        runner.run("Weather?")
    assert len(seen) == 1  # the second turn was never requested


def test_a_granular_step_needs_a_model() -> None:
    granular = Step.granular("ask", Agent(None), tools={})
    result = Flujo(granular, persist_state=False).run("hi")
    assert result.status == "failed"
    assert result.error is not None
    assert "has no model" in result.error.message
