"""SQLiteBackend: runs in one SQLite file (WAL), one transaction per checkpoint.

Layout: ``runs`` holds one row per run (status, progress, version, last output); context fields
live in ``run_context`` (one row per field, rewritten only when the field changed) and step
records in ``run_steps`` (appended, never rewritten). ``flujo_schema`` records which of
:data:`MIGRATIONS` have been applied.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import orjson

from flujo.exceptions import (
    ConfigurationError,
    CorruptStateError,
    SchemaVersionError,
    StateBackendError,
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
    metadata_index,
    now,
    to_datetime,
    validate_queue_name,
    validate_run_id,
)
from flujo.state.models import Evaluation

__all__ = ["MIGRATIONS", "SQLiteBackend"]

logger = logging.getLogger("flujo.state.sqlite")

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

#: Migration 1: the whole schema, as a store made today gets it.
_SCHEMA_1 = """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        pipeline_id TEXT NOT NULL,
        pipeline_name TEXT NOT NULL,
        pipeline_version TEXT NOT NULL,
        step_names BLOB NOT NULL,
        initial_input BLOB NOT NULL,
        metadata BLOB NOT NULL,
        status TEXT NOT NULL,
        current_step_index INTEGER NOT NULL,
        version INTEGER NOT NULL,
        last_step_output BLOB NOT NULL,
        error BLOB,
        usage BLOB,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        queue TEXT,
        priority INTEGER NOT NULL DEFAULT 0,
        locked_by TEXT,
        lease_expires_at REAL,
        cancel_requested INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX runs_queued ON runs (queue, priority DESC, created_at, run_id)
        WHERE status = 'queued';
    CREATE INDEX runs_leased ON runs (queue, lease_expires_at)
        WHERE status = 'running' AND locked_by IS NOT NULL;
    CREATE INDEX runs_created ON runs (created_at, run_id);
    CREATE INDEX runs_status_created ON runs (status, created_at, run_id);
    CREATE INDEX runs_updated ON runs (updated_at);
    CREATE TABLE run_context (
        run_id TEXT NOT NULL,
        field TEXT NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (run_id, field)
    );
    CREATE TABLE run_steps (
        run_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        record BLOB NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE run_metadata (
        run_id TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (run_id, key)
    );
    CREATE INDEX run_metadata_lookup ON run_metadata (key, value, created_at, run_id);
    CREATE TABLE flujo_cache (
        key TEXT PRIMARY KEY,
        value BLOB NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE evaluations (
        eval_id TEXT PRIMARY KEY,
        run_id TEXT NOT NULL,
        step_name TEXT NOT NULL,
        step_path BLOB NOT NULL,
        score REAL NOT NULL,
        reasoning TEXT NOT NULL,
        judge TEXT NOT NULL,
        usage BLOB,
        created_at REAL NOT NULL
    );
    CREATE INDEX evaluations_run ON evaluations (run_id, created_at);
    CREATE INDEX evaluations_created ON evaluations (created_at, eval_id);
    CREATE TABLE flujo_queues (
        queue TEXT PRIMARY KEY,
        concurrency_limit INTEGER
    );
    CREATE TABLE flujo_workers (
        worker_id TEXT PRIMARY KEY,
        info BLOB NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL
    );
    """

#: Columns of ``runs`` that migration 1 gained while flujo was unreleased (0.1.0), with the
#: definitions that add them to a store made by an earlier build of it.
_RUNS_COLUMNS_ADDED = (
    ("metadata", "BLOB NOT NULL DEFAULT X'7B7D'"),  # b"{}"
    ("usage", "BLOB"),
    ("queue", "TEXT"),
    ("priority", "INTEGER NOT NULL DEFAULT 0"),
    ("locked_by", "TEXT"),
    ("lease_expires_at", "REAL"),
    ("cancel_requested", "INTEGER NOT NULL DEFAULT 0"),
)


def _catch_up(conn: sqlite3.Connection) -> None:
    """Migration 2: bring a store made by an earlier build of migration 1 (which changed
    before release) to the schema migration 1 makes now: the missing ``runs`` columns, tables
    and indexes. A no-op on a store migration 1 made today."""
    columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(runs)")}
    for name, definition in _RUNS_COLUMNS_ADDED:
        if name not in columns:
            conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {definition}")
    for statement in _SCHEMA_1.split(";"):
        if statement.strip():
            conn.execute(
                statement.replace("CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ", 1).replace(
                    "CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1
                )
            )


#: The schema, as an ordered list: migration N (1-based) brings the store to version N (SQL
#: statements, or a function of the connection). Append new migrations; never edit one.
MIGRATIONS: tuple[str | Callable[[sqlite3.Connection], None], ...] = (_SCHEMA_1, _catch_up)

# A run's state rows, runs last (a whole-state save replaces these), and everything deleted
# with a run (its evaluations too).
_STATE_TABLES = ("run_context", "run_steps", "run_metadata", "runs")
_TABLES = ("run_context", "run_steps", "run_metadata", "evaluations", "runs")
_SUMMARY_COLUMNS = (
    "r.run_id, r.pipeline_id, r.pipeline_name, r.pipeline_version, r.status, "
    "r.current_step_index, r.version, r.created_at, r.updated_at, r.metadata, r.error, r.usage, "
    "r.queue, r.priority, r.locked_by, r.lease_expires_at, r.cancel_requested"
)
_RUN_COLUMNS = (
    "pipeline_id, pipeline_name, pipeline_version, step_names, initial_input, created_at, "
    "status, current_step_index, updated_at, version, last_step_output, error, metadata, usage, "
    "queue, priority, locked_by, lease_expires_at, cancel_requested"
)
_INSERT_RUN = (
    "INSERT INTO runs (run_id, pipeline_id, pipeline_name, pipeline_version, step_names, "
    "initial_input, metadata, created_at, status, current_step_index, updated_at, version, "
    "last_step_output, error, usage, queue, priority) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE_RUN = (
    "UPDATE runs SET status = ?, current_step_index = ?, updated_at = ?, version = ?, "
    "error = ?, last_step_output = COALESCE(?, last_step_output), usage = COALESCE(?, usage) "
    "WHERE run_id = ? AND version = ?"
)
# The same without status: the status index is left alone when the status did not change.
_UPDATE_RUN_SAME_STATUS = (
    "UPDATE runs SET current_step_index = ?, updated_at = ?, version = ?, "
    "error = ?, last_step_output = COALESCE(?, last_step_output), usage = COALESCE(?, usage) "
    "WHERE run_id = ? AND version = ?"
)
_UPSERT_CONTEXT = (
    "INSERT INTO run_context (run_id, field, value) VALUES (?, ?, ?) "
    "ON CONFLICT (run_id, field) DO UPDATE SET value = excluded.value"
)
_EVALUATION_COLUMNS = (
    "eval_id, run_id, step_name, step_path, score, reasoning, judge, usage, created_at"
)
_INSERT_STEP = "INSERT INTO run_steps (run_id, seq, record) VALUES (?, ?, ?)"
_INSERT_METADATA = "INSERT INTO run_metadata (run_id, key, value, created_at) VALUES (?, ?, ?, ?)"


class SQLiteBackend(StateBackend):
    """Stores runs in a SQLite database file: the embedded default.

    >>> import asyncio, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "runs.db"
    >>> backend = SQLiteBackend(path)
    >>> asyncio.run(backend.list_runs())
    []

    The file is opened (and created, and migrated) on first use, in WAL mode. ``synchronous``
    chooses durability: ``"NORMAL"`` (default) never loses a committed checkpoint when the
    process crashes, but the newest commits may be lost on power loss; ``"FULL"`` keeps every
    commit through power loss at the cost of an fsync per checkpoint.

    Calls run on the caller's thread (a commit takes tens of microseconds) and are serialized
    by a lock, so one backend may be shared by threads and event loops. Other processes may use
    the same file; ``busy_timeout_s`` bounds how long a write waits for them.
    """

    writes_may_suspend: ClassVar[bool] = False  # its writes never await: nothing to protect
    supports_queues: ClassVar[bool] = True

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Synchronous = "NORMAL",
        busy_timeout_s: float = 5.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(
                f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}"
            )
        self.path = Path(path)
        self.synchronous: Synchronous = synchronous
        self.busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None
        self._applied: list[int] = []  # migrations the last _open() applied
        self._lock = threading.Lock()
        self._wakeup = Wakeup()  # this process's workers, woken by its own enqueues

    # -- connection and schema -------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        conn = self._conn
        if conn is None:
            conn = self._conn = self._open()
        return conn

    def _open(self) -> sqlite3.Connection:
        parent = self.path.parent
        if not parent.is_dir():
            raise StateBackendError(
                f"cannot open SQLite store {self.path}: directory {parent} does not exist"
            )
        try:
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                check_same_thread=False,
                timeout=self.busy_timeout_s,
            )
        except sqlite3.Error as exc:
            raise StateBackendError(f"cannot open SQLite store {self.path}: {exc}") from exc
        try:
            self._enter_wal(conn)
            # A literal from a fixed set, checked in __init__; pragmas cannot take parameters.
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            self._applied = self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _enter_wal(self, conn: sqlite3.Connection) -> None:
        """Put the store in WAL mode. Switching a new file to WAL takes an exclusive lock, and
        SQLite reports a concurrent switch (several processes opening a new store at once) as
        "database is locked" without waiting: retry for up to ``busy_timeout_s``."""
        deadline = time.monotonic() + self.busy_timeout_s
        delay = 0.001
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise StateBackendError(f"cannot open SQLite store {self.path}: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def _migrate(self, conn: sqlite3.Connection) -> list[int]:
        """Apply the migrations the store lacks, in one transaction; return their numbers."""
        applied = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS flujo_schema "
                    "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
                )
                found = conn.execute("SELECT COALESCE(MAX(version), 0) FROM flujo_schema")
                current = int(found.fetchone()[0])
                if current > len(MIGRATIONS):
                    raise SchemaVersionError(
                        f"SQLite store {self.path} has schema version {current}, newer than "
                        f"this flujo understands ({len(MIGRATIONS)}); upgrade flujo",
                        found=current,
                        expected=len(MIGRATIONS),
                    )
                for number in range(current + 1, len(MIGRATIONS) + 1):
                    migration = MIGRATIONS[number - 1]
                    if callable(migration):
                        migration(conn)
                        statements: list[str] = []
                    else:
                        statements = migration.split(";")
                    for statement in statements:
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(
                        "INSERT INTO flujo_schema (version, applied_at) VALUES (?, ?)",
                        (number, now()),
                    )
                    applied.append(number)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, None) from exc
        return applied

    async def migrate(self) -> list[int]:
        """Open the store (creating it if needed), which applies any missing migration.

        Returns the migrations this call applied: ``[]`` when the store was already open or up
        to date. (A SQLite store migrates itself whenever it is opened; this names that step.)
        """
        with self._lock:
            if self._conn is not None:
                return []
            self._conn = self._open()
            applied, self._applied = self._applied, []
            return applied

    async def schema_version(self) -> int:
        """The schema version of the store (opening and migrating it if needed)."""
        with self._lock:
            try:
                conn = self._connection()
                row = conn.execute("SELECT MAX(version) FROM flujo_schema").fetchone()
            except sqlite3.Error as exc:
                raise _translate(exc, self.path, None) from exc
        return int(row[0] or 0)

    # -- writes ----------------------------------------------------------------------------------

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        """Apply ``checkpoint`` in one transaction, with compare-and-swap on ``version``."""
        run_id = validate_run_id(checkpoint.run_id)
        with self._lock, _Transaction(self, run_id) as conn:
            return self._write(conn, checkpoint)

    def _write(self, conn: sqlite3.Connection, cp: Checkpoint) -> int:
        run_id = cp.run_id
        expected = cp.expected_version
        if expected is None or cp.replace:
            row = conn.execute("SELECT version FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            stored = None if row is None else int(row[0])
            check_version(cp, stored)
            version = cp.new_version(stored or 0)
            if cp.replace and stored is not None:
                for table in _STATE_TABLES:
                    conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))  # noqa: S608 - fixed names
                stored = None
            if stored is None:
                self._insert_run(conn, cp, version)
            else:
                self._update_run(conn, cp, stored, version)
        elif expected == 0:
            version = cp.new_version(0)
            try:
                self._insert_run(conn, cp, version)
            except sqlite3.IntegrityError:
                row = conn.execute(
                    "SELECT version FROM runs WHERE run_id = ?", (run_id,)
                ).fetchone()
                check_version(cp, None if row is None else int(row[0]))
                raise
        else:
            version = cp.new_version(expected)
            self._update_run(conn, cp, expected, version)
        if cp.context:
            conn.executemany(
                _UPSERT_CONTEXT, [(run_id, name, value) for name, value in cp.context.items()]
            )
        steps = cp.steps
        if steps:
            offset = cp.step_offset
            rows = [(run_id, offset + i, record) for i, record in enumerate(steps)]
            try:
                conn.executemany(_INSERT_STEP, rows)
            except sqlite3.IntegrityError:
                # Records from step_offset on are replaced (never the case for the runner,
                # which always appends; kept for the contract every backend shares).
                conn.execute(
                    "DELETE FROM run_steps WHERE run_id = ? AND seq >= ?", (run_id, offset)
                )
                conn.executemany(_INSERT_STEP, rows)
        return version

    @staticmethod
    def _insert_run(conn: sqlite3.Connection, cp: Checkpoint, version: int) -> None:
        header = cp.header
        if header is None:
            raise CorruptStateError(
                f"run {cp.run_id!r}: the first checkpoint of a run has no header",
                run_id=cp.run_id,
            )
        conn.execute(
            _INSERT_RUN,
            (
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
                None if cp.usage == b"null" else cp.usage,
                header.queue,
                header.priority,
            ),
        )
        if header.metadata != b"{}":
            conn.executemany(
                _INSERT_METADATA,
                [
                    (cp.run_id, key, value, header.created_at)
                    for key, value in metadata_index(header.metadata)
                ],
            )

    @staticmethod
    def _update_run(conn: sqlite3.Connection, cp: Checkpoint, expected: int, version: int) -> None:
        params: tuple[Any, ...]
        if cp.status_changed:
            sql, params = _UPDATE_RUN, (cp.status,)
        else:
            sql, params = _UPDATE_RUN_SAME_STATUS, ()
        cursor = conn.execute(
            sql,
            (
                *params,
                cp.current_step_index,
                cp.updated_at,
                version,
                cp.error,
                cp.last_step_output,
                cp.usage,
                cp.run_id,
                expected,
            ),
        )
        if cursor.rowcount != 1:
            row = conn.execute("SELECT version FROM runs WHERE run_id = ?", (cp.run_id,)).fetchone()
            check_version(cp, None if row is None else int(row[0]))
            raise StateBackendError(f"run {cp.run_id!r}: update matched no row")  # unreachable

    async def save_state(self, run_id: str, state: dict[str, Any]) -> None:
        """Store ``state`` whole, replacing what was there."""
        validate_run_id(run_id)
        await self.write_checkpoint(checkpoint_from_state(run_id, state, self.serializer))

    async def delete_state(self, run_id: str) -> None:
        """Forget ``run_id`` (its row, context fields and step records)."""
        validate_run_id(run_id)
        with self._lock, _Transaction(self, run_id) as conn:
            for table in _TABLES:
                conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))  # noqa: S608 - fixed names

    # -- reads -----------------------------------------------------------------------------------

    async def load_state(self, run_id: str) -> dict[str, Any] | None:
        """The stored state of ``run_id`` (read in one snapshot), or None."""
        validate_run_id(run_id)
        with self._lock:
            try:
                conn = self._connection()
                conn.execute("BEGIN")
                try:
                    row = conn.execute(
                        f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?",  # noqa: S608 - fixed names
                        (run_id,),
                    ).fetchone()
                    if row is None:
                        return None
                    context = conn.execute(
                        "SELECT field, value FROM run_context WHERE run_id = ?", (run_id,)
                    ).fetchall()
                    steps = conn.execute(
                        "SELECT record FROM run_steps WHERE run_id = ? ORDER BY seq", (run_id,)
                    ).fetchall()
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _translate(exc, self.path, run_id) from exc
        try:
            run = StoredRun(
                run_id=run_id,
                pipeline_id=str(row[0]),
                pipeline_name=str(row[1]),
                pipeline_version=str(row[2]),
                step_names=_blob(row[3]),
                initial_input=_blob(row[4]),
                created_at=float(row[5]),
                status=str(row[6]),
                current_step_index=int(row[7]),
                updated_at=float(row[8]),
                version=int(row[9]),
                last_step_output=_blob(row[10]),
                error=None if row[11] is None else _blob(row[11]),
                metadata=_blob(row[12]),
                usage=None if row[13] is None or row[13] == b"null" else _blob(row[13]),
                queue=row[14],
                priority=int(row[15]),
                locked_by=row[16],
                lease_expires_at=None if row[17] is None else float(row[17]),
                cancel_requested=bool(row[18]),
                context={str(name): _blob(value) for name, value in context},
                steps=[_blob(record) for (record,) in steps],
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
        """Summaries of stored runs, newest first; every value is a bound parameter."""
        sql, params = _list_query(
            status, pipeline_name, metadata_filter_items(metadata_filter), since, limit, offset
        )
        with self._lock:
            try:
                rows = self._connection().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, self.path, None) from exc
        summaries = []
        for row in rows:
            try:
                summaries.append(_summary(row))
            except (TypeError, ValueError, OverflowError, OSError) as exc:
                logger.warning(
                    "skipping unreadable row of run %r in %s: %s", row[0], self.path, exc
                )
        return summaries

    async def delete_runs(self, *, updated_before: datetime, status: str | None = None) -> int:
        """Delete runs last updated before ``updated_before`` (of ``status``), atomically."""
        where = "updated_at < ?" + (" AND status = ?" if status is not None else "")
        params: tuple[Any, ...] = (epoch(updated_before),)
        if status is not None:
            params += (status,)
        with self._lock, _Transaction(self, None) as conn:
            for table in _TABLES[:-1]:
                conn.execute(
                    f"DELETE FROM {table} WHERE run_id IN "  # noqa: S608 - fixed names
                    f"(SELECT run_id FROM runs WHERE {where})",
                    params,
                )
            deleted = conn.execute(f"DELETE FROM runs WHERE {where}", params).rowcount  # noqa: S608 - fixed fragments
        return int(deleted)

    # -- the step cache (CacheStep's SQLiteCache) ------------------------------------------------

    async def cache_get(self, key: str) -> bytes | None:
        """The cached value under ``key``, or None."""
        with self._lock:
            try:
                row = (
                    self._connection()
                    .execute("SELECT value FROM flujo_cache WHERE key = ?", (key,))
                    .fetchone()
                )
            except sqlite3.Error as exc:
                raise _translate(exc, self.path, None) from exc
        return None if row is None else _blob(row[0])

    async def cache_set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (replacing any earlier value)."""
        with self._lock, _Transaction(self, None) as conn:
            conn.execute(
                "INSERT INTO flujo_cache (key, value, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                "created_at = excluded.created_at",
                (key, value, now()),
            )

    # -- queues and workers ----------------------------------------------------------------------
    # One write transaction (BEGIN IMMEDIATE) per operation: SQLite serializes writers, so a
    # claim never races another (there is no SKIP LOCKED to need). Workers in other processes
    # are not notified: they poll (see flujo.worker).

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
        claimed: list[Claim] = []
        with self._lock, _Transaction(self, None) as conn:
            current = now()
            for queue in names:
                room = limit - len(claimed)
                if room <= 0:
                    break
                room = min(room, _queue_room(conn, queue, current))
                if room <= 0:
                    continue
                sql = _CLAIMABLE
                params: list[Any] = [queue, current]
                if pipelines is not None:
                    marks = ", ".join("?" * len(pipelines))
                    sql += f" AND pipeline_name || '@' || pipeline_version IN ({marks})"
                    params += list(pipelines)
                if exclude:
                    sql += f" AND run_id NOT IN ({', '.join('?' * len(exclude))})"
                    params += list(exclude)
                sql += " ORDER BY priority DESC, created_at, run_id LIMIT ?"
                found = [
                    Claim(str(row[0]), str(row[1]), str(row[2]))
                    for row in conn.execute(sql, (*params, room))
                ]
                conn.executemany(
                    "UPDATE runs SET status = 'running', locked_by = ?, lease_expires_at = ?, "
                    "version = version + 1, updated_at = ? WHERE run_id = ?",
                    [(worker_id, current + lease_s, current, claim.run_id) for claim in found],
                )
                claimed += found
        return claimed

    async def renew_leases(
        self, *, worker_id: str, run_ids: Sequence[str], lease_s: float
    ) -> dict[str, bool]:
        """Extend the leases ``worker_id`` still holds; see StateBackend."""
        if not run_ids:
            return {}
        held: dict[str, bool] = {}
        with self._lock, _Transaction(self, None) as conn:
            expires = now() + lease_s
            for run_id in run_ids:
                row = conn.execute(
                    "UPDATE runs SET lease_expires_at = ? WHERE run_id = ? AND locked_by = ? "
                    "AND status = 'running' RETURNING cancel_requested",
                    (expires, run_id, worker_id),
                ).fetchone()
                if row is not None:
                    held[run_id] = bool(row[0])
        return held

    async def release_runs(self, *, worker_id: str, run_ids: Sequence[str]) -> None:
        """Give up ``worker_id``'s leases on ``run_ids``; see StateBackend."""
        if not run_ids:
            return
        with self._lock, _Transaction(self, None) as conn:
            conn.executemany(_RELEASE, [(run_id, worker_id) for run_id in run_ids])

    async def requeue_run(
        self, run_id: str, *, queue: str | None = None, priority: int | None = None
    ) -> bool:
        """Put a failed (or abandoned) run back in its queue; see StateBackend."""
        validate_run_id(run_id)
        if queue is not None:
            validate_queue_name(queue)
        with self._lock, _Transaction(self, run_id) as conn:
            cursor = conn.execute(_REQUEUE, (queue, priority, now(), run_id, queue, now()))
            return cursor.rowcount == 1

    async def request_cancel(self, run_id: str) -> str | None:
        """Cancel a queued or paused run; flag a running one; see StateBackend."""
        validate_run_id(run_id)
        with self._lock, _Transaction(self, run_id) as conn:
            row = conn.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            status = str(row[0])
            if status in ("queued", "paused"):
                conn.execute(_CANCEL_NOW, (cancel_error(status), now(), run_id))
                return "cancelled"
            if status == "running":
                conn.execute("UPDATE runs SET cancel_requested = 1 WHERE run_id = ?", (run_id,))
            return status

    async def set_queue_limit(self, queue: str, limit: int | None) -> None:
        """Limit how many runs of ``queue`` run at once (None: no limit)."""
        validate_queue_name(queue)
        with self._lock, _Transaction(self, None) as conn:
            if limit is None:
                conn.execute("DELETE FROM flujo_queues WHERE queue = ?", (queue,))
            else:
                conn.execute(
                    "INSERT INTO flujo_queues (queue, concurrency_limit) VALUES (?, ?) "
                    "ON CONFLICT (queue) DO UPDATE SET "
                    "concurrency_limit = excluded.concurrency_limit",
                    (queue, check_limit(limit)),
                )

    async def queue_limits(self) -> dict[str, int]:
        """The concurrency limit of each queue that has one."""
        with self._lock:
            rows = self._connection().execute(
                "SELECT queue, concurrency_limit FROM flujo_queues "
                "WHERE concurrency_limit IS NOT NULL"
            )
            return {str(queue): int(limit) for queue, limit in rows}

    async def next_lease_expiry(self, queues: Sequence[str]) -> float | None:
        """When the earliest lease of a running run of ``queues`` expires."""
        names = [validate_queue_name(queue) for queue in queues]
        if not names:
            return None
        marks = ", ".join("?" * len(names))
        with self._lock:
            row = (
                self._connection()
                .execute(
                    "SELECT min(lease_expires_at) FROM runs WHERE status = 'running' "  # noqa: S608 - placeholders only
                    f"AND locked_by IS NOT NULL AND queue IN ({marks})",
                    names,
                )
                .fetchone()
            )
        return None if row is None or row[0] is None else float(row[0])

    async def register_worker(self, worker_id: str, info: Mapping[str, Any]) -> None:
        """Record (or refresh) a live worker."""
        data = self.serializer.dumps(dict(info), "worker info")
        with self._lock, _Transaction(self, None) as conn:
            current = now()
            conn.execute(
                "INSERT INTO flujo_workers (worker_id, info, started_at, heartbeat_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (worker_id) DO UPDATE SET "
                "info = excluded.info, heartbeat_at = excluded.heartbeat_at",
                (worker_id, data, current, current),
            )
            conn.execute(
                "DELETE FROM flujo_workers WHERE heartbeat_at < ?", (current - WORKER_FORGET_S,)
            )

    async def remove_worker(self, worker_id: str) -> None:
        """Forget a worker that stopped."""
        with self._lock, _Transaction(self, None) as conn:
            conn.execute("DELETE FROM flujo_workers WHERE worker_id = ?", (worker_id,))

    async def list_workers(self) -> list[dict[str, Any]]:
        """Registered workers, most recently seen first."""
        with self._lock:
            rows = self._connection().execute(
                "SELECT worker_id, info, started_at, heartbeat_at FROM flujo_workers "
                "ORDER BY heartbeat_at DESC"
            )
            return [
                {
                    "worker_id": str(worker_id),
                    "info": orjson.loads(_blob(info)),
                    "started_at": to_datetime(float(started)),
                    "heartbeat_at": to_datetime(float(seen)),
                }
                for worker_id, info, started, seen in rows
            ]

    async def notify_work(self, queue: str) -> None:
        """Wake this process's workers waiting on this store (other processes poll)."""
        self._wakeup.wake()

    async def notify_cancel(self, run_id: str) -> None:
        """Tell this process's workers that ``run_id`` is to be cancelled."""
        self._wakeup.wake(cancelled=run_id)

    async def wait_for_work(self, timeout_s: float) -> set[str]:
        """Wait for a notification from this process, or ``timeout_s``."""
        return await self._wakeup.wait(timeout_s)

    # -- shadow evaluations ----------------------------------------------------------------------

    async def save_evaluation(self, evaluation: Evaluation) -> None:
        """Store a shadow evaluation's score in ``evaluations``."""
        validate_run_id(evaluation.run_id)
        row = (
            evaluation.eval_id,
            evaluation.run_id,
            evaluation.step_name,
            self.serializer.dumps(evaluation.step_path, "step_path"),
            evaluation.score,
            evaluation.reasoning,
            evaluation.judge,
            orjson.dumps(evaluation.usage.to_dict()) if evaluation.usage else None,
            epoch(evaluation.created_at),
        )
        with self._lock, _Transaction(self, evaluation.run_id) as conn:
            conn.execute(
                f"INSERT INTO evaluations ({_EVALUATION_COLUMNS}) "  # noqa: S608 - fixed names
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
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
        clauses: list[str] = []
        params: list[Any] = []
        if run_id is not None:
            clauses.append("run_id = ?")
            params.append(validate_run_id(run_id))
        if step_name is not None:
            clauses.append("step_name = ?")
            params.append(step_name)
        if since is not None:
            clauses.append("created_at >= ?")
            params.append(epoch(since))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params += [max(int(limit), 0), max(int(offset), 0)]
        order = "ORDER BY created_at DESC, eval_id DESC LIMIT ? OFFSET ?"
        sql = f"SELECT {_EVALUATION_COLUMNS} FROM evaluations {where} {order}"  # noqa: S608 - fixed fragments, bound values
        with self._lock:
            try:
                rows = self._connection().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise _translate(exc, self.path, run_id) from exc
        return [_evaluation(row) for row in rows]

    async def aclose(self) -> None:
        """Close the database connection (it reopens on next use)."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()


def _list_query(
    status: str | None,
    pipeline_name: str | None,
    metadata: list[tuple[str, bytes]],
    since: datetime | None,
    limit: int,
    offset: int,
) -> tuple[str, list[Any]]:
    """SQL (fixed fragments only) and bound parameters for list_runs, newest first.

    A metadata filter drives the query from the ``run_metadata`` index, which is ordered by
    creation time within each (key, value), so both rare and common values list fast.
    """
    params: list[Any] = []
    clauses: list[str] = []
    if metadata:
        (key, value), rest = metadata[0], metadata[1:]
        source = "run_metadata m JOIN runs r ON r.run_id = m.run_id"
        clauses.append("m.key = ? AND m.value = ?")
        params += [key, value]
        for key, value in rest:
            clauses.append(
                "EXISTS (SELECT 1 FROM run_metadata x "
                "WHERE x.run_id = r.run_id AND x.key = ? AND x.value = ?)"
            )
            params += [key, value]
        order = "m.created_at DESC, m.run_id DESC"
        created = "m.created_at"
    else:
        source = "runs r"
        order = "r.created_at DESC, r.run_id DESC"
        created = "r.created_at"
    if status is not None:
        clauses.append("r.status = ?")
        params.append(status)
    if pipeline_name is not None:
        clauses.append("r.pipeline_name = ?")
        params.append(pipeline_name)
    if since is not None:
        clauses.append(f"{created} >= ?")
        params.append(epoch(since))
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    params += [max(int(limit), 0), max(int(offset), 0)]
    sql = f"SELECT {_SUMMARY_COLUMNS} FROM {source} {where} ORDER BY {order} LIMIT ? OFFSET ?"  # noqa: S608 - fixed fragments, bound values
    return sql, params


def _summary(row: Any) -> dict[str, Any]:
    """A run summary from a row of _SUMMARY_COLUMNS, checked."""
    (run_id, pipeline_id, pipeline_name, pipeline_version, status, index, version) = row[:7]
    created, updated, metadata, error, usage = row[7:12]
    queue, priority, locked_by, lease, cancel = row[12:]
    for name, value in (("status", status), ("pipeline_name", pipeline_name)):
        if not isinstance(value, str):
            raise ValueError(f"{name} is not text")
    for name, value in (("current_step_index", index), ("version", version)):
        if not isinstance(value, int):
            raise ValueError(f"{name} is not an integer")
    for name, value in (("created_at", created), ("updated_at", updated)):
        if not isinstance(value, (int, float)):
            raise ValueError(f"{name} is not a number")
    return {
        "run_id": str(run_id),
        "pipeline_id": str(pipeline_id),
        "pipeline_name": pipeline_name,
        "pipeline_version": str(pipeline_version),
        "status": status,
        "current_step_index": index,
        "version": version,
        "created_at": to_datetime(created),
        "updated_at": to_datetime(updated),
        "metadata": orjson.loads(_blob(metadata)),
        "error": None if error is None else orjson.loads(_blob(error)),
        "usage": None if usage is None else orjson.loads(_blob(usage)),
        "queue": queue,
        "priority": int(priority),
        "locked_by": locked_by,
        "lease_expires_at": None if lease is None else to_datetime(float(lease)),
        "cancel_requested": bool(cancel),
    }


_CLAIMABLE = (
    "SELECT run_id, pipeline_name, pipeline_version FROM runs WHERE queue = ? AND "
    "(status = 'queued' OR "
    "(status = 'running' AND locked_by IS NOT NULL AND lease_expires_at < ?))"
)
# A released run that was still running goes back to its queue, one version on (so whatever
# of it still runs in the releasing process can no longer checkpoint).
_RELEASE = (
    "UPDATE runs SET locked_by = NULL, lease_expires_at = NULL, "
    "version = CASE WHEN status = 'running' THEN version + 1 ELSE version END, "
    "status = CASE WHEN status = 'running' THEN 'queued' ELSE status END "
    "WHERE run_id = ? AND locked_by = ?"
)
_REQUEUE = (
    "UPDATE runs SET status = 'queued', queue = COALESCE(?, queue), "
    "priority = COALESCE(?, priority), locked_by = NULL, lease_expires_at = NULL, "
    "cancel_requested = 0, version = version + 1, updated_at = ? "
    "WHERE run_id = ? AND COALESCE(?, queue) IS NOT NULL AND (status = 'failed' OR "
    "(status = 'queued' AND queue IS NULL) OR "
    "(status = 'running' AND (locked_by IS NULL OR lease_expires_at < ?)))"
)
_CANCEL_NOW = (
    "UPDATE runs SET status = 'cancelled', cancel_requested = 1, error = ?, updated_at = ?, "
    "locked_by = NULL, lease_expires_at = NULL, version = version + 1 WHERE run_id = ?"
)


def _queue_room(conn: sqlite3.Connection, queue: str, current: float) -> int:
    """How many more runs of ``queue`` may start now (its limit minus the leased runs)."""
    row = conn.execute(
        "SELECT concurrency_limit FROM flujo_queues WHERE queue = ?", (queue,)
    ).fetchone()
    if row is None or row[0] is None:
        return 1 << 30
    busy = conn.execute(
        "SELECT count(*) FROM runs WHERE queue = ? AND status = 'running' "
        "AND locked_by IS NOT NULL AND lease_expires_at >= ?",
        (queue, current),
    ).fetchone()[0]
    return int(row[0]) - int(busy)


def _evaluation(row: Any) -> Evaluation:
    """An evaluation from a row of the evaluations table."""
    eval_id, run_id, step_name, path, score, reasoning, judge, usage, created = row
    return Evaluation(
        eval_id=eval_id,
        run_id=run_id,
        step_name=step_name,
        step_path=orjson.loads(_blob(path)),
        score=score,
        reasoning=reasoning,
        judge=judge,
        usage=None if usage is None else orjson.loads(_blob(usage)),
        created_at=to_datetime(created),
    )


def _blob(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ValueError(f"expected JSON bytes, found {type(value).__name__}")


class _Transaction:
    """``with _Transaction(backend, run_id) as conn``: one write transaction (call under the
    backend's lock): BEGIN IMMEDIATE, then COMMIT, or ROLLBACK on any exception; sqlite3
    errors become flujo's typed errors."""

    __slots__ = ("backend", "conn", "run_id")

    def __init__(self, backend: SQLiteBackend, run_id: str | None) -> None:
        self.backend = backend
        self.run_id = run_id
        self.conn: sqlite3.Connection | None = None

    def __enter__(self) -> sqlite3.Connection:
        backend = self.backend
        try:
            conn = self.conn = backend._conn or backend._connection()
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _translate(exc, backend.path, self.run_id) from exc
        return conn

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        conn = self.conn
        assert conn is not None
        try:
            if exc is None:
                conn.execute("COMMIT")
            elif conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error as error:
            if conn.in_transaction:  # a COMMIT that failed (busy, disk full) leaves it open
                conn.execute("ROLLBACK")
            raise _translate(error, self.backend.path, self.run_id) from error
        if isinstance(exc, sqlite3.Error):
            raise _translate(exc, self.backend.path, self.run_id) from exc


def _translate(exc: sqlite3.Error, path: Path, run_id: str | None) -> Exception:
    """flujo's typed error for a sqlite3 error."""
    message = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in message or "malformed" in message
    ):
        return CorruptStateError(f"SQLite store {path} is corrupt: {message}", run_id=run_id)
    where = f" (run {run_id!r})" if run_id else ""
    return StateBackendError(f"SQLite store {path}{where}: {message}")
