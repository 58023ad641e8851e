"""Background steps: a step launched as a durable task of its own while its pipeline goes on.

A step with ``execution_mode="background"`` is not run in line. Its launch stores a *background
task*: a run of its own, in the same store, whose pipeline is that one step (run in the
foreground), whose input is the step's input and whose context starts as a copy of the launching
run's context. Its metadata names it (``flujo.kind = "background"``, ``flujo.parent_run_id``,
``flujo.step_name``, ``flujo.step_path``), so it is found, listed and resumed like any run. The
launching step's output is a :class:`~flujo.BackgroundLaunched` with the task's id.

The task id is derived from the parent run's id and the step's path, so launching is
idempotent: a parent that crashes after the launch and runs the step again finds the task
already there.

Where the task runs: ``"local"`` mode (the default) runs it on the launching runner's event loop
(``Flujo.run()`` waits for it before returning); it is stored with no queue, so no worker ever
claims it. ``"queue"`` mode leaves it queued for workers (``flujo worker``), on the step's
``queue`` (default: the parent's queue, else ``default``).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import weakref
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson

from flujo.domain.models import BackgroundLaunched, StepResult
from flujo.domain.pipeline import Pipeline
from flujo.exceptions import StateConflictError
from flujo.state.backends.base import RunHeader, encode_metadata, now

if TYPE_CHECKING:
    from flujo.application.runner import Flujo
    from flujo.domain.step import Step

__all__ = [
    "KIND",
    "PARENT",
    "PATH",
    "STEP",
    "BackgroundLauncher",
    "background_pipeline",
    "background_task_id",
]

logger = logging.getLogger("flujo.background")

#: Metadata keys of a background task.
KIND, PARENT, STEP, PATH = "flujo.kind", "flujo.parent_run_id", "flujo.step_name", "flujo.step_path"


def background_task_id(parent_run_id: str, path: tuple[int | str, ...]) -> str:
    """The id of the task a background step at ``path`` of ``parent_run_id`` launches."""
    digest = hashlib.sha256(orjson.dumps([parent_run_id, list(path)])).hexdigest()
    return f"bg-{digest[:32]}"


def background_pipeline(
    pipeline: Pipeline[Any, Any], path: tuple[int | str, ...]
) -> Pipeline[Any, Any]:
    """The one-step pipeline a background task at ``path`` of ``pipeline`` runs (the step, in
    the foreground)."""
    step = pipeline.step_at(path)
    foreground = _foreground(step)
    return Pipeline.from_steps([foreground])


_FOREGROUND: weakref.WeakKeyDictionary[Step[Any, Any], Step[Any, Any]] = weakref.WeakKeyDictionary()


def _foreground(step: Step[Any, Any]) -> Step[Any, Any]:
    """``step`` with ``execution_mode="foreground"`` (one copy per step, kept)."""
    found = _FOREGROUND.get(step)
    if found is None:
        found = copy.copy(step)
        found.config = replace(step.config, execution_mode="foreground")
        _FOREGROUND[step] = found
    return found


class BackgroundLauncher:
    """Launches the background steps of one run."""

    __slots__ = ("parent_queue", "pipeline_version", "run_id", "runner")

    def __init__(
        self,
        runner: Flujo[Any, Any, Any],
        run_id: str,
        pipeline_version: str,
        *,
        parent_queue: str | None,
    ) -> None:
        self.runner = runner
        self.run_id = run_id
        self.pipeline_version = pipeline_version
        self.parent_queue = parent_queue

    async def launch(
        self, step: Step[Any, Any], data: Any, context: Any, index: int, path: Any
    ) -> StepResult:
        """Store the task (once), start it (locally) or announce it (queue); describe it."""
        location = path if path is not None else (index,)
        task_id = background_task_id(self.run_id, location)
        runner = self.runner
        backend = runner.state_backend
        started = now()
        queue: str | None = None  # local mode: no worker may claim the task
        if backend is None:  # nothing is stored: the step simply runs beside the pipeline
            runner._spawn_background(_run_unstored(runner, step, data, context), task_id)
        elif runner._resolved_background_mode() == "queue":
            runner._check_runnable_by_workers()
            queue = step.config.queue or self.parent_queue or "default"
            await self._store(step, data, context, task_id, location, queue)
            await backend.notify_work(queue)
        elif await self._store(step, data, context, task_id, location, None):
            runner._spawn_background(runner.run_async(None, run_id=task_id), task_id)
        elif task_id not in runner._background_ids:
            # Launched before, by an attempt of the parent that did not checkpoint the launch
            # (it crashed): if the task did not finish, nothing runs it now but this runner.
            stored = await backend.load_state(task_id)
            unfinished = stored is not None and stored["status"] in ("queued", "running")
            if unfinished and stored is not None and stored.get("queue") is None:
                runner._spawn_background(runner.run_async(None, run_id=task_id), task_id)
        launched = BackgroundLaunched(task_id=task_id, queue=queue)
        return StepResult(step.name, launched, True, 1, now() - started, None, index, path)

    async def _store(
        self,
        step: Step[Any, Any],
        data: Any,
        context: Any,
        task_id: str,
        location: tuple[int | str, ...],
        queue: str | None,
    ) -> bool:
        """Store the task as a queued run (``queue`` None: run here, never claimed by a
        worker); False if it was stored before (a relaunch)."""
        from flujo.application.state_manager import StateManager  # noqa: PLC0415

        runner = self.runner
        backend = runner.state_backend
        assert backend is not None
        serializer = backend.serializer
        metadata = {
            KIND: "background",
            PARENT: self.run_id,
            STEP: step.name,
            PATH: orjson.dumps(list(location)).decode(),
        }
        header = RunHeader(
            pipeline_id=runner.pipeline_id,
            pipeline_name=runner.pipeline_name,
            pipeline_version=self.pipeline_version,
            step_names=orjson.dumps([step.name]),
            initial_input=serializer.dumps(data, f"input of background step {step.name!r}"),
            created_at=now(),
            metadata=encode_metadata(metadata, serializer),
            queue=queue,
        )
        task_context = context.model_copy(deep=True)
        task_context.run_id = task_id
        manager = StateManager(
            backend, task_id, task_context, version=0, history_len=0, header=header
        )
        try:
            await manager.queued()
        except StateConflictError:
            return False  # launched before this attempt (the parent ran the step again)
        logger.debug("run %s launched background task %s (%s)", self.run_id, task_id, step.name)
        return True


async def _run_unstored(
    runner: Flujo[Any, Any, Any], step: Step[Any, Any], data: Any, context: Any
) -> None:
    """A background step of a run that stores nothing: run it once, log a failure."""
    foreground = _foreground(step)
    own = context.model_copy(deep=True)
    result = await runner._executor.execute(foreground, data, own, runner.resources, 0)
    if not result.success:
        logger.warning("background step %r failed: %s", step.name, result.error)


async def drain(tasks: set[asyncio.Task[Any]], timeout_s: float | None) -> None:
    """Wait for background tasks, including those they launch meanwhile (all of them, or up
    to ``timeout_s``, then cancel the rest)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    while True:
        pending = [task for task in tasks if task.get_loop() is loop and not task.done()]
        if not pending:
            return
        left = None if deadline is None else max(0.0, deadline - loop.time())
        _, late = await asyncio.wait(pending, timeout=left)
        if late and deadline is not None and loop.time() >= deadline:
            break
    for task in late:
        task.cancel()
    logger.warning(
        "cancelled %d background task(s) still running; resume them with "
        "resume_background_task (or a worker)",
        len(late),
    )
    await asyncio.gather(*late, return_exceptions=True)
