"""Migration 2: a store made by an early build of migration 1 is brought up to date.

Migration 1 changed while flujo was unreleased (it gained run metadata, usage, queue columns,
evaluation, cache, queue and worker tables; on Postgres its state columns went from jsonb to
json). A store made by an early build records schema version 1 all the same. Migration 2 adds
what it lacks, so that it works as a store made today: old runs still load, new runs run,
queues and evaluations work. The stores here are made with the earliest released form of
migration 1, written out below.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import asyncpg

from flujo import Flujo, Step
from flujo.state import SQLiteBackend
from flujo.state.backends.base import StateBackend
from flujo.state.backends.postgres import PostgresBackend

SQLITE_EARLY_SCHEMA_1 = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, pipeline_id TEXT NOT NULL, pipeline_name TEXT NOT NULL,
    pipeline_version TEXT NOT NULL, step_names BLOB NOT NULL, initial_input BLOB NOT NULL,
    status TEXT NOT NULL, current_step_index INTEGER NOT NULL, version INTEGER NOT NULL,
    last_step_output BLOB NOT NULL, error BLOB, created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX runs_status_updated ON runs (status, updated_at);
CREATE INDEX runs_updated ON runs (updated_at);
CREATE TABLE run_context (
    run_id TEXT NOT NULL, field TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (run_id, field)
);
CREATE TABLE run_steps (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, record BLOB NOT NULL, PRIMARY KEY (run_id, seq)
);
CREATE TABLE flujo_schema (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL);
INSERT INTO flujo_schema VALUES (1, 0);
INSERT INTO runs VALUES ('old-run', 'p', 'p', '1.0.0', X'5B2261225D', X'31', 'failed', 0, 1,
    X'6E756C6C', NULL, 1700000000.0, 1700000000.0);
"""

POSTGRES_EARLY_SCHEMA_1 = """
CREATE TABLE flujo_runs (
    run_id text PRIMARY KEY, pipeline_id text NOT NULL, pipeline_name text NOT NULL,
    pipeline_version text NOT NULL, step_names jsonb NOT NULL, initial_input jsonb NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}', status text NOT NULL,
    current_step_index integer NOT NULL, version bigint NOT NULL,
    last_step_output jsonb NOT NULL, error jsonb, created_at double precision NOT NULL,
    updated_at double precision NOT NULL
) WITH (fillfactor = 70);
CREATE INDEX flujo_runs_created ON flujo_runs (created_at DESC, run_id DESC);
CREATE INDEX flujo_runs_status_created ON flujo_runs (status, created_at DESC, run_id DESC);
CREATE INDEX flujo_runs_pipeline_created ON flujo_runs (pipeline_name, created_at DESC, run_id DESC);
CREATE INDEX flujo_runs_metadata ON flujo_runs USING gin (metadata jsonb_path_ops);
CREATE TABLE flujo_run_context (
    run_id text NOT NULL, field text NOT NULL, value jsonb NOT NULL, PRIMARY KEY (run_id, field)
);
CREATE TABLE flujo_run_steps (
    run_id text NOT NULL, seq integer NOT NULL, record jsonb NOT NULL, PRIMARY KEY (run_id, seq)
);
CREATE TABLE flujo_schema_version (version integer PRIMARY KEY, applied_at double precision NOT NULL);
INSERT INTO flujo_schema_version VALUES (1, 0);
INSERT INTO flujo_runs (run_id, pipeline_id, pipeline_name, pipeline_version, step_names,
    initial_input, status, current_step_index, version, last_step_output, created_at, updated_at)
VALUES ('old-run', 'p', 'p', '1.0.0', '["a"]', '1', 'failed', 0, 1, 'null', 1700000000.0,
    1700000000.0);
"""  # noqa: E501 - the schema as it was written


async def add_one(x: int) -> int:
    return x + 1


async def works_as_new(backend: StateBackend) -> None:
    """The old run loads; a new run runs and records usage; a run is queued and claimed."""
    old = await backend.load_state("old-run")
    assert old is not None
    assert (old["status"], old["initial_input"], old["metadata"]) == ("failed", 1, {})
    assert old["queue"] is None
    runner: Flujo[Any, Any, Any] = Flujo(
        Step.from_callable(add_one, name="a"),
        state_backend=backend,
        pipeline_name="p",
        pipeline_version="1.0.0",
    )
    result = await runner.run_async(1, run_id="new-run", metadata={"team": "x"})
    assert result.status == "completed"
    assert [s["run_id"] for s in await backend.list_runs(metadata_filter={"team": "x"})] == [
        "new-run"
    ]
    queued = await runner.submit(5, queue="mail", priority=3)
    [claim] = await backend.claim_runs(worker_id="w", queues=["mail"], limit=5, lease_s=30)
    assert claim.run_id == queued
    await backend.set_queue_limit("mail", 2)
    assert await backend.queue_limits() == {"mail": 2}
    await backend.register_worker("w", {"host": "h"})
    assert [w["worker_id"] for w in await backend.list_workers()] == ["w"]


async def test_an_early_sqlite_store_is_brought_up_to_date(tmp_path: Path) -> None:
    path = tmp_path / "early.db"
    conn = sqlite3.connect(path)
    conn.executescript(SQLITE_EARLY_SCHEMA_1)
    conn.close()
    backend = SQLiteBackend(path)
    try:
        assert await backend.migrate() == [2]
        assert await backend.schema_version() == 2
        await works_as_new(backend)
    finally:
        await backend.aclose()
    again = SQLiteBackend(path)  # migration 2 ran once; the store opens as it is
    try:
        assert await again.migrate() == []
    finally:
        await again.aclose()


async def test_an_early_postgres_database_is_brought_up_to_date(
    postgres_dsn: str, postgres_schema: str
) -> None:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f'CREATE SCHEMA "{postgres_schema}"')
        await conn.execute(f'SET search_path TO "{postgres_schema}"')
        await conn.execute(POSTGRES_EARLY_SCHEMA_1)
    finally:
        await conn.close()
    backend = PostgresBackend(postgres_dsn, schema=postgres_schema, pool_min=0, pool_max=2)
    try:
        assert await backend.migrate() == [2]
        await works_as_new(backend)
        # Exact numbers again: the state columns are json now, as migration 1 makes them.
        await backend.aclose()
        conn = await asyncpg.connect(postgres_dsn)
        try:
            types = await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = $1 AND table_name = 'flujo_runs'",
                postgres_schema,
            )
        finally:
            await conn.close()
        found = {row["column_name"]: row["data_type"] for row in types}
        assert found["last_step_output"] == "json"
        assert found["metadata"] == "jsonb"
    finally:
        await backend.aclose()


async def test_migration_2_changes_nothing_on_a_store_made_today(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "today.db")
    try:
        assert await backend.migrate() == [1, 2]
    finally:
        await backend.aclose()
    conn = sqlite3.connect(tmp_path / "today.db")
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(runs)")]
    finally:
        conn.close()
    assert len(columns) == len(set(columns)) == 20  # each column once, none added twice
