"""Managed state: ContextReference fields whose data lives in state providers, in four demos.

1. Basic hydration and persistence: a research pipeline grows a knowledge graph that lives in
   a provider; the context holds only a pointer to it.
2. Multiple providers: one step reads user preferences from one provider and writes findings
   to another.
3. A custom ExecutorFactory: providers configured on the factory, given to the runner with
   ``executor_factory=``, and merged with the runner's own ``state_providers=``.
4. Durability: a run fails midway, the store keeps only the pointer, and a new runner resumes
   the run, hydrating the data again from the provider.

Runs are stored in ./flujo_ops.db (the default SQLite store); the providers keep their data in
memory, standing in for a database that outlives the runs.

    python examples/state_providers_demo.py
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from flujo import Flujo, PipelineContext, TaskClient, step
from flujo.application.core.factories import ExecutorFactory
from flujo.domain.interfaces import StateProvider
from flujo.domain.models import ContextReference

Fact = dict[str, str]


class KnowledgeGraphProvider(StateProvider):
    """A knowledge graph per key (in memory here; a graph database in real life)."""

    def __init__(self, name: str = "kg") -> None:
        self.name = name
        self.graphs: dict[str, list[Fact]] = {}
        self.loads = 0
        self.saves = 0

    async def load(self, key: str) -> list[Fact]:
        self.loads += 1
        return [dict(fact) for fact in self.graphs.get(key, [])]  # a copy, as a database gives

    async def save(self, key: str, data: list[Fact]) -> None:
        self.saves += 1
        self.graphs[key] = [dict(fact) for fact in data]


class PreferencesProvider(StateProvider):
    """User preferences, keyed by user."""

    def __init__(self, preferences: dict[str, dict[str, str]]) -> None:
        self.preferences = preferences

    async def load(self, key: str) -> dict[str, str]:
        return dict(self.preferences.get(key, {}))

    async def save(self, key: str, data: dict[str, str]) -> None:
        self.preferences[key] = dict(data)


class ResearchContext(PipelineContext):
    # Checkpoints store {"provider_id": "kg", "key": "research_graph"}, never the graph.
    knowledge: ContextReference[list[Fact]] = ContextReference(
        provider_id="kg", key="research_graph"
    )


class PersonalContext(PipelineContext):
    knowledge: ContextReference[list[Fact]] = ContextReference(provider_id="kg", key="ana_graph")
    preferences: ContextReference[dict[str, str]] = ContextReference(provider_id="prefs", key="ana")


@step
async def research(topic: str, *, context: ResearchContext) -> str:
    graph = context.knowledge.get()  # loaded from the provider before this step
    for source in ("encyclopedia", "journal"):
        graph.append({"topic": topic, "source": source})
    context.knowledge.set(graph)  # saved to the provider after this step succeeds
    return topic


@step
async def summarize(topic: str, *, context: ResearchContext) -> str:
    facts = [f for f in context.knowledge.get() if f["topic"] == topic]
    return f"{topic}: {len(facts)} facts from {', '.join(f['source'] for f in facts)}"


@step
async def personal_research(topic: str, *, context: PersonalContext) -> str:
    language = context.preferences.get().get("language", "en")
    graph = context.knowledge.get()
    graph.append({"topic": topic, "source": f"search ({language})"})
    context.knowledge.set(graph)
    return f"{topic} researched in {language!r}"


def stored_pointer(run_id: str, field: str) -> Any:
    """The context field as the store holds it (what a checkpoint wrote)."""

    async def read() -> Any:
        client = TaskClient()  # the configured store: ./flujo_ops.db
        try:
            task = await client.get_task(run_id)
        finally:
            await client.aclose()
        assert task is not None
        return task.context[field]

    return asyncio.run(read())


def show_graph(provider: KnowledgeGraphProvider, key: str) -> None:
    for fact in provider.graphs.get(key, []):
        print(f"    {fact['topic']} <- {fact['source']}")


def demo_basic() -> None:
    print("Demo 1: basic hydration and persistence")
    kg = KnowledgeGraphProvider()
    runner = Flujo(research >> summarize, context_model=ResearchContext, state_providers={"kg": kg})
    first = runner.run("tides")
    second = runner.run("moons")  # a new run, on the same graph: it starts from 2 facts
    print(f"  {first.output}")
    print(f"  {second.output}")
    print(f"  graph 'research_graph' in the provider ({len(kg.graphs['research_graph'])} facts):")
    show_graph(kg, "research_graph")
    print(f"  provider calls: {kg.loads} loads, {kg.saves} saves (one each per step)")
    pointer = json.dumps(stored_pointer(second.run_id, "knowledge"))
    print(f"  the store holds for 'knowledge': {pointer}")
    print()


def demo_multiple_providers() -> None:
    print("Demo 2: multiple providers")
    kg = KnowledgeGraphProvider()
    prefs = PreferencesProvider({"ana": {"language": "es"}})
    runner = Flujo(
        personal_research,
        context_model=PersonalContext,
        state_providers={"kg": kg, "prefs": prefs},
    )
    result = runner.run("volcanoes")
    print(f"  {result.output}")
    print(f"  graph 'ana_graph': {kg.graphs['ana_graph']}")
    print(f"  preferences 'ana': {prefs.preferences['ana']}")
    print()


def demo_custom_factory() -> None:
    print("Demo 3: a custom ExecutorFactory")
    shared_kg = KnowledgeGraphProvider()
    factory = ExecutorFactory(state_providers={"kg": shared_kg})
    runner = Flujo(research >> summarize, context_model=ResearchContext, executor_factory=factory)
    print(f"  {runner.run('comets').output}")
    print(f"  providers from the factory: {sorted(runner.state_providers)}")
    # state_providers= on top of a factory: merged, the runner's own winning for the same id.
    prefs = PreferencesProvider({"ana": {"language": "fr"}})
    merged = Flujo(
        personal_research,
        context_model=PersonalContext,
        executor_factory=factory,
        state_providers={"prefs": prefs},
    )
    print(f"  {merged.run('glaciers').output}")
    print(f"  providers merged: {sorted(merged.state_providers)}")
    print(f"  the factory's graph provider got both runs' data: {sorted(shared_kg.graphs)}")
    print()


def demo_durability() -> None:
    print("Demo 4: durability (fail midway, resume)")
    kg = KnowledgeGraphProvider()
    outage = {"review"}  # the review service is down during the first attempt

    @step
    async def review(topic: str, *, context: ResearchContext) -> str:
        if "review" in outage:
            raise ConnectionError("review service unavailable")
        graph = context.knowledge.get()  # hydrated again, in the resumed run
        graph.append({"topic": topic, "source": "peer review"})
        context.knowledge.set(graph)
        return topic

    pipeline = research >> review >> summarize
    run_id = f"durable-{uuid.uuid4().hex[:8]}"
    first = Flujo(pipeline, context_model=ResearchContext, state_providers={"kg": kg})
    failed = first.run("earthquakes", run_id=run_id)
    print(f"  first attempt: {failed.status} at step {failed.failed_step!r} ({failed.error})")
    print(f"  graph in the provider after 'research': {len(kg.graphs['research_graph'])} facts")
    pointer = stored_pointer(run_id, "knowledge")
    print(f"  stored reference: {json.dumps(pointer)}")
    print(f"  the checkpoint holds only the pointer: {sorted(pointer) == ['key', 'provider_id']}")

    outage.clear()
    loads_before = kg.loads
    second = Flujo(pipeline, context_model=ResearchContext, state_providers={"kg": kg})
    resumed = second.run("earthquakes", run_id=run_id)  # a new runner, the same run id
    print(f"  resumed: {resumed.status}: {resumed.output}")
    history = ", ".join(f"{r.name} {'ok' if r.success else 'failed'}" for r in resumed.step_history)
    print(f"  history: {history}")
    print(f"  loads while resuming: {kg.loads - loads_before} (review, summarize; not research)")
    print(f"  graph in the provider after the resume ({len(kg.graphs['research_graph'])} facts):")
    show_graph(kg, "research_graph")
    print(f"  stored reference after the resume: {json.dumps(stored_pointer(run_id, 'knowledge'))}")


def main() -> None:
    demo_basic()
    demo_multiple_providers()
    demo_custom_factory()
    demo_durability()


if __name__ == "__main__":
    main()
