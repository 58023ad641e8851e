"""The app the worker processes of test_worker_processes.py run (``--app _worker_app:registry``).

One pipeline, ``counted@1.0.0``, of ``FLUJO_TEST_STEPS`` steps (default 10). Step ``i`` turns
its input ``"r<n>"...`` into ``"<input>-<i>"``, so a run's final output ``"r<n>-0-1-...-9"``
shows that every step's committed output was used once, in order. Every execution of a step
is logged by the step itself, outside flujo's store and checkpoints:

- it notes its start (run id, step index, process id, ``time.time()``) before doing anything,
- sleeps ``FLUJO_TEST_STEP_SLEEP`` seconds (default 0.005: the step is "in flight" a while),
- notes its end, then returns.

The log goes to the table ``step_log`` of the Postgres schema ``FLUJO_TEST_LOG_SCHEMA`` at
``FLUJO_TEST_LOG_DSN`` (a pool of this process's own), or, with ``FLUJO_TEST_LOG_DIR``, to the
file ``<pid>.log`` in that directory: ``S <exec> <run_id> <step> <pid> <time>`` and
``E <exec> <time>`` lines, each written by one ``os.write`` on an ``O_APPEND`` descriptor, so a
line is complete on disk the moment it is written (and survives a SIGKILL right after).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any

from flujo import Pipeline, PipelineContext, PipelineRegistry, Step

PIPELINE = "counted"
VERSION = "1.0.0"
#: The side table the steps log into (Postgres); the test creates it.
LOG_TABLE_SQL = """
CREATE TABLE step_log (
    exec_id bigserial PRIMARY KEY,
    run_id text NOT NULL,
    step integer NOT NULL,
    pid integer NOT NULL,
    started double precision NOT NULL,
    ended double precision
)
"""


class _PostgresLog:
    """Start and end rows in ``step_log``, through a pool opened on first use."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self._pool: Any = None
        self._lock: asyncio.Lock | None = None

    async def _get_pool(self) -> Any:
        if self._pool is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._pool is None:
                    import asyncpg  # only the Postgres test needs it

                    self._pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=1,
                        max_size=3,
                        server_settings={"search_path": self.schema},
                    )
        return self._pool

    async def start(self, run_id: str, step: int) -> Any:
        pool = await self._get_pool()
        return await pool.fetchval(
            "INSERT INTO step_log (run_id, step, pid, started) VALUES ($1, $2, $3, $4) "
            "RETURNING exec_id",
            run_id,
            step,
            os.getpid(),
            time.time(),
        )

    async def end(self, exec_id: Any) -> None:
        pool = await self._get_pool()
        await pool.execute(
            "UPDATE step_log SET ended = $2 WHERE exec_id = $1", exec_id, time.time()
        )


class _FileLog:
    """``S``/``E`` lines in ``<directory>/<pid>.log``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._pid = 0
        self._ids = itertools.count()

    def _write(self, line: str) -> None:
        if self._fd is None or self._pid != os.getpid():
            self._pid = os.getpid()
            path = os.path.join(self.directory, f"{self._pid}.log")
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(self._fd, line.encode())

    async def start(self, run_id: str, step: int) -> Any:
        exec_id = f"{os.getpid()}.{next(self._ids)}"
        self._write(f"S {exec_id} {run_id} {step} {os.getpid()} {time.time()!r}\n")
        return exec_id

    async def end(self, exec_id: Any) -> None:
        self._write(f"E {exec_id} {time.time()!r}\n")


_log: _PostgresLog | _FileLog | None = None


def _get_log() -> _PostgresLog | _FileLog:
    global _log  # noqa: PLW0603 - one log per process, opened on first use
    if _log is None:
        directory = os.environ.get("FLUJO_TEST_LOG_DIR")
        if directory:
            _log = _FileLog(directory)
        else:
            _log = _PostgresLog(
                os.environ["FLUJO_TEST_LOG_DSN"], os.environ["FLUJO_TEST_LOG_SCHEMA"]
            )
    return _log


def _counted_step(index: int) -> Step[Any, Any]:
    async def fn(data: str, *, context: PipelineContext) -> str:
        log = _get_log()
        exec_id = await log.start(context.run_id, index)
        await asyncio.sleep(float(os.environ.get("FLUJO_TEST_STEP_SLEEP", "0.005")))
        await log.end(exec_id)
        return f"{data}-{index}"

    return Step.from_callable(fn, name=f"s{index}")


def build_registry(steps: int) -> PipelineRegistry:
    """A registry holding ``counted@1.0.0`` with ``steps`` steps."""
    built = PipelineRegistry()
    built.register(Pipeline.from_steps([_counted_step(i) for i in range(steps)]), PIPELINE, VERSION)
    return built


def expected_output(initial: str, steps: int) -> str:
    return initial + "".join(f"-{i}" for i in range(steps))


registry = build_registry(int(os.environ.get("FLUJO_TEST_STEPS", "10")))
