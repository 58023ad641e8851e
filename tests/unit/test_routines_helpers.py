"""Helpers of the flujo.routines unit tests (no tests here; named to sit with them)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from flujo.routines import ActivationPolicy, Flow, FlowRegistry, JobState, Routine, Runtime
from flujo.state.backends.base import StateBackend

Fn = Callable[["Node", dict[str, list[dict[str, Any]]], JobState], Any]


class Node(Routine):
    """A routine built from arguments, for runtime tests (so it is not serializable)."""

    def __init__(
        self,
        fn: Fn | None = None,
        *,
        slots: Iterable[str] = ("input",),
        events: Iterable[str] = ("output",),
        params: Iterable[str] | None = None,
        policy: ActivationPolicy | None = None,
    ) -> None:
        super().__init__()
        for slot in slots:
            self.add_slot(slot)
        for event in events:
            self.add_event(event, None if params is None else list(params))
        if fn is not None:
            self.set_logic(lambda slot_data, message, job_state: fn(self, slot_data, job_state))
        if policy is not None:
            self.set_activation_policy(policy)


def relay(node: Node, slot_data: dict[str, list[dict[str, Any]]], job_state: JobState) -> None:
    """Emit every message received, unchanged."""
    for messages in slot_data.values():
        for message in messages:
            node.emit("output", **message)


def add_one(node: Node, slot_data: dict[str, list[dict[str, Any]]], job_state: JobState) -> None:
    node.emit("output", x=slot_data["input"][0]["x"] + 1)


def chain(n: int, *, flow_id: str = "chain", fn: Fn = add_one) -> Flow:
    """``r0 -> r1 -> ... -> r{n-1}`` connected output -> input."""
    flow = Flow(flow_id)
    for i in range(n):
        flow.add_routine(Node(fn), f"r{i}")
        if i:
            flow.connect(f"r{i - 1}", "output", f"r{i}", "input")
    return flow


class Recorder:
    """Thread-safe list of what routines saw."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._lock = threading.Lock()

    def add(self, item: Any) -> None:
        with self._lock:
            self.items.append(item)


def runtime_for(
    *flows: Flow,
    backend: StateBackend | None = None,
    pool: int = 4,
    names: dict[str, Flow] | None = None,
) -> Runtime:
    """A Runtime on a private registry holding ``flows`` (by flow id) and ``names``."""
    registry = FlowRegistry()
    for flow in flows:
        registry.register(flow)
    for name, flow in (names or {}).items():
        registry.register_by_name(name, flow)
    return Runtime(thread_pool_size=pool, state_backend=backend, registry=registry)
