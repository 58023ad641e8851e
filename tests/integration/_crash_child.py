"""Child process of the crash tests: runs (or resumes) a 10-step pipeline, and may kill itself.

Run as ``python _crash_child.py '<json config>'``; it prints one JSON line with the outcome:
``{"status": ..., "output": ...}`` when the run returned, or ``{"error": "<class name>", ...}``
when ``run_async`` raised. Config keys (all but the first four optional):

- ``backend``: ``"sqlite"``, ``"file"`` or ``"postgres"``; ``store``: the database file, the
  state directory, or for Postgres the DSN; ``schema``: the Postgres schema (already migrated);
  ``run_id``; ``effects``: the side-effect file (each step appends ``"<index>\\n"`` with one
  ``os.write`` on an ``O_APPEND`` descriptor, so a line is on disk the moment it is written).
- ``kill``: ``[point, k]``: SIGKILL this process at ``point`` of step ``k``:
  ``enter`` (before the side effect), ``after_effect`` (side effect done, checkpoint not yet
  written), ``after_commit`` (in the post_step hook: the checkpoint committed),
  ``sqlite_before_commit`` (every statement of step k's checkpoint executed, no COMMIT),
  ``file_before_replace`` (temp file written and fsynced, not yet renamed over the run's file),
  ``file_after_replace`` (renamed, directory not yet fsynced).
- ``fail_step``: that step raises (the run is stored as failed).
- ``barrier``: ``[directory, step, count]``: on entering ``step``, wait until ``count``
  processes have arrived (each drops a file in ``directory``). All of them have loaded the run
  by then, and none has written a checkpoint since.
- ``sleep_ms``: ``[low, high]``: each step sleeps a random time in that range (``seed`` seeds it).
- ``announce``: print ``ready`` (and flush) just before the run starts.
"""

import asyncio
import json
import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from flujo import Flujo, Pipeline, PipelineContext, Step
from flujo.state.backends.base import Checkpoint, StateBackend
from flujo.state.backends.file import FileBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend

STEPS = 10
PIPELINE_NAME = "crash-test"
BARRIER_WAIT_S = 60.0

config: dict[str, Any] = json.loads(sys.argv[1])
kill_point, kill_step = config.get("kill") or (None, -1)
fail_step: int = config.get("fail_step", -1)
barrier: list[Any] | None = config.get("barrier")
sleep_ms: list[float] | None = config.get("sleep_ms")
rng = random.Random(config.get("seed", 0))
effects_fd = os.open(config["effects"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def die() -> None:
    """Die the way a crashed process dies: no cleanup, no flush, no atexit."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # pragma: no cover - SIGKILL cannot be caught
    os._exit(99)  # pragma: no cover


def is_kill_checkpoint(checkpoint: Checkpoint) -> bool:
    """True for the checkpoint that records step ``kill_step`` as done."""
    return (
        checkpoint.current_step_index == kill_step + 1
        and checkpoint.status in ("running", "completed")
        and bool(checkpoint.steps)
    )


class KillingSQLiteBackend(SQLiteBackend):
    """Dies inside the transaction of step k's checkpoint, after its statements ran."""

    def _write(self, conn: sqlite3.Connection, cp: Checkpoint) -> int:
        version = super()._write(conn, cp)
        if kill_point == "sqlite_before_commit" and is_kill_checkpoint(cp):
            assert conn.in_transaction
            die()
        return version


class KillingFileBackend(FileBackend):
    """Dies around the rename that publishes step k's checkpoint."""

    writing: Checkpoint | None = None

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        KillingFileBackend.writing = checkpoint
        try:
            return await super().write_checkpoint(checkpoint)
        finally:
            KillingFileBackend.writing = None


_real_replace = os.replace


def _replace(src: Any, dst: Any, **kwargs: Any) -> None:
    writing = KillingFileBackend.writing
    target = writing is not None and is_kill_checkpoint(writing)
    if target and kill_point == "file_before_replace":
        assert Path(src).stat().st_size > 0
        die()
    _real_replace(src, dst, **kwargs)
    if target and kill_point == "file_after_replace":
        die()


os.replace = _replace  # the file backend calls os.replace through the os module


def make_backend() -> StateBackend:
    if config["backend"] == "sqlite":
        return KillingSQLiteBackend(config["store"])
    if config["backend"] == "postgres":
        return PostgresBackend(config["store"], schema=config["schema"], pool_max=2)
    return KillingFileBackend(config["store"])


async def wait_at_barrier(directory: Path, count: int) -> None:
    (directory / f"arrived.{os.getpid()}").touch()
    deadline = time.monotonic() + BARRIER_WAIT_S
    while len(list(directory.glob("arrived.*"))) < count:
        if time.monotonic() > deadline:
            print(json.dumps({"error": "BarrierTimeout"}), flush=True)
            os._exit(3)
        await asyncio.sleep(0.001)


def make_step(index: int) -> Step[list[int], list[int]]:
    async def run(data: list[int], context: PipelineContext) -> list[int]:
        if kill_point == "enter" and index == kill_step:
            die()
        if barrier is not None and index == barrier[1]:
            await wait_at_barrier(Path(barrier[0]), barrier[2])
        if index == fail_step:
            raise RuntimeError(f"step {index} fails on purpose")
        os.write(effects_fd, f"{index}\n".encode())
        # The context changes with every step too, so a torn checkpoint would show as a
        # context that disagrees with the step history.
        context.scratchpad["done"] = [*context.scratchpad.get("done", []), index]
        if sleep_ms is not None:
            await asyncio.sleep(rng.uniform(*sleep_ms) / 1000)
        if kill_point == "after_effect" and index == kill_step:
            die()
        return [*data, index]

    return Step.from_callable(run, name=f"s{index}")


def post_step_hook(event: Any) -> None:
    if (
        kill_point == "after_commit"
        and event.event_name == "post_step"
        and event.step_result.index == kill_step
    ):
        die()


async def main() -> None:
    pipeline: Pipeline[list[int], list[int]] = Pipeline.from_steps(
        [make_step(i) for i in range(STEPS)]
    )
    runner = Flujo(
        pipeline,
        state_backend=make_backend(),
        pipeline_name=PIPELINE_NAME,
        hooks=[post_step_hook],
    )
    if config.get("announce"):
        print("ready", flush=True)
    outcome: dict[str, Any]
    try:
        async with runner:
            result = await runner.run_async([], run_id=config["run_id"])
        outcome = {"status": result.status, "output": result.output}
    except Exception as exc:
        outcome = {
            "error": type(exc).__name__,
            "message": str(exc),
            "expected_version": getattr(exc, "expected_version", None),
            "actual_version": getattr(exc, "actual_version", None),
        }
    print(json.dumps(outcome), flush=True)


asyncio.run(main())
