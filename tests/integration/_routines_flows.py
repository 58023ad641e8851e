"""The flows of the routines crash tests, shared by the test and its child process.

Every routine appends its id to a side-effect file (one ``os.write`` on an ``O_APPEND``
descriptor: the line is on disk the moment it is written) and keeps its result in its routine
state. ``KILL`` makes the process SIGKILL itself at a point of one routine's activation:

- ``enter``: the logic started, before the side effect;
- ``after_effect``: the side effect written, the activation not committed;
- ``after_commit``: the activation's checkpoint committed (``write_checkpoint`` returned),
  before anything else happens.

The chain: ``r0 -> r1 -> ... -> r9``, each ``x -> x + 1``; r9 ends with ``{"x": 10}``.
The fan-out/fan-in: ``source`` sends ``n`` to ``a`` (``n + 1``), ``b`` (``n * 2``) and ``c``
(``n * 3``); ``join`` (``all_slots_ready_policy``, slots ``a``, ``b``, ``c``) sums them;
``sink`` keeps the sum. With ``n = 5``: 6 + 10 + 15 = 31.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import orjson

from flujo.routines import Flow, Routine, all_slots_ready_policy
from flujo.state.backends.base import Checkpoint
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend

CHAIN = [f"r{i}" for i in range(10)]
FANIN = ["source", "a", "b", "c", "join", "sink"]
FANIN_RESULT = 31
POINTS = ("enter", "after_effect", "after_commit")

KILL: dict[str, str | None] = {"routine": None, "point": None}


def die() -> None:
    """Die the way a crashed process dies: no cleanup, no flush, no atexit."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # pragma: no cover - SIGKILL cannot be caught
    os._exit(99)  # pragma: no cover


def checkpoint(rid: str | None, point: str) -> None:
    if KILL["routine"] == rid and KILL["point"] == point:
        die()


def effect(routine: Routine) -> None:
    """Note in the side-effect file that ``routine`` ran (kill points around it)."""
    rid = routine.routine_id
    checkpoint(rid, "enter")
    fd = os.open(routine.get_config("effects"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{rid}\n".encode())
    finally:
        os.close(fd)
    checkpoint(rid, "after_effect")


def committed_activation_of(checkpoint_: Checkpoint) -> str | None:
    for step in checkpoint_.steps:
        record = orjson.loads(step)
        if record.get("kind") == "activation":
            routine: str = record["routine"]
            return routine
    return None


class KillingSQLite(SQLiteBackend):
    async def write_checkpoint(self, checkpoint_: Checkpoint) -> int:
        version = await super().write_checkpoint(checkpoint_)
        checkpoint(committed_activation_of(checkpoint_), "after_commit")
        return version


class KillingPostgres(PostgresBackend):
    async def write_checkpoint(self, checkpoint_: Checkpoint) -> int:
        version = await super().write_checkpoint(checkpoint_)
        checkpoint(committed_activation_of(checkpoint_), "after_commit")
        return version


class Hop(Routine):
    """x -> x + 1."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("input")
        self.add_event("output", ["x"])

        def hop(slot_data: dict[str, Any], policy_message: Any, job_state: Any) -> None:
            effect(self)
            x = slot_data["input"][0]["x"] + 1
            job_state.update_routine_state(self.routine_id, {"x": x})
            self.emit("output", x=x)

        self.set_logic(hop)


class Scale(Routine):
    """x -> x * factor + offset (config)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_slot("input")
        self.add_event("output", ["x"])
        self.set_config(factor=1, offset=0)

        def scale(slot_data: dict[str, Any], policy_message: Any, job_state: Any) -> None:
            effect(self)
            x = slot_data["input"][0]["x"] * self.get_config("factor") + self.get_config("offset")
            job_state.update_routine_state(self.routine_id, {"x": x})
            self.emit("output", x=x)

        self.set_logic(scale)


class Join(Routine):
    """Fan-in: one message on each of a, b, c -> their sum."""

    def __init__(self) -> None:
        super().__init__()
        for name in ("a", "b", "c"):
            self.add_slot(name)
        self.add_event("output", ["x"])
        self.set_activation_policy(all_slots_ready_policy())

        def join(slot_data: dict[str, Any], policy_message: Any, job_state: Any) -> None:
            effect(self)
            total = sum(slot_data[name][0]["x"] for name in ("a", "b", "c"))
            job_state.update_routine_state(self.routine_id, {"x": total})
            self.emit("output", x=total)

        self.set_logic(join)


def chain_flow(effects: str) -> Flow:
    flow = Flow("crash_chain")
    for i, rid in enumerate(CHAIN):
        hop = Hop()
        hop.set_config(effects=effects)
        flow.add_routine(hop, rid)
        if i:
            flow.connect(CHAIN[i - 1], "output", rid, "input")
    return flow


def fanin_flow(effects: str) -> Flow:
    flow = Flow("crash_fanin")
    settings = {
        "source": (1, 0),
        "a": (1, 1),
        "b": (2, 0),
        "c": (3, 0),
        "sink": (1, 0),
    }
    for rid in FANIN:
        routine: Routine = Join() if rid == "join" else Scale()
        if rid in settings:
            factor, offset = settings[rid]
            routine.set_config(factor=factor, offset=offset)
        routine.set_config(effects=effects)
        flow.add_routine(routine, rid)
    for worker in ("a", "b", "c"):
        flow.connect("source", "output", worker, "input")
        flow.connect(worker, "output", "join", worker)
    flow.connect("join", "output", "sink", "input")
    return flow


FLOWS = {"chain": (chain_flow, CHAIN, {"x": 0}), "fanin": (fanin_flow, FANIN, {"x": 5})}
