"""SQLiteBackend specifics: schema versions, corrupt rows and files, storage failures."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from backend_helpers import checkpoint, run_header, sample_state

from flujo.exceptions import (
    ConfigurationError,
    CorruptStateError,
    SchemaVersionError,
    StateBackendError,
)
from flujo.state import SQLiteBackend
from flujo.state.backends.base import to_datetime
from flujo.state.backends.sqlite import MIGRATIONS


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "flujo.db"


@pytest.fixture
async def open_sqlite(db_path: Path) -> AsyncIterator[Callable[..., SQLiteBackend]]:
    opened: list[SQLiteBackend] = []

    def make(path: Path | None = None, **kwargs: Any) -> SQLiteBackend:
        backend = SQLiteBackend(db_path if path is None else path, **kwargs)
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        await backend.aclose()


@pytest.fixture
async def sqlite_backend(open_sqlite: Callable[..., SQLiteBackend]) -> SQLiteBackend:
    return open_sqlite()


def _execute(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Change the store behind the backend's back, as another program would."""
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            conn.execute(sql, params)
    finally:
        conn.close()


def _rows(db_path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# -- schema ----------------------------------------------------------------------------------------


async def test_a_new_store_is_migrated_to_the_latest_schema(
    sqlite_backend: SQLiteBackend, db_path: Path
) -> None:
    assert await sqlite_backend.schema_version() == len(MIGRATIONS)
    tables = {row[0] for row in _rows(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "run_context", "run_steps", "flujo_schema"} <= tables
    assert _rows(db_path, "PRAGMA journal_mode") == [("wal",)]


async def test_migrate_reports_what_it_applied(tmp_path: Path) -> None:
    fresh = SQLiteBackend(tmp_path / "fresh.db")
    assert await fresh.migrate() == list(range(1, len(MIGRATIONS) + 1))
    assert await fresh.migrate() == []
    await fresh.aclose()
    assert await SQLiteBackend(tmp_path / "fresh.db").migrate() == []


async def test_reopening_does_not_migrate_again(
    open_sqlite: Callable[..., SQLiteBackend], db_path: Path
) -> None:
    first = open_sqlite()
    await first.save_state("r", sample_state("r"))
    await first.aclose()

    second = open_sqlite()
    assert await second.migrate() == []  # an up-to-date store: nothing to apply
    assert await second.schema_version() == len(MIGRATIONS)
    assert _rows(db_path, "SELECT COUNT(*) FROM flujo_schema") == [(len(MIGRATIONS),)]
    assert await second.load_state("r") == sample_state("r")


async def test_a_store_with_a_newer_schema_is_refused(
    open_sqlite: Callable[..., SQLiteBackend], db_path: Path
) -> None:
    first = open_sqlite()
    await first.save_state("r", sample_state("r"))
    await first.aclose()
    newer = len(MIGRATIONS) + 1
    _execute(db_path, "INSERT INTO flujo_schema (version, applied_at) VALUES (?, 0)", (newer,))

    backend = open_sqlite()
    for call in (
        lambda: backend.load_state("r"),
        lambda: backend.save_state("r", sample_state("r", status="failed")),
        lambda: backend.write_checkpoint(checkpoint(backend, "r", 2)),
        lambda: backend.delete_state("r"),
        backend.list_runs,
    ):
        with pytest.raises(SchemaVersionError) as info:
            await call()
        assert info.value.found == newer
        assert info.value.expected == len(MIGRATIONS)
    with pytest.raises(SchemaVersionError):
        await backend.schema_version()
    with pytest.raises(SchemaVersionError):
        await backend.migrate()

    assert _rows(db_path, "SELECT run_id, status, version FROM runs") == [("r", "running", 2)]


@pytest.mark.parametrize("mode", ["SOMETIMES; DROP TABLE runs", "normal", "", "FULL ", None, 2])
async def test_synchronous_must_be_a_known_mode(db_path: Path, mode: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        SQLiteBackend(db_path, synchronous=mode)
    assert repr(mode) in str(info.value)
    assert not db_path.exists()  # refused before anything was opened


@pytest.mark.parametrize("mode", ["OFF", "NORMAL", "FULL", "EXTRA"])
async def test_every_synchronous_mode_works(
    open_sqlite: Callable[..., SQLiteBackend], mode: str
) -> None:
    backend = open_sqlite(synchronous=mode)
    await backend.save_state("r", sample_state("r"))
    assert await backend.load_state("r") == sample_state("r")


# -- corrupt rows and files ------------------------------------------------------------------------

GARBAGE_CELLS = [
    pytest.param("run_context", "value", b"\xde\xad\xbe\xef", id="context-garbage-bytes"),
    pytest.param("run_context", "value", "{not json", id="context-broken-json-text"),
    pytest.param("run_context", "value", 42, id="context-an-integer"),
    pytest.param("run_steps", "record", b'{"index": 0, "na', id="step-truncated"),
    pytest.param("runs", "last_step_output", b"\x00\x01\x02", id="output-garbage"),
    pytest.param("runs", "step_names", "][", id="step-names-garbage"),
    pytest.param("runs", "initial_input", b"", id="initial-input-empty"),
    pytest.param("runs", "error", b"{'single': 'quotes'}", id="error-python-repr"),
    pytest.param("runs", "version", "seven", id="version-text"),
    pytest.param("runs", "created_at", "yesterday", id="created-at-text"),
    pytest.param("runs", "current_step_index", b"\xff", id="step-index-blob"),
]


@pytest.mark.parametrize(("table", "column", "value"), GARBAGE_CELLS)
async def test_a_corrupt_row_gives_corrupt_state_error(
    sqlite_backend: SQLiteBackend, db_path: Path, table: str, column: str, value: Any
) -> None:
    await sqlite_backend.save_state("r", sample_state("r"))
    await sqlite_backend.save_state("ok", sample_state("ok"))
    _execute(db_path, f"UPDATE {table} SET {column} = ? WHERE run_id = 'r'", (value,))

    with pytest.raises(CorruptStateError) as info:
        await sqlite_backend.load_state("r")

    assert info.value.run_id == "r"
    assert await sqlite_backend.load_state("ok") == sample_state("ok")
    await sqlite_backend.delete_state("r")  # the way out
    assert await sqlite_backend.load_state("r") is None


@pytest.mark.parametrize(
    ("column", "value"),
    [("updated_at", "yesterday"), ("created_at", b"\x00"), ("version", "seven")],
)
async def test_list_runs_with_a_corrupt_row_gives_a_typed_error_or_skips_it(
    sqlite_backend: SQLiteBackend, db_path: Path, column: str, value: Any
) -> None:
    await sqlite_backend.save_state("r", sample_state("r"))
    await sqlite_backend.save_state("ok", sample_state("ok"))
    _execute(db_path, f"UPDATE runs SET {column} = ? WHERE run_id = 'r'", (value,))

    try:
        runs = await sqlite_backend.list_runs()
    except CorruptStateError:
        return
    assert [run["run_id"] for run in runs] == ["ok"]


async def test_a_file_that_is_not_a_database(
    open_sqlite: Callable[..., SQLiteBackend], db_path: Path
) -> None:
    garbage = b"this is not a SQLite database, just some text\n" * 200
    db_path.write_bytes(garbage)
    backend = open_sqlite()

    for call in (
        lambda: backend.load_state("r"),
        lambda: backend.save_state("r", sample_state("r")),
        lambda: backend.write_checkpoint(checkpoint(backend, "r", 0, header=run_header())),
        lambda: backend.delete_state("r"),
        backend.list_runs,
    ):
        with pytest.raises((CorruptStateError, StateBackendError)):
            await call()
    assert db_path.read_bytes() == garbage


async def test_a_truncated_database_gives_a_typed_error(
    open_sqlite: Callable[..., SQLiteBackend], db_path: Path
) -> None:
    first = open_sqlite()
    for i in range(50):
        await first.save_state(f"r{i}", sample_state(f"r{i}", pipeline_context={"pad": "x" * 3000}))
    await first.aclose()  # checkpoints the WAL into the main file
    size = db_path.stat().st_size
    page = _rows(db_path, "PRAGMA page_size")[0][0]
    with db_path.open("r+b") as f:
        f.truncate(max(page * 3, size // 3))

    backend = open_sqlite()
    failures: list[Exception] = []
    for i in range(50):
        try:
            await backend.load_state(f"r{i}")
        except Exception as exc:  # every error is checked below
            failures.append(exc)
    assert failures  # half the runs are gone: reading them cannot succeed
    for exc in failures:
        assert isinstance(exc, (CorruptStateError, StateBackendError)), repr(exc)


# -- storage failures ------------------------------------------------------------------------------


async def test_a_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dir" / "flujo.db"
    backend = SQLiteBackend(missing)  # nothing happens until first use

    with pytest.raises(StateBackendError) as info:
        await backend.load_state("r")
    assert str(missing.parent) in str(info.value)
    with pytest.raises(StateBackendError):
        await backend.save_state("r", sample_state("r"))
    with pytest.raises(StateBackendError):
        await backend.list_runs()
    assert not (tmp_path / "no").exists()
    await backend.aclose()


async def test_a_database_path_that_is_a_directory_fails_cleanly(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path)
    with pytest.raises(StateBackendError):
        await backend.save_state("r", sample_state("r"))
    await backend.aclose()


async def test_a_read_only_database_fails_cleanly(
    open_sqlite: Callable[..., SQLiteBackend], db_path: Path, tmp_path: Path
) -> None:
    first = open_sqlite()
    await first.save_state("r", sample_state("r"))
    await first.aclose()
    dir_mode = tmp_path.stat().st_mode
    db_path.chmod(stat.S_IRUSR)
    tmp_path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(db_path, os.W_OK) or os.access(tmp_path, os.W_OK):
            pytest.skip("running with privileges that ignore file permissions (root)")
        backend = open_sqlite()
        with pytest.raises(StateBackendError):
            await backend.save_state("r", sample_state("r", status="failed"))
        with pytest.raises(StateBackendError):
            await backend.write_checkpoint(checkpoint(backend, "r", 2))
        await backend.aclose()
    finally:
        tmp_path.chmod(dir_mode)
        db_path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert await open_sqlite().load_state("r") == sample_state("r")


async def test_a_read_only_directory_without_a_database_fails_cleanly(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(directory, os.W_OK):
            pytest.skip("running with privileges that ignore file permissions (root)")
        backend = SQLiteBackend(directory / "flujo.db")
        with pytest.raises(StateBackendError):
            await backend.save_state("r", sample_state("r"))
        await backend.aclose()
    finally:
        directory.chmod(stat.S_IRWXU)


def _fill_the_disk(backend: SQLiteBackend) -> int:
    """Cap the database at its current size (SQLite then reports SQLITE_FULL)."""
    conn = backend._connection()
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    conn.execute(f"PRAGMA max_page_count = {pages}")
    return pages


async def test_disk_full_during_a_checkpoint_keeps_the_previous_one(
    sqlite_backend: SQLiteBackend,
) -> None:
    await sqlite_backend.write_checkpoint(
        checkpoint(sqlite_backend, "r", 0, header=run_header(), context={"a": 1}, output="o")
    )
    await sqlite_backend.write_checkpoint(
        checkpoint(sqlite_backend, "r", 1, context={"a": 2}, steps=[{"i": 0}], index=1)
    )
    before = await sqlite_backend.load_state("r")
    pages = _fill_the_disk(sqlite_backend)

    with pytest.raises(StateBackendError) as info:
        await sqlite_backend.write_checkpoint(
            checkpoint(
                sqlite_backend,
                "r",
                2,
                context={"a": 3, "big": "x" * 500_000},
                steps=[{"i": 1, "blob": "y" * 200_000}],
                step_offset=1,
                output="new",
                index=2,
            )
        )

    assert "full" in str(info.value)
    assert await sqlite_backend.load_state("r") == before
    # Once there is room again, the same checkpoint goes through.
    sqlite_backend._connection().execute(f"PRAGMA max_page_count = {pages * 1000}")
    assert await sqlite_backend.write_checkpoint(checkpoint(sqlite_backend, "r", 2)) == 3


async def test_disk_full_during_a_save_keeps_the_previous_state(
    sqlite_backend: SQLiteBackend,
) -> None:
    """save_state deletes and re-inserts the run; a failure must roll the delete back."""
    await sqlite_backend.save_state("r", sample_state("r"))
    _fill_the_disk(sqlite_backend)

    with pytest.raises(StateBackendError):
        await sqlite_backend.save_state(
            "r", sample_state("r", pipeline_context={"big": "x" * 500_000}, version=9)
        )

    assert await sqlite_backend.load_state("r") == sample_state("r")
    with pytest.raises(StateBackendError):
        await sqlite_backend.save_state(
            "new", sample_state("new", pipeline_context={"big": "x" * 500_000})
        )
    assert await sqlite_backend.load_state("new") is None


async def test_a_connection_closed_underneath_fails_cleanly_and_aclose_recovers(
    sqlite_backend: SQLiteBackend,
) -> None:
    await sqlite_backend.save_state("r", sample_state("r"))
    sqlite_backend._connection().close()

    with pytest.raises(StateBackendError):
        await sqlite_backend.load_state("r")
    with pytest.raises(StateBackendError):
        await sqlite_backend.write_checkpoint(checkpoint(sqlite_backend, "r", 2))

    await sqlite_backend.aclose()
    assert await sqlite_backend.load_state("r") == sample_state("r")
    assert await sqlite_backend.write_checkpoint(checkpoint(sqlite_backend, "r", 2)) == 3


async def test_aclose_reopens_the_file(sqlite_backend: SQLiteBackend, db_path: Path) -> None:
    await sqlite_backend.save_state("r", sample_state("r"))
    await sqlite_backend.aclose()
    assert sqlite_backend._conn is None
    assert not Path(f"{db_path}-wal").exists() or Path(f"{db_path}-wal").stat().st_size == 0

    assert await sqlite_backend.load_state("r") == sample_state("r")
    assert sqlite_backend._conn is not None


# -- bulk deletion leaves nothing behind -----------------------------------------------------------


async def test_deletes_leave_no_rows_behind(sqlite_backend: SQLiteBackend, db_path: Path) -> None:
    for i in range(4):
        header = run_header(metadata={"tenant": "acme", "i": i, "nested": {"x": 1}})
        await sqlite_backend.write_checkpoint(
            checkpoint(
                sqlite_backend,
                f"r{i}",
                0,
                header=header,
                context={"a": i, "b": [i]},
                steps=[{"i": 0}, {"i": 1}],
                updated_at=1000.0 + i,
            )
        )
    tables = ("runs", "run_context", "run_steps", "run_metadata")

    def counts() -> dict[str, int]:
        return {t: _rows(db_path, f"SELECT COUNT(*) FROM {t}")[0][0] for t in tables}

    # Only scalar metadata is indexed: two keys per run.
    assert counts() == {"runs": 4, "run_context": 8, "run_steps": 8, "run_metadata": 8}

    await sqlite_backend.delete_state("r0")
    assert await sqlite_backend.delete_runs(updated_before=to_datetime(1002.0)) == 1  # r1

    assert counts() == {"runs": 2, "run_context": 4, "run_steps": 4, "run_metadata": 4}
    left = {
        row[0] for table in tables for row in _rows(db_path, f"SELECT DISTINCT run_id FROM {table}")
    }
    assert left == {"r2", "r3"}


class _LockedAtFirst:
    """A connection whose first ``locked`` calls of ``PRAGMA journal_mode`` fail as SQLite
    fails them while another process switches a new file to WAL."""

    def __init__(self, locked: int) -> None:
        self.locked = locked
        self.calls = 0

    def execute(self, sql: str) -> None:
        self.calls += 1
        if self.calls <= self.locked:
            raise sqlite3.OperationalError("database is locked")


def test_switching_to_wal_waits_for_another_process(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "new.db", busy_timeout_s=5.0)
    conn = _LockedAtFirst(locked=3)
    backend._enter_wal(conn)  # type: ignore[arg-type]
    assert conn.calls == 4


def test_switching_to_wal_gives_up_after_the_busy_timeout(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "new.db", busy_timeout_s=0.05)
    with pytest.raises(StateBackendError, match="database is locked"):
        backend._enter_wal(_LockedAtFirst(locked=10**9))  # type: ignore[arg-type]


def test_many_processes_open_a_new_store_at_once(tmp_path: Path) -> None:
    """Eight processes create the same new store at the same moment: all of them open it."""
    script = (
        "import asyncio, sys\n"
        "from flujo.state import SQLiteBackend\n"
        "asyncio.run(SQLiteBackend(sys.argv[1]).migrate())\n"
    )
    for trial in range(3):
        path = tmp_path / f"new-{trial}.db"
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(path)], stderr=subprocess.PIPE, text=True
            )
            for _ in range(8)
        ]
        for process in processes:
            _, err = process.communicate(timeout=60)
            assert process.returncode == 0, err
