"""Child of the granular-step crash tests: runs (or resumes) one agent loop, may kill itself.

Run as ``python _granular_child.py '<json config>'``; prints one JSON line with the outcome:
``{"status", "output", "error", "transcript"}`` (``transcript``: what the model was given for
its final turn in this process, or None if it was not asked for it here).

The pipeline is ``head >> granular``: the granular step is top-level step 1, so its records
are at ``[1, turn]`` (kinds "model" and "turn") and ``[1, turn, call]`` (kind "tool"). A
scripted model asks in turn 0 for ``CALLS[0]`` tool calls, in turn 1 for ``CALLS[1]``, and
answers in turn 2. Every model turn asked and every tool call's effect appends one JSON line to
the side-effect file with a single ``os.write`` on an ``O_APPEND`` descriptor:
``[phase, "model", turn]`` and ``[phase, "tool", idempotency_key, item]``.

Config keys: ``backend`` (``"sqlite"`` or ``"postgres"``), ``store`` (file or DSN), ``schema``
(Postgres, migrated), ``run_id``, ``effects``, ``phase``, ``enforce`` (enforce_idempotency),
``kill`` (absent: run to the end): ``{"model": t}`` (while the model takes turn t),
``{"tool_before": [t, c]}`` / ``{"tool_after": [t, c]}`` (in tool call c of turn t, before or
after its effect), ``{"committed": [path, kind]}`` (right after the checkpoint holding that
record was committed).
"""

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

import orjson

from flujo import AgentTurn, Flujo, GranularStep, Step, ToolCall
from flujo.state.backends.base import Checkpoint, StateBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend

CALLS = (2, 2)  # tool calls in turns 0 and 1; turn 2 answers
config: dict[str, Any] = json.loads(sys.argv[1])
kill: dict[str, Any] = config.get("kill") or {}
phase: str = config.get("phase", "run")
effects_fd = os.open(config["effects"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def die() -> None:
    """Die the way a crashed process dies: no cleanup, no flush, no atexit."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # pragma: no cover - SIGKILL cannot be caught
    os._exit(99)  # pragma: no cover


def write_effect(*fields: Any) -> None:
    os.write(effects_fd, json.dumps([phase, *fields]).encode() + b"\n")


class Killing(StateBackend):
    """Dies right after committing the checkpoint that holds the record ``kill["committed"]``."""

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        version = await super().write_checkpoint(checkpoint)
        target = kill.get("committed")
        if target is not None:
            for raw in checkpoint.steps:
                record = orjson.loads(raw)
                if [record.get("path"), record.get("kind", "step")] == target:
                    die()
        return version


class KillingSQLiteBackend(Killing, SQLiteBackend):
    pass


class KillingPostgresBackend(Killing, PostgresBackend):
    pass


def make_backend() -> StateBackend:
    if config["backend"] == "postgres":
        return KillingPostgresBackend(
            config["store"], schema=config["schema"], pool_min=1, pool_max=2
        )
    return KillingSQLiteBackend(config["store"])


class Model:
    """The scripted model: tool calls in turns 0 and 1, the answer in turn 2."""

    def __init__(self) -> None:
        self.final_transcript: list[dict[str, Any]] | None = None

    async def turn(self, transcript: list[dict[str, Any]]) -> AgentTurn:
        turn = sum(1 for message in transcript if message["role"] == "assistant")
        write_effect("model", turn)
        if kill.get("model") == turn:
            die()
        if turn < len(CALLS):
            return AgentTurn(
                f"turn {turn}",
                tuple(ToolCall("charge", {"item": f"t{turn}c{c}"}) for c in range(CALLS[turn])),
            )
        self.final_transcript = transcript
        results = [m["content"] for m in transcript if m["role"] == "tool"]
        return AgentTurn({"charged": results})


async def charge(item: str, idempotency_key: str) -> str:
    """The side effect: one line per call, with its idempotency key."""
    turn, call = (int(part) for part in idempotency_key.rsplit(":", 2)[1:])
    if kill.get("tool_before") == [turn, call]:
        die()
    write_effect("tool", idempotency_key, item)
    if kill.get("tool_after") == [turn, call]:
        die()
    return f"charged {item}"


async def head(data: Any) -> Any:
    return data


async def main() -> None:
    model = Model()
    pipeline = Step.from_callable(head, name="head") >> GranularStep(
        "agent", model, tools={"charge": charge}, enforce_idempotency=config["enforce"]
    )
    async with Flujo(
        pipeline, state_backend=make_backend(), pipeline_name="granular-crash-test"
    ) as runner:
        try:
            result = await runner.run_async("buy things", run_id=config["run_id"])
        except Exception as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
            return
    outcome = {
        "status": result.status,
        "output": result.output,
        "error": None if result.error is None else str(result.error),
        "transcript": model.final_transcript,
    }
    print(json.dumps(outcome))


asyncio.run(main())
