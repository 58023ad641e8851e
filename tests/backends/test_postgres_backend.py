"""PostgresBackend specifics: migrations and schema versions, NUL (stored in state values,
refused in names and metadata), exact round trips of values, the pool and event loops, session
settings.

Every test runs on its own schema (the ``postgres_schema`` fixture). Without a server these
tests fail under CI=true and skip elsewhere (the ``postgres_dsn`` fixture).
"""

from __future__ import annotations

import asyncio
import gc
import math
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest
from backend_helpers import T0, checkpoint, run_header, sample_state, step_record

from flujo import Flujo, Pipeline, Step
from flujo.exceptions import (
    ConfigurationError,
    SchemaVersionError,
    SerializationError,
    StateBackendError,
)
from flujo.state.backends.base import StateBackend, to_datetime
from flujo.state.backends.postgres import MIGRATIONS, PostgresBackend

OpenPostgres = Callable[..., PostgresBackend]
#: A DSN nothing listens on (port 1), with a password that must never be shown.
NO_SERVER = "postgresql://flujo:s3cret-pw@127.0.0.1:1/nothing"


@pytest.fixture
async def open_postgres(postgres_dsn: str, postgres_schema: str) -> AsyncIterator[OpenPostgres]:
    """Open PostgresBackends on this test's schema (not migrated); closed after the test."""
    opened: list[PostgresBackend] = []

    def make(*, dsn: str | None = None, **kwargs: Any) -> PostgresBackend:
        kwargs.setdefault("schema", postgres_schema)
        kwargs.setdefault("pool_min", 0)
        kwargs.setdefault("pool_max", 4)
        backend = PostgresBackend(dsn or postgres_dsn, **kwargs)
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        await backend.aclose()


@pytest.fixture
async def pg(open_postgres: OpenPostgres) -> PostgresBackend:
    """A backend on a freshly migrated schema."""
    backend = open_postgres()
    assert await backend.migrate() == [1, 2]
    return backend


async def _sql(dsn: str, schema: str, query: str, *args: Any) -> list[asyncpg.Record]:
    """Run ``query`` on a connection of our own (not the backend's), in ``schema``."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def _tables(dsn: str, schema: str) -> set[str]:
    rows = await _sql(
        dsn,
        schema,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
        schema,
    )
    return {row["table_name"] for row in rows}


async def _row_counts(dsn: str, schema: str) -> dict[str, int]:
    counts = {}
    for table in ("flujo_runs", "flujo_run_context", "flujo_run_steps"):
        rows = await _sql(dsn, schema, f"SELECT count(*) AS n FROM {table}")
        counts[table] = rows[0]["n"]
    return counts


def _every_operation(backend: StateBackend) -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("load_state", lambda: backend.load_state("r")),
        ("save_state", lambda: backend.save_state("r", sample_state("r"))),
        (
            "write_checkpoint",
            lambda: backend.write_checkpoint(checkpoint(backend, "r", 0, header=run_header())),
        ),
        ("delete_state", lambda: backend.delete_state("r")),
        ("list_runs", backend.list_runs),
        ("delete_runs", lambda: backend.delete_runs(updated_before=datetime.now(UTC))),
    ]


# -- migrations and schema versions ----------------------------------------------------------------


async def test_migrate_is_idempotent_and_reports_what_it_applied(
    open_postgres: OpenPostgres, postgres_dsn: str, postgres_schema: str
) -> None:
    backend = open_postgres()
    assert await backend.schema_version() == 0

    assert await backend.migrate() == [1, 2]
    assert await backend.migrate() == []
    assert await open_postgres().migrate() == []  # another backend on the same schema

    assert await backend.schema_version() == len(MIGRATIONS) == 2
    assert await _tables(postgres_dsn, postgres_schema) == {
        "flujo_runs",
        "flujo_run_context",
        "flujo_run_steps",
        "flujo_schema_version",
        "flujo_cache",
        "flujo_evaluations",
        "flujo_queues",
        "flujo_workers",
    }
    rows = await _sql(postgres_dsn, postgres_schema, "SELECT version FROM flujo_schema_version")
    assert [row["version"] for row in rows] == [1, 2]
    await backend.save_state("r", sample_state("r"))
    assert await backend.load_state("r") == sample_state("r")


@pytest.mark.parametrize("schema_exists", [False, True])
async def test_an_unmigrated_schema_is_refused_before_any_write(
    open_postgres: OpenPostgres, postgres_dsn: str, postgres_schema: str, schema_exists: bool
) -> None:
    if schema_exists:
        await _sql(postgres_dsn, "public", f'CREATE SCHEMA "{postgres_schema}"')
    backend = open_postgres()

    for name, call in _every_operation(backend):
        with pytest.raises(SchemaVersionError) as info:
            await call()
        assert "flujo migrate" in str(info.value), name
        assert info.value.found == 0, name
        assert info.value.expected == len(MIGRATIONS), name

    # Nothing was created: no schema (if there was none), no table.
    assert await _tables(postgres_dsn, postgres_schema) == set()
    schemas = await _sql(
        postgres_dsn,
        "public",
        "SELECT 1 FROM information_schema.schemata WHERE schema_name = $1",
        postgres_schema,
    )
    assert len(schemas) == (1 if schema_exists else 0)
    # Migrating makes the same backend usable.
    assert await backend.migrate() == [1, 2]
    await backend.save_state("r", sample_state("r"))
    assert await backend.load_state("r") == sample_state("r")


async def test_a_schema_missing_tables_after_migration_gives_a_typed_error(
    pg: PostgresBackend, postgres_dsn: str, postgres_schema: str
) -> None:
    await pg.save_state("r", sample_state("r"))
    await _sql(postgres_dsn, postgres_schema, "DROP TABLE flujo_run_steps")

    with pytest.raises(SchemaVersionError) as info:
        await pg.load_state("r")
    assert "flujo migrate" in str(info.value)


async def test_a_newer_schema_is_refused(
    pg: PostgresBackend, open_postgres: OpenPostgres, postgres_dsn: str, postgres_schema: str
) -> None:
    await pg.save_state("r", sample_state("r"))
    newer = len(MIGRATIONS) + 1
    await _sql(
        postgres_dsn,
        postgres_schema,
        "INSERT INTO flujo_schema_version (version, applied_at) VALUES ($1, 0)",
        newer,
    )

    backend = open_postgres()
    for name, call in _every_operation(backend):
        with pytest.raises(SchemaVersionError) as info:
            await call()
        assert info.value.found == newer, name
        assert info.value.expected == len(MIGRATIONS), name
        assert "upgrade flujo" in str(info.value), name
    with pytest.raises(SchemaVersionError) as info:
        await backend.migrate()
    assert info.value.found == newer

    rows = await _sql(
        postgres_dsn, postgres_schema, "SELECT run_id, status, version FROM flujo_runs"
    )
    assert [tuple(row) for row in rows] == [("r", "running", 2)]
    versions = await _sql(postgres_dsn, postgres_schema, "SELECT version FROM flujo_schema_version")
    assert sorted(row["version"] for row in versions) == [*range(1, newer + 1)]


async def test_concurrent_migrations_apply_each_migration_once(
    open_postgres: OpenPostgres, postgres_dsn: str, postgres_schema: str
) -> None:
    backends = [open_postgres() for _ in range(4)]

    results = await asyncio.gather(*(backend.migrate() for backend in backends))

    assert sorted(results) == [[], [], [], [1, 2]]
    rows = await _sql(postgres_dsn, postgres_schema, "SELECT version FROM flujo_schema_version")
    assert [row["version"] for row in rows] == [1, 2]
    for backend in backends:
        assert await backend.schema_version() == len(MIGRATIONS)
    await backends[0].save_state("r", sample_state("r"))
    assert await backends[3].load_state("r") == sample_state("r")


async def test_concurrent_migrations_from_two_event_loops(
    open_postgres: OpenPostgres, postgres_schema: str, postgres_dsn: str
) -> None:
    """Two threads, each with its own event loop and backend, as two processes would."""
    backends = [open_postgres(), open_postgres()]

    def migrate(backend: PostgresBackend) -> list[int]:
        async def go() -> list[int]:
            try:
                return await backend.migrate()
            finally:
                await backend.aclose()

        return asyncio.run(go())

    results = await asyncio.gather(*(asyncio.to_thread(migrate, b) for b in backends))

    assert sorted(results) == [[], [1, 2]]
    rows = await _sql(postgres_dsn, postgres_schema, "SELECT version FROM flujo_schema_version")
    assert [row["version"] for row in rows] == [1, 2]


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schema",
    ["public; DROP TABLE flujo_runs", "Upper", "1abc", "a-b", 'x"y', "", "a" * 64, "sch ema"],
)
def test_a_bad_schema_name_is_refused(schema: str) -> None:
    with pytest.raises(ConfigurationError):
        PostgresBackend(NO_SERVER, schema=schema)


@pytest.mark.parametrize(("pool_min", "pool_max"), [(-1, 5), (5, 2), (0, 0)])
def test_bad_pool_sizes_are_refused(pool_min: int, pool_max: int) -> None:
    with pytest.raises(ConfigurationError):
        PostgresBackend(NO_SERVER, pool_min=pool_min, pool_max=pool_max)


async def test_an_unreachable_server_gives_a_typed_error_without_the_password() -> None:
    backend = PostgresBackend(NO_SERVER, pool_min=0)
    assert "s3cret-pw" not in repr(backend)
    for name, call in _every_operation(backend):
        with pytest.raises(StateBackendError) as info:
            await call()
        assert not isinstance(info.value, SchemaVersionError), name
        assert "s3cret-pw" not in str(info.value), name
    with pytest.raises(StateBackendError):
        await backend.migrate()
    await backend.aclose()


@pytest.mark.parametrize(("synchronous_commit", "expected"), [(True, "on"), (False, "off")])
async def test_synchronous_commit_sets_the_session_setting(
    open_postgres: OpenPostgres, postgres_schema: str, synchronous_commit: bool, expected: str
) -> None:
    backend = open_postgres(synchronous_commit=synchronous_commit, pool_min=2)
    await backend.migrate()
    await backend.save_state("r", sample_state("r"))

    pool = await backend._get_pool()
    # Every connection of the pool has it, not only the first.
    async with pool.acquire() as one, pool.acquire() as two:
        for conn in (one, two):
            assert await conn.fetchval("SHOW synchronous_commit") == expected
            assert await conn.fetchval("SHOW search_path") == postgres_schema
    assert await backend.load_state("r") == sample_state("r")


# -- NUL: stored in values, refused in names and metadata ------------------------------------------

# (what the state holds, the part SerializationError names)
NUL_IN_NAMES = [
    pytest.param({"pipeline_context": {"ok": 1, "key\x00": 1}}, "pipeline_context", id="field"),
    pytest.param({"metadata": {"tenant": "a\x00"}}, "metadata", id="metadata"),
    pytest.param({"metadata": {"deep": {"x": ["\x00"]}}}, "metadata", id="metadata-nested"),
    pytest.param({"pipeline_id": "p\x00"}, "pipeline_id", id="pipeline_id"),
    pytest.param({"pipeline_name": "pipe\x00line"}, "pipeline_name", id="pipeline_name"),
    pytest.param({"pipeline_version": "1\x00"}, "pipeline_version", id="pipeline_version"),
    pytest.param({"status": "running\x00"}, "status", id="status"),
]


@pytest.mark.parametrize(("changes", "part"), NUL_IN_NAMES)
async def test_nul_in_a_name_or_metadata_is_refused_and_nothing_is_written(
    pg: PostgresBackend,
    postgres_dsn: str,
    postgres_schema: str,
    changes: dict[str, Any],
    part: str,
) -> None:
    """Text columns and JSONB cannot hold NUL: SerializationError names the part, before any
    row is touched."""
    await pg.save_state("kept", sample_state("kept"))
    counts = await _row_counts(postgres_dsn, postgres_schema)

    for run_id, state in (
        ("kept", sample_state("kept", version=7, **changes)),
        ("new", sample_state("new", **changes)),
    ):
        with pytest.raises(SerializationError) as info:
            await pg.save_state(run_id, state)
        assert info.value.path.startswith(part), info.value.path
        assert "NUL" in str(info.value)

    assert await pg.load_state("kept") == sample_state("kept")
    assert await pg.load_state("new") is None
    assert await _row_counts(postgres_dsn, postgres_schema) == counts


async def test_nul_in_a_checkpoint_name_or_metadata_is_refused_and_nothing_is_written(
    pg: PostgresBackend, postgres_dsn: str, postgres_schema: str
) -> None:
    await pg.write_checkpoint(checkpoint(pg, "r", 0, header=run_header(), context={"a": 1}))
    before = await pg.load_state("r")
    counts = await _row_counts(postgres_dsn, postgres_schema)

    for kwargs, part in (
        ({"context": {"a": 2, "b\x00": 1}}, "pipeline_context"),
        ({"status": "failed\x00", "steps": [step_record(0, "a")]}, "status"),
    ):
        with pytest.raises(SerializationError) as info:
            await pg.write_checkpoint(checkpoint(pg, "r", 1, index=1, **kwargs))
        assert info.value.path.startswith(part), info.value.path
        assert await pg.load_state("r") == before, kwargs
    for header, part in (
        (run_header(pipeline_name="p\x00"), "pipeline_id"),  # the helper uses it for both
        (run_header(pipeline_version="\x00"), "pipeline_version"),
        (run_header(metadata={"tenant": "\x00"}), "metadata"),
    ):
        with pytest.raises(SerializationError) as info:
            await pg.write_checkpoint(checkpoint(pg, "new", 0, header=header))
        assert info.value.path.startswith(part), info.value.path
    assert await pg.load_state("new") is None
    assert await _row_counts(postgres_dsn, postgres_schema) == counts


NUL_IN_VALUES = [
    pytest.param({"pipeline_context": {"ok": 1, "v": "a\x00b"}}, id="context-value"),
    pytest.param({"pipeline_context": {"v": {"deep": ["x", "\x00"], "k\x00": 1}}}, id="nested"),
    pytest.param({"last_step_output": "\x00"}, id="last_step_output"),
    pytest.param({"initial_input": {"in": "nul\x00"}}, id="initial_input"),
    pytest.param({"step_history": [{"output": "x\x00"}]}, id="step_history"),
    pytest.param({"error": {"type": "E", "message": "bad\x00", "step": None}}, id="error"),
    pytest.param({"step_names": ["a\x00"]}, id="step_names"),
]


@pytest.mark.parametrize("changes", NUL_IN_VALUES)
async def test_nul_in_state_values_is_stored_exactly(
    pg: PostgresBackend, postgres_dsn: str, postgres_schema: str, changes: dict[str, Any]
) -> None:
    """State values are stored as ``json`` (exact text), which holds the escape ``\\u0000``."""
    await pg.save_state("kept", sample_state("kept"))
    changed = sample_state("kept", version=7, **changes)
    new = sample_state("new", **changes)

    await pg.save_state("kept", changed)
    await pg.save_state("new", new)

    assert await pg.load_state("kept") == changed
    assert await pg.load_state("new") == new
    holds_escape = "strpos({}::text, '\\u0000') > 0"  # the JSON escape, six characters
    rows = await _sql(
        postgres_dsn,
        postgres_schema,
        "SELECT count(*) AS n FROM flujo_runs r WHERE "
        + " OR ".join(
            holds_escape.format(column)
            for column in ("step_names", "initial_input", "last_step_output", "error")
        )
        + " OR EXISTS (SELECT 1 FROM flujo_run_context c WHERE c.run_id = r.run_id AND "
        + holds_escape.format("c.value")
        + ") OR EXISTS (SELECT 1 FROM flujo_run_steps s WHERE s.run_id = r.run_id AND "
        + holds_escape.format("s.record")
        + ")",
    )
    assert rows[0]["n"] == 2  # both runs hold the escape as written


async def test_nul_in_checkpoint_values_is_stored_exactly(pg: PostgresBackend) -> None:
    header = run_header(initial_input=orjson.dumps("\x00"), step_names=["a\x00"])
    await pg.write_checkpoint(checkpoint(pg, "r", 0, header=header, context={"a": 1}))
    loaded = await pg.load_state("r")
    assert loaded is not None
    assert loaded["initial_input"] == "\x00"
    assert loaded["step_names"] == ["a\x00"]

    for version, (kwargs, field, expected) in enumerate(
        [
            ({"context": {"a": 2, "b": "x\x00"}}, "pipeline_context", {"a": 2, "b": "x\x00"}),
            (
                {"steps": [step_record(0, "a", "\x00")]},
                "step_history",
                [step_record(0, "a", "\x00")],
            ),
            ({"output": ["ok", "\x00"]}, "last_step_output", ["ok", "\x00"]),
            (
                {"error": {"type": "E", "message": "\x00", "step": "a"}, "status": "failed"},
                "error",
                {"type": "E", "message": "\x00", "step": "a"},
            ),
        ],
        start=1,
    ):
        await pg.write_checkpoint(checkpoint(pg, "r", version, index=1, step_offset=0, **kwargs))
        loaded = await pg.load_state("r")
        assert loaded is not None
        assert loaded["version"] == version + 1
        assert loaded[field] == expected, kwargs
    [summary] = await pg.list_runs()
    assert summary["error"] == {"type": "E", "message": "\x00", "step": "a"}


async def test_list_runs_filters_holding_nul_find_nothing(pg: PostgresBackend) -> None:
    """Nothing stored can hold NUL in a text column or JSONB, so such a filter matches no run
    (and is not an error); the same filters without NUL still find the run."""
    await pg.save_state("r", sample_state("r", metadata={"tenant": "acme"}))

    assert await pg.list_runs(status="running\x00") == []
    assert await pg.list_runs(pipeline_name="ingest\x00") == []
    assert await pg.list_runs(metadata_filter={"tenant": "acme\x00"}) == []
    assert await pg.list_runs(metadata_filter={"tenant": "acme", "x": "\x00"}) == []
    assert await pg.list_runs(status="running", metadata_filter={"tenant": "\x00"}) == []
    found = await pg.list_runs(
        status="running", pipeline_name="ingest", metadata_filter={"tenant": "acme"}
    )
    assert [run["run_id"] for run in found] == ["r"]


@pytest.mark.parametrize(
    "text",
    [
        "\\u0000",  # a backslash, then "u0000": six ordinary characters
        "C:\\u0000dir",
        "\\\\u0000",
        '{"a": "\\u0000"}',
    ],
)
async def test_text_that_only_looks_like_an_escaped_nul_is_stored(
    pg: PostgresBackend, text: str
) -> None:
    assert "\x00" not in text
    state = sample_state(
        "r",
        pipeline_name=text,
        pipeline_context={"v": text},
        last_step_output=text,
        step_history=[step_record(0, "a", text)],
        error={"type": "E", "message": text, "step": None},
        metadata={"note": text},
    )
    await pg.save_state("r", state)
    assert await pg.load_state("r") == state
    assert [r["run_id"] for r in await pg.list_runs(metadata_filter={"note": text})] == ["r"]
    assert [r["run_id"] for r in await pg.list_runs(pipeline_name=text)] == ["r"]


class _Opaque:
    pass


async def test_a_step_output_with_nul_is_stored_and_the_run_completes(
    pg: PostgresBackend,
) -> None:
    """A step output holding NUL is an ordinary value on Postgres too: the run completes, and
    the stored output comes back exactly (as the stored result of the finished run)."""

    async def fine(x: str) -> str:
        return x + "!"

    async def with_nul(x: str) -> str:
        return x + "\x00"

    pipeline = Pipeline.from_steps(
        [Step.from_callable(fine, name="fine"), Step.from_callable(with_nul, name="nul")]
    )
    runner = Flujo(pipeline, state_backend=pg, pipeline_name="nul-test")

    result = await runner.run_async("x", run_id="r")

    assert result.status == "completed"
    assert result.output == "x!\x00"
    stored = await pg.load_state("r")
    assert stored is not None
    assert stored["status"] == "completed"
    assert stored["last_step_output"] == "x!\x00"
    assert [record["output"] for record in stored["step_history"]] == ["x!", "x!\x00"]
    again = await runner.run_async("ignored", run_id="r")
    assert (again.status, again.output) == ("completed", "x!\x00")


async def test_an_unserializable_step_output_fails_the_run_with_serialization_error(
    pg: PostgresBackend,
) -> None:
    """RELIABILITY.md promise 5 on Postgres: the error names the culprit, the previous
    checkpoint stays, and the run is marked failed (as on every other backend)."""

    async def fine(x: str) -> str:
        return x + "!"

    async def opaque(x: str) -> Any:
        return _Opaque()

    pipeline = Pipeline.from_steps(
        [Step.from_callable(fine, name="fine"), Step.from_callable(opaque, name="opaque")]
    )
    runner = Flujo(pipeline, state_backend=pg, pipeline_name="opaque-test")

    with pytest.raises(SerializationError) as info:
        await runner.run_async("x", run_id="r")
    assert "last_step_output" in info.value.path or "opaque" in info.value.path

    stored = await pg.load_state("r")
    assert stored is not None
    assert stored["last_step_output"] == "x!"
    assert stored["step_history"][0]["name"] == "fine"
    assert stored["status"] == "failed", stored
    assert stored["error"]["type"] == "SerializationError"


async def test_a_step_failing_with_nul_in_its_message_is_recorded_as_failed(
    pg: PostgresBackend,
) -> None:
    """A step failure is a result ("failed"), not an exception, on every backend; the message
    holding NUL (binary input quoted in an error) is stored exactly."""

    async def fine(x: str) -> str:
        return x + "!"

    async def boom(x: str) -> str:
        raise ValueError("bad byte \x00 in input")

    pipeline = Pipeline.from_steps(
        [Step.from_callable(fine, name="fine"), Step.from_callable(boom, name="boom")]
    )
    runner = Flujo(pipeline, state_backend=pg, pipeline_name="nul-failure")

    result = await runner.run_async("x", run_id="r")

    assert result.status == "failed"
    assert result.failed_step == "boom"
    stored = await pg.load_state("r")
    assert stored is not None
    assert stored["status"] == "failed"
    assert stored["error"]["step"] == "boom"
    assert "\x00" in stored["error"]["message"]
    assert stored["last_step_output"] == "x!"


# -- exact round trips (values are stored as json text) -------------------------------------------

UNICODE = [
    "Zoë",
    "東京",
    "עִבְרִית",
    "e\u0301",  # a combining accent
    "🙂👩‍👩‍👧",
    "\u2028\u2029",
    "\uffff",
    "\U0010ffff",
    "\x01\x1f\x7f",
    'quote " backslash \\ slash /',
    "tab\tnewline\n",
    "",
]
FLOATS = [
    0.1,
    -2.5,
    1e-7,
    5e-324,
    2.2250738585072014e-308,
    1.7976931348623157e308,
    -1e300,
    1e15,
    1e16,
    1e18,
    4.110259334656402e16,
    123456789012345680.0,
    2.0**53,
    2.0**63,
    2.0**64,
    1e22,
    1e300,
    0.0,
    -0.0,
    1.0,
]
INTS = [0, 1, -1, 2**53 + 1, 2**63 - 1, -(2**63)]


def _same(a: Any, b: Any) -> bool:
    """Equal, with the same JSON types all the way down (1.0 is not 1, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _nested(levels: int) -> Any:
    value: Any = {"leaf": [1, 2.5, "x", None, True]}
    for i in range(levels):
        value = {"d": value, "i": i} if i % 2 else [value, i]
    return value


NESTED = {
    "empty_object": {},
    "empty_list": [],
    "deep": _nested(60),
    "mixed": [{"a": [{"b": [None, False, {"c": "🙂"}]}]}],
    "keys": {k: i for i, k in enumerate(UNICODE[:-1])},
    "long": "x" * 100_000,
}


async def test_values_round_trip_unicode(pg: PostgresBackend) -> None:
    state = sample_state(
        "r",
        pipeline_context={f"f{i}": text for i, text in enumerate(UNICODE)}
        | {"keys": {text: i for i, text in enumerate(UNICODE)}},
        last_step_output=UNICODE,
        step_history=[{"output": text} for text in UNICODE],
        initial_input={"texts": UNICODE},
        metadata={"label": "Zoë 東京 🙂", "all": UNICODE},
        error={"type": "E", "message": "".join(UNICODE), "step": "東京"},
    )
    await pg.save_state("r", state)
    loaded = await pg.load_state("r")
    assert loaded is not None
    assert _same(loaded["pipeline_context"], state["pipeline_context"])
    assert _same(loaded["last_step_output"], UNICODE)
    assert _same(loaded["step_history"], state["step_history"])
    assert _same(loaded["error"], state["error"])
    assert _same(loaded["metadata"], state["metadata"])
    found = await pg.list_runs(metadata_filter={"label": "Zoë 東京 🙂"})
    assert [r["run_id"] for r in found] == ["r"]


async def test_values_round_trip_numbers_with_their_type_and_value(pg: PostgresBackend) -> None:
    """A float comes back as the same float (not an int, not a rounded neighbour)."""
    numbers = FLOATS + INTS
    await pg.write_checkpoint(
        checkpoint(
            pg,
            "r",
            0,
            header=run_header(initial_input=orjson.dumps(numbers)),
            context={f"n{i}": n for i, n in enumerate(numbers)},
            steps=[{"value": n} for n in numbers],
            output=numbers,
        )
    )
    loaded = await pg.load_state("r")
    assert loaded is not None

    wrong = {
        repr(n): loaded["pipeline_context"][f"n{i}"]
        for i, n in enumerate(numbers)
        if not _same(loaded["pipeline_context"][f"n{i}"], n)
    }
    assert wrong == {}, f"stored -> loaded: {wrong}"
    assert _same(loaded["last_step_output"], numbers)
    assert _same(loaded["initial_input"], numbers)
    assert _same([record["value"] for record in loaded["step_history"]], numbers)


async def test_values_round_trip_nested_data(pg: PostgresBackend) -> None:
    state = sample_state("r", pipeline_context=NESTED, last_step_output=NESTED)
    await pg.save_state("r", state)
    await pg.write_checkpoint(
        checkpoint(pg, "r", 2, context={"later": NESTED}, steps=[NESTED], step_offset=2)
    )
    loaded = await pg.load_state("r")
    assert loaded is not None
    assert _same(loaded["pipeline_context"], {**NESTED, "later": NESTED})
    assert _same(loaded["last_step_output"], NESTED)
    assert _same(loaded["step_history"][-1], NESTED)


# -- the pool and event loops ----------------------------------------------------------------------


async def _connections(dsn: str, application_name: str) -> int:
    rows = await _sql(
        dsn,
        "public",
        "SELECT count(*) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = $1",
        application_name,
    )
    return int(rows[0]["n"])


async def _eventually_no_connections(dsn: str, application_name: str) -> None:
    """The server notices a closed connection a moment after the client closed it."""
    for _ in range(200):
        if await _connections(dsn, application_name) == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"connections of {application_name} are still open")


def _with_application_name(dsn: str, name: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}application_name={name}"


async def test_aclose_drains_the_pool_and_the_backend_works_again(
    open_postgres: OpenPostgres, postgres_dsn: str
) -> None:
    name = f"flujo-test-{uuid.uuid4().hex[:12]}"
    backend = open_postgres(dsn=_with_application_name(postgres_dsn, name), pool_min=2)
    await backend.migrate()
    await backend.save_state("r", sample_state("r"))
    assert await _connections(postgres_dsn, name) >= 1

    await backend.aclose()

    await _eventually_no_connections(postgres_dsn, name)
    assert await backend.load_state("r") == sample_state("r")
    await backend.write_checkpoint(checkpoint(backend, "r", 2, context={"after": "close"}))
    assert await _connections(postgres_dsn, name) >= 1
    await backend.aclose()
    await backend.aclose()  # twice is fine
    await _eventually_no_connections(postgres_dsn, name)


async def test_many_concurrent_calls_share_a_small_pool(open_postgres: OpenPostgres) -> None:
    backend = open_postgres(pool_max=2)
    await backend.migrate()
    await asyncio.gather(*(backend.save_state(f"r{i}", sample_state(f"r{i}")) for i in range(30)))
    loaded = await asyncio.gather(*(backend.load_state(f"r{i}") for i in range(30)))
    assert loaded == [sample_state(f"r{i}") for i in range(30)]


async def test_the_backend_works_from_two_event_loops(pg: PostgresBackend) -> None:
    """Each ``asyncio.run`` (as each ``Flujo.run()``) has its own event loop; one backend
    serves them one after the other, and the test's own loop afterwards."""
    await pg.save_state("r", sample_state("r"))

    def in_new_loop(coro_fn: Callable[[], Any]) -> Any:
        return asyncio.run(coro_fn())

    async def first() -> Any:
        return await pg.load_state("r")

    async def second() -> Any:
        await pg.write_checkpoint(checkpoint(pg, "r", 2, context={"loop": 2}))
        return await pg.load_state("r")

    assert await asyncio.to_thread(in_new_loop, first) == sample_state("r")
    loaded = await asyncio.to_thread(in_new_loop, second)
    assert loaded is not None
    assert loaded["pipeline_context"]["loop"] == 2
    assert loaded["version"] == 3
    # Back in this loop, after the other loops are gone.
    again = await pg.load_state("r")
    assert again is not None
    assert again["version"] == 3
    await pg.aclose()


async def test_aclose_after_use_in_an_event_loop_that_is_gone(
    pg: PostgresBackend, postgres_dsn: str, postgres_schema: str
) -> None:
    """The pool was made (and last used) in an event loop that has closed since: aclose from
    another loop drops it without raising (its sockets, bound to the dead loop, close when the
    garbage collector frees them, as documented), and the backend works again in this loop."""
    name = f"flujo-test-{uuid.uuid4().hex[:12]}"
    backend = PostgresBackend(
        _with_application_name(postgres_dsn, name), schema=postgres_schema, pool_min=2
    )

    async def use() -> None:
        await backend.save_state("r", sample_state("r"))

    await asyncio.to_thread(asyncio.run, use())
    assert await _connections(postgres_dsn, name) >= 1

    await backend.aclose()  # not in the pool's loop, which is closed
    gc.collect()

    await _eventually_no_connections(postgres_dsn, name)
    assert await backend.load_state("r") == sample_state("r")
    await backend.aclose()
    await _eventually_no_connections(postgres_dsn, name)
    assert await pg.load_state("r") == sample_state("r")


def test_a_backend_used_by_two_flujo_runs_closes_cleanly(postgres_dsn: str) -> None:
    """Each ``runner.run()`` has its own event loop: the pool of the first run's loop is
    replaced in the second; closing afterwards (in a third loop) raises nothing."""
    schema = f"flujo_test_{uuid.uuid4().hex[:12]}"
    backend = PostgresBackend(postgres_dsn, schema=schema, pool_min=1, pool_max=2)

    async def add(x: int) -> int:
        return x + 1

    runner = Flujo(
        Pipeline.from_steps([Step.from_callable(add, name="add")]),
        state_backend=backend,
        pipeline_name="close",
    )
    try:
        asyncio.run(backend.migrate())
        assert runner.run(1, run_id="one").output == 2
        assert runner.run(2, run_id="two").output == 3
        asyncio.run(backend.aclose())
        assert runner.run(0, run_id="two").output == 3  # reopens in yet another loop
    finally:

        async def cleanup() -> None:
            try:
                await backend.aclose()
            finally:
                await _sql(postgres_dsn, "public", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

        asyncio.run(cleanup())


def test_flujo_run_twice_with_one_postgres_backend(postgres_dsn: str) -> None:
    """The synchronous API: two ``runner.run()`` calls, two event loops, one backend."""
    schema = f"flujo_test_{uuid.uuid4().hex[:12]}"
    backend = PostgresBackend(postgres_dsn, schema=schema, pool_min=0, pool_max=2)

    async def add(x: int) -> int:
        return x + 1

    runner = Flujo(
        Pipeline.from_steps([Step.from_callable(add, name="add")]),
        state_backend=backend,
        pipeline_name="twice",
    )
    try:
        asyncio.run(backend.migrate())
        first = runner.run(1, run_id="one")
        second = runner.run(10, run_id="two")
        assert (first.status, first.output) == ("completed", 2)
        assert (second.status, second.output) == ("completed", 11)
        assert runner.run(0, run_id="one").output == 2  # the stored result
    finally:

        async def cleanup() -> None:
            try:
                await backend.aclose()
            finally:
                await _sql(postgres_dsn, "public", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

        asyncio.run(cleanup())


# -- what a delete leaves behind -------------------------------------------------------------------


async def test_deletes_leave_no_rows_behind(
    pg: PostgresBackend, postgres_dsn: str, postgres_schema: str
) -> None:
    for i in range(4):
        await pg.write_checkpoint(
            checkpoint(
                pg,
                f"r{i}",
                0,
                header=run_header(),
                context={"a": i, "b": [i]},
                steps=[{"i": 0}, {"i": 1}],
                updated_at=T0 + i,
            )
        )
    assert await _row_counts(postgres_dsn, postgres_schema) == {
        "flujo_runs": 4,
        "flujo_run_context": 8,
        "flujo_run_steps": 8,
    }

    await pg.delete_state("r0")
    assert await pg.delete_runs(updated_before=to_datetime(T0 + 2)) == 1  # r1

    assert await _row_counts(postgres_dsn, postgres_schema) == {
        "flujo_runs": 2,
        "flujo_run_context": 4,
        "flujo_run_steps": 4,
    }
    rows = await _sql(
        postgres_dsn,
        postgres_schema,
        "SELECT DISTINCT run_id FROM flujo_run_steps UNION SELECT run_id FROM flujo_run_context",
    )
    assert sorted(row["run_id"] for row in rows) == ["r2", "r3"]


async def test_a_newer_schema_is_refused_after_schema_version_was_asked(
    pg: PostgresBackend, open_postgres: OpenPostgres, postgres_dsn: str, postgres_schema: str
) -> None:
    """Asking the version first (as ``flujo migrate`` or a health check would) must not let
    the backend write into a schema it does not understand."""
    await pg.save_state("r", sample_state("r"))
    newer = len(MIGRATIONS) + 1
    await _sql(
        postgres_dsn,
        postgres_schema,
        "INSERT INTO flujo_schema_version (version, applied_at) VALUES ($1, 0)",
        newer,
    )
    backend = open_postgres()
    assert await backend.schema_version() == newer

    with pytest.raises(SchemaVersionError):
        await backend.save_state("r", sample_state("r", status="completed", version=5))
    with pytest.raises(SchemaVersionError):
        await backend.list_runs()
    rows = await _sql(
        postgres_dsn, postgres_schema, "SELECT run_id, status, version FROM flujo_runs"
    )
    assert [tuple(row) for row in rows] == [("r", "running", 2)]


# -- the checkpoint lane -----------------------------------------------------------------------


@pytest.mark.parametrize("pool_max", [1, 2, 4])
async def test_concurrent_runs_share_the_pool_and_the_lane_without_starving(
    postgres_dsn: str, postgres_schema: str, pool_max: int
) -> None:
    """Checkpoints go through one kept connection while it is free and through the pool when
    it is busy; with a pool of one there is no lane, so nothing can wait forever."""
    backend = PostgresBackend(postgres_dsn, schema=postgres_schema, pool_min=0, pool_max=pool_max)
    await backend.migrate()

    async def add(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    runner = Flujo(
        Pipeline.from_steps([Step.from_callable(add, name=f"s{i}") for i in range(10)]),
        state_backend=backend,
    )
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(runner.run_async(i, run_id=f"run-{i}") for i in range(12))),
            timeout=60,
        )
        assert [r.output for r in results] == [i + 10 for i in range(12)]
        for i in range(12):
            state = await backend.load_state(f"run-{i}")
            assert state is not None
            assert state["version"] == 10
            assert [r["index"] for r in state["step_history"]] == list(range(10))
    finally:
        await backend.aclose()


async def test_a_cancelled_checkpoint_leaves_no_broken_lane_behind(
    postgres_dsn: str, postgres_schema: str
) -> None:
    """A run cancelled in the middle of a checkpoint statement: the kept connection is given
    back closed, and the next run checkpoints on a fresh one."""
    backend = PostgresBackend(postgres_dsn, schema=postgres_schema, pool_max=2)
    await backend.migrate()

    async def add(x: int) -> int:
        return x + 1

    runner = Flujo(
        Pipeline.from_steps([Step.from_callable(add, name=f"s{i}") for i in range(200)]),
        state_backend=backend,
    )
    try:
        task = asyncio.create_task(runner.run_async(0, run_id="cut"))
        while (await backend.load_state("cut")) is None:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        again = await runner.run_async(0, run_id="cut")  # resumes where the commit stopped
        assert again.output == 200
        state = await backend.load_state("cut")
        assert state is not None
        assert [r["index"] for r in state["step_history"]] == list(range(200))
        fresh = await runner.run_async(5, run_id="after")
        assert fresh.output == 205
    finally:
        await backend.aclose()
