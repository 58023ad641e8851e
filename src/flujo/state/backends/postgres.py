"""PostgresBackend: runs in Postgres (JSONB) through an asyncpg pool; the production store.

Install with ``pip install 'flujo[postgres]'``. Create or upgrade the schema with
``flujo migrate`` (or ``await backend.migrate()``); a database whose schema is older or newer
than this flujo raises :class:`~flujo.exceptions.SchemaVersionError` instead of being misread.

Layout (tables prefixed ``flujo_``, in the schema named by ``schema=`` or the connection's
``search_path``): ``flujo_runs`` (one row per run; the version column is the compare-and-swap
guard; metadata in JSONB with a GIN index), ``flujo_run_context`` (one row per context field),
``flujo_run_steps`` (one row per step record), ``flujo_schema_version`` (applied migrations).

State values are stored as ``json`` (Postgres keeps the exact text), metadata as ``jsonb``
(queried by containment). ``jsonb`` would rewrite numbers (``1e16`` comes back as the integer
``10000000000000000``, ``-0.0`` as ``0.0``, so a float would come back as an int) and refuses the
NUL character; ``json`` gives back exactly what was written.

A checkpoint is one SQL statement (a data-modifying CTE): the guarded update of the run's row
and the inserts that depend on it commit together or not at all, in one round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

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
    WORKER_FORGET_S,
    Checkpoint,
    Claim,
    MetadataValue,
    StateBackend,
    StoredRun,
    Wakeup,
    cancel_error,
    check_limit,
    check_version,
    checkpoint_from_state,
    epoch,
    metadata_filter_items,
    now,
    to_datetime,
    validate_queue_name,
    validate_run_id,
)
from flujo.state.models import Evaluation
from flujo.state.uri import redact_uri

if TYPE_CHECKING:
    import asyncpg

__all__ = ["MIGRATIONS", "PostgresBackend"]

logger = logging.getLogger("flujo.state.postgres")

#: Migration 1: the whole schema, as a database set up today gets it.
_SCHEMA_1 = """
    CREATE TABLE flujo_runs (
        run_id text PRIMARY KEY,
        pipeline_id text NOT NULL,
        pipeline_name text NOT NULL,
        pipeline_version text NOT NULL,
        step_names json NOT NULL,
        initial_input json NOT NULL,
        metadata jsonb NOT NULL DEFAULT '{}',
        status text NOT NULL,
        current_step_index integer NOT NULL,
        version bigint NOT NULL,
        last_step_output json NOT NULL,
        error json,
        usage json,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        queue text,
        priority integer NOT NULL DEFAULT 0,
        locked_by text,
        lease_expires_at double precision,
        cancel_requested boolean NOT NULL DEFAULT false
    ) WITH (fillfactor = 70);
    CREATE INDEX flujo_runs_queued ON flujo_runs (queue, priority DESC, created_at, run_id)
        WHERE status = 'queued';
    CREATE INDEX flujo_runs_leased ON flujo_runs (queue, lease_expires_at)
        WHERE status = 'running' AND locked_by IS NOT NULL;
    CREATE INDEX flujo_runs_created ON flujo_runs (created_at DESC, run_id DESC);
    CREATE INDEX flujo_runs_status_created ON flujo_runs (status, created_at DESC, run_id DESC);
    CREATE INDEX flujo_runs_pipeline_created
        ON flujo_runs (pipeline_name, created_at DESC, run_id DESC);
    CREATE INDEX flujo_runs_metadata ON flujo_runs USING gin (metadata jsonb_path_ops);
    CREATE TABLE flujo_run_context (
        run_id text NOT NULL,
        field text NOT NULL,
        value json NOT NULL,
        PRIMARY KEY (run_id, field)
    );
    CREATE TABLE flujo_run_steps (
        run_id text NOT NULL,
        seq integer NOT NULL,
        record json NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE flujo_cache (
        key text PRIMARY KEY,
        value bytea NOT NULL,
        created_at double precision NOT NULL
    );
    CREATE TABLE flujo_evaluations (
        eval_id text PRIMARY KEY,
        run_id text NOT NULL,
        step_name text NOT NULL,
        step_path json NOT NULL,
        score double precision NOT NULL,
        reasoning text NOT NULL,
        judge text NOT NULL,
        usage json,
        created_at double precision NOT NULL
    );
    CREATE INDEX flujo_evaluations_run ON flujo_evaluations (run_id, created_at DESC);
    CREATE INDEX flujo_evaluations_created ON flujo_evaluations (created_at DESC, eval_id DESC);
    CREATE TABLE flujo_queues (
        queue text PRIMARY KEY,
        concurrency_limit integer
    );
    CREATE TABLE flujo_workers (
        worker_id text PRIMARY KEY,
        info json NOT NULL,
        started_at double precision NOT NULL,
        heartbeat_at double precision NOT NULL
    );
    """

#: Migration 2: bring a database set up by an earlier build of migration 1 (which changed
#: before release) to the schema migration 1 makes now: state columns that were jsonb become
#: json (exact text), the missing flujo_runs columns, tables and indexes. A no-op on a database
#: migration 1 set up today.
_JSON_AND_COLUMNS = """
    DO $$
    DECLARE c record;
    BEGIN
        FOR c IN
            SELECT table_name, column_name FROM information_schema.columns
            WHERE table_schema = current_schema() AND data_type = 'jsonb'
              AND table_name IN ('flujo_runs', 'flujo_run_context', 'flujo_run_steps')
              AND column_name <> 'metadata'
        LOOP
            EXECUTE format('ALTER TABLE %I ALTER COLUMN %I TYPE json USING %I::json',
                           c.table_name, c.column_name, c.column_name);
        END LOOP;
    END $$;
    ALTER TABLE flujo_runs
        ADD COLUMN IF NOT EXISTS usage json,
        ADD COLUMN IF NOT EXISTS queue text,
        ADD COLUMN IF NOT EXISTS priority integer NOT NULL DEFAULT 0,
        ADD COLUMN IF NOT EXISTS locked_by text,
        ADD COLUMN IF NOT EXISTS lease_expires_at double precision,
        ADD COLUMN IF NOT EXISTS cancel_requested boolean NOT NULL DEFAULT false;
    """
_SCHEMA_1_IF_MISSING = _SCHEMA_1.replace("CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ").replace(
    "CREATE INDEX ", "CREATE INDEX IF NOT EXISTS "
)
_CATCH_UP = _JSON_AND_COLUMNS + _SCHEMA_1_IF_MISSING

#: The schema, as an ordered list: migration N (1-based) brings the database to version N.
#: Append new migrations; never edit one.
MIGRATIONS: tuple[str, ...] = (_SCHEMA_1, _CATCH_UP)

_MIGRATION_LOCK = 0x666C756A6F  # "flujo": serializes concurrent `flujo migrate` runs
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_SUMMARY_COLUMNS = (
    "run_id, pipeline_id, pipeline_name, pipeline_version, status, current_step_index, "
    "version, created_at, updated_at, metadata, error, usage, queue, priority, locked_by, "
    "lease_expires_at, cancel_requested"
)

# The common checkpoint: one step record appended, no context field changed.
_ADVANCE = """
WITH run AS (
    UPDATE flujo_runs
    SET status = $2, current_step_index = $3, updated_at = $4, version = $5, error = $6,
        last_step_output = COALESCE($7, last_step_output), usage = COALESCE($11, usage)
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
        last_step_output = COALESCE($7, last_step_output), usage = COALESCE($13, usage)
    WHERE run_id = $1 AND version = $8
    RETURNING run_id
), steps AS (
    INSERT INTO flujo_run_steps (run_id, seq, record)
    SELECT run.run_id, $9 + s.i - 1, s.record
    FROM run, unnest($10::json[]) WITH ORDINALITY AS s(record, i)
    ON CONFLICT (run_id, seq) DO UPDATE SET record = EXCLUDED.record
), fields AS (
    INSERT INTO flujo_run_context (run_id, field, value)
    SELECT run.run_id, f.field, f.value
    FROM run, unnest($11::text[], $12::json[]) AS f(field, value)
    ON CONFLICT (run_id, field) DO UPDATE SET value = EXCLUDED.value
)
SELECT count(*) FROM run
"""

# A new run: its row, its first records and its whole context.
_CREATE = """
WITH run AS (
    INSERT INTO flujo_runs (run_id, pipeline_id, pipeline_name, pipeline_version, step_names,
        initial_input, metadata, created_at, status, current_step_index, updated_at, version,
        last_step_output, error, usage, queue, priority)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $19, $20, $21)
    ON CONFLICT (run_id) DO NOTHING
    RETURNING run_id
), steps AS (
    INSERT INTO flujo_run_steps (run_id, seq, record)
    SELECT run.run_id, $15 + s.i - 1, s.record
    FROM run, unnest($16::json[]) WITH ORDINALITY AS s(record, i)
), fields AS (
    INSERT INTO flujo_run_context (run_id, field, value)
    SELECT run.run_id, f.field, f.value
    FROM run, unnest($17::text[], $18::json[]) AS f(field, value)
)
SELECT count(*) FROM run
"""

_LOAD = """
SELECT pipeline_id, pipeline_name, pipeline_version, step_names, initial_input, created_at,
    status, current_step_index, updated_at, version, last_step_output, error, metadata, usage,
    queue, priority, locked_by, lease_expires_at, cancel_requested,
    ARRAY(SELECT field FROM flujo_run_context c WHERE c.run_id = r.run_id ORDER BY field),
    ARRAY(SELECT value FROM flujo_run_context c WHERE c.run_id = r.run_id ORDER BY field),
    ARRAY(SELECT record FROM flujo_run_steps s WHERE s.run_id = r.run_id ORDER BY seq)
FROM flujo_runs r WHERE run_id = $1
"""

# A run's state (a whole-state save replaces it) ...
_DELETE_WHERE = """
WITH doomed AS (DELETE FROM flujo_runs WHERE {where} RETURNING run_id),
fields AS (DELETE FROM flujo_run_context WHERE run_id IN (SELECT run_id FROM doomed)),
steps AS (DELETE FROM flujo_run_steps WHERE run_id IN (SELECT run_id FROM doomed))
SELECT count(*) FROM doomed
"""
# ... and everything deleted with a run (its evaluations too).
_DELETE_RUNS_WHERE = """
WITH doomed AS (DELETE FROM flujo_runs WHERE {where} RETURNING run_id),
fields AS (DELETE FROM flujo_run_context WHERE run_id IN (SELECT run_id FROM doomed)),
steps AS (DELETE FROM flujo_run_steps WHERE run_id IN (SELECT run_id FROM doomed)),
scores AS (DELETE FROM flujo_evaluations WHERE run_id IN (SELECT run_id FROM doomed))
SELECT count(*) FROM doomed
"""
# Leases are measured on the server's clock (extract(epoch FROM clock_timestamp())), never on
# a host's clock.
_LEASED_COUNT = (
    "SELECT count(*) FROM flujo_runs WHERE queue = $1 AND status = 'running' "
    "AND locked_by IS NOT NULL AND lease_expires_at >= extract(epoch FROM clock_timestamp())"
)
# $1 queue, $2 "name@version" list (NULL: any), $3 how many, $4 worker, $5 lease seconds.
_CLAIM = """
WITH picked AS (
    SELECT run_id FROM flujo_runs
    WHERE queue = $1
      AND (status = 'queued'
           OR (status = 'running' AND locked_by IS NOT NULL
               AND lease_expires_at < extract(epoch FROM clock_timestamp())))
      AND ($2::text[] IS NULL OR pipeline_name || '@' || pipeline_version = ANY($2::text[]))
      AND NOT (run_id = ANY($6::text[]))
    ORDER BY priority DESC, created_at, run_id
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE flujo_runs r
SET status = 'running', locked_by = $4,
    lease_expires_at = extract(epoch FROM clock_timestamp()) + $5,
    version = r.version + 1, updated_at = extract(epoch FROM clock_timestamp())
FROM picked WHERE r.run_id = picked.run_id
RETURNING r.run_id, r.pipeline_name, r.pipeline_version
"""
# A released run that was still running goes back to its queue, one version on (whatever of
# it still runs in the releasing process can no longer checkpoint). Returns the queues whose
# waiting workers have something new to claim: a run handed back, or a slot freed in a queue
# with a concurrency limit (a finished run in an unlimited queue gives nobody new work).
_RELEASE = """
WITH released AS (
    UPDATE flujo_runs
    SET locked_by = NULL, lease_expires_at = NULL,
        version = CASE WHEN status = 'running' THEN version + 1 ELSE version END,
        status = CASE WHEN status = 'running' THEN 'queued' ELSE status END
    WHERE run_id = ANY($1) AND locked_by = $2
    RETURNING queue, status = 'queued' AS handed_back
)
SELECT DISTINCT r.queue FROM released r
WHERE r.queue IS NOT NULL AND (r.handed_back OR EXISTS (
    SELECT 1 FROM flujo_queues q WHERE q.queue = r.queue AND q.concurrency_limit IS NOT NULL))
"""
_REQUEUE = """
UPDATE flujo_runs
SET status = 'queued', queue = COALESCE($2, queue), priority = COALESCE($3, priority),
    locked_by = NULL, lease_expires_at = NULL, cancel_requested = false,
    version = version + 1, updated_at = extract(epoch FROM clock_timestamp())
WHERE run_id = $1 AND COALESCE($2, queue) IS NOT NULL
  AND (status = 'failed' OR (status = 'queued' AND queue IS NULL)
       OR (status = 'running'
           AND (locked_by IS NULL OR lease_expires_at < extract(epoch FROM clock_timestamp()))))
RETURNING queue
"""
_CANCEL_NOW = """
UPDATE flujo_runs
SET status = 'cancelled', cancel_requested = true, error = $2,
    updated_at = extract(epoch FROM clock_timestamp()),
    locked_by = NULL, lease_expires_at = NULL, version = version + 1
WHERE run_id = $1
"""
_EVALUATION_COLUMNS = (
    "eval_id, run_id, step_name, step_path, score, reasoning, judge, usage, created_at"
)


def _connection_errors() -> tuple[type[BaseException], ...]:
    import asyncpg  # noqa: PLC0415

    return (
        asyncpg.exceptions.ConnectionDoesNotExistError,
        asyncpg.exceptions.InterfaceError,
        # raised by a pooled connection the server closed while it sat idle
        asyncpg.exceptions.InternalClientError,
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
        self._schema_checked = False
        # The checkpoint lane: one pooled connection kept for checkpoints while it is free, so
        # that a run's steady stream of checkpoints skips the pool's acquire/release dance.
        self._lane: asyncpg.Connection | None = None
        self._lane_busy = False
        # Workers: a connection that LISTENs for queued work and cancellations.
        self._listener: asyncpg.Connection | None = None
        self._wakeup = Wakeup()

    def __repr__(self) -> str:
        return f"PostgresBackend({redact_uri(self.dsn)!r}, schema={self.schema!r})"

    # -- the pool --------------------------------------------------------------------------------

    async def _get_pool(self, *, check_schema: bool = True) -> asyncpg.Pool:
        loop = asyncio.get_running_loop()
        pool = self._pool
        if (
            pool is not None
            and self._pool_loop is loop
            and (self._schema_checked or not check_schema)
        ):
            return pool
        if self._pool_lock is None or self._pool_loop is not loop:
            self._pool_lock = asyncio.Lock()
            self._drop_pool()  # made in an event loop that is gone (or another one)
            self._pool_loop = loop
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await self._create_pool()
                self._schema_checked = False
            if check_schema and not self._schema_checked:
                await self._check_schema(self._pool)
                self._schema_checked = True
            return self._pool

    def _drop_pool(self) -> None:
        """Forget the pool, closing its connections at once (no waiting, any event loop)."""
        pool, self._pool = self._pool, None
        self._schema_checked = False
        self._lane, self._lane_busy = None, False
        if pool is None:
            return
        try:
            pool.terminate()
        except RuntimeError:  # its event loop is closed: the sockets go with the pool
            logger.debug("dropped a Postgres pool whose event loop is closed")

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
        pool, loop = self._pool, self._pool_loop
        self._pool_loop = None
        self._pool_lock = None
        if pool is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        listener, self._listener = self._listener, None
        if listener is not None and running is loop and not listener.is_closed():
            with contextlib.suppress(Exception):
                await listener.close(timeout=5)
        elif listener is not None:
            listener.terminate()
        if running is loop:
            lane, self._lane, self._lane_busy = self._lane, None, False
            if lane is not None:
                await pool.release(lane)
            self._pool = None
            self._schema_checked = False
            await pool.close()
        else:  # its event loop is gone: nothing can be awaited there any more
            self._drop_pool()

    # -- writes ----------------------------------------------------------------------------------

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        """Apply ``checkpoint`` in one statement, guarded by the stored version.

        If the connection drops, the outcome is read back from a fresh connection: a write
        that committed is not applied twice; one that did not is retried once.
        """
        validate_run_id(checkpoint.run_id)
        _check_text(checkpoint)
        with _errors(self.dsn, checkpoint.run_id):
            try:
                return await self._write(checkpoint)
            except _connection_errors() as exc:
                logger.warning(
                    "connection lost while checkpointing run %r (%s); checking what committed",
                    checkpoint.run_id,
                    exc,
                )
                self._drop_pool()
                landed = await self._landed(checkpoint)
                if landed is not None:
                    return landed
                return await self._write(checkpoint)

    async def _landed(self, cp: Checkpoint) -> int | None:
        """After a lost connection: the version ``cp`` stored if it committed, else None.

        It committed if the run holds exactly what it wrote: its version, its timestamp, its
        status and error, and its first step record (``json`` columns keep the exact text).
        """
        pool = await self._get_pool()
        row = await pool.fetchrow(
            "SELECT version, updated_at, status, error, current_step_index, "
            "(SELECT record FROM flujo_run_steps s WHERE s.run_id = r.run_id AND s.seq = $2) "
            "FROM flujo_runs r WHERE run_id = $1",
            cp.run_id,
            cp.step_offset,
        )
        if row is None:
            return None
        version = int(row[0])
        stored = (float(row[1]), row[2], row[3], int(row[4]), row[5] if cp.steps else None)
        written = (
            cp.updated_at,
            cp.status,
            cp.error,
            cp.current_step_index,
            cp.steps[0] if cp.steps else None,
        )
        if stored != written:
            return None
        if cp.version is None and cp.expected_version is None:
            return version  # an unguarded write: its content is the proof
        return version if version == cp.new_version(cp.expected_version or 0) else None

    async def _write(self, cp: Checkpoint) -> int:
        pool = await self._get_pool()
        expected = cp.expected_version
        if expected is None or cp.replace:
            return await self._replace(pool, cp)
        if expected == 0:
            version = cp.new_version(0)
            created = await self._checkpoint_statement(pool, _CREATE, *_create_args(cp, version))
            if not created:
                await self._raise_conflict(pool, cp)
            return version
        version = cp.new_version(expected)
        import asyncpg  # noqa: PLC0415 - loaded by the pool already

        try:
            if len(cp.steps) == 1 and not cp.context:
                common = _advance_args(cp, expected, version)
                advanced = await self._checkpoint_statement(
                    pool, _ADVANCE, *common, cp.steps[0], cp.usage
                )
            else:
                advanced = await self._checkpoint_statement(
                    pool, _ADVANCE_MANY, *_advance_many_args(cp, expected, version)
                )
        except asyncpg.exceptions.UniqueViolationError:
            # Records from step_offset on are replaced (never the case for the runner, which
            # always appends; kept for the contract every backend shares). Nothing was written.
            return await self._replace(pool, cp, from_offset=True)
        if not advanced:
            await self._raise_conflict(pool, cp)
        return version

    async def _checkpoint_statement(self, pool: asyncpg.Pool, sql: str, *args: Any) -> Any:
        """Run one checkpoint statement: on the lane when it is free, else on the pool.

        With ``pool_max`` of 1 there is no lane: holding the only connection would starve
        every other caller.
        """
        if self._lane_busy or self.pool_max < 2:
            return await pool.fetchval(sql, *args)
        self._lane_busy = True
        try:
            lane = self._lane
            if lane is None or lane.is_closed():
                self._lane = lane = await pool.acquire()
            try:
                return await lane.fetchval(sql, *args)
            except BaseException:
                # A failed, cancelled or lost statement leaves the connection in doubt: give it
                # back closed (the pool replaces it) and take a fresh one next time.
                self._lane = None
                lane.terminate()
                await pool.release(lane)
                raise
        finally:
            self._lane_busy = False

    async def _raise_conflict(self, pool: asyncpg.Pool, cp: Checkpoint) -> None:
        stored = await pool.fetchval("SELECT version FROM flujo_runs WHERE run_id = $1", cp.run_id)
        check_version(cp, None if stored is None else int(stored))
        raise StateConflictError(  # the version matched, yet nothing was written: a race
            f"run {cp.run_id!r} changed while it was being written",
            run_id=cp.run_id,
            expected_version=cp.expected_version or 0,
            actual_version=None if stored is None else int(stored),
        )

    async def _replace(
        self, pool: asyncpg.Pool, cp: Checkpoint, *, from_offset: bool = False
    ) -> int:
        """A whole-state save, an unguarded write, or a rewrite of the step records from
        ``step_offset``: in one transaction, with the run's row locked."""
        async with pool.acquire() as conn, conn.transaction():
            stored = await conn.fetchval(
                "SELECT version FROM flujo_runs WHERE run_id = $1 FOR UPDATE", cp.run_id
            )
            stored_version = None if stored is None else int(stored)
            check_version(cp, stored_version)
            version = cp.new_version(stored_version or 0)
            if from_offset:
                await conn.execute(
                    "DELETE FROM flujo_run_steps WHERE run_id = $1 AND seq >= $2",
                    cp.run_id,
                    cp.step_offset,
                )
            if cp.replace and stored_version is not None:
                await conn.execute(_DELETE_WHERE.format(where="run_id = $1"), cp.run_id)
                stored_version = None
            if stored_version is None:
                await conn.fetchval(_CREATE, *_create_args(cp, version))
            else:
                await conn.fetchval(_ADVANCE_MANY, *_advance_many_args(cp, stored_version, version))
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
            async with pool.acquire() as conn, conn.transaction():
                await conn.fetchval(_DELETE_RUNS_WHERE.format(where="run_id = $1"), run_id)
                # evaluations written for a run that is not (or no longer) stored
                await conn.execute("DELETE FROM flujo_evaluations WHERE run_id = $1", run_id)

    async def delete_runs(self, *, updated_before: datetime, status: str | None = None) -> int:
        """Delete runs last updated before ``updated_before`` (of ``status``), atomically."""
        where = "updated_at < $1" + (" AND status = $2" if status is not None else "")
        params: list[Any] = [epoch(updated_before)]
        if status is not None:
            params.append(status)
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            return int(await pool.fetchval(_DELETE_RUNS_WHERE.format(where=where), *params))

    # -- the step cache (CacheStep's PostgresCache) ----------------------------------------------

    async def cache_get(self, key: str) -> bytes | None:
        """The cached value under ``key``, or None."""
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            value = await pool.fetchval("SELECT value FROM flujo_cache WHERE key = $1", key)
        return None if value is None else bytes(value)

    async def cache_set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (replacing any earlier value)."""
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            await pool.execute(
                "INSERT INTO flujo_cache (key, value, created_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, "
                "created_at = EXCLUDED.created_at",
                key,
                value,
                now(),
            )

    # -- queues and workers ----------------------------------------------------------------------
    # Claims take rows with FOR UPDATE SKIP LOCKED (claimers never wait on each other's rows);
    # a queue with a concurrency limit is claimed under a lock on its flujo_queues row, so
    # its count of leased runs holds across workers. Leases are measured on the server's
    # clock. NOTIFY wakes the workers (LISTEN) when work is queued or a cancellation asked.

    supports_queues: ClassVar[bool] = True
    notifies_other_processes: ClassVar[bool] = True

    @property
    def channel(self) -> str:
        """The NOTIFY channel of this store (one per schema)."""
        return f"flujo_work_{self.schema or 'public'}"

    async def claim_runs(
        self,
        *,
        worker_id: str,
        queues: Sequence[str],
        limit: int,
        lease_s: float,
        pipelines: Collection[str] | None = None,
        exclude: Collection[str] = (),
    ) -> list[Claim]:
        """Claim up to ``limit`` queued (or abandoned) runs of ``queues``; see StateBackend."""
        names = [validate_queue_name(queue) for queue in queues]
        if pipelines is not None and not pipelines:
            return []
        wanted = None if pipelines is None else list(pipelines)
        skip = list(exclude)
        claimed: list[Claim] = []
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            async with pool.acquire() as conn, conn.transaction():
                for queue in names:
                    room = limit - len(claimed)
                    if room <= 0:
                        break
                    cap = await conn.fetchval(
                        "SELECT concurrency_limit FROM flujo_queues WHERE queue = $1 FOR UPDATE",
                        queue,
                    )
                    if cap is not None:
                        busy = await conn.fetchval(_LEASED_COUNT, queue)
                        room = min(room, int(cap) - int(busy))
                        if room <= 0:
                            continue
                    rows = await conn.fetch(_CLAIM, queue, wanted, room, worker_id, lease_s, skip)
                    claimed += [Claim(str(row[0]), str(row[1]), str(row[2])) for row in rows]
        return claimed

    async def renew_leases(
        self, *, worker_id: str, run_ids: Sequence[str], lease_s: float
    ) -> dict[str, bool]:
        """Extend the leases ``worker_id`` still holds; see StateBackend."""
        if not run_ids:
            return {}
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            rows = await pool.fetch(
                "UPDATE flujo_runs SET lease_expires_at = "
                "extract(epoch FROM clock_timestamp()) + $3 "
                "WHERE run_id = ANY($1) AND locked_by = $2 "
                "AND status = 'running' RETURNING run_id, cancel_requested",
                list(run_ids),
                worker_id,
                lease_s,
            )
        return {str(row[0]): bool(row[1]) for row in rows}

    async def release_runs(self, *, worker_id: str, run_ids: Sequence[str]) -> None:
        """Give up ``worker_id``'s leases on ``run_ids``; see StateBackend."""
        if not run_ids:
            return
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            queues = await pool.fetch(_RELEASE, list(run_ids), worker_id)
            for queue in {row[0] for row in queues}:
                await pool.execute("SELECT pg_notify($1, $2)", self.channel, f"work:{queue}")

    async def requeue_run(
        self, run_id: str, *, queue: str | None = None, priority: int | None = None
    ) -> bool:
        """Put a failed (or abandoned) run back in its queue; see StateBackend."""
        validate_run_id(run_id)
        if queue is not None:
            validate_queue_name(queue)
        with _errors(self.dsn, run_id):
            pool = await self._get_pool()
            found = await pool.fetchval(_REQUEUE, run_id, queue, priority)
            if found is not None:
                await pool.execute("SELECT pg_notify($1, $2)", self.channel, f"work:{found}")
        return found is not None

    async def request_cancel(self, run_id: str) -> str | None:
        """Cancel a queued or paused run; flag a running one; see StateBackend."""
        validate_run_id(run_id)
        with _errors(self.dsn, run_id):
            pool = await self._get_pool()
            async with pool.acquire() as conn, conn.transaction():
                status = await conn.fetchval(
                    "SELECT status FROM flujo_runs WHERE run_id = $1 FOR UPDATE", run_id
                )
                if status is None:
                    return None
                if status in ("queued", "paused"):
                    await conn.execute(_CANCEL_NOW, run_id, cancel_error(status))
                    return "cancelled"
                if status == "running":
                    await conn.execute(
                        "UPDATE flujo_runs SET cancel_requested = true WHERE run_id = $1", run_id
                    )
                    await conn.execute("SELECT pg_notify($1, $2)", self.channel, f"cancel:{run_id}")
                return str(status)

    async def set_queue_limit(self, queue: str, limit: int | None) -> None:
        """Limit how many runs of ``queue`` run at once, across workers (None: no limit)."""
        validate_queue_name(queue)
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            if limit is None:
                await pool.execute("DELETE FROM flujo_queues WHERE queue = $1", queue)
            else:
                await pool.execute(
                    "INSERT INTO flujo_queues (queue, concurrency_limit) VALUES ($1, $2) "
                    "ON CONFLICT (queue) DO UPDATE SET "
                    "concurrency_limit = EXCLUDED.concurrency_limit",
                    queue,
                    check_limit(limit),
                )

    async def queue_limits(self) -> dict[str, int]:
        """The concurrency limit of each queue that has one."""
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            rows = await pool.fetch(
                "SELECT queue, concurrency_limit FROM flujo_queues "
                "WHERE concurrency_limit IS NOT NULL"
            )
        return {str(row[0]): int(row[1]) for row in rows}

    async def next_lease_expiry(self, queues: Sequence[str]) -> float | None:
        """When the earliest lease of a running run of ``queues`` expires (server clock)."""
        names = [validate_queue_name(queue) for queue in queues]
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            value = await pool.fetchval(
                "SELECT min(lease_expires_at) FROM flujo_runs WHERE status = 'running' "
                "AND locked_by IS NOT NULL AND queue = ANY($1)",
                names,
            )
        return None if value is None else float(value)

    async def store_time(self) -> float:
        """The server's clock (epoch seconds)."""
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            return float(await pool.fetchval("SELECT extract(epoch FROM clock_timestamp())"))

    async def register_worker(self, worker_id: str, info: Mapping[str, Any]) -> None:
        """Record (or refresh) a live worker."""
        data = self.serializer.dumps(dict(info), "worker info")
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            await pool.execute(
                "INSERT INTO flujo_workers (worker_id, info, started_at, heartbeat_at) "
                "VALUES ($1, $2, extract(epoch FROM clock_timestamp()), "
                "extract(epoch FROM clock_timestamp())) ON CONFLICT (worker_id) DO UPDATE SET "
                "info = EXCLUDED.info, heartbeat_at = EXCLUDED.heartbeat_at",
                worker_id,
                data,
            )
            await pool.execute(
                "DELETE FROM flujo_workers WHERE heartbeat_at < "
                "extract(epoch FROM clock_timestamp()) - $1",
                WORKER_FORGET_S,
            )

    async def remove_worker(self, worker_id: str) -> None:
        """Forget a worker that stopped."""
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            await pool.execute("DELETE FROM flujo_workers WHERE worker_id = $1", worker_id)

    async def list_workers(self) -> list[dict[str, Any]]:
        """Registered workers, most recently seen first."""
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            rows = await pool.fetch(
                "SELECT worker_id, info, started_at, heartbeat_at FROM flujo_workers "
                "ORDER BY heartbeat_at DESC"
            )
        return [
            {
                "worker_id": str(row[0]),
                "info": orjson.loads(row[1]),
                "started_at": to_datetime(float(row[2])),
                "heartbeat_at": to_datetime(float(row[3])),
            }
            for row in rows
        ]

    async def notify_work(self, queue: str) -> None:
        """NOTIFY the workers listening on this store that ``queue`` has work."""
        validate_queue_name(queue)
        self._wakeup.wake()
        with _errors(self.dsn, None):
            pool = await self._get_pool()
            await pool.execute("SELECT pg_notify($1, $2)", self.channel, f"work:{queue}")

    async def notify_cancel(self, run_id: str) -> None:
        """NOTIFY the workers that ``run_id``'s cancellation was requested."""
        self._wakeup.wake(cancelled=run_id)
        with _errors(self.dsn, run_id):
            pool = await self._get_pool()
            await pool.execute("SELECT pg_notify($1, $2)", self.channel, f"cancel:{run_id}")

    async def wait_for_work(self, timeout_s: float) -> set[str]:
        """LISTEN (on a connection of its own, opened on first use) until a notification or
        ``timeout_s``; return the run ids whose cancellation was announced."""
        await self._listen()
        return await self._wakeup.wait(timeout_s)

    async def _listen(self) -> None:
        listener = self._listener
        if listener is not None and not listener.is_closed():
            return
        import asyncpg  # noqa: PLC0415 - loaded by the pool already

        await self._get_pool()  # checks the schema (and the connection settings) first
        with _errors(self.dsn, None):
            listener = await asyncpg.connect(self.dsn, command_timeout=self.command_timeout_s)
            await listener.add_listener(self.channel, self._on_notification)
            listener.add_termination_listener(self._on_listener_lost)
        self._listener = listener

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        kind, _, value = payload.partition(":")
        self._wakeup.wake(cancelled=value if kind == "cancel" else None)

    def _on_listener_lost(self, conn: Any) -> None:
        # Reconnected on the next wait; wake the waiters so that nothing waits on a dead line.
        self._listener = None
        self._wakeup.wake()

    # -- shadow evaluations ----------------------------------------------------------------------

    async def save_evaluation(self, evaluation: Evaluation) -> None:
        """Store a shadow evaluation's score in ``flujo_evaluations``."""
        validate_run_id(evaluation.run_id)
        path = self.serializer.dumps(evaluation.step_path, "step_path")
        if _holds_nul(evaluation.step_name, evaluation.reasoning, evaluation.judge, path):
            raise SerializationError(
                "an evaluation's text cannot hold a NUL character on Postgres", path="evaluation"
            )
        with _errors(self.dsn, evaluation.run_id):
            pool = await self._get_pool()
            await pool.execute(
                f"INSERT INTO flujo_evaluations ({_EVALUATION_COLUMNS}) "  # noqa: S608 - fixed names
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                evaluation.eval_id,
                evaluation.run_id,
                evaluation.step_name,
                path,
                evaluation.score,
                evaluation.reasoning,
                evaluation.judge,
                orjson.dumps(evaluation.usage.to_dict()) if evaluation.usage else None,
                epoch(evaluation.created_at),
            )

    async def list_evaluations(
        self,
        *,
        run_id: str | None = None,
        step_name: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Evaluation]:
        """Stored evaluations, newest first; every value is a bound parameter."""
        if run_id is not None:
            validate_run_id(run_id)
        if _holds_nul(step_name):
            return []
        clauses: list[str] = []
        params: list[Any] = []
        bind = _binder(params)

        if run_id is not None:
            clauses.append(f"run_id = {bind(run_id)}")
        if step_name is not None:
            clauses.append(f"step_name = {bind(step_name)}")
        if since is not None:
            clauses.append(f"created_at >= {bind(epoch(since))}")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        page = f"LIMIT {bind(max(int(limit), 0))} OFFSET {bind(max(int(offset), 0))}"
        sql = f"SELECT {_EVALUATION_COLUMNS} FROM flujo_evaluations {where} ORDER BY created_at DESC, eval_id DESC {page}"  # noqa: S608, E501 - fixed fragments, bound values
        with _errors(self.dsn, run_id):
            pool = await self._get_pool()
            rows = await pool.fetch(sql, *params)
        return [
            Evaluation(
                eval_id=row[0],
                run_id=row[1],
                step_name=row[2],
                step_path=orjson.loads(row[3]),
                score=row[4],
                reasoning=row[5],
                judge=row[6],
                usage=None if row[7] is None else orjson.loads(row[7]),
                created_at=to_datetime(row[8]),
            )
            for row in rows
        ]

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
                usage=None if row[13] is None or row[13] == b"null" else row[13],
                queue=row[14],
                priority=int(row[15]),
                locked_by=row[16],
                lease_expires_at=None if row[17] is None else float(row[17]),
                cancel_requested=bool(row[18]),
                context=dict(zip(row[19], row[20], strict=True)),
                steps=list(row[21]),
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
        items = metadata_filter_items(metadata_filter)
        if _holds_nul(status, pipeline_name, *(value for _, value in items)):
            return []  # Postgres text and JSONB cannot hold NUL: nothing stored can match
        clauses: list[str] = []
        params: list[Any] = []
        bind = _binder(params)

        if status is not None:
            clauses.append(f"status = {bind(status)}")
        if pipeline_name is not None:
            clauses.append(f"pipeline_name = {bind(pipeline_name)}")
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
                        "usage": None if row[11] is None else orjson.loads(row[11]),
                        "queue": row[12],
                        "priority": int(row[13]),
                        "locked_by": row[14],
                        "lease_expires_at": None if row[15] is None else to_datetime(row[15]),
                        "cancel_requested": bool(row[16]),
                    }
                )
            except (TypeError, ValueError) as exc:
                logger.warning("skipping unreadable row of run %r: %s", row[0], exc)
        return summaries


async def _init_connection(conn: asyncpg.Connection) -> None:
    """JSON and JSONB pass through as the serializer's bytes: no decode, no re-encode."""
    await conn.set_type_codec(
        "json", schema="pg_catalog", encoder=bytes, decoder=bytes, format="binary"
    )
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


def _create_args(cp: Checkpoint, version: int) -> tuple[Any, ...]:
    """The parameters of ``_CREATE`` for a checkpoint that creates its run."""
    header = cp.header
    if header is None:
        raise CorruptStateError(
            f"run {cp.run_id!r}: the first checkpoint of a run has no header", run_id=cp.run_id
        )
    return (
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
        list(cp.context),
        list(cp.context.values()),
        None if cp.usage == b"null" else cp.usage,
        header.queue,
        header.priority,
    )


def _advance_args(cp: Checkpoint, expected: int, version: int) -> tuple[Any, ...]:
    """The parameters ``_ADVANCE`` and ``_ADVANCE_MANY`` share ($1 to $9)."""
    return (
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


def _advance_many_args(cp: Checkpoint, expected: int, version: int) -> tuple[Any, ...]:
    return (
        *_advance_args(cp, expected, version),
        cp.steps,
        list(cp.context),
        list(cp.context.values()),
        cp.usage,
    )


def _binder(params: list[Any]) -> Callable[[Any], str]:
    """``bind(value)``: append ``value`` to ``params`` and return its placeholder (``$n``)."""

    def bind(value: Any) -> str:
        params.append(value)
        return f"${len(params)}"

    return bind


def _holds_nul(*values: object) -> bool:
    """Whether any text (or JSON text) holds a NUL character or its JSON escape."""
    for value in values:
        if isinstance(value, str) and "\x00" in value:
            return True
        if isinstance(value, bytes) and _json_has_nul(value):
            return True
    return False


def _json_has_nul(data: bytes) -> bool:
    """Whether JSON text holds the escape ``\\u0000`` (not a literal backslash before it)."""
    start = data.find(b"\\u0000")
    while start != -1:
        backslashes = len(data[:start]) - len(data[:start].rstrip(b"\\"))
        if backslashes % 2 == 0:  # the escape's own backslash is not itself escaped
            return True
        start = data.find(b"\\u0000", start + 1)
    return False


def _check_text(cp: Checkpoint) -> None:
    """Postgres text columns and JSONB cannot hold NUL: refuse it up front, naming where."""
    parts: list[tuple[str, object]] = [("status", cp.status)]
    parts += [(f"pipeline_context field name {name!r}", name) for name in cp.context]
    if cp.header is not None:
        header = cp.header
        parts += [
            ("pipeline_id", header.pipeline_id),
            ("pipeline_name", header.pipeline_name),
            ("pipeline_version", header.pipeline_version),
            ("metadata", header.metadata),
        ]
    for path, value in parts:
        if _holds_nul(value):
            raise SerializationError(
                f"{path}: holds a NUL character, which Postgres cannot store there",
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
