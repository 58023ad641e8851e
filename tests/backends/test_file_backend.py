"""FileBackend specifics: its file format, corrupt files, write failures, the write cache."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from backend_helpers import checkpoint, run_header, sample_state

import flujo.state.backends.file as file_module
from flujo.exceptions import (
    CorruptStateError,
    SchemaVersionError,
    StateBackendError,
    StateConflictError,
)
from flujo.state import FileBackend


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
async def file_backend(directory: Path) -> AsyncIterator[FileBackend]:
    backend = FileBackend(directory)
    yield backend
    await backend.aclose()


def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# -- the file format -------------------------------------------------------------------------------


async def test_one_json_file_per_run_with_a_format_version(
    file_backend: FileBackend, directory: Path
) -> None:
    await file_backend.save_state("run-1", sample_state("run-1"))
    await file_backend.write_checkpoint(checkpoint(file_backend, "run-1", 2, context={"n": 1}))

    assert sorted(p.name for p in directory.iterdir()) == [".flujo.lock", "run-1.json"]
    data = orjson.loads((directory / "run-1.json").read_bytes())
    assert data["format"] == file_module.FORMAT_VERSION == 1
    assert data["run_id"] == "run-1"
    assert data["version"] == 3
    assert data["pipeline_context"]["n"] == 1
    assert _temp_files(directory) == []


async def test_the_directory_is_created_on_first_write(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b" / "runs"
    backend = FileBackend(directory)

    assert await backend.load_state("r") is None
    assert await backend.list_runs() == []
    await backend.delete_state("r")
    assert not directory.exists()  # reads and deletes create nothing

    await backend.save_state("r", sample_state("r"))
    assert (directory / "r.json").is_file()


async def test_a_directory_path_that_is_a_file_fails_cleanly(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "runs"
    not_a_dir.write_bytes(b"i am a file")
    backend = FileBackend(not_a_dir)

    with pytest.raises(StateBackendError):
        await backend.save_state("r", sample_state("r"))
    assert not_a_dir.read_bytes() == b"i am a file"


async def test_list_runs_ignores_stray_files(file_backend: FileBackend, directory: Path) -> None:
    await file_backend.save_state("r", sample_state("r"))
    (directory / ".r.json.123.deadbeef.tmp").write_bytes(b'{"half": ')  # a crashed writer's
    (directory / "notes.txt").write_text("hello")
    (directory / ".hidden.json").write_bytes(b"{}")

    assert [run["run_id"] for run in await file_backend.list_runs()] == ["r"]
    assert await file_backend.load_state("r") == sample_state("r")


async def test_a_hand_written_file_that_looks_like_code_loads_as_data(
    file_backend: FileBackend, directory: Path
) -> None:
    await file_backend.save_state("r", sample_state("r"))
    data = orjson.loads((directory / "r.json").read_bytes())
    evil = {"__class__": "os.system", "args": ["touch pwned"], "py/reduce": "os.system"}
    data["pipeline_context"]["x"] = evil
    data["last_step_output"] = "!!python/object/apply:os.system ['touch pwned']"
    (directory / "r.json").write_bytes(orjson.dumps(data))

    loaded = await FileBackend(directory).load_state("r")

    assert loaded is not None
    assert loaded["pipeline_context"]["x"] == evil
    assert loaded["last_step_output"] == "!!python/object/apply:os.system ['touch pwned']"


# -- corrupt files ---------------------------------------------------------------------------------


def _valid_file(run_id: str = "r") -> dict[str, Any]:
    return {
        "format": 1,
        "run_id": run_id,
        "pipeline_id": "p",
        "pipeline_name": "p",
        "pipeline_version": "1",
        "status": "running",
        "current_step_index": 0,
        "version": 1,
        "created_at": 1.0,
        "updated_at": 2.0,
        "step_names": [],
        "initial_input": None,
        "last_step_output": None,
        "error": None,
        "pipeline_context": {},
        "step_history": [],
    }


def _with(**changes: Any) -> bytes:
    data = _valid_file()
    for key, value in changes.items():
        if value is _DROP:
            del data[key]
        else:
            data[key] = value
    return orjson.dumps(data)


_DROP: Any = object()

CORRUPT_FILES = [
    pytest.param(b"", id="empty"),
    pytest.param(_with()[:40], id="truncated"),
    pytest.param(_with()[:-1], id="truncated-last-byte"),
    pytest.param(os.urandom(64) + b"\xff\xfe", id="garbage-bytes"),
    pytest.param(b"\x00" * 128, id="nul-bytes"),
    pytest.param(b"[1, 2, 3]", id="json-list"),
    pytest.param(b'"just a string"', id="json-string"),
    pytest.param(b"null", id="json-null"),
    pytest.param(b"{}", id="empty-object"),
    pytest.param(_with(format=_DROP), id="no-format"),
    pytest.param(_with(format="1"), id="format-as-string"),
    pytest.param(_with(format=True), id="format-as-bool"),
    pytest.param(_with(run_id="someone-else"), id="another-runs-file"),
    pytest.param(_with(status=3), id="status-not-a-string"),
    pytest.param(_with(version="1"), id="version-not-an-int"),
    pytest.param(_with(current_step_index=_DROP), id="no-step-index"),
    pytest.param(_with(created_at="yesterday"), id="created-at-not-a-number"),
    pytest.param(_with(pipeline_context=[]), id="context-not-an-object"),
    pytest.param(_with(step_history={}), id="history-not-a-list"),
    pytest.param(_with(step_names="abc"), id="step-names-not-a-list"),
    pytest.param(_with(last_step_output=_DROP), id="no-last-output"),
    pytest.param(_with(error="boom"), id="error-not-an-object"),
]


@pytest.mark.parametrize("content", CORRUPT_FILES)
async def test_a_corrupt_file_gives_corrupt_state_error(
    file_backend: FileBackend, directory: Path, content: bytes
) -> None:
    await file_backend.save_state("ok", sample_state("ok"))
    (directory / "r.json").write_bytes(content)

    with pytest.raises(CorruptStateError) as info:
        await file_backend.load_state("r")
    assert info.value.run_id == "r"

    # A checkpoint does not overwrite what it cannot read.
    with pytest.raises(CorruptStateError):
        await file_backend.write_checkpoint(checkpoint(file_backend, "r", 1, context={"a": 1}))
    assert (directory / "r.json").read_bytes() == content
    assert _temp_files(directory) == []

    # Other runs are unaffected, listing skips the bad file, and deleting it recovers the id.
    assert [run["run_id"] for run in await file_backend.list_runs()] == ["ok"]
    assert await file_backend.load_state("ok") == sample_state("ok")
    await file_backend.delete_state("r")
    assert await file_backend.load_state("r") is None


@pytest.mark.parametrize("found", [2, 99, 0, -1])
async def test_a_file_of_another_format_gives_schema_version_error(
    file_backend: FileBackend, directory: Path, found: int
) -> None:
    content = _with(format=found, some_new_field={"x": 1})
    directory.mkdir(parents=True)
    (directory / "r.json").write_bytes(content)

    with pytest.raises(SchemaVersionError) as info:
        await file_backend.load_state("r")
    assert info.value.found == found
    assert info.value.expected == 1
    assert isinstance(info.value, StateBackendError)

    with pytest.raises(SchemaVersionError):
        await file_backend.write_checkpoint(checkpoint(file_backend, "r", 1))
    assert (directory / "r.json").read_bytes() == content
    assert await file_backend.list_runs() == []


async def test_a_file_changed_behind_the_backends_back_is_reread(
    file_backend: FileBackend, directory: Path
) -> None:
    """The write cache must not hide a file another process replaced with garbage."""
    await file_backend.write_checkpoint(checkpoint(file_backend, "r", 0, header=run_header()))
    (directory / "r.json").write_bytes(b"garbage that is not json at all, longer than before" * 9)

    with pytest.raises(CorruptStateError):
        await file_backend.write_checkpoint(checkpoint(file_backend, "r", 1))


# -- write failures --------------------------------------------------------------------------------


_CHUNK = 1024 * 1024


class _FailingOs:
    """Stands in for the ``os`` module inside flujo.state.backends.file; one call fails."""

    def __init__(self, failing: str, error: int = errno.ENOSPC, *, after: int = 0) -> None:
        self.failing = failing
        self.error = error
        self.after = after  # calls that still succeed before the failures start
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(os, name)
        if name != self.failing:
            return real

        def fail(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls > self.after:
                raise OSError(self.error, os.strerror(self.error))
            if name == "write":  # a short write, so that there is a next chunk to fail
                fd, data = args
                return real(fd, data[:_CHUNK])
            return real(*args, **kwargs)

        return fail


@pytest.mark.parametrize(
    ("failing", "error", "after"),
    [
        ("write", errno.ENOSPC, 0),
        ("write", errno.ENOSPC, 1),  # the first chunk is written, then the disk is full
        ("write", errno.EDQUOT, 0),
        ("fsync", errno.ENOSPC, 0),
        ("fsync", errno.EIO, 0),
        ("replace", errno.EACCES, 0),
        ("open", errno.EMFILE, 1),  # the lock file opens, the temp file does not
    ],
)
async def test_a_failed_write_keeps_the_old_file(
    file_backend: FileBackend,
    directory: Path,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
    error: int,
    after: int,
) -> None:
    await file_backend.save_state("r", sample_state("r"))
    before_bytes = (directory / "r.json").read_bytes()
    before = await file_backend.load_state("r")
    big_enough_for_two_chunks = "x" * (2 * _CHUNK)

    monkeypatch.setattr(file_module, "os", _FailingOs(failing, error, after=after))
    with pytest.raises(StateBackendError) as info:
        await file_backend.write_checkpoint(
            checkpoint(
                file_backend,
                "r",
                2,
                context={"big": big_enough_for_two_chunks},
                steps=[{"new": 1}],
                step_offset=2,
            )
        )
    monkeypatch.undo()

    assert os.strerror(error) in str(info.value) or str(error) in str(info.value)
    assert (directory / "r.json").read_bytes() == before_bytes
    assert await file_backend.load_state("r") == before
    assert _temp_files(directory) == []
    # The failure left no stale cache behind: the same checkpoint can be retried.
    assert (
        await file_backend.write_checkpoint(checkpoint(file_backend, "r", 2, context={"n": 1})) == 3
    )
    assert await FileBackend(directory).load_state("r") == await file_backend.load_state("r")


async def test_a_failed_first_write_creates_no_run(
    file_backend: FileBackend, directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await file_backend.save_state("other", sample_state("other"))
    monkeypatch.setattr(file_module, "os", _FailingOs("fsync"))

    with pytest.raises(StateBackendError):
        await file_backend.write_checkpoint(checkpoint(file_backend, "r", 0, header=run_header()))
    monkeypatch.undo()

    assert await file_backend.load_state("r") is None
    assert _temp_files(directory) == []
    assert (
        await file_backend.write_checkpoint(checkpoint(file_backend, "r", 0, header=run_header()))
        == 1
    )


def _chmod_denies_writes(path: Path) -> bool:
    return not os.access(path, os.W_OK)


async def test_a_read_only_directory_fails_cleanly(
    file_backend: FileBackend, directory: Path
) -> None:
    await file_backend.save_state("r", sample_state("r"))
    mode = directory.stat().st_mode
    directory.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if not _chmod_denies_writes(directory):
            pytest.skip("running with privileges that ignore file permissions (root)")
        with pytest.raises(StateBackendError):
            await file_backend.write_checkpoint(checkpoint(file_backend, "r", 2, context={"a": 1}))
        with pytest.raises(StateBackendError):
            await file_backend.save_state("new", sample_state("new"))
        with pytest.raises(StateBackendError):
            await file_backend.delete_state("r")
        assert await file_backend.load_state("r") == sample_state("r")
    finally:
        directory.chmod(mode)
    assert _temp_files(directory) == []
    assert await file_backend.load_state("new") is None


async def test_an_unreadable_file_fails_cleanly(file_backend: FileBackend, directory: Path) -> None:
    await file_backend.save_state("r", sample_state("r"))
    path = directory / "r.json"
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running with privileges that ignore file permissions (root)")
        with pytest.raises(StateBackendError):
            await file_backend.load_state("r")
    finally:
        path.chmod(0o644)


# -- the write cache and other writers -------------------------------------------------------------


async def test_a_stale_cache_never_lets_a_stale_writer_win(
    directory: Path, make_two: Callable[[], tuple[FileBackend, FileBackend]]
) -> None:
    """Two processes (two backends) on one directory, on a filesystem with coarse timestamps.

    ``second`` caches the run at version 2, keyed by the file's (inode, mtime, size). ``first``
    then advances the run; ext4 soon hands the freed inode of version 2 to a newer version of
    the same size. On a filesystem whose timestamps are coarser than two writes (emulated
    here with os.utime), the file now has the identity ``second`` cached, so ``second``'s
    compare-and-swap passes against its cached version 2 and overwrites what ``first`` wrote.
    """
    first, second = make_two()
    await first.write_checkpoint(checkpoint(first, "r", 0, header=run_header()))
    await second.write_checkpoint(checkpoint(second, "r", 1, context={"n": 2}))
    path = directory / "r.json"
    cached = path.stat()
    for version in range(2, 9):  # same-sized files: one-digit versions and values
        await first.write_checkpoint(checkpoint(first, "r", version, context={"n": version + 1}))
        now = path.stat()
        if (now.st_ino, now.st_size) == (cached.st_ino, cached.st_size):
            break
    else:
        pytest.skip("this filesystem did not reuse the inode; the race needs it")
    os.utime(path, ns=(now.st_atime_ns, cached.st_mtime_ns))  # a coarse-timestamp filesystem
    before = await first.load_state("r")

    with pytest.raises(StateConflictError):
        await second.write_checkpoint(checkpoint(second, "r", 2, context={"n": 99}))

    assert await first.load_state("r") == before


@pytest.fixture
async def make_two(directory: Path) -> AsyncIterator[Callable[[], tuple[FileBackend, FileBackend]]]:
    opened: list[FileBackend] = []

    def make() -> tuple[FileBackend, FileBackend]:
        opened.extend([FileBackend(directory), FileBackend(directory)])
        return opened[-2], opened[-1]

    yield make
    for backend in opened:
        await backend.aclose()


async def test_a_run_deleted_by_another_writer_is_not_revived_from_cache(
    directory: Path, make_two: Callable[[], tuple[FileBackend, FileBackend]]
) -> None:
    first, second = make_two()
    await first.write_checkpoint(checkpoint(first, "r", 0, header=run_header()))
    await second.delete_state("r")

    with pytest.raises(StateConflictError):
        await first.write_checkpoint(checkpoint(first, "r", 1))
    assert await first.load_state("r") is None
