"""pydantic-ai agents as steps: typed output, usage and cost per step, and a budget that holds."""

import asyncio
import tempfile
from pathlib import Path

from pydantic import BaseModel
from pydantic_ai import ModelResponse, TextPart, UserPromptPart
from pydantic_ai.messages import ModelMessage
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel

from flujo import Flujo, PipelineResult, Step, UsageLimits
from flujo.agents import ModelPrice, make_agent
from flujo.exceptions import UsageLimitExceededError
from flujo.state import SQLiteBackend


class Trip(BaseModel):
    city: str
    days: int


def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city}"


postcards_asked: list[str] = []  # every request the postcard model received


def write_postcard(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """An offline stand-in for a real model: reads the trip (the prompt is its JSON)."""
    prompt = next(p.content for p in messages[-1].parts if isinstance(p, UserPromptPart))
    trip = Trip.model_validate_json(str(prompt))
    postcards_asked.append(trip.city)
    return ModelResponse(parts=[TextPart(f"Greetings from {trip.city}: {trip.days} days of sun!")])


# Offline models cost nothing; a price makes their (made-up) cost visible.
price = ModelPrice(input_per_million=2.5, output_per_million=10.0)

planner = make_agent(
    # pydantic-ai's test model calls every tool, then answers with these arguments; use a
    # real model the same way, e.g. make_agent("openai:gpt-4o", ...)
    TestModel(custom_output_args={"city": "Lisbon", "days": 3}),
    system_prompt="Plan a short trip.",
    output_type=Trip,
    tools=[weather],
    pricing=price,
)
writer = make_agent(
    FunctionModel(write_postcard),
    system_prompt="Write a one-line postcard about the trip you are given (as JSON).",
    pricing=price,
)
pipeline = Step("plan", agent=planner) >> Step("postcard", agent=writer)
TRIP = "A long weekend somewhere warm"


def show(result: PipelineResult) -> None:
    for step in result.step_history:
        print(f"  {step.name:<8} {'ok' if step.success else 'failed':<6} {step.output!r}")
        print(f"           {step.usage}")
    print(f"  run total: {result.usage}")


async def main(store: Path) -> None:
    async with SQLiteBackend(store) as backend:
        runner = Flujo(
            pipeline,
            state_backend=backend,
            usage_limits=UsageLimits(total_cost_usd_limit=0.50, request_limit=10),
        )
        result = await runner.run_async(TRIP, run_id="trip-1")
        print(f"trip-1: {result.status}")
        show(result)
        plan = result.step_history[0].output
        print(f"  the plan is a {type(plan).__name__}: {plan.days} days in {plan.city}")
        stored = await backend.load_state("trip-1")
        print(f"  usage stored with the run: {stored['usage']}")

        # The planner makes two requests (the weather tool call, then its answer). With a
        # budget of two requests, the run stops before the postcard model is asked anything.
        postcards_asked.clear()
        tight = Flujo(pipeline, state_backend=backend, usage_limits=UsageLimits(request_limit=2))
        try:
            await tight.run_async(TRIP, run_id="trip-2")
        except UsageLimitExceededError as exc:
            print(f"\ntrip-2: {type(exc).__name__} ({exc.limit})")
            print(f"  run {exc.result.status} at step {exc.result.failed_step!r}")
            print(f"  used: {exc.usage}")
            print(f"  postcard requests: {len(postcards_asked)}")

        # The usage is stored with the run: resuming under the same budget stops again ...
        try:
            await tight.run_async(TRIP, run_id="trip-2")
        except UsageLimitExceededError:
            print("  resumed with the same budget: stopped again")
            print(f"  postcard requests: {len(postcards_asked)}")
        # ... and a larger budget finishes it, counting the requests of every attempt.
        roomy = Flujo(pipeline, state_backend=backend, usage_limits=UsageLimits(request_limit=5))
        result = await roomy.run_async(TRIP, run_id="trip-2")
        print(f"  resumed with request_limit=5: {result.status}, {result.output!r}")
        print(f"  run total: {result.usage}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as directory:  # the store lives only for the demo
        asyncio.run(main(Path(directory) / "agents.db"))
