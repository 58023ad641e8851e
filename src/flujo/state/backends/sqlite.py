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
from pathlib import Path
from typing import Any, Literal

from flujo.exceptions import CorruptStateError, SchemaVersionError, StateBackendError
from flujo.state.backends.base import (
    Checkpoint,
    StateBackend,
    StoredRun,
    check_version,
    checkpoint_from_state,
    now,
    to_datetime,
    validate_run_id,
)

__all__ = ["MIGRATIONS", "SQLiteBackend"]

logger = logging.getLogger("flujo.state.sqlite")

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

#: The schema, as an ordered list: migration N (1-based) brings the store to version N.
#: Append new migrations; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        pipeline_id TEXT NOT NULL,
        pipeline_name TEXT NOT NULL,
        pipeline_version TEXT NOT NULL,
        step_names BLOB NOT NULL,
        initial_input BLOB NOT NULL,
        status TEXT NOT NULL,
        current_step_index INTEGER NOT NULL,
        version INTEGER NOT NULL,
        last_step_output BLOB NOT NULL,
        error BLOB,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX runs_status_updated ON runs (status, updated_at);
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
    """,
)

_SUMMARY_COLUMNS = (
    "run_id, pipeline_id, pipeline_name, pipeline_version, status, current_step_index, "
    "version, created_at, updated_at"
)
_RUN_COLUMNS = (
    "pipeline_id, pipeline_name, pipeline_version, step_names, initial_input, created_at, "
    "status, current_step_index, updated_at, version, last_step_output, error"
)
_INSERT_RUN = (
    "INSERT INTO runs (run_id, pipeline_id, pipeline_name, pipeline_version, step_names, "
    "initial_input, created_at, status, current_step_index, updated_at, version, "
    "last_step_output, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE_RUN = (
    "UPDATE runs SET status = ?, current_step_index = ?, updated_at = ?, version = ?, "
    "error = ?, last_step_output = COALESCE(?, last_step_output) "
    "WHERE run_id = ? AND version = ?"
)
_UPSERT_CONTEXT = (
    "INSERT INTO run_context (run_id, field, value) VALUES (?, ?, ?) "
    "ON CONFLICT (run_id, field) DO UPDATE SET value = excluded.value"
)
_INSERT_STEP = "INSERT INTO run_steps (run_id, seq, record) VALUES (?, ?, ?)"


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
            raise StateBackendError(
                f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}"
            )
        self.path = Path(path)
        self.synchronous: Synchronous = synchronous
        self.busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

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
            conn.execute("PRAGMA journal_mode=WAL")
            # A literal from a fixed set, checked in __init__; pragmas cannot take parameters.
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
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
                    for statement in MIGRATIONS[number - 1].split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(
                        "INSERT INTO flujo_schema (version, applied_at) VALUES (?, ?)",
                        (number, now()),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _translate(exc, self.path, None) from exc

    def schema_version(self) -> int:
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
        with self._lock:
            try:
                conn = self._conn or self._connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    version = self._write(conn, checkpoint)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _translate(exc, self.path, run_id) from exc
        return version

    def _write(self, conn: sqlite3.Connection, cp: Checkpoint) -> int:
        run_id = cp.run_id
        expected = cp.expected_version
        if expected is None or cp.replace:
            row = conn.execute("SELECT version FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            stored = None if row is None else int(row[0])
            check_version(cp, stored)
            version = cp.new_version(stored or 0)
            if cp.replace:
                conn.execute("DELETE FROM run_context WHERE run_id = ?", (run_id,))
                conn.execute("DELETE FROM run_steps WHERE run_id = ?", (run_id,))
                conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
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
                header.created_at,
                cp.status,
                cp.current_step_index,
                cp.updated_at,
                version,
                cp.last_step_output or b"null",
                cp.error,
            ),
        )

    @staticmethod
    def _update_run(conn: sqlite3.Connection, cp: Checkpoint, expected: int, version: int) -> None:
        cursor = conn.execute(
            _UPDATE_RUN,
            (
                cp.status,
                cp.current_step_index,
                cp.updated_at,
                version,
                cp.error,
                cp.last_step_output,
                cp.run_id,
                expected,
            ),
        )
        if cursor.rowcount != 1:
            row = conn.execute("SELECT version FROM runs WHERE run_id = ?", (cp.run_id,)).fetchone()
            check_version(cp, None if row is None else int(row[0]))
            raise StateBackendError(f"run {cp.run_id!r}: update matched no row")  # unreachable
        if cp.header is not None:
            header = cp.header
            conn.execute(
                "UPDATE runs SET pipeline_id = ?, pipeline_name = ?, pipeline_version = ?, "
                "step_names = ?, initial_input = ?, created_at = ? WHERE run_id = ?",
                (
                    header.pipeline_id,
                    header.pipeline_name,
                    header.pipeline_version,
                    header.step_names,
                    header.initial_input,
                    header.created_at,
                    cp.run_id,
                ),
            )

    async def save_state(self, run_id: str, state: dict[str, Any]) -> None:
        """Store ``state`` whole, replacing what was there."""
        validate_run_id(run_id)
        await self.write_checkpoint(checkpoint_from_state(run_id, state, self.serializer))

    async def delete_state(self, run_id: str) -> None:
        """Forget ``run_id`` (its row, context fields and step records)."""
        validate_run_id(run_id)
        with self._lock:
            try:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for table in ("run_context", "run_steps", "runs"):
                        conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))  # noqa: S608 - fixed names
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise _translate(exc, self.path, run_id) from exc

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
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Summaries of stored runs, most recently updated first."""
        clauses: list[str] = []
        params: list[Any] = []
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        if pipeline_name is not None:
            clauses.append("pipeline_name = ?")
            params.append(pipeline_name)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(max(int(limit), 0))
        sql = f"SELECT {_SUMMARY_COLUMNS} FROM runs {where} ORDER BY updated_at DESC LIMIT ?"  # noqa: S608 - fixed fragments, bound values
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

    async def aclose(self) -> None:
        """Close the database connection (it reopens on next use)."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()


def _summary(row: Any) -> dict[str, Any]:
    """A run summary from a row of _SUMMARY_COLUMNS, checked."""
    (
        run_id,
        pipeline_id,
        pipeline_name,
        pipeline_version,
        status,
        index,
        version,
        created,
        updated,
    ) = row
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
    }


def _blob(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise ValueError(f"expected JSON bytes, found {type(value).__name__}")


def _translate(exc: sqlite3.Error, path: Path, run_id: str | None) -> Exception:
    """flujo's typed error for a sqlite3 error."""
    message = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in message or "malformed" in message
    ):
        return CorruptStateError(f"SQLite store {path} is corrupt: {message}", run_id=run_id)
    where = f" (run {run_id!r})" if run_id else ""
    return StateBackendError(f"SQLite store {path}{where}: {message}")
