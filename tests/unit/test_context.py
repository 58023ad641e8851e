"""The typed context: validation of initial data, run_id, persistence of nested models."""

import datetime
import enum
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field, ValidationError

from flujo import AppResources, Flujo, PipelineContext, step
from flujo.exceptions import ContextValidationError, FlujoError
from flujo.state import InMemoryBackend, SQLiteBackend


class Profile(BaseModel):
    name: str
    age: int


class ResearchContext(PipelineContext):
    """The production manual's example context."""

    user_id: str
    source_type: str = "unknown"
    results: list[dict[str, Any]] = Field(default_factory=list)


class ProfileContext(PipelineContext):
    profile: Profile | None = None
    count: int = 0


@step
async def echo(x: Any) -> Any:
    return x


@step
async def capture(x: Any, *, context: PipelineContext) -> Any:
    return {"run_id": context.run_id, "type": type(context).__name__}


async def test_context_model_subclass_is_used() -> None:
    @step
    async def research(q: str, *, context: ResearchContext) -> str:
        context.results.append({"q": q})
        context.source_type = "web"
        return context.user_id

    result = await Flujo(
        research,
        context_model=ResearchContext,
        initial_context_data={"user_id": "u-1"},
        persist_state=False,
    ).run_async("question")
    ctx = result.final_pipeline_context
    assert isinstance(ctx, ResearchContext)
    assert result.output == "u-1"
    assert ctx.results == [{"q": "question"}]
    assert ctx.source_type == "web"


def test_default_context_is_a_pipeline_context() -> None:
    result = Flujo(capture, persist_state=False).run(1)
    assert result.output["type"] == "PipelineContext"
    assert result.final_pipeline_context.scratchpad == {}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({}, "user_id"),
        ({"user_id": 123}, "user_id"),
        ({"user_id": "u", "results": "not a list"}, "results"),
        ({"user_id": "u", "bogus": 1}, "bogus"),
    ],
)
def test_bad_initial_context_data_names_the_field(data: dict[str, Any], field: str) -> None:
    runner = Flujo(
        echo, context_model=ResearchContext, initial_context_data=data, persist_state=False
    )
    with pytest.raises(ContextValidationError) as info:
        runner.run(1)
    err = info.value
    assert isinstance(err, FlujoError)
    assert isinstance(err, ValueError)
    assert err.field == field
    assert err.errors
    assert field in str(err)


def test_nested_field_error_names_the_dotted_path() -> None:
    runner = Flujo(
        echo,
        context_model=ProfileContext,
        initial_context_data={"profile": {"name": "ann", "age": "old"}},
        persist_state=False,
    )
    with pytest.raises(ContextValidationError) as info:
        runner.run(1)
    assert info.value.field == "profile.age"


async def test_bad_context_data_runs_no_step_and_stores_nothing() -> None:
    backend = InMemoryBackend()
    calls: list[Any] = []

    @step
    async def track(x: Any) -> Any:
        calls.append(x)
        return x

    runner = Flujo(
        track, context_model=ResearchContext, state_backend=backend, initial_context_data={}
    )
    with pytest.raises(ContextValidationError):
        await runner.run_async(1, run_id="bad-ctx")
    assert calls == []
    assert await backend.load_state("bad-ctx") is None


def test_run_level_context_data_overrides_constructor_data() -> None:
    runner = Flujo(
        echo,
        context_model=ResearchContext,
        initial_context_data={"user_id": "a", "source_type": "db"},
        persist_state=False,
    )
    result = runner.run(1, initial_context_data={"user_id": "b"})
    assert result.final_pipeline_context.user_id == "b"
    assert result.final_pipeline_context.source_type == "db"


async def test_context_assignments_are_validated() -> None:
    @step
    async def wrong_type(x: int, *, context: ProfileContext) -> int:
        context.count = "many"  # type: ignore[assignment]
        return x

    result = await Flujo(wrong_type, context_model=ProfileContext, persist_state=False).run_async(1)
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "ValidationError"


async def test_unknown_context_attribute_is_refused() -> None:
    @step
    async def typo(x: int, *, context: ProfileContext) -> int:
        context.cuont = 1  # type: ignore[attr-defined]
        return x

    result = await Flujo(typo, context_model=ProfileContext, persist_state=False).run_async(1)
    assert result.status == "failed"


def test_pipeline_context_refuses_unknown_fields_directly() -> None:
    with pytest.raises(ValidationError):
        PipelineContext(nope=1)  # type: ignore[call-arg]


# -- run_id in the context (FR-17b) ----------------------------------------------------------


async def test_context_run_id_is_the_generated_run_id_in_the_first_step() -> None:
    result = await Flujo(capture >> echo, persist_state=False).run_async(0)
    assert result.run_id
    assert result.step_history[0].output["run_id"] == result.run_id
    assert result.final_pipeline_context.run_id == result.run_id


async def test_context_run_id_is_the_given_run_id_in_the_first_step() -> None:
    result = await Flujo(capture, state_backend=InMemoryBackend()).run_async(0, run_id="given-id")
    assert result.output["run_id"] == "given-id"
    assert result.run_id == "given-id"


async def test_run_id_in_initial_context_data_does_not_override_the_run_id() -> None:
    result = await Flujo(
        capture, initial_context_data={"run_id": "spoofed"}, persist_state=False
    ).run_async(0, run_id="real")
    assert result.output["run_id"] == "real"


async def test_context_run_id_is_stored() -> None:
    backend = InMemoryBackend()
    await Flujo(capture, state_backend=backend).run_async(0, run_id="stored-id")
    state = await backend.load_state("stored-id")
    assert state is not None
    assert state["pipeline_context"]["run_id"] == "stored-id"


# -- nested pydantic models on SQLite (AC-18) ------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    city: str
    since: datetime.datetime


class Person(BaseModel):
    name: str
    color: Color = Color.RED
    addresses: list[Address] = Field(default_factory=list)


class PeopleContext(PipelineContext):
    owner: Person | None = None
    people: list[Person] = Field(default_factory=list)
    by_name: dict[str, Person] = Field(default_factory=dict)


WHEN = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


async def test_nested_models_persist_and_restore_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "ctx.db"
    broken = {"on": True}
    seen: list[PeopleContext] = []

    @step
    async def fill(name: str, *, context: PeopleContext) -> str:
        person = Person(name=name, color=Color.BLUE, addresses=[Address(city="Lima", since=WHEN)])
        context.owner = person
        context.people.append(person)
        context.by_name[name] = person
        context.scratchpad["person"] = person
        context.scratchpad["when"] = WHEN
        return name

    @step
    async def check(name: str, *, context: PeopleContext) -> str:
        seen.append(context.model_copy(deep=True))
        if broken["on"]:
            raise RuntimeError("stop here")
        return name

    async with Flujo(
        fill >> check, context_model=PeopleContext, state_backend=SQLiteBackend(db)
    ) as runner:
        first = await runner.run_async("ann", run_id="people")
    assert first.status == "failed"

    stored_backend = SQLiteBackend(db)
    state = await stored_backend.load_state("people")
    await stored_backend.aclose()
    assert state is not None
    stored = state["pipeline_context"]
    owner_json = {
        "name": "ann",
        "color": "blue",
        "addresses": [{"city": "Lima", "since": "2024-01-02T03:04:05Z"}],
    }
    assert stored["owner"] == owner_json
    assert stored["people"] == [owner_json]
    assert stored["by_name"] == {"ann": owner_json}
    # Models and datetimes inside the free-form scratchpad are stored as JSON data.
    assert stored["scratchpad"]["person"] == owner_json
    assert datetime.datetime.fromisoformat(stored["scratchpad"]["when"]) == WHEN

    broken["on"] = False
    async with Flujo(
        fill >> check, context_model=PeopleContext, state_backend=SQLiteBackend(db)
    ) as runner:
        resumed = await runner.run_async("ignored", run_id="people")
    assert resumed.status == "completed"
    restored = seen[-1]
    assert isinstance(restored.owner, Person)
    assert restored.owner == Person(
        name="ann", color=Color.BLUE, addresses=[Address(city="Lima", since=WHEN)]
    )
    assert restored.owner.color is Color.BLUE
    assert restored.owner.addresses[0].since == WHEN
    assert isinstance(restored.people[0], Person)
    assert isinstance(restored.by_name["ann"], Person)
    assert restored.scratchpad["person"]["name"] == "ann"

    # Re-reading the completed run restores the models in its final context too.
    async with Flujo(
        fill >> check, context_model=PeopleContext, state_backend=SQLiteBackend(db)
    ) as runner:
        reread = await runner.run_async("ignored", run_id="people")
    final = reread.final_pipeline_context
    assert isinstance(final, PeopleContext)
    assert final.owner == restored.owner
    assert final.by_name == restored.by_name


# -- resources -------------------------------------------------------------------------------


class Client:
    def __init__(self) -> None:
        self.calls = 0


class Resources(AppResources):
    client: Client
    settings: dict[str, Any] = Field(default_factory=dict)


async def test_resources_are_injected_and_never_stored() -> None:
    backend = InMemoryBackend()
    client = Client()

    @step
    async def use(x: int, *, resources: Resources, context: PipelineContext) -> int:
        resources.client.calls += 1
        return x

    result = await Flujo(
        use >> use, resources=Resources(client=client), state_backend=backend
    ).run_async(1, run_id="res")
    assert result.status == "completed"
    assert client.calls == 2
    state = await backend.load_state("res")
    assert state is not None
    assert "client" not in str(state)
    assert set(state["pipeline_context"]) == {"run_id", "scratchpad"}
