"""Managed state (issue 5; spec 001): ContextReference fields hydrated from state providers.

Beyond the spec's own tests (tests/spec/test_state_providers_integration.py, kept as written):
hydration before every plain step and saving after it succeeds (top-level and nested), a
failed step saves nothing, checkpoints hold only the pointer, a resume hydrates again from the
provider, a missing provider is one warning and a typed error on ``get()``, the factory route
(``ExecutorFactory`` via ``Flujo(executor_factory=...)``, merged with ``state_providers=``), and
static typing of ``ContextReference[T]``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import Field

from flujo import (
    AgentTurn,
    ConditionalStep,
    Flujo,
    GranularStep,
    LoopStep,
    MapStep,
    ParallelStep,
    PipelineContext,
    PipelineResult,
    StateMachineStep,
    Step,
    ToolCall,
    Transition,
)
from flujo.application.core.factories import ExecutorFactory
from flujo.domain.events import PostStep
from flujo.domain.interfaces import StateProvider
from flujo.domain.models import ContextReference
from flujo.exceptions import ConfigurationError, ContextReferenceError
from flujo.state import InMemoryBackend, SQLiteBackend, StateBackend

from .steplib_helpers import Crash

RUN = "run-1"
SECRET = "kg-payload-that-must-never-reach-the-store"


class Provider(StateProvider):
    """An in-memory provider over ``storage`` (shared by "processes"), logging every call."""

    def __init__(self, storage: dict[str, Any] | None = None) -> None:
        self.storage: dict[str, Any] = {} if storage is None else storage
        self.log: list[tuple[str, str, Any]] = []

    async def load(self, key: str) -> Any:
        await asyncio.sleep(0)
        value = orjson.loads(orjson.dumps(self.storage.get(key, [])))  # a copy, like a DB read
        self.log.append(("load", key, value))
        return value

    async def save(self, key: str, data: Any) -> None:
        await asyncio.sleep(0)
        self.log.append(("save", key, data))
        self.storage[key] = orjson.loads(orjson.dumps(data))

    def calls(self) -> list[str]:
        return [f"{op} {key}" for op, key, _ in self.log]


class NotesContext(PipelineContext):
    notes: ContextReference[list[str]] = ContextReference(provider_id="kg", key="notes")


class TwoRefContext(PipelineContext):
    notes: ContextReference[list[str]] = ContextReference(provider_id="kg", key="notes")
    cache: ContextReference[list[str]] = ContextReference(provider_id="cache", key="hot")
    plain: list[str] = Field(default_factory=list)


def appender(label: str) -> Step[Any, Any]:
    """A step that appends ``label`` to the notes and returns how many there are."""

    async def append(data: Any, *, context: NotesContext) -> int:
        notes = context.notes.get()
        context.notes.set([*notes, label])
        return len(notes) + 1

    return Step.from_callable(append, name=label)


async def run(
    pipeline: Any,
    data: Any = "go",
    *,
    backend: StateBackend | None = None,
    run_id: str = RUN,
    context_model: type[PipelineContext] = NotesContext,
    **options: Any,
) -> PipelineResult[Any, Any]:
    async with Flujo(
        pipeline,
        context_model=context_model,
        state_backend=backend or InMemoryBackend(),
        **options,
    ) as runner:
        return await runner.run_async(data, run_id=run_id)


# -- hydrate before, save after --------------------------------------------------------------------


async def test_each_top_level_step_is_hydrated_before_and_saved_after() -> None:
    provider = Provider({"notes": ["seed"]})
    seen: list[list[str]] = []

    async def look(data: Any, *, context: NotesContext) -> Any:
        seen.append(list(context.notes.get()))
        return data

    pipeline = appender("a") >> Step.from_callable(look, name="look") >> appender("b")
    result = await run(pipeline, state_providers={"kg": provider})
    assert result.status == "completed", result.error
    assert result.output == 3
    assert provider.log == [
        ("load", "notes", ["seed"]),
        ("save", "notes", ["seed", "a"]),
        ("load", "notes", ["seed", "a"]),
        ("save", "notes", ["seed", "a"]),
        ("load", "notes", ["seed", "a"]),
        ("save", "notes", ["seed", "a", "b"]),
    ]
    assert seen == [["seed", "a"]]
    assert provider.storage == {"notes": ["seed", "a", "b"]}


async def test_a_change_in_the_provider_between_steps_is_seen_by_the_next_step() -> None:
    provider = Provider({"notes": []})

    def elsewhere(event: Any) -> None:  # after step "a" was saved, someone else writes
        if isinstance(event, PostStep) and event.step_result.name == "a":
            provider.storage["notes"] = [*provider.storage["notes"], "written elsewhere"]

    result = await run(
        appender("a") >> appender("b"), state_providers={"kg": provider}, hooks=[elsewhere]
    )
    assert result.status == "completed", result.error
    assert provider.storage == {"notes": ["a", "written elsewhere", "b"]}


async def test_every_reference_of_the_context_is_hydrated_and_saved() -> None:
    kg = Provider({"notes": ["n"]})
    cache = Provider({"hot": ["h"]})

    async def both(data: Any, *, context: TwoRefContext) -> Any:
        context.notes.set([*context.notes.get(), "n2"])
        context.cache.set([*context.cache.get(), "h2"])
        context.plain.append("p")
        return data

    result = await run(
        Step.from_callable(both, name="both"),
        context_model=TwoRefContext,
        state_providers={"kg": kg, "cache": cache},
    )
    assert result.status == "completed", result.error
    assert kg.storage == {"notes": ["n", "n2"]}
    assert cache.storage == {"hot": ["h", "h2"]}
    assert kg.calls() == ["load notes", "save notes"]
    assert cache.calls() == ["load hot", "save hot"]


async def test_nested_steps_are_hydrated_and_saved_each_time() -> None:
    provider = Provider({"notes": []})
    loop = LoopStep(
        "loop",
        appender("l1") >> appender("l2"),
        exit_condition_callable=lambda out, ctx: out >= 4,
        max_loops=5,
    )
    mapped = MapStep("map", appender("m"))
    branch = ConditionalStep(
        "branch", lambda out, ctx: "yes", {"yes": appender("c")}, default_branch=None
    )
    to_items = Step.from_callable(lambda n: [n, n], name="items")
    pipeline = loop >> to_items >> mapped >> branch
    result = await run(pipeline, state_providers={"kg": provider})
    assert result.status == "completed", result.error
    # Every plain step (nested or not) loaded before it ran and saved after; composite steps
    # themselves neither load nor save.
    ran = ["l1", "l2", "l1", "l2", "items", "m", "m", "c"]
    assert provider.calls() == ["load notes", "save notes"] * len(ran)
    assert provider.storage == {"notes": ["l1", "l2", "l1", "l2", "m", "m", "c"]}
    saves = [value for op, _, value in provider.log if op == "save"]
    loads = [value for op, _, value in provider.log if op == "load"]
    # Each step started from what the previous one saved.
    assert loads[1:] == saves[:-1]


async def test_parallel_branches_and_state_machine_states_are_hydrated_and_saved() -> None:
    provider = Provider({"notes": []})

    def to(state: str, label: str) -> Step[Any, Any]:
        async def move(data: Any, *, context: NotesContext) -> Transition:
            context.notes.set([*context.notes.get(), label])
            return Transition(state, data)

        return Step.from_callable(move, name=label)

    machine = StateMachineStep(
        "machine",
        {"draft": to("review", "s-draft"), "review": to("end", "s-review"), "end": appender("s")},
        start_state="draft",
        end_states=["end"],
    )
    branches = ParallelStep("par", {"a": appender("p-a"), "b": appender("p-b")}, max_concurrency=1)
    result = await run(machine >> branches, state_providers={"kg": provider})
    assert result.status == "completed", result.error
    assert provider.calls() == ["load notes", "save notes"] * 5
    assert provider.storage == {"notes": ["s-draft", "s-review", "s", "p-a", "p-b"]}


async def test_a_granular_step_is_hydrated_and_saved_as_a_whole() -> None:
    provider = Provider({"notes": ["known"]})
    seen: list[list[str]] = []

    class Agent:
        async def turn(self, transcript: list[Any], context: NotesContext) -> AgentTurn:
            seen.append(list(context.notes.get()))
            context.notes.set([*context.notes.get(), f"turn {len(seen)}"])
            if len(seen) == 1:
                return AgentTurn(None, (ToolCall("noop", {}),))
            return AgentTurn("done")

    step = GranularStep("agent", Agent(), tools={"noop": lambda: "ok"})
    result = await run(step, state_providers={"kg": provider})
    assert result.status == "completed", result.error
    assert seen == [["known"], ["known", "turn 1"]]
    assert provider.calls() == ["load notes", "save notes"]
    assert provider.storage == {"notes": ["known", "turn 1", "turn 2"]}


async def test_a_failed_step_saves_nothing() -> None:
    provider = Provider({"notes": ["kept"]})

    async def half_done(data: Any, *, context: NotesContext) -> Any:
        context.notes.set([*context.notes.get(), "half"])
        raise RuntimeError("boom")

    result = await run(
        appender("a") >> Step.from_callable(half_done, name="half"),
        state_providers={"kg": provider},
    )
    assert result.status == "failed"
    assert result.failed_step == "half"
    assert provider.calls() == ["load notes", "save notes", "load notes"]
    assert provider.storage == {"notes": ["kept", "a"]}


async def test_a_retried_step_saves_only_what_its_successful_attempt_left() -> None:
    provider = Provider({"notes": ["x"]})
    attempts: list[list[str]] = []

    async def flaky(data: Any, *, context: NotesContext) -> Any:
        notes = context.notes.get()
        attempts.append(list(notes))
        notes.append(f"attempt {len(attempts)}")  # in place: the retry must not see it
        context.notes.set(notes)
        if len(attempts) == 1:
            raise RuntimeError("transient")
        return data

    step = Step.from_callable(flaky, name="flaky", retries=1, backoff_s=0)
    result = await run(step, state_providers={"kg": provider})
    assert result.status == "completed", result.error
    assert attempts == [["x"], ["x"]]
    assert provider.calls() == ["load notes", "save notes"]
    assert provider.storage == {"notes": ["x", "attempt 2"]}


async def test_a_step_that_points_the_field_elsewhere_saves_under_the_new_key() -> None:
    provider = Provider({"notes": ["old"]})

    async def move(data: Any, *, context: NotesContext) -> Any:
        moved = ContextReference[list[str]](provider_id="kg", key="notes-v2")
        moved.set([*context.notes.get(), "moved"])
        context.notes = moved
        return data

    backend = InMemoryBackend()
    result = await run(Step.from_callable(move, name="move"), backend=backend,
                       state_providers={"kg": provider})  # fmt: skip
    assert result.status == "completed", result.error
    state = await backend.load_state(RUN)
    assert state is not None
    assert state["pipeline_context"]["notes"] == {"provider_id": "kg", "key": "notes-v2"}
    # The stored pointer leads to the data the step left.
    assert provider.storage.get("notes-v2") == ["old", "moved"]


# -- what the checkpoint holds ---------------------------------------------------------------------


def raw_context_rows(path: Path) -> dict[str, Any]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT field, value FROM run_context WHERE run_id = ?", (RUN,)
        ).fetchall()
    conn.close()
    return {field: orjson.loads(value) for field, value in rows}


async def test_the_checkpoint_stores_only_the_pointer(tmp_path: Path) -> None:
    provider = Provider({"notes": [SECRET]})
    db = tmp_path / "runs.db"

    async def grow(data: Any, *, context: NotesContext) -> str:
        context.notes.set([*context.notes.get(), SECRET + "-2"])
        return "grown"

    backend = SQLiteBackend(db)
    result = await run(
        Step.from_callable(grow, name="grow") >> appender("a"),
        backend=backend,
        state_providers={"kg": provider},
    )
    assert result.status == "completed", result.error
    state = await SQLiteBackend(db).load_state(RUN)
    assert state is not None
    assert state["pipeline_context"]["notes"] == {"provider_id": "kg", "key": "notes"}
    assert raw_context_rows(db)["notes"] == {"provider_id": "kg", "key": "notes"}
    # The data is nowhere in the store's files (database, WAL), only in the provider.
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("runs.db"))
    assert SECRET.encode() not in stored
    assert provider.storage["notes"] == [SECRET, SECRET + "-2", "a"]


async def test_the_pointer_is_stored_with_the_first_checkpoint_and_never_rewritten() -> None:
    backend = InMemoryBackend()
    written: list[set[str]] = []
    original = backend.write_checkpoint

    async def spy(checkpoint: Any) -> int:
        written.append(set(checkpoint.context))
        return await original(checkpoint)

    backend.write_checkpoint = spy  # type: ignore[method-assign]
    result = await run(
        appender("a") >> appender("b"), backend=backend, state_providers={"kg": Provider()}
    )
    assert result.status == "completed", result.error
    assert "notes" in written[0]
    assert all("notes" not in fields for fields in written[1:])


async def test_a_resume_hydrates_again_from_the_provider(tmp_path: Path) -> None:
    storage: dict[str, Any] = {"notes": ["start"]}
    db = tmp_path / "runs.db"
    crash = [True]
    seen: list[list[str]] = []

    async def second(data: Any, *, context: NotesContext) -> int:
        seen.append(list(context.notes.get()))
        if crash and crash.pop():
            raise Crash("the process died in the second step")
        context.notes.set([*context.notes.get(), "second"])
        return data

    pipeline = appender("first") >> Step.from_callable(second, name="second") >> appender("third")
    first_process = Provider(storage)
    with pytest.raises(Crash):
        await Flujo(
            pipeline,
            context_model=NotesContext,
            state_backend=SQLiteBackend(db),
            state_providers={"kg": first_process},
        ).run_async("go", run_id=RUN)
    state = await SQLiteBackend(db).load_state(RUN)
    assert state is not None
    assert state["current_step_index"] == 1
    assert state["pipeline_context"]["notes"] == {"provider_id": "kg", "key": "notes"}
    # The provider's data moves on while the run is down: the resume must read it from there.
    storage["notes"] = [*storage["notes"], "outside"]
    second_process = Provider(storage)
    result = await run(pipeline, backend=SQLiteBackend(db), state_providers={"kg": second_process})
    assert result.status == "completed", result.error
    assert seen == [["start", "first"], ["start", "first", "outside"]]
    assert second_process.calls() == ["load notes", "save notes"] * 2
    assert storage["notes"] == ["start", "first", "outside", "second", "third"]
    assert result.final_pipeline_context is not None
    assert result.final_pipeline_context.notes.get() == storage["notes"]


async def test_a_failed_run_resumed_hydrates_the_failed_step_again() -> None:
    provider = Provider({"notes": []})
    backend = InMemoryBackend()
    fail = [True]

    async def fragile(data: Any, *, context: NotesContext) -> Any:
        context.notes.set([*context.notes.get(), "fragile"])
        if fail and fail.pop():
            raise RuntimeError("first time")
        return data

    pipeline = appender("a") >> Step.from_callable(fragile, name="fragile")
    failed = await run(pipeline, backend=backend, state_providers={"kg": provider})
    assert failed.status == "failed"
    assert provider.storage == {"notes": ["a"]}
    resumed = await run(pipeline, backend=backend, state_providers={"kg": provider})
    assert resumed.status == "completed", resumed.error
    assert provider.storage == {"notes": ["a", "fragile"]}


# -- missing providers -----------------------------------------------------------------------------


def test_a_reference_that_was_never_hydrated_raises_on_get() -> None:
    reference: ContextReference[list[str]] = ContextReference(provider_id="kg", key="k")
    assert reference.hydrated is False
    with pytest.raises(ContextReferenceError) as caught:
        reference.get()
    assert (caught.value.provider_id, caught.value.key) == ("kg", "k")
    assert "kg" in str(caught.value)
    reference.set(["x"])
    assert reference.hydrated is True
    assert reference.get() == ["x"]
    # A context's default reference starts unhydrated too.
    assert NotesContext().notes.hydrated is False


async def test_a_missing_provider_logs_one_warning_and_get_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flujo.state_providers")
    errors: list[BaseException] = []

    async def reads(data: Any, *, context: NotesContext) -> Any:
        try:
            context.notes.get()
        except ContextReferenceError as exc:
            errors.append(exc)
            raise
        return data

    async def ignores(data: Any) -> Any:
        return data

    pipeline = (
        Step.from_callable(ignores, name="one")
        >> Step.from_callable(ignores, name="two")
        >> Step.from_callable(reads, name="reads")
    )
    result = await run(pipeline, state_providers={"other": Provider()})
    warnings = [r for r in caplog.records if r.name == "flujo.state_providers"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].levelno == logging.WARNING
    assert "'kg'" in warnings[0].getMessage()
    assert "notes" in warnings[0].getMessage()
    # The steps that do not read the reference run; the one that does fails with the typed error.
    assert result.status == "failed"
    assert result.failed_step == "reads"
    assert result.error is not None
    assert result.error.type == "ContextReferenceError"
    assert len(errors) == 1


async def test_one_warning_per_missing_provider(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="flujo.state_providers")
    pipeline = Step.from_callable(lambda x: x, name="a") >> Step.from_callable(
        lambda x: x, name="b"
    )
    result = await run(pipeline, context_model=TwoRefContext, state_providers={"x": Provider()})
    assert result.status == "completed", result.error
    messages = [r.getMessage() for r in caplog.records if r.name == "flujo.state_providers"]
    assert len(messages) == 2, messages
    assert any("'kg'" in m for m in messages)
    assert any("'cache'" in m for m in messages)


async def test_a_provider_that_fails_to_load_fails_the_step_and_the_run_resumes_later() -> None:
    """A provider error fails the step like any error (typed, recorded); the run is resumed
    once the provider is back, from the step that failed."""

    class Flaky(Provider):
        down = False

        async def load(self, key: str) -> Any:
            if self.down:
                raise ConnectionError("knowledge graph unreachable")
            return await super().load(key)

    provider = Flaky({"notes": []})
    backend = InMemoryBackend()
    ran: list[str] = []

    async def knock(data: Any) -> Any:
        provider.down = True  # the provider goes down after the first step
        ran.append("knock")
        return data

    pipeline = Step.from_callable(knock, name="knock") >> appender("a")
    failed = await run(pipeline, backend=backend, state_providers={"kg": provider})
    assert failed.status == "failed"
    assert failed.failed_step == "a"
    assert failed.error is not None
    assert failed.error.type == "ConnectionError"
    state = await backend.load_state(RUN)
    assert state is not None
    assert (state["status"], state["current_step_index"]) == ("failed", 1)
    provider.down = False
    result = await run(pipeline, backend=backend, state_providers={"kg": provider})
    assert result.status == "completed", result.error
    assert ran == ["knock"]
    assert provider.storage == {"notes": ["a"]}


async def test_a_provider_that_fails_to_save_fails_the_step() -> None:
    class ReadOnly(Provider):
        refuse = True

        async def save(self, key: str, data: Any) -> None:
            if self.refuse:
                raise ConnectionError("read-only replica")
            await super().save(key, data)

    provider = ReadOnly({"notes": []})
    backend = InMemoryBackend()
    failed = await run(appender("a"), backend=backend, state_providers={"kg": provider})
    assert failed.status == "failed"
    assert failed.error is not None
    assert failed.error.type == "ConnectionError"
    state = await backend.load_state(RUN)
    assert state is not None
    assert state["status"] == "failed"
    assert provider.storage == {"notes": []}
    provider.refuse = False
    result = await run(appender("a"), backend=backend, state_providers={"kg": provider})
    assert result.status == "completed", result.error
    assert provider.storage == {"notes": ["a"]}


# -- configuration: state_providers=, ExecutorFactory, both ----------------------------------------


async def test_executor_factory_with_providers_via_the_runner() -> None:
    provider = Provider({"notes": ["f"]})
    factory = ExecutorFactory(state_providers={"kg": provider})
    result = await run(appender("a"), executor_factory=factory)
    assert result.status == "completed", result.error
    assert provider.storage == {"notes": ["f", "a"]}
    executor = factory.create_executor()
    assert executor.state_providers == {"kg": provider}


async def test_factory_and_runner_providers_are_merged_the_runner_winning() -> None:
    kg_in_factory = Provider({"notes": ["factory"]})
    kg_in_runner = Provider({"notes": ["runner"]})
    cache = Provider({"hot": ["c"]})
    factory = ExecutorFactory(state_providers={"kg": kg_in_factory, "cache": cache})

    async def both(data: Any, *, context: TwoRefContext) -> Any:
        context.notes.set([*context.notes.get(), "+"])
        context.cache.set([*context.cache.get(), "+"])
        return data

    async with Flujo(
        Step.from_callable(both, name="both"),
        context_model=TwoRefContext,
        state_backend=InMemoryBackend(),
        executor_factory=factory,
        state_providers={"kg": kg_in_runner},
    ) as runner:
        assert runner.state_providers == {"kg": kg_in_runner, "cache": cache}
        result = await runner.run_async("go")
    assert result.status == "completed", result.error
    assert kg_in_runner.storage == {"notes": ["runner", "+"]}
    assert kg_in_factory.log == []
    assert cache.storage == {"hot": ["c", "+"]}
    # The factory passed in is not changed by the merge.
    assert factory.state_providers == {"kg": kg_in_factory, "cache": cache}


BAD_PROVIDERS = {
    "object": object(),
    "str": "kg",
    "load-only": type("LoadOnly", (), {"load": lambda self, key: None})(),
}
ROUTES = {
    "factory": lambda p: ExecutorFactory(state_providers={"kg": p}),
    "runner": lambda p: Flujo(appender("a"), persist_state=False, state_providers={"kg": p}),
    "runner-over-factory": lambda p: Flujo(
        appender("a"),
        persist_state=False,
        executor_factory=ExecutorFactory(),
        state_providers={"kg": p},
    ),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("provider", sorted(BAD_PROVIDERS))
def test_a_provider_without_load_and_save_is_a_configuration_error(
    provider: str, route: str
) -> None:
    with pytest.raises(ConfigurationError, match="'kg'"):
        ROUTES[route](BAD_PROVIDERS[provider])


def test_without_providers_there_is_no_hydration_at_all() -> None:
    runner = Flujo(appender("a"), persist_state=False)
    assert runner.state_providers == {}


# -- isolation -------------------------------------------------------------------------------------


async def test_each_run_has_its_own_reference() -> None:
    """Two runs at once on one runner, each with its own key: no hydrated value is shared."""
    provider = Provider({"a": ["A"], "b": ["B"]})
    both_loaded = asyncio.Event()
    loaded: list[str] = []
    seen: dict[str, list[str]] = {}
    references: list[Any] = []

    async def look(data: str, *, context: NotesContext) -> str:
        loaded.append(data)
        references.append(context.notes)
        if len(loaded) == 2:
            both_loaded.set()
        await both_loaded.wait()
        seen[data] = list(context.notes.get())
        return data

    async with Flujo(
        Step.from_callable(look, name="look"),
        context_model=NotesContext,
        persist_state=False,
        state_providers={"kg": provider},
    ) as runner:
        ref_a = ContextReference[list[str]](provider_id="kg", key="a")
        ref_b = ContextReference[list[str]](provider_id="kg", key="b")
        await asyncio.gather(
            runner.run_async("a", initial_context_data={"notes": ref_a}),
            runner.run_async("b", initial_context_data={"notes": ref_b}),
        )
    assert seen == {"a": ["A"], "b": ["B"]}
    assert references[0] is not references[1]
    # The class default was never hydrated with a run's data.
    fresh = NotesContext()
    assert fresh.notes is not references[0]
    try:
        value = fresh.notes.get()
    except ContextReferenceError:
        value = None
    assert value not in (["A"], ["B"])


async def test_runs_of_one_runner_do_not_share_a_reference_given_as_initial_data() -> None:
    """The same ContextReference instance in initial_context_data gives each run a copy: a
    run's hydrated (or set, not yet saved) value is its own."""
    provider = Provider({"notes": ["stored"]})
    given = ContextReference[list[str]](provider_id="kg", key="notes")
    in_step = asyncio.Event()
    other_done = asyncio.Event()
    seen: dict[str, list[str]] = {}
    references: list[Any] = []

    async def slow(data: str, *, context: NotesContext) -> str:
        references.append(context.notes)
        if data == "slow":
            context.notes.set(["slow's own value"])
            in_step.set()
            await other_done.wait()  # meanwhile the other run hydrates its reference
        else:
            await in_step.wait()
        seen[data] = list(context.notes.get())
        if data != "slow":
            other_done.set()
        return data

    async with Flujo(
        Step.from_callable(slow, name="slow"),
        context_model=NotesContext,
        persist_state=False,
        state_providers={"kg": provider},
        initial_context_data={"notes": given},
    ) as runner:
        await asyncio.gather(runner.run_async("slow"), runner.run_async("fast"))
    assert seen == {"slow": ["slow's own value"], "fast": ["stored"]}
    assert references[0] is not references[1]
    assert all(r is not given for r in references)


async def test_a_pointer_given_as_data_makes_a_reference_per_run() -> None:
    """The documented way to give each run its own data: the pointer as plain data."""
    provider = Provider({"chat/ana": ["hi ana"], "chat/bo": ["hi bo"]})
    references: list[Any] = []

    async def read(data: str, *, context: NotesContext) -> list[str]:
        references.append(context.notes)
        return list(context.notes.get())

    async with Flujo(
        Step.from_callable(read, name="read"),
        context_model=NotesContext,
        persist_state=False,
        state_providers={"kg": provider},
        initial_context_data={"notes": {"provider_id": "kg", "key": "chat/ana"}},
    ) as runner:
        ana, ana_again, bo = await asyncio.gather(
            runner.run_async("x"),
            runner.run_async("y"),
            runner.run_async(
                "z", initial_context_data={"notes": {"provider_id": "kg", "key": "chat/bo"}}
            ),
        )
    assert (ana.output, ana_again.output, bo.output) == (["hi ana"], ["hi ana"], ["hi bo"])
    assert len({id(r) for r in references}) == 3


# -- imports and typing ----------------------------------------------------------------------------


def test_public_import_paths() -> None:
    from flujo.application.core.factories import ExecutorFactory as Factory
    from flujo.domain.interfaces import StateProvider as Protocol
    from flujo.domain.models import ContextReference as Reference

    assert Reference is ContextReference
    assert Protocol is StateProvider
    assert Factory is ExecutorFactory
    assert isinstance(Provider(), StateProvider)
    assert not isinstance(object(), StateProvider)


TYPED = """
import asyncio

from flujo import Flujo, PipelineContext, Step
from flujo.application.core.factories import ExecutorFactory
from flujo.domain.interfaces import StateProvider
from flujo.domain.models import ContextReference


class Graph(StateProvider):
    def __init__(self) -> None:
        self.data: dict[str, list[dict[str, str]]] = {}

    async def load(self, key: str) -> list[dict[str, str]]:
        return self.data.get(key, [])

    async def save(self, key: str, data: list[dict[str, str]]) -> None:
        self.data[key] = data


class ResearchContext(PipelineContext):
    facts: ContextReference[list[dict[str, str]]] = ContextReference(
        provider_id="kg", key="facts"
    )


async def learn(topic: str, *, context: ResearchContext) -> int:
    facts: list[dict[str, str]] = context.facts.get()
    facts.append({"topic": topic})
    context.facts.set(facts)
    return len(facts)


graph = Graph()
runner = Flujo(
    Step.from_callable(learn, name="learn"),
    context_model=ResearchContext,
    state_providers={"kg": graph},
    persist_state=False,
)
other = Flujo(
    Step.from_callable(learn, name="learn"),
    context_model=ResearchContext,
    executor_factory=ExecutorFactory(state_providers={"kg": graph}),
    persist_state=False,
)


async def main() -> None:
    result = await runner.run_async("tides")
    await other.run_async("moons")
    print(result.output, graph.data["facts"])


asyncio.run(main())
"""

BAD_TYPED = """
from flujo import PipelineContext
from flujo.domain.models import ContextReference


class ResearchContext(PipelineContext):
    facts: ContextReference[list[dict[str, str]]] = ContextReference(
        provider_id="kg", key="facts"
    )


def read(context: ResearchContext) -> None:
    count: int = context.facts.get()
    context.facts.set("not a list")
"""


def _mypy(tmp_path: Path, name: str, source: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )


def test_typed_references_pass_mypy_strict_and_run(tmp_path: Path) -> None:
    proc = _mypy(tmp_path, "typed.py", TYPED)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = subprocess.run(
        [sys.executable, str(tmp_path / "typed.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "1 [{'topic': 'tides'}, {'topic': 'moons'}]" in done.stdout


def test_get_and_set_are_typed(tmp_path: Path) -> None:
    proc = _mypy(tmp_path, "bad.py", BAD_TYPED)
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 2, proc.stdout
    assert any("bad.py:13" in line and "list[dict[str, str]]" in line for line in errors)
    assert any("bad.py:14" in line and '"set"' in line for line in errors), proc.stdout
