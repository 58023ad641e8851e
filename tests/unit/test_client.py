"""TaskClient: listing, inspecting, resuming, deleting and pruning stored runs.

The main flows run on SQLite, in memory and on Postgres (one fresh schema per test; skipped
without a server, failing under CI=true).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flujo import (
    Flujo,
    PausedException,
    Pipeline,
    PipelineContext,
    PipelineRegistry,
    PipelineResult,
    Step,
    StepResult,
    TaskClient,
    TaskDetail,
    TaskSummary,
    step,
)
from flujo.exceptions import (
    ConfigurationError,
    InvalidMetadataError,
    InvalidRunIdError,
    PipelineMismatchError,
    RunNotFoundError,
    StateConflictError,
)
from flujo.state import FileBackend, InMemoryBackend, SQLiteBackend
from flujo.state.backends.base import StateBackend

# -- pipelines -------------------------------------------------------------------------------


class OrderContext(PipelineContext):
    """A typed context: a resume must bring it back as this model, not a plain one."""

    order_id: str = ""
    charged_cents: int = 0
    log: list[str] = []


class World:
    """Switches and call counts shared by the steps of one test."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.ship_works = True
        self.pause_at_ship = False


def order_pipeline(world: World) -> Pipeline[str, str]:
    @step
    async def fetch(order_id: str, *, context: OrderContext) -> int:
        world.calls.append("fetch")
        context.order_id = order_id
        context.log.append("fetched")
        return 2500

    @step
    async def charge(cents: int, *, context: OrderContext) -> int:
        world.calls.append("charge")
        context.charged_cents += cents
        context.log.append("charged")
        return cents

    @step
    async def ship(cents: int, *, context: OrderContext) -> str:
        world.calls.append("ship")
        if world.pause_at_ship:
            raise PausedException("waiting for a warehouse slot")
        if not world.ship_works:
            raise RuntimeError("the carrier is down")
        context.log.append("shipped")
        return f"{context.order_id}: {cents / 100:.2f} EUR"

    return fetch >> charge >> ship


@step
async def shout(text: str) -> str:
    return text.upper()


def make_registry(world: World) -> PipelineRegistry:
    registry = PipelineRegistry()
    registry.register(order_pipeline(world), "orders", "1.0.0", context_model=OrderContext)
    registry.register(shout, "shout", "1.0.0")
    return registry


def orders_runner(
    backend: StateBackend, registry: PipelineRegistry, version: str = "1.0.0"
) -> Flujo[str, str, OrderContext]:
    return Flujo(
        registry=registry,
        pipeline_name="orders",
        pipeline_version=version,
        context_model=OrderContext,
        state_backend=backend,
    )


def shout_runner(backend: StateBackend, registry: PipelineRegistry) -> Flujo[str, str, Any]:
    return Flujo(registry=registry, pipeline_name="shout", state_backend=backend)


async def age(backend: StateBackend, run_id: str, days: float) -> None:
    """Make ``run_id`` look created and last updated ``days`` ago."""
    state = await backend.load_state(run_id)
    assert state is not None
    then = datetime.now(UTC) - timedelta(days=days)
    state["created_at"] = state["updated_at"] = then
    await backend.save_state(run_id, state)


# -- backends --------------------------------------------------------------------------------

KINDS = ["sqlite", "memory", "postgres"]


@pytest.fixture(params=KINDS)
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Any]:
    """Which store a test runs on (the Postgres schema is made and dropped by conftest)."""
    kind = request.param
    if kind == "sqlite":
        return kind, tmp_path / "flujo.db"
    if kind == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")
        schema = request.getfixturevalue("postgres_schema")
        return kind, (dsn, schema)
    return kind, None


def build_backend(spec: tuple[str, Any]) -> StateBackend:
    kind, where = spec
    if kind == "sqlite":
        return SQLiteBackend(where)
    if kind == "postgres":
        from flujo.state.backends.postgres import PostgresBackend

        dsn, schema = where
        return PostgresBackend(dsn, schema=schema, pool_min=1, pool_max=4)
    return InMemoryBackend()


@pytest.fixture
async def backend(store_spec: tuple[str, Any]) -> AsyncIterator[StateBackend]:
    store = build_backend(store_spec)
    if store_spec[0] == "postgres":
        await store.migrate()  # type: ignore[attr-defined]
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def registry(world: World) -> PipelineRegistry:
    return make_registry(world)


@pytest.fixture
def client(backend: StateBackend, registry: PipelineRegistry) -> TaskClient:
    return TaskClient(backend, registry=registry)


# -- building a client -----------------------------------------------------------------------


def test_client_from_a_backend(registry: PipelineRegistry) -> None:
    backend = InMemoryBackend()
    client = TaskClient(backend, registry=registry)
    assert client.backend is backend
    assert client.registry is registry
    assert TaskClient(backend).registry is None


def test_client_from_a_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    sqlite = TaskClient("sqlite:///ops.db").backend
    assert isinstance(sqlite, SQLiteBackend)
    assert sqlite.path == tmp_path / "ops.db"
    assert isinstance(TaskClient("memory://").backend, InMemoryBackend)
    files = TaskClient(f"file://{tmp_path / 'runs'}").backend
    assert isinstance(files, FileBackend)
    assert files.directory == tmp_path / "runs"


@pytest.mark.parametrize("bad", ["not-a-uri", "mysql://db/x", 42, object()])
def test_client_refuses_what_is_neither_a_backend_nor_a_uri(bad: Any) -> None:
    with pytest.raises(ConfigurationError):
        TaskClient(bad)


@pytest.fixture
def no_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.upper().startswith("FLUJO_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_client_from_settings_defaults_to_the_sqlite_file(no_settings: Path) -> None:
    backend = TaskClient().backend
    assert isinstance(backend, SQLiteBackend)
    assert backend.path == no_settings / "flujo_ops.db"


async def test_client_from_settings_sees_the_runs_of_a_configured_runner(
    no_settings: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = no_settings / "shared.db"
    monkeypatch.setenv("FLUJO_STATE_URI", f"sqlite:///{db}")
    async with Flujo(shout) as runner:
        await runner.run_async("hi", run_id="from-env", metadata={"team": "ops"})
    async with TaskClient(None) as client:
        assert isinstance(client.backend, SQLiteBackend)
        assert client.backend.path == db
        [summary] = await client.list_tasks(metadata_filter={"team": "ops"})
    assert summary.run_id == "from-env"


# -- listing ---------------------------------------------------------------------------------


async def test_list_tasks_newest_created_first_with_summary_fields(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry, world: World
) -> None:
    runner = orders_runner(backend, registry)
    done = await runner.run_async("A-1", run_id="r1", metadata={"user_id": "u-1"})
    world.ship_works = False
    failed = await runner.run_async("A-2", run_id="r2", metadata={"user_id": "u-2"})
    world.ship_works, world.pause_at_ship = True, True
    paused = await runner.run_async("A-3", run_id="r3")
    assert (done.status, failed.status, paused.status) == ("completed", "failed", "paused")

    tasks = await client.list_tasks()
    assert [t.run_id for t in tasks] == ["r3", "r2", "r1"]
    assert all(isinstance(t, TaskSummary) for t in tasks)
    by_id = {t.run_id: t for t in tasks}

    first = by_id["r1"]
    assert first.pipeline_name == "orders"
    assert first.pipeline_version == "1.0.0"
    assert first.status == "completed"
    assert first.current_step_index == 3
    assert first.metadata == {"user_id": "u-1"}
    assert first.error is None
    assert first.created_at.tzinfo is not None
    assert first.created_at <= first.updated_at <= datetime.now(UTC)

    second = by_id["r2"]
    assert second.status == "failed"
    assert second.current_step_index == 2
    assert second.error == {
        "type": "RuntimeError",
        "message": "the carrier is down",
        "step": "ship",
    }

    third = by_id["r3"]
    assert third.status == "paused"
    assert third.metadata == {}
    assert third.error is not None
    assert third.error["step"] == "ship"
    assert "warehouse" in third.error["message"]


async def test_list_tasks_filters(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry, world: World
) -> None:
    orders = orders_runner(backend, registry)
    shouts = shout_runner(backend, registry)
    await orders.run_async("A-1", run_id="o1", metadata={"user_id": "u-7", "tier": "gold"})
    world.ship_works = False
    await orders.run_async("A-2", run_id="o2", metadata={"user_id": "u-7", "tier": "free"})
    await orders.run_async("A-3", run_id="o3", metadata={"user_id": "u-8", "tier": "gold"})
    await shouts.run_async("hey", run_id="s1", metadata={"user_id": "u-7"})

    async def ids(**kwargs: Any) -> list[str]:
        return [t.run_id for t in await client.list_tasks(**kwargs)]

    assert await ids(status="failed") == ["o3", "o2"]
    assert await ids(status="completed") == ["s1", "o1"]
    assert await ids(status="paused") == []
    assert await ids(metadata_filter={"user_id": "u-7"}) == ["s1", "o2", "o1"]
    assert await ids(metadata_filter={"user_id": "u-7", "tier": "gold"}) == ["o1"]
    assert await ids(metadata_filter={"user_id": "u-9"}) == []
    assert await ids(metadata_filter={}) == ["s1", "o3", "o2", "o1"]
    assert await ids(pipeline_name="shout") == ["s1"]
    assert await ids(pipeline_name="orders", status="failed") == ["o3", "o2"]
    assert await ids(status="failed", metadata_filter={"user_id": "u-7"}) == ["o2"]
    assert await ids(pipeline_name="nothing") == []


async def test_list_tasks_pages_with_limit_and_offset(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry
) -> None:
    runner = shout_runner(backend, registry)
    for i in range(7):
        await runner.run_async("x", run_id=f"run-{i}")
    newest_first = [f"run-{i}" for i in reversed(range(7))]

    async def page(limit: int, offset: int) -> list[str]:
        return [t.run_id for t in await client.list_tasks(limit=limit, offset=offset)]

    assert await page(3, 0) == newest_first[:3]
    assert await page(3, 3) == newest_first[3:6]
    assert await page(3, 6) == newest_first[6:]
    assert await page(3, 9) == []
    assert await page(0, 0) == []
    assert [t.run_id for t in await client.list_tasks()] == newest_first  # default limit 50


async def test_list_tasks_since_keeps_runs_created_at_or_after(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry
) -> None:
    runner = shout_runner(backend, registry)
    await runner.run_async("x", run_id="old")
    await runner.run_async("x", run_id="older")
    await age(backend, "old", days=2)
    await age(backend, "older", days=5)
    await runner.run_async("x", run_id="new")

    async def ids(since: datetime) -> list[str]:
        return [t.run_id for t in await client.list_tasks(since=since)]

    now = datetime.now(UTC)
    assert await ids(now - timedelta(days=1)) == ["new"]
    assert await ids(now - timedelta(days=3)) == ["new", "old"]
    assert await ids(now - timedelta(days=6)) == ["new", "old", "older"]
    assert await ids(now + timedelta(hours=1)) == []


# -- metadata --------------------------------------------------------------------------------


async def test_metadata_is_stored_and_found(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry
) -> None:
    metadata = {
        "user_id": "u-42",
        "attempt": 3,
        "priority": 1.5,
        "urgent": True,
        "note": None,
        "tags": ["a", "b"],
        "trace.id": "t-1",
        "A_b-c.9": "ok",
    }
    runner = shout_runner(backend, registry)
    await runner.run_async("x", run_id="tagged", metadata=metadata)
    await runner.run_async("x", run_id="plain")

    detail = await client.get_task("tagged")
    assert detail is not None
    assert detail.metadata == metadata
    plain = await client.get_task("plain")
    assert plain is not None
    assert plain.metadata == {}

    for key, value in metadata.items():
        if isinstance(value, list):
            continue
        found = await client.list_tasks(metadata_filter={key: value})
        assert [t.run_id for t in found] == ["tagged"], key
        assert found[0].metadata == metadata
    # Equality is on JSON values: the string "3" is not the number 3, False is not None.
    assert await client.list_tasks(metadata_filter={"attempt": "3"}) == []
    assert await client.list_tasks(metadata_filter={"urgent": False}) == []
    assert await client.list_tasks(metadata_filter={"missing": None}) == []


HOSTILE_KEYS = [
    "user_id'; DROP TABLE runs; --",
    "a') OR 1=1 --",
    "",
    ".hidden",
    "-flag",
    "k" * 65,
    "with space",
    'quote"d',
    "path/like",
    "$.user_id",
    "nul\x00",
    "ключ",
]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
async def test_hostile_metadata_filter_keys_are_refused(client: TaskClient, key: str) -> None:
    with pytest.raises(InvalidMetadataError) as info:
        await client.list_tasks(metadata_filter={key: "x"})
    assert info.value.key == key


@pytest.mark.parametrize("key", HOSTILE_KEYS[:4])
async def test_hostile_metadata_keys_are_refused_before_a_run_starts(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry, key: str
) -> None:
    with pytest.raises(InvalidMetadataError):
        await shout_runner(backend, registry).run_async("x", run_id="r", metadata={key: "x"})
    assert await client.get_task("r") is None
    assert await client.list_tasks() == []


@pytest.mark.parametrize("value", [["a"], {"a": 1}, object()])
async def test_metadata_filter_values_must_be_json_scalars(client: TaskClient, value: Any) -> None:
    with pytest.raises(InvalidMetadataError):
        await client.list_tasks(metadata_filter={"user_id": value})


HOSTILE_VALUES = [
    "x' OR '1'='1",
    "'; DELETE FROM runs; --",
    '"}, "user_id": "u-1',
    '{"user_id": "u-1"}',
    "%",
    "_",
    "*",
    "\\",
    "u-1\n",
    "ü-1 ☃",
]


async def test_hostile_metadata_values_are_just_data(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry
) -> None:
    runner = shout_runner(backend, registry)
    await runner.run_async("x", run_id="victim", metadata={"user_id": "u-1"})
    for i, value in enumerate(HOSTILE_VALUES):
        await runner.run_async("x", run_id=f"h{i}", metadata={"user_id": value})
    for i, value in enumerate(HOSTILE_VALUES):
        found = await client.list_tasks(metadata_filter={"user_id": value})
        assert [t.run_id for t in found] == [f"h{i}"], value
    [victim] = await client.list_tasks(metadata_filter={"user_id": "u-1"})
    assert victim.run_id == "victim"
    assert len(await client.list_tasks()) == len(HOSTILE_VALUES) + 1


# -- inspecting ------------------------------------------------------------------------------


async def test_get_task_returns_everything_stored(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry, world: World
) -> None:
    world.ship_works = False
    before = datetime.now(UTC)
    await orders_runner(backend, registry).run_async(
        "A-9", run_id="detail", metadata={"user_id": "u-1"}
    )
    detail = await client.get_task("detail")
    assert isinstance(detail, TaskDetail)
    assert detail.run_id == "detail"
    assert detail.status == "failed"
    assert detail.error == {
        "type": "RuntimeError",
        "message": "the carrier is down",
        "step": "ship",
    }
    assert detail.pipeline_name == "orders"
    assert detail.pipeline_version == "1.0.0"
    assert detail.pipeline_id == "orders"
    assert detail.step_names == ["fetch", "charge", "ship"]
    assert detail.current_step_index == 2
    assert detail.version >= 3
    assert detail.metadata == {"user_id": "u-1"}
    assert detail.initial_input == "A-9"
    assert detail.last_step_output == 2500
    # The context as last committed: the failed step's changes are not in it.
    assert detail.context["order_id"] == "A-9"
    assert detail.context["charged_cents"] == 2500
    assert detail.context["log"] == ["fetched", "charged"]
    assert detail.context["run_id"] == "detail"
    assert all(isinstance(r, StepResult) for r in detail.step_history)
    assert [(r.name, r.success, r.index) for r in detail.step_history] == [
        ("fetch", True, 0),
        ("charge", True, 1),
        ("ship", False, 2),
    ]
    assert detail.step_history[1].output == 2500
    error = detail.step_history[2].error
    assert error is not None
    assert (error.type, error.message) == ("RuntimeError", "the carrier is down")
    assert before - timedelta(seconds=5) <= detail.created_at <= detail.updated_at
    assert detail.updated_at <= datetime.now(UTC)
    # A TaskDetail is a summary too, and serializes to JSON (for dashboards).
    assert isinstance(detail, TaskSummary)
    assert '"ship"' in detail.model_dump_json()


async def test_get_task_of_an_unknown_run_is_none(client: TaskClient) -> None:
    assert await client.get_task("never-ran") is None


@pytest.mark.parametrize("run_id", ["../etc/passwd", "", "a b", "x" * 200])
async def test_get_task_refuses_invalid_run_ids(client: TaskClient, run_id: str) -> None:
    with pytest.raises(InvalidRunIdError):
        await client.get_task(run_id)


# -- resuming --------------------------------------------------------------------------------


async def test_resume_task_continues_a_failed_run_with_its_typed_context(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry, world: World
) -> None:
    world.ship_works = False
    failed = await orders_runner(backend, registry).run_async("A-5", run_id="flaky")
    assert failed.status == "failed"
    assert world.calls == ["fetch", "charge", "ship"]

    world.ship_works = True
    result = await client.resume_task("flaky")
    assert isinstance(result, PipelineResult)
    assert result.status == "completed"
    assert result.success
    assert result.output == "A-5: 25.00 EUR"
    assert world.calls == ["fetch", "charge", "ship", "ship"]  # nothing committed ran again
    context = result.final_pipeline_context
    assert isinstance(context, OrderContext)
    assert context.charged_cents == 2500  # charged once
    assert context.log == ["fetched", "charged", "shipped"]

    detail = await client.get_task("flaky")
    assert detail is not None
    assert detail.status == "completed"
    assert detail.error is None
    assert detail.last_step_output == "A-5: 25.00 EUR"
    assert detail.context["log"] == ["fetched", "charged", "shipped"]


async def test_resume_task_continues_a_run_of_an_unversioned_pipeline(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry, world: World
) -> None:
    """``Flujo(pipeline)`` records version "latest" (so do ``flujo run`` runs): the client
    resumes such a run on the newest registered version whose steps are the run's."""
    world.ship_works = False
    unversioned = Flujo(
        registry.get("orders", "1.0.0"),
        pipeline_name="orders",
        context_model=OrderContext,
        state_backend=backend,
    )
    failed = await unversioned.run_async("A-9", run_id="no-version")
    assert failed.status == "failed"
    assert (await client.get_task("no-version")).pipeline_version == "latest"  # type: ignore[union-attr]

    world.ship_works = True
    result = await client.resume_task("no-version")
    assert result.status == "completed"
    assert result.output == "A-9: 25.00 EUR"
    assert world.calls == ["fetch", "charge", "ship", "ship"]

    registry.register(Step.from_callable(lambda x: x, name="other"), "orders", "2.0.0")
    world.ship_works = False
    assert (await unversioned.run_async("A-10", run_id="no-version-2")).status == "failed"
    with pytest.raises(PipelineMismatchError, match="now has steps"):  # 2.0.0: other steps
        await client.resume_task("no-version-2")


async def test_resume_task_of_a_completed_run_returns_the_stored_result(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry, world: World
) -> None:
    first = await orders_runner(backend, registry).run_async("A-6", run_id="done")
    assert first.status == "completed"
    calls = list(world.calls)
    again = await client.resume_task("done")
    assert world.calls == calls  # nothing ran
    with pytest.raises(StateConflictError):  # an answer for a run that is not paused
        await client.resume_task("done", input="an answer")
    assert world.calls == calls
    assert again.status == "completed"
    assert again.output == first.output == "A-6: 25.00 EUR"
    assert isinstance(again.final_pipeline_context, OrderContext)
    assert again.final_pipeline_context.log == ["fetched", "charged", "shipped"]
    assert [r.name for r in again.step_history] == ["fetch", "charge", "ship"]


async def test_resume_task_of_an_unknown_run(client: TaskClient) -> None:
    with pytest.raises(RunNotFoundError) as info:
        await client.resume_task("ghost")
    assert info.value.run_id == "ghost"


async def test_resume_task_needs_a_registry(
    backend: StateBackend, registry: PipelineRegistry, world: World
) -> None:
    world.ship_works = False
    await orders_runner(backend, registry).run_async("A-7", run_id="stuck")
    with pytest.raises(ConfigurationError, match="registry"):
        await TaskClient(backend).resume_task("stuck")
    assert world.calls == ["fetch", "charge", "ship"]


async def test_resume_task_refuses_a_version_that_is_not_registered(
    backend: StateBackend, registry: PipelineRegistry, world: World
) -> None:
    world.ship_works = False
    await orders_runner(backend, registry).run_async("A-8", run_id="old-version")
    newer = PipelineRegistry()
    newer.register(order_pipeline(world), "orders", "2.0.0", context_model=OrderContext)
    world.ship_works = True
    with pytest.raises(PipelineMismatchError) as info:
        await TaskClient(backend, registry=newer).resume_task("old-version")
    assert info.value.run_id == "old-version"
    assert world.calls == ["fetch", "charge", "ship"]  # nothing ran
    detail = await TaskClient(backend).get_task("old-version")
    assert detail is not None
    assert detail.status == "failed"


async def test_resume_task_refuses_a_registered_version_whose_steps_changed(
    backend: StateBackend, registry: PipelineRegistry, world: World
) -> None:
    world.ship_works = False
    await orders_runner(backend, registry).run_async("A-8", run_id="changed")
    other = PipelineRegistry()
    other.register(shout >> shout, "orders", "1.0.0")
    with pytest.raises(PipelineMismatchError):
        await TaskClient(backend, registry=other).resume_task("changed")


async def test_resume_task_of_a_completed_run_on_an_unregistered_version(
    backend: StateBackend, registry: PipelineRegistry
) -> None:
    """Either the stored result (nothing to run) or PipelineMismatchError; never a context
    error from reading the stored typed context with the default context model."""
    await orders_runner(backend, registry).run_async("A-1", run_id="finished")
    try:
        result = await TaskClient(backend, registry=PipelineRegistry()).resume_task("finished")
    except PipelineMismatchError:
        return
    assert result.status == "completed"
    assert result.output == "A-1: 25.00 EUR"


# -- deleting and pruning --------------------------------------------------------------------


async def test_delete_task(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry
) -> None:
    runner = shout_runner(backend, registry)
    await runner.run_async("x", run_id="keep")
    await runner.run_async("x", run_id="drop")
    assert await client.delete_task("drop") is True
    assert await client.get_task("drop") is None
    assert await client.delete_task("drop") is False
    assert await client.delete_task("never-was") is False
    assert [t.run_id for t in await client.list_tasks()] == ["keep"]
    with pytest.raises(InvalidRunIdError):
        await client.delete_task("../keep")


async def make_aged_runs(backend: StateBackend, registry: PipelineRegistry, world: World) -> None:
    """old-done (10 days, completed), old-failed (10 days, failed), mid (3 days, completed),
    fresh-done and fresh-failed (now)."""
    runner = orders_runner(backend, registry)
    await runner.run_async("A", run_id="old-done")
    await runner.run_async("A", run_id="mid")
    world.ship_works = False
    await runner.run_async("A", run_id="old-failed")
    await runner.run_async("A", run_id="fresh-failed")
    world.ship_works = True
    await runner.run_async("A", run_id="fresh-done")
    await age(backend, "old-done", days=10)
    await age(backend, "old-failed", days=10)
    await age(backend, "mid", days=3)


async def remaining(client: TaskClient) -> set[str]:
    return {t.run_id for t in await client.list_tasks()}


async def test_prune_by_age(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry, world: World
) -> None:
    await make_aged_runs(backend, registry, world)
    assert await client.prune(timedelta(days=30)) == 0
    assert await client.prune(timedelta(days=7)) == 2
    assert await remaining(client) == {"mid", "fresh-done", "fresh-failed"}
    assert await client.prune(timedelta(days=7)) == 0
    assert await client.prune(timedelta(days=1)) == 1
    assert await remaining(client) == {"fresh-done", "fresh-failed"}


async def test_prune_by_age_and_status(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry, world: World
) -> None:
    await make_aged_runs(backend, registry, world)
    assert await client.prune(timedelta(days=7), status="failed") == 1
    assert await remaining(client) == {"old-done", "mid", "fresh-done", "fresh-failed"}
    assert await client.prune(timedelta(days=1), status="completed") == 2
    assert await remaining(client) == {"fresh-done", "fresh-failed"}
    assert await client.prune(timedelta(days=1), status="paused") == 0


async def test_prune_by_cutoff_datetime(
    client: TaskClient, backend: StateBackend, registry: PipelineRegistry, world: World
) -> None:
    await make_aged_runs(backend, registry, world)
    cutoff = datetime.now(UTC) - timedelta(days=5)
    assert await client.prune(cutoff, status="completed") == 1
    assert await remaining(client) == {"old-failed", "mid", "fresh-done", "fresh-failed"}
    assert await client.prune(cutoff) == 1
    assert await remaining(client) == {"mid", "fresh-done", "fresh-failed"}
    # Everything updated before now: all of it.
    assert await client.prune(datetime.now(UTC) + timedelta(seconds=1)) == 3
    assert await client.list_tasks() == []


@pytest.mark.parametrize("bad", [timedelta(days=-1), 7, "7d", None])
async def test_prune_refuses_bad_ages(client: TaskClient, bad: Any) -> None:
    with pytest.raises(ConfigurationError):
        await client.prune(bad)


@pytest.fixture
def tokyo_time() -> Iterator[None]:
    """The process's local time zone is UTC+9 for the test."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Etc/GMT-9"  # POSIX sign convention: this is UTC+9
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


async def test_naive_datetimes_mean_the_same_in_prune_and_list_tasks(tokyo_time: None) -> None:
    backend = InMemoryBackend()
    await Flujo(shout, state_backend=backend).run_async("x", run_id="just-now")
    client = TaskClient(backend)
    an_hour_ago = datetime.now() - timedelta(hours=1)  # naive: local wall-clock time
    listed = [t.run_id for t in await client.list_tasks(since=an_hour_ago)]
    assert listed == ["just-now"]  # created after the cutoff ...
    assert await client.prune(an_hour_ago) == 0  # ... so not updated before it either
    assert await client.get_task("just-now") is not None


# -- closing ---------------------------------------------------------------------------------


async def test_async_with_closes_the_backend(
    store_spec: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = build_backend(store_spec)
    if store_spec[0] == "postgres":
        await store.migrate()  # type: ignore[attr-defined]
    closed: list[StateBackend] = []
    original = type(store).aclose

    async def spy(self: StateBackend) -> None:
        closed.append(self)
        await original(self)

    monkeypatch.setattr(type(store), "aclose", spy)
    async with TaskClient(store) as client:
        assert await client.list_tasks() == []
        if isinstance(store, SQLiteBackend):
            assert store._conn is not None
    assert closed == [store]
    if isinstance(store, SQLiteBackend):
        assert store._conn is None
    if store_spec[0] == "postgres":
        assert store._pool is None  # type: ignore[attr-defined]
    # A closed backend reopens when used again.
    assert await client.list_tasks() == []
    await original(store)
