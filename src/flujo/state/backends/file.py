"""FileBackend: one JSON file per run in a directory, replaced atomically on every checkpoint."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import orjson

from flujo.exceptions import (
    CorruptStateError,
    InvalidMetadataError,
    InvalidRunIdError,
    SchemaVersionError,
    StateBackendError,
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
    to_datetime,
    validate_run_id,
)

__all__ = ["FORMAT_VERSION", "FileBackend"]

logger = logging.getLogger("flujo.state.file")

#: The version of the file layout this code writes and reads.
FORMAT_VERSION = 1

_LOCK_NAME = ".flujo.lock"
_STR_FIELDS = ("pipeline_id", "pipeline_name", "pipeline_version", "status")


class FileBackend(StateBackend):
    """Stores each run as ``<directory>/<run_id>.json``.

    >>> import asyncio, tempfile
    >>> backend = FileBackend(tempfile.mkdtemp())
    >>> asyncio.run(backend.list_runs())
    []

    Every checkpoint writes a temporary file, fsyncs it, renames it over the run's file and
    fsyncs the directory, so a reader (or a restarted process) sees the old state or the new
    one, never a mix. Writers take an exclusive ``flock`` on ``<directory>/.flujo.lock`` for the
    compare-and-swap, so two processes cannot both advance one run. The directory is created on
    first write. Good for a few processes on one machine; prefer SQLite or Postgres beyond that.
    """

    writes_may_suspend: ClassVar[bool] = False  # its writes never await: nothing to protect

    def __init__(self, directory: str | Path, *, cache_size: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.directory = Path(directory)
        self._root: Path | None = None
        self._lock = threading.Lock()
        self._cache_size = cache_size
        # run_id -> (the write token of the file we last wrote, what it holds)
        self._cache: OrderedDict[str, tuple[str, StoredRun]] = OrderedDict()
        self._swept = False

    # -- paths -----------------------------------------------------------------------------------

    def _root_dir(self, *, create: bool) -> Path | None:
        if self._root is not None:
            return self._root
        try:
            if create:
                self.directory.mkdir(parents=True, exist_ok=True)
            elif not self.directory.is_dir():
                return None
            self._root = self.directory.resolve(strict=True)
        except OSError as exc:
            raise StateBackendError(f"cannot use state directory {self.directory}: {exc}") from exc
        return self._root

    def _path(self, root: Path, run_id: str) -> Path:
        validate_run_id(run_id)
        path = root / f"{run_id}.json"
        if path.parent != root:  # cannot happen for a valid id; checked all the same
            raise InvalidRunIdError(f"run id {run_id!r} escapes {root}", run_id=run_id)
        return path

    # -- writes ----------------------------------------------------------------------------------

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        """Apply ``checkpoint`` under the directory lock and replace the run's file."""
        run_id = validate_run_id(checkpoint.run_id)
        root = self._root_dir(create=True)
        assert root is not None
        path = self._path(root, run_id)
        with self._lock, _directory_lock(root):
            if not self._swept:
                _sweep_temp_files(root)
                self._swept = True
            run = self._current(path, run_id)
            check_version(checkpoint, None if run is None else run.version)
            self._cache.pop(run_id, None)  # re-added only once the new file is in place
            if run is None:
                run = StoredRun.create(checkpoint)
            else:
                run.apply(checkpoint)
            token = secrets.token_hex(8)
            _replace_file(root, path, _render(run, token))
            if run.status not in ("completed", "cancelled"):  # finished runs are rarely written
                self._cache[run_id] = (token, run)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            return run.version

    def _current(self, path: Path, run_id: str) -> StoredRun | None:
        """What the run's file holds now; from the cache when the file is the one we wrote.

        Every write stamps the file with a random token, at a fixed place at its start: if the
        token is still ours, no one else has replaced the file since, whatever the file system's
        timestamp resolution or inode reuse.
        """
        cached = self._cache.get(run_id)
        try:
            with path.open("rb") as handle:
                head = handle.read(len(_token_prefix("0" * 16)))
                if cached is not None and head == _token_prefix(cached[0]):
                    self._cache.move_to_end(run_id)
                    return cached[1]
                data = head + handle.read()
        except FileNotFoundError:
            self._cache.pop(run_id, None)
            return None
        except OSError as exc:
            raise StateBackendError(f"cannot read {path}: {exc}") from exc
        return _stored(run_id, _parse(data, run_id, path))

    async def save_state(self, run_id: str, state: dict[str, Any]) -> None:
        """Store ``state`` whole, replacing the run's file."""
        validate_run_id(run_id)
        await self.write_checkpoint(checkpoint_from_state(run_id, state, self.serializer))

    async def delete_state(self, run_id: str) -> None:
        """Remove the run's file."""
        validate_run_id(run_id)
        root = self._root_dir(create=False)
        if root is None:
            return
        path = self._path(root, run_id)
        with self._lock, _directory_lock(root):
            self._cache.pop(run_id, None)
            try:
                path.unlink()
            except FileNotFoundError:
                return
            except OSError as exc:
                raise StateBackendError(f"cannot delete {path}: {exc}") from exc
            _fsync_directory(root)

    # -- reads -----------------------------------------------------------------------------------

    def _read(self, path: Path, run_id: str) -> dict[str, Any] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateBackendError(f"cannot read {path}: {exc}") from exc
        return _parse(data, run_id, path)

    async def load_state(self, run_id: str) -> dict[str, Any] | None:
        """The stored state of ``run_id``, or None."""
        validate_run_id(run_id)
        root = self._root_dir(create=False)
        if root is None:
            return None
        return self._read(self._path(root, run_id), run_id)

    def _stored_runs(self) -> list[tuple[Path, StoredRun]]:
        """Every readable run in the directory (unreadable files are skipped with a warning)."""
        root = self._root_dir(create=False)
        if root is None:
            return []
        runs = []
        for path in root.glob("*.json"):
            if path.name.startswith("."):
                continue
            run_id = path.name[: -len(".json")]
            try:
                state = self._read(path, run_id)
                if state is not None:
                    runs.append((path, _stored(run_id, state)))
            except (CorruptStateError, StateBackendError, InvalidMetadataError) as exc:
                logger.warning("skipping unreadable run file %s: %s", path, exc)
        return runs

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
        """Summaries of stored runs, newest first (reads every file)."""
        wanted = metadata_filter_items(metadata_filter)
        after = None if since is None else epoch(since)
        runs = [
            run
            for _, run in self._stored_runs()
            if run.matches(status, pipeline_name, wanted, after)
        ]
        runs.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        start = max(offset, 0)
        return [run.summary() for run in runs[start : start + max(limit, 0)]]

    async def delete_runs(self, *, updated_before: datetime, status: str | None = None) -> int:
        """Delete runs last updated before ``updated_before`` (of ``status``)."""
        cutoff = epoch(updated_before)
        deleted = 0
        for _, run in self._stored_runs():
            if run.updated_at < cutoff and (status is None or run.status == status):
                await self.delete_state(run.run_id)
                deleted += 1
        return deleted


def _token_prefix(token: str) -> bytes:
    """How a run's file starts: its format and the token of the write that made it."""
    return b'{"format":%d,"token":"%s"' % (FORMAT_VERSION, token.encode("ascii"))


def _render(run: StoredRun, token: str) -> bytes:
    """The run's file: a JSON object assembled from the stored parts without re-serializing."""
    head = orjson.dumps(
        {
            "format": FORMAT_VERSION,
            "token": token,
            "run_id": run.run_id,
            "pipeline_id": run.pipeline_id,
            "pipeline_name": run.pipeline_name,
            "pipeline_version": run.pipeline_version,
            "status": run.status,
            "current_step_index": run.current_step_index,
            "version": run.version,
            "created_at": run.created_at,
            "updated_at": run.updated_at,
            "queue": run.queue,
            "priority": run.priority,
        }
    )
    context = b",".join(orjson.dumps(name) + b":" + value for name, value in run.context.items())
    return b"".join(
        (
            head[:-1],
            b',"step_names":',
            run.step_names,
            b',"initial_input":',
            run.initial_input,
            b',"last_step_output":',
            run.last_step_output,
            b',"error":',
            run.error or b"null",
            b',"metadata":',
            run.metadata,
            b',"usage":',
            run.usage or b"null",
            b',"pipeline_context":{',
            context,
            b'},"step_history":[',
            b",".join(run.steps),
            b"]}",
        )
    )


def _parse(data: bytes, run_id: str, path: Path) -> dict[str, Any]:
    """Check and return the state held in a run's file."""

    def bad(detail: str) -> CorruptStateError:
        return CorruptStateError(f"state file {path} is corrupt: {detail}", run_id=run_id)

    try:
        state = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise bad(f"not valid JSON ({exc})") from exc
    if not isinstance(state, dict):
        raise bad("not a JSON object")
    found = state.pop("format", None)
    state.pop("token", None)
    if not isinstance(found, int) or isinstance(found, bool):
        raise bad("no format version")
    if found != FORMAT_VERSION:
        raise SchemaVersionError(
            f"state file {path} has format {found}; this flujo reads format {FORMAT_VERSION}",
            found=found,
            expected=FORMAT_VERSION,
        )
    if state.get("run_id") != run_id:
        raise bad(f"it holds run {state.get('run_id')!r}")
    for key in _STR_FIELDS:
        if not isinstance(state.get(key), str):
            raise bad(f"{key} is missing or not a string")
    for key in ("current_step_index", "version"):
        if not isinstance(state.get(key), int):
            raise bad(f"{key} is missing or not an integer")
    for key in ("created_at", "updated_at"):
        if not isinstance(state.get(key), (int, float)):
            raise bad(f"{key} is missing or not a number")
    if not isinstance(state.get("pipeline_context"), dict):
        raise bad("pipeline_context is missing or not an object")
    for key in ("step_history", "step_names"):
        if not isinstance(state.get(key), list):
            raise bad(f"{key} is missing or not a list")
    if "last_step_output" not in state or "initial_input" not in state:
        raise bad("last_step_output or initial_input is missing")
    if state.get("error") is not None and not isinstance(state["error"], dict):
        raise bad("error is not an object")
    if not isinstance(state.setdefault("metadata", {}), dict):
        raise bad("metadata is not an object")
    if state.setdefault("usage", None) is not None and not isinstance(state["usage"], dict):
        raise bad("usage is not an object")
    if state.setdefault("queue", None) is not None and not isinstance(state["queue"], str):
        raise bad("queue is not a string")
    priority = state.setdefault("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise bad("priority is not an integer")
    state.update(locked_by=None, lease_expires_at=None, cancel_requested=False)
    state["created_at"] = to_datetime(state["created_at"])
    state["updated_at"] = to_datetime(state["updated_at"])
    return state


def _stored(run_id: str, state: dict[str, Any]) -> StoredRun:
    """A checked state dict (from a file) as stored parts."""
    dumps = orjson.dumps
    return StoredRun(
        run_id=run_id,
        pipeline_id=state["pipeline_id"],
        pipeline_name=state["pipeline_name"],
        pipeline_version=state["pipeline_version"],
        step_names=dumps(state["step_names"]),
        initial_input=dumps(state["initial_input"]),
        created_at=state["created_at"].timestamp(),
        status=state["status"],
        current_step_index=state["current_step_index"],
        updated_at=state["updated_at"].timestamp(),
        version=state["version"],
        last_step_output=dumps(state["last_step_output"]),
        error=None if state.get("error") is None else dumps(state["error"]),
        context={name: dumps(value) for name, value in state["pipeline_context"].items()},
        steps=[dumps(record) for record in state["step_history"]],
        metadata=dumps(state["metadata"]),
        usage=None if state.get("usage") is None else dumps(state["usage"]),
        queue=state["queue"],
        priority=state["priority"],
    )


class _directory_lock:
    """An exclusive ``flock`` on the directory's lock file (excludes other processes)."""

    def __init__(self, root: Path) -> None:
        self.path = root / _LOCK_NAME
        self.fd = -1

    def __enter__(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as exc:
            if self.fd >= 0:
                os.close(self.fd)
            raise StateBackendError(f"cannot lock {self.path}: {exc}") from exc

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the lock


def _sweep_temp_files(root: Path) -> None:
    """Remove temporary files left by writers that died mid-write (call under the lock)."""
    for leftover in root.glob(".*.json.*.tmp"):
        try:
            leftover.unlink()
        except OSError as exc:
            logger.warning("cannot remove leftover temporary file %s: %s", leftover, exc)


def _replace_file(root: Path, path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync dir)."""
    tmp = root / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StateBackendError(f"cannot write {path}: {exc}") from exc
    _fsync_directory(root)


def _fsync_directory(root: Path) -> None:
    try:
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StateBackendError(f"cannot sync directory {root}: {exc}") from exc
