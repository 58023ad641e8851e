"""PostgresBackend: runs in Postgres (JSONB) through an asyncpg pool; the production store.

Install with ``pip install 'flujo[postgres]'``. Create or upgrade the schema with
``flujo migrate`` (or ``await backend.migrate()``); a database whose schema is older or newer
than this flujo raises :class:`~flujo.exceptions.SchemaVersionError` instead of being misread.

Layout (tables prefixed ``flujo_``, in the schema named by ``schema=`` or the connection's
``search_path``): ``flujo_runs`` (one row per run; the version column is the compare-and-swap
guard; metadata in JSONB with a GIN index), ``flujo_run_context`` (one row per context field),
``flujo_run_steps`` (one row per step record), ``flujo_schema_version`` (applied migrations).

A checkpoint is one SQL statement (a data-modifying CTE): the guarded update of the run's row
and the inserts that depend on it commit together or not at all, in one round trip.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from flujo.exceptions import (
    ConfigurationError,
    CorruptStateError,
    SchemaVersionError,
    SerializationError,
    StateBackendError,
    StateConflictError,
)
from flujo.state.backends.base import (
    Checkpoint,
    MetadataValue,
    StateBackend,
    StoredRun,
    check_version,
    checkpoint_from_state,
    epoch,
    metadata_filter_items,
    now,
    to_datetime,
    validate_run_id,
)
from flujo.state.uri import redact_uri

if TYPE_CHECKING:
    import asyncpg

__all__ = ["MIGRATIONS", "PostgresBackend"]

logger = logging.getLogger("flujo.state.postgres")

#: The schema, as an ordered list: migration N (1-based) brings the database to version N.
#: Append new migrations; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE flujo_runs (
        run_id text PRIMARY KEY,
        pipeline_id text NOT NULL,
        pipeline_name text NOT NULL,
        pipeline_version text NOT NULL,
        step_names jsonb NOT NULL,
        initial_input jsonb NOT NULL,
        metadata jsonb NOT NULL DEFAULT '{}',
        status text NOT NULL,
        current_step_index integer NOT NULL,
        version bigint NOT NULL,
        last_step_output jsonb NOT NULL,
        error jsonb,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL
    ) WITH (fillfactor = 70);
    CREATE INDEX flujo_runs_created ON flujo_runs (created_at DESC, run_id DESC);
    CREATE INDEX flujo_runs_status_created ON flujo_runs (status, created_at DESC, run_id DESC);
    CREATE INDEX flujo_runs_pipeline_created
        ON flujo_runs (pipeline_name, created_at DESC, run_id DESC);
    CREATE INDEX flujo_runs_metadata ON flujo_runs USING gin (metadata jsonb_path_ops);
    CREATE TABLE flujo_run_context (
        run_id text NOT NULL,
        field text NOT NULL,
        value jsonb NOT NULL,
        PRIMARY KEY (run_id, field)
    );
    CREATE TABLE flujo_run_steps (
        run_id text NOT NULL,
        seq integer NOT NULL,
        record jsonb NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    """,
)

_MIGRATION_LOCK = 0x666C756A6F  # "flujo": serializes concurrent `flujo migrate` runs
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_SUMMARY_COLUMNS = (
    "run_id, pipeline_id, pipeline_name, pipeline_version, status, current_step_index, "
    "version, created_at, updated_at, metadata, error"
)

# The common checkpoint: one step record appended, no context field changed.
_ADVANCE = """
WITH run AS (
    UPDATE flujo_runs
    SET status = $2, current_step_index = $3, updated_at = $4, version = $5, error = $6,
        last_step_output = COALESCE($7, last_step_output)
    WHERE run_id = $1 AND version = $8
    RETURNING run_id
)
INSERT INTO flujo_run_steps (run_id, seq, record) SELECT run_id, $9, $10 FROM run
RETURNING 1
"""

# Any other checkpoint on an existing run: records and context fields as arrays.
_ADVANCE_MANY = """
WITH run AS (
    UPDATE flujo_runs
    SET status = $2, current_step_index = $3, updated_at = $4, version = $5, error = $6,
        last_step_output = COALESCE($7, last_step_output)
    WHERE run_id = $1 AND version = $8
    RETURNING run_id
), steps AS (
    INSERT INTO flujo_run_steps (run_id, seq, record)
    SELECT run.run_id, $9 + s.i - 1, s.record
    FROM run, unnest($10::jsonb[]) WITH ORDINALITY AS s(record, i)
    ON CONFLICT (run_id, seq) DO UPDATE SET record = EXCLUDED.record
), fields AS (
    INSERT INTO flujo_run_context (run_id, field, value)
    SELECT run.run_id, f.field, f.value
    FROM run, unnest($11::text[], $12::jsonb[]) AS f(field, value)
    ON CONFLICT (run_id, field) DO UPDATE SET value = EXCLUDED.value
)
SELECT count(*) FROM run
"""

# A new run: its row, its first records and its whole context.
_CREATE = """
WITH run AS (
    INSERT INTO flujo_runs (run_id, pipeline_id, pipeline_name, pipeline_version, step_names,
        initial_input, metadata, created_at, status, current_step_index, updated_at, version,
        last_step_output, error)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
    ON CONFLICT (run_id) DO NOTHING
    RETURNING run_id
), steps AS (
    INSERT INTO flujo_run_steps (run_id, seq, record)
    SELECT run.run_id, $15 + s.i - 1, s.record
    FROM run, unnest($16::jsonb[]) WITH ORDINALITY AS s(record, i)
), fields AS (
    INSERT INTO flujo_run_context (run_id, field, value)
    SELECT run.run_id, f.field, f.value
    FROM run, unnest($17::text[], $18::jsonb[]) AS f(field, value)
)
SELECT count(*) FROM run
"""

_LOAD = """
SELECT pipeline_id, pipeline_name, pipeline_version, step_names, initial_input, created_at,
    status, current_step_index, updated_at, version, last_step_output, error, metadata,
    ARRAY(SELECT field FROM flujo_run_context c WHERE c.run_id = r.run_id ORDER BY field),
    ARRAY(SELECT value FROM flujo_run_context c WHERE c.run_id = r.run_id ORDER BY field),
    ARRAY(SELECT record FROM flujo_run_steps s WHERE s.run_id = r.run_id ORDER BY seq)
FROM flujo_runs r WHERE run_id = $1
"""

_DELETE_WHERE = """
WITH doomed AS (DELETE FROM flujo_runs WHERE {where} RETURNING run_id),
fields AS (DELETE FROM flujo_run_context WHERE run_id IN (SELECT run_id FROM doomed)),
steps AS (DELETE FROM flujo_run_steps WHERE run_id IN (SELECT run_id FROM doomed))
SELECT count(*) FROM doomed
"""


def _connection_errors() -> tuple[type[BaseException], ...]:
    import asyncpg  # noqa: PLC0415

    return (
        asyncpg.exceptions.ConnectionDoesNotExistError,
        asyncpg.exceptions.InterfaceError,
        asyncpg.exceptions.PostgresConnectionError,
        asyncpg.exceptions.AdminShutdownError,
        asyncpg.exceptions.CannotConnectNowError,
        ConnectionError,
        OSError,
    )


class PostgresBackend(StateBackend):
    """Stores runs in Postgres through an asyncpg connection pool.

    >>> backend = PostgresBackend("postgresql://postgres@127.0.0.1:5432/test")  # doctest: +SKIP
    >>> await backend.migrate()                                                   # doctest: +SKIP

    ``pool_min``/``pool_max`` size the pool (settings ``postgres_pool_min``/``_max``);
    ``schema`` puts the tables in that schema (created by :meth:`migrate`);
    ``synchronous_commit=False`` trades the last commits on a server crash for speed (a
    process crash of the client never loses a committed checkpoint either way).

    The pool is created on first use in the running event loop; used from another event loop
    (each ``Flujo.run()`` call makes its own), the backend opens a fresh pool there.
    :meth:`aclose` drains it.
    """

    def __init__(
        self,
        dsn: str,
        *,
        pool_min: int = 1,
        pool_max: int = 10,
        schema: str | None = None,
        synchronous_commit: bool = True,
        command_timeout_s: float = 60.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if schema is not None and _SCHEMA_NAME.fullmatch(schema) is None:
            raise ConfigurationError(
                f"schema {schema!r} must be a plain lower-case identifier ([a-z_][a-z0-9_]*)"
            )
        if not 0 <= pool_min <= pool_max or pool_max < 1:
            raise ConfigurationError(
                f"pool sizes must satisfy 0 <= pool_min <= pool_max >= 1, got {pool_min}, "
                f"{pool_max}"
            )
        self.dsn = dsn
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.schema = schema
        self.synchronous_commit = synchronous_commit
        self.command_timeout_s = command_timeout_s
        self._pool: asyncpg.Pool | None = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self._pool_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"PostgresBackend({redact_uri(self.dsn)!r}, schema={self.schema!r})"

    # -- the pool --------------------------------------------------------------------------------

    async def _get_pool(self, *, check_schema: bool = True) -> asyncpg.Pool:
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._pool_loop is loop:
            return self._pool
        if self._pool_lock is None or self._pool_loop is not loop:
            self._pool_lock = asyncio.Lock()
            if self._pool is not None:  # made in an event loop that is gone (or elsewhere)
                self._pool.terminate()
            self._pool, self._pool_loop = None, loop
        async with self._pool_lock:
            if self._pool is None:
                pool = await self._create_pool()
                if check_schema:
                    try:
                        await self._check_schema(pool)
                    except BaseException:
                        pool.terminate()
                        raise
                self._pool = pool
            return self._pool

    async def _create_pool(self) -> asyncpg.Pool:
        try:
            import asyncpg  # noqa: PLC0415
        except ImportError as exc:
            raise ConfigurationError(
                "the Postgres backend needs asyncpg: pip install 'flujo[postgres]'"
            ) from exc
        settings = {"synchronous_commit": "on" if self.synchronous_commit else "off"}
        if self.schema is not None:
            settings["search_path"] = self.schema
        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self.pool_min,
                max_size=self.pool_max,
                init=_init_connection,
                reset=_keep_session,
                server_settings=settings,
                command_timeout=self.command_timeout_s,
            )
        except (*_connection_errors(), asyncpg.PostgresError) as exc:
            raise StateBackendError(
                f"cannot connect to Postgres at {redact_uri(self.dsn)}: {exc}"
            ) from exc
        assert pool is not None
        return pool

    async def _check_schema(self, pool: asyncpg.Pool) -> None:
        found = await self._schema_version(pool)
        expected = len(MIGRATIONS)
        if found < expected:
            raise SchemaVersionError(
                f"the flujo schema in {redact_uri(self.dsn)} is at version {found}, this flujo "
                f"needs {expected}: run `flujo migrate`",
                found=found,
                expected=expected,
            )
        if found > expected:
            raise SchemaVersionError(
                f"the flujo schema in {redact_uri(self.dsn)} is at version {found}, newer than "
                f"this flujo understands ({expected}); upgrade flujo",
                found=found,
                expected=expected,
            )

    async def _schema_version(self, pool: asyncpg.Pool) -> int:
        async with pool.acquire() as conn:
            exists = await conn.fetchval("SELECT to_regclass('flujo_schema_version') IS NOT NULL")
            if not exists:
                return 0
            version = await conn.fetchval(
                "SELECT COALESCE(MAX(version), 0) FROM flujo_schema_version"
            )
            return int(version)

    async def schema_version(self) -> int:
        """The schema version of the database (0 when flujo's tables do not exist)."""
        with _errors(self.dsn, None):
            return await self._schema_version(await self._get_pool(check_schema=False))

    async def migrate(self) -> list[int]:
        """Apply the migrations the database lacks, in order; return their numbers.

        Idempotent, and safe to run from several processes at once (an advisory lock
        serializes them). A database newer than this flujo raises SchemaVersionError.
        """
        with _errors(self.dsn, None):
            pool = await self._get_pool(check_schema=False)
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                if self.schema is not None:
                    # A checked identifier ([a-z_][a-z0-9_]*): identifiers cannot be bound.
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS flujo_schema_version "
                    "(version integer PRIMARY KEY, applied_at double precision NOT NULL)"
                )
                current = int(
                    await conn.fetchval(
                        "SELECT COALESCE(MAX(version), 0) FROM flujo_schema_version"
                    )
                )
                if current > len(MIGRATIONS):
                    raise SchemaVersionError(
                        f"the flujo schema is at version {current}, newer than this flujo "
                        f"understands ({len(MIGRATIONS)}); upgrade flujo",
                        found=current,
                        expected=len(MIGRATIONS),
                    )
                applied = []
                for number in range(current + 1, len(MIGRATIONS) + 1):
                    await conn.execute(MIGRATIONS[number - 1])
                    await conn.execute(
                        "INSERT INTO flujo_schema_version (version, applied_at) VALUES ($1, $2)",
                        number,
                        now(),
                    )
                    applied.append(number)
            return applied

    async def aclose(self) -> None:
        """Drain and close the pool (it reopens on next use)."""
        pool, self._pool = self._pool, None
        loop, self._pool_loop = self._pool_loop, None
        self._pool_lock = None
        if pool is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            await pool.close()
        else:  # its event loop is gone: nothing can be awaited there any more
            pool.terminate()

    # -- writes ----------------------------------------------------------------------------------

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        """Apply ``checkpoint`` in one statement, guarded by the stored version.

        If the connection drops, the outcome is read back from a fresh connection: a write
        that committed is not applied twice; one that did not is retried once.
        """
        validate_run_id(checkpoint.run_id)
        _check_nul(checkpoint)
        with _errors(self.dsn, checkpoint.run_id):
            try:
                return await self._write(checkpoint)
            except _connection_errors() as exc:
                logger.warning(
                    "connection lost while checkpointing run %r (%s); checking what committed",
                    checkpoint.run_id,
                    exc,
                )
                self._forget_pool()
                if await self._landed(checkpoint):
                    return checkpoint.new_version(checkpoint.expected_version or 0)
                return await self._write(checkpoint)

    async def _landed(self, cp: Checkpoint) -> bool:
        """After a lost connection: did ``cp`` commit? (Only it stamps this exact updated_at.)"""
        pool = await self._get_pool()
        row = await pool.fetchrow(
            "SELECT version, updated_at FROM flujo_runs WHERE run_id = $1", cp.run_id
        )
        return row is not None and row["updated_at"] == cp.updated_at

    def _forget_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    async def _write(self, cp: Checkpoint) -> int:
        pool = await self._get_pool()
        expected = cp.expected_version
        if expected is None or cp.replace:
            return await self._replace(pool, cp)
        if expected == 0:
            header = cp.header
            if header is None:
                raise CorruptStateError(
                    f"run {cp.run_id!r}: the first checkpoint of a run has no header",
                    run_id=cp.run_id,
                )
            version = cp.new_version(0)
            fields, values = _context_arrays(cp)
            created = await pool.fetchval(
                _CREATE,
                cp.run_id,
                header.pipeline_id,
                header.pipeline_name,
                header.pipeline_version,
                header.step_names,
                header.initial_input,
                header.metadata,
                header.created_at,
                cp.status,
                cp.current_step_index,
                cp.updated_at,
                version,
                cp.last_step_output or b"null",
                cp.error,
                cp.step_offset,
                cp.steps,
                fields,
                values,
            )
            if not created:
                await self._raise_conflict(pool, cp)
            return version
        version = cp.new_version(expected)
        common = (
            cp.run_id,
            cp.status,
            cp.current_step_index,
            cp.updated_at,
            version,
            cp.error,
            cp.last_step_output,
            expected,
            cp.step_offset,
        )
        if len(cp.steps) == 1 and not cp.context:
            advanced = await pool.fetchval(_ADVANCE, *common, cp.steps[0])
        else:
            fields, values = _context_arrays(cp)
            advanced = await pool.fetchval(_ADVANCE_MANY, *common, cp.steps, fields, values)
        if not advanced:
            await self._raise_conflict(pool, cp)
        return version

    async def _raise_conflict(self, pool: asyncpg.Pool, cp: Checkpoint) -> None:
        stored = await pool.fetchval("SELECT version FROM flujo_runs WHERE run_id = $1", cp.run_id)
        check_version(cp, None if stored is None else int(stored))
        raise StateConflictError(  # the version matched, yet nothing was written: a race
            f"run {cp.run_id!r} changed while it was being written",
            run_id=cp.run_id,
            expected_version=cp.expected_version or 0,
            actual_version=None if stored is None else int(stored),
        )

    async def _replace(self, pool: asyncpg.Pool, cp: Checkpoint) -> int:
        """A whole-state save (or an unguarded write): in one transaction, rows locked."""
        async with pool.acquire() as conn, conn.transaction():
            stored = await conn.fetchval(
                "SELECT version FROM flujo_runs WHERE run_id = $1 FOR UPDATE", cp.run_id
            )
            stored_version = None if stored is None else int(stored)
            check_version(cp, stored_version)
            version = cp.new_version(stored_version or 0)
            if cp.replace and stored_version is not None:
                await conn.execute(_DELETE_WHERE.format(where="run_id = $1"), cp.run_id)
                stored_version = None
            if stored_version is None:
                header = cp.header
                if header is None:
                    raise CorruptStateError(
                        f"run {cp.run_id!r}: the first checkpoint of a run has no header",
                        run_id=cp.run_id,
                    )
                fields, values = _context_arrays(cp)
                await conn.fetchval(
                    _CREATE,
                    cp.run_id,
                    header.pipeline_id,
                    header.pipeline_name,
                    header.pipeline_version,
                    header.step_names,
                    header.initial_input,
                    header.metadata,
                    header.created_at,
                    cp.status,
                    cp.current_step_index,
                    cp.updated_at,
                    version,
                    cp.last_step_output or b"null",
                    cp.error,
                    cp.step_offset,
                    cp.steps,
                    fields,
                    values,
                )
            else:
                fields, values = _context_arrays(cp)
                await conn.fetchval(
                    _ADVANCE_MANY,
                    cp.run_id,
                    cp.status,
                    cp.current_step_index,
                    cp.updated_at,
                    version,
                    cp.error,
                    cp.last_step_output,
                    stored_version,
                    cp.step_offset,
                    cp.steps,
                    fields,
                    values,
                )
            return version

    async def save_state(self, run_id: str, state: dict[str, Any]) -> None:
        """Store ``state`` whole, replacing what was there."""
        validate_run_id(run_id)
        await self.write_checkpoint(checkpoint_from_state(run_id, state, self.serializer))

    async def delete_state(self, run_id: str) -> None:
        """Forget ``run_id`` (its row, context fields and step records), atomically."""
        validate_run_id(run_id)
        with _errors(self.dsn, run_id):
            pool = await self._get_pool()
            await pool.fetchval(_DELETE_WHERE.format(where="run_id = $1"), run_id)

    async def delete_runs(self, *, updated_before: datetime, status: str | None = None) -> int:
        """Delete runs last updated before ``updated_before`` (of ``status``), atomically."""
        where = "updated_at < $1" + (" AND status = $2" if status is not None else "")
        params: list[Any] = [epoch(updated_before)]
        if status is not None:
            params.append(status)
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            return int(await pool.fetchval(_DELETE_WHERE.format(where=where), *params))

    # -- reads -----------------------------------------------------------------------------------

    async def load_state(self, run_id: str) -> dict[str, Any] | None:
        """The stored state of ``run_id`` (one statement, so one snapshot), or None."""
        validate_run_id(run_id)
        with _errors(self.dsn, run_id):
            pool = await self._get_pool()
            row = await pool.fetchrow(_LOAD, run_id)
        if row is None:
            return None
        try:
            run = StoredRun(
                run_id=run_id,
                pipeline_id=row[0],
                pipeline_name=row[1],
                pipeline_version=row[2],
                step_names=row[3],
                initial_input=row[4],
                created_at=float(row[5]),
                status=row[6],
                current_step_index=int(row[7]),
                updated_at=float(row[8]),
                version=int(row[9]),
                last_step_output=row[10],
                error=row[11],
                metadata=row[12],
                context=dict(zip(row[13], row[14], strict=True)),
                steps=list(row[15]),
            )
        except (TypeError, ValueError) as exc:
            raise CorruptStateError(
                f"stored state of run {run_id!r} is corrupt: {exc}", run_id=run_id
            ) from exc
        return run.to_state(self.serializer)

    async def list_runs(
        self,
        *,
        status: str | None = None,
        pipeline_name: str | None = None,
        metadata_filter: Mapping[str, MetadataValue] | None = None,
        since: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Summaries of stored runs, newest first; every value is a bound parameter.

        A metadata filter is one JSONB containment test (``metadata @> $n``) on the GIN index.
        """
        clauses: list[str] = []
        params: list[Any] = []

        def bind(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        if status is not None:
            clauses.append(f"status = {bind(status)}")
        if pipeline_name is not None:
            clauses.append(f"pipeline_name = {bind(pipeline_name)}")
        items = metadata_filter_items(metadata_filter)
        if items:
            wanted = b"{" + b",".join(orjson.dumps(k) + b":" + v for k, v in items) + b"}"
            clauses.append(f"metadata @> {bind(wanted)}::jsonb")
        if since is not None:
            clauses.append(f"created_at >= {bind(epoch(since))}")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (
            f"SELECT {_SUMMARY_COLUMNS} FROM flujo_runs {where} "  # noqa: S608 - fixed fragments, bound values
            f"ORDER BY created_at DESC, run_id DESC "
            f"LIMIT {bind(max(int(limit), 0))} OFFSET {bind(max(int(offset), 0))}"
        )
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            rows = await pool.fetch(sql, *params)
        summaries = []
        for row in rows:
            try:
                summaries.append(
                    {
                        "run_id": row[0],
                        "pipeline_id": row[1],
                        "pipeline_name": row[2],
                        "pipeline_version": row[3],
                        "status": row[4],
                        "current_step_index": int(row[5]),
                        "version": int(row[6]),
                        "created_at": to_datetime(row[7]),
                        "updated_at": to_datetime(row[8]),
                        "metadata": orjson.loads(row[9]),
                        "error": None if row[10] is None else orjson.loads(row[10]),
                    }
                )
            except (TypeError, ValueError) as exc:
                logger.warning("skipping unreadable row of run %r: %s", row[0], exc)
        return summaries


async def _init_connection(conn: asyncpg.Connection) -> None:
    """JSONB passes through as the serializer's bytes: no decode, no re-encode."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        format="binary",
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset round trip on release (RESET ALL, UNLISTEN *, ...).

    This backend never leaves session state behind: no SET, no LISTEN, no session advisory
    locks (migrations take a transaction-level one), no open cursors. Saving the round trip
    takes one network exchange off every checkpoint.
    """


def _encode_jsonb(data: bytes) -> bytes:
    return b"\x01" + data  # JSONB's binary format: a version byte, then the JSON text


def _decode_jsonb(data: bytes) -> bytes:
    return data[1:]


def _context_arrays(cp: Checkpoint) -> tuple[list[str], list[bytes]]:
    return list(cp.context), list(cp.context.values())


def _check_nul(cp: Checkpoint) -> None:
    """Postgres JSONB cannot hold the NUL character; say so, naming where it is."""
    parts: list[tuple[str, bytes | None]] = [("last_step_output", cp.last_step_output)]
    parts += [(f"pipeline_context.{name}", value) for name, value in cp.context.items()]
    parts += [(f"step_history[{cp.step_offset + i}]", r) for i, r in enumerate(cp.steps)]
    if cp.header is not None:
        parts += [("initial_input", cp.header.initial_input), ("metadata", cp.header.metadata)]
    for path, data in parts:
        if data is not None and b"\\u0000" in data:
            raise SerializationError(
                f"{path}: holds a NUL character (\\u0000), which Postgres JSONB cannot store",
                path=path,
            )


class _errors:
    """Turn asyncpg's errors into flujo's typed errors (flujo's own pass through)."""

    def __init__(self, dsn: str, run_id: str | None) -> None:
        self.dsn = dsn
        self.run_id = run_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or not isinstance(exc, Exception):
            return
        from flujo.exceptions import FlujoError  # noqa: PLC0415

        if isinstance(exc, FlujoError):
            return
        import asyncpg  # noqa: PLC0415

        where = f" (run {self.run_id!r})" if self.run_id else ""
        if isinstance(exc, asyncpg.exceptions.UndefinedTableError):
            raise SchemaVersionError(
                f"flujo's tables are missing in {redact_uri(self.dsn)}: run `flujo migrate`",
                found=0,
                expected=len(MIGRATIONS),
            ) from exc
        if isinstance(exc, (asyncpg.PostgresError, *_connection_errors(), TimeoutError)):
            raise StateBackendError(f"Postgres {redact_uri(self.dsn)}{where}: {exc}") from exc
