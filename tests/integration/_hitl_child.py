"""Child process of the human-in-the-loop process tests: starts, answers or resumes one run.

Run as ``python _hitl_child.py '<json config>'``; it prints one JSON line with the outcome:
``{"status", "output", "error", "failed_step", "context"}`` when the call returned, or
``{"raised": "<class name>", "message"}`` when it raised.

The pipeline (registered as ``hitl-process-test`` 1.0.0 with ``Ctx``) is, by ``scenario``:

- ``top``: ``prep >> ask >> after >> finish`` (``ask`` is top-level step 1);
- ``loop``: ``prep >> rounds >> after >> finish``, where ``rounds`` is a loop whose body is
  ``work >> ask`` (the pause is at ``[1, 0, 1]``) and which exits on an approving answer.

``ask`` takes a ``Verdict`` (``{"approved": bool, "by": str}``). Every step (and the question's
wording) appends one JSON line ``[tag, label]`` to the ``effects`` file with a single
``os.write`` on an ``O_APPEND`` descriptor, so a line is on disk the moment it is written.

Config keys: ``backend`` (``"sqlite"`` or ``"postgres"``), ``store`` (file or DSN), ``schema``
(Postgres, migrated), ``scenario``, ``run_id``, ``effects``, ``tag`` (names this process in the
effects), ``action``:

- ``start``: ``Flujo(registry=...).run(1, run_id=run_id)`` (it pauses);
- ``answer``: ``TaskClient(backend, registry=...).resume_task(run_id, config["answer"])``;
- ``run``: ``Flujo(registry=...).run(None, run_id=run_id)`` (resume by run id).

Synchronization and kills (all optional):

- ``commit_barrier``: ``{"dir", "parties"}``: before this process's first checkpoint write
  (the answer's commit) it creates a file named ``tag`` in ``dir`` and waits until ``parties``
  files are there, so every answering process has read the paused run before any commits;
- ``hold_after``: ``{"dir"}``: the ``after`` step creates ``dir/holding`` and waits for
  ``dir/release`` before it goes on;
- ``kill``: ``"committed"`` SIGKILLs this process right after its first checkpoint write
  returned (the answer is committed, nothing after it ran); ``"in_after"`` SIGKILLs it inside
  the ``after`` step, after its effect line was written and before the step returned.
"""

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flujo import (
    Flujo,
    HumanInTheLoopStep,
    LoopStep,
    PipelineContext,
    PipelineRegistry,
    Step,
    TaskClient,
)
from flujo.state.backends.base import Checkpoint, StateBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend

PIPELINE_NAME = "hitl-process-test"
WAIT_S = 60.0

config: dict[str, Any] = json.loads(sys.argv[1])
tag: str = config.get("tag", "child")
effects_fd = os.open(config["effects"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def die() -> None:
    """Die the way a crashed process dies: no cleanup, no flush, no atexit."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # pragma: no cover - SIGKILL cannot be caught
    os._exit(99)  # pragma: no cover


def effect(label: str) -> None:
    os.write(effects_fd, json.dumps([tag, label]).encode() + b"\n")


def wait_until(done: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        if time.monotonic() > deadline:
            print(json.dumps({"raised": "WaitTimeout", "message": what}))
            sys.stdout.flush()
            os._exit(3)
        time.sleep(0.005)


# -- the store ---------------------------------------------------------------------------------


class Hooked(StateBackend):
    """Runs the commit barrier before, and the "committed" kill after, the first write."""

    writes = 0

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        first = Hooked.writes == 0
        Hooked.writes += 1
        barrier = config.get("commit_barrier")
        if first and barrier:
            directory = Path(barrier["dir"])
            (directory / tag).touch()
            wait_until(
                lambda: len(list(directory.iterdir())) >= barrier["parties"], "commit barrier"
            )
        version = await super().write_checkpoint(checkpoint)
        if first and config.get("kill") == "committed":
            die()
        return version


class HookedSQLiteBackend(Hooked, SQLiteBackend):
    pass


class HookedPostgresBackend(Hooked, PostgresBackend):
    pass


def make_backend() -> StateBackend:
    if config["backend"] == "sqlite":
        return HookedSQLiteBackend(config["store"])
    return HookedPostgresBackend(config["store"], schema=config["schema"], pool_min=1, pool_max=2)


# -- the pipeline --------------------------------------------------------------------------------


class Ctx(PipelineContext):
    notes: list[str] = []


class Verdict(BaseModel):
    approved: bool
    by: str


async def prep(x: int, *, context: Ctx) -> int:
    effect("prep")
    context.notes.append("prep")
    return x + 1


async def work(x: Any, *, context: Ctx) -> int:
    effect("work")
    context.notes.append("work")
    return 10 if isinstance(x, Verdict) else x * 10


def question(data: Any, context: Ctx) -> str:
    effect("asked")
    return f"Approve {data}?"


async def after(verdict: Verdict, *, context: Ctx) -> str:
    effect(f"after {verdict.by}")
    hold = config.get("hold_after")
    if hold:
        directory = Path(hold["dir"])
        (directory / "holding").touch()
        wait_until((directory / "release").exists, "release")
    if config.get("kill") == "in_after":
        die()
    context.notes.append(f"after {verdict.by}")
    return verdict.by


async def finish(by: str, *, context: Ctx) -> str:
    effect("finish")
    return f"done by {by}"


def build(scenario: str) -> Any:
    ask = HumanInTheLoopStep("ask", message_for_user=question, input_schema=Verdict)
    head = Step.from_callable(prep, name="prep")
    tail = Step.from_callable(after, name="after") >> Step.from_callable(finish, name="finish")
    if scenario == "top":
        return head >> ask >> tail
    rounds = LoopStep(
        "rounds",
        Step.from_callable(work, name="work") >> ask,
        lambda out, ctx: out.approved,
        max_loops=3,
    )
    return head >> rounds >> tail


REGISTRY = PipelineRegistry()
REGISTRY.register(build(config["scenario"]), PIPELINE_NAME, "1.0.0", context_model=Ctx)


def runner() -> Flujo[Any, Any, Ctx]:
    return Flujo(
        registry=REGISTRY,
        pipeline_name=PIPELINE_NAME,
        context_model=Ctx,
        state_backend=make_backend(),
    )


def describe(result: Any) -> dict[str, Any]:
    return {
        "status": result.status,
        "output": result.output,
        "error": None if result.error is None else result.error.to_dict(),
        "failed_step": result.failed_step,
        "context": result.final_pipeline_context.notes,
    }


async def answer() -> Any:
    async with TaskClient(make_backend(), registry=REGISTRY) as client:
        return await client.resume_task(config["run_id"], config["answer"])


def main() -> None:
    action = config["action"]
    try:
        if action == "start":
            result = runner().run(1, run_id=config["run_id"])
        elif action == "answer":
            result = asyncio.run(answer())
        else:
            result = runner().run(None, run_id=config["run_id"])
    except Exception as exc:
        print(json.dumps({"raised": type(exc).__name__, "message": str(exc)}))
        return
    print(json.dumps(describe(result)))


if __name__ == "__main__":
    main()
