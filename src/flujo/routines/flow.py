"""Flow: routines and the connections between their events and slots; its serialized form.

A flow is a definition only. It holds no execution state: every run of it is a job, with its
own :class:`~flujo.routines.job_state.JobState`, so one flow serves many jobs at once.

``Flow.serialize()`` returns the flow's structure and configuration as JSON data::

    {"flow_id": "orders",
     "routines": {"source": {"class": "app.routines.Source", "config": {}}, ...},
     "connections": [{"source": "source", "event": "output",
                      "target": "processor", "slot": "input"}, ...],
     "format": "flujo.routines.flow/1"}

``Flow.deserialize(data)`` rebuilds it: each routine's class is looked up among the registered
``Routine`` subclasses (never imported), constructed with no arguments (which restores its
slots, events, logic and policy) and given its stored configuration.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import orjson

from flujo.exceptions import (
    FlowError,
    RoutineNotSerializableError,
    UnknownRoutineClassError,
)
from flujo.routines.routine import Routine, check_id, find_routine_class, routine_class_name
from flujo.state.serialization import Serializer

__all__ = ["FLOW_FORMAT", "Connection", "Flow", "Plan"]

#: The ``format`` tag of serialized flows.
FLOW_FORMAT = "flujo.routines.flow/1"


def _not_json(obj: Any) -> Any:
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")


_CONFIG_SERIALIZER = Serializer(_not_json)


@dataclass(frozen=True, slots=True)
class Connection:
    """``source``'s ``event`` delivers to ``target``'s ``slot``."""

    source: str
    event: str
    target: str
    slot: str

    def to_dict(self) -> dict[str, str]:
        return {
            "source": self.source,
            "event": self.event,
            "target": self.target,
            "slot": self.slot,
        }


class Plan:
    """A flow compiled for running: the lookups the runtime makes for every message.

    A job keeps the plan it started with; a flow changed later affects later jobs only.
    """

    __slots__ = ("entries", "flow_id", "ids", "routes", "routines", "slots")

    def __init__(self, flow: Flow) -> None:
        self.flow_id = flow.flow_id
        self.routines: dict[str, Routine] = dict(flow._routines)
        """Routine id -> routine."""
        self.ids: dict[int, str] = {id(r): rid for rid, r in self.routines.items()}
        """id(routine) -> routine id."""
        self.slots: dict[str, tuple[str, ...]] = {
            rid: tuple(r._slots) for rid, r in self.routines.items()
        }
        """Routine id -> its slot names, in declaration order."""
        routes: dict[str, dict[str, list[tuple[str, str]]]] = {rid: {} for rid in self.routines}
        targeted = set()
        for c in flow._connections:
            routes[c.source].setdefault(c.event, []).append((c.target, c.slot))
            targeted.add(c.target)
        self.routes: dict[str, dict[str, tuple[tuple[str, str], ...]]] = {
            rid: {event: tuple(targets) for event, targets in events.items()}
            for rid, events in routes.items()
        }
        """Routine id -> event -> ((target routine id, slot), ...)."""
        self.entries: tuple[tuple[str, str], ...] = tuple(
            (rid, slots[0]) for rid, slots in self.slots.items() if rid not in targeted and slots
        )
        """(routine id, first slot) of every routine no connection targets: entry params go
        there."""


class Flow:
    """Routines (by id) and connections; see the module docstring."""

    def __init__(self, flow_id: str | None = None) -> None:
        self.flow_id: str = check_id(flow_id, "flow id") if flow_id is not None else _new_id()
        self._routines: dict[str, Routine] = {}
        self._connections: list[Connection] = []
        self._plan: Plan | None = None

    # -- building --------------------------------------------------------------------------------

    def add_routine(self, routine: Routine, routine_id: str) -> str:
        """Add ``routine`` under ``routine_id``; return the id."""
        flow_id = self.flow_id
        if not isinstance(routine, Routine):
            raise FlowError(f"add_routine takes a Routine, got {routine!r}", flow_id=flow_id)
        check_id(routine_id, "routine id", flow_id=flow_id)
        if routine_id in self._routines:
            raise FlowError(
                f"flow {flow_id!r} already has a routine {routine_id!r}", flow_id=flow_id
            )
        if not hasattr(routine, "_slots"):
            raise FlowError(
                f"{type(routine).__name__}.__init__ must call super().__init__()", flow_id=flow_id
            )
        if routine._flow is not None:
            raise FlowError(
                f"this {type(routine).__name__} is routine {routine._routine_id!r} of flow "
                f"{routine._flow.flow_id!r} already; create another instance",
                flow_id=flow_id,
            )
        routine._flow = self
        routine._routine_id = routine_id
        self._routines[routine_id] = routine
        self._plan = None
        return routine_id

    def connect(self, source_id: str, event: str, target_id: str, slot: str) -> Connection:
        """Deliver every ``event`` of routine ``source_id`` to ``slot`` of ``target_id``."""
        flow_id = self.flow_id
        source = self._routines.get(source_id)
        target = self._routines.get(target_id)
        for rid, found in ((source_id, source), (target_id, target)):
            if found is None:
                raise FlowError(f"flow {flow_id!r} has no routine {rid!r}", flow_id=flow_id)
        assert source is not None
        assert target is not None
        if event not in source._events:
            raise FlowError(
                f"routine {source_id!r} has no event {event!r} (it has {list(source._events)})",
                flow_id=flow_id,
            )
        if slot not in target._slots:
            raise FlowError(
                f"routine {target_id!r} has no slot {slot!r} (it has {list(target._slots)})",
                flow_id=flow_id,
            )
        connection = Connection(source_id, event, target_id, slot)
        if connection in self._connections:
            raise FlowError(f"flow {flow_id!r} already has {connection}", flow_id=flow_id)
        self._connections.append(connection)
        self._plan = None
        return connection

    # -- reading ---------------------------------------------------------------------------------

    @property
    def routines(self) -> Mapping[str, Routine]:
        """The routines, by id, in the order they were added."""
        return MappingProxyType(self._routines)

    @property
    def connections(self) -> tuple[Connection, ...]:
        return tuple(self._connections)

    def plan(self) -> Plan:
        """The flow compiled for running (cached until the flow changes)."""
        plan = self._plan
        if plan is None:
            plan = self._plan = Plan(self)
        return plan

    def __repr__(self) -> str:
        return f"Flow({self.flow_id!r}, routines={list(self._routines)})"

    # -- serialization ---------------------------------------------------------------------------

    def serialize(self) -> dict[str, Any]:
        """The flow's structure and configuration as JSON data (no execution state).

        Raises :class:`~flujo.exceptions.RoutineNotSerializableError` for a routine that could
        not be rebuilt from that data (constructor arguments, changes made after construction)
        and :class:`~flujo.exceptions.SerializationError` for configuration that is not JSON
        data.
        """
        routines: dict[str, Any] = {}
        for rid, routine in self._routines.items():
            path = f"routines.{rid}"
            name = _check_rebuildable(routine, rid, path)
            data = _CONFIG_SERIALIZER.dumps(routine._config, f"{path}.config")
            routines[rid] = {"class": name, "config": orjson.loads(data)}
        return {
            "flow_id": self.flow_id,
            "routines": routines,
            "connections": [c.to_dict() for c in self._connections],
            "format": FLOW_FORMAT,
        }

    @classmethod
    def deserialize(cls, data: Mapping[str, Any]) -> Flow:
        """Rebuild a flow from :meth:`serialize`'s data (see the module docstring).

        Raises :class:`~flujo.exceptions.UnknownRoutineClassError` for a class that is not
        registered and :class:`~flujo.exceptions.FlowError` for data of the wrong shape.
        """
        if not isinstance(data, Mapping):
            raise FlowError(
                f"serialized flow data must be a mapping, got {type(data).__name__}", flow_id=None
            )
        fmt = data.get("format", FLOW_FORMAT)
        if fmt != FLOW_FORMAT:
            raise FlowError(
                f"serialized flow has format {fmt!r}; this flujo reads {FLOW_FORMAT!r}",
                flow_id=None,
                path="format",
            )
        flow = cls(check_id(data.get("flow_id"), "flow id", path="flow_id"))
        flow_id = flow.flow_id
        routines = data.get("routines")
        if not isinstance(routines, Mapping):
            raise FlowError("'routines' must be a mapping", flow_id=flow_id, path="routines")
        for rid, spec in routines.items():
            path = f"routines.{rid}"
            check_id(rid, "routine id", flow_id=flow_id, path="routines")
            if not isinstance(spec, Mapping):
                raise FlowError(f"{path} must be a mapping", flow_id=flow_id, path=path)
            name = spec.get("class")
            if not isinstance(name, str):
                raise FlowError(
                    f"{path}.class must be a string", flow_id=flow_id, path=f"{path}.class"
                )
            routine_cls = find_routine_class(name)
            if routine_cls is None:
                shown = name if len(name) <= 200 else name[:200] + "..."
                raise UnknownRoutineClassError(
                    f"routine {rid!r} of flow {flow_id!r} is of class {shown!r}, which this "
                    "program does not define: define (or import) that Routine subclass before "
                    "deserializing",
                    class_name=name,
                    flow_id=flow_id,
                    path=f"{path}.class",
                )
            config = _json_data(spec.get("config", {}), flow_id, f"{path}.config")
            if not isinstance(config, dict):
                raise FlowError(
                    f"{path}.config must be a mapping", flow_id=flow_id, path=f"{path}.config"
                )
            try:
                routine = routine_cls()
            except Exception as exc:
                raise FlowError(
                    f"routine {rid!r}: {routine_cls.__qualname__}() failed: "
                    f"{type(exc).__name__}: {exc}",
                    flow_id=flow_id,
                    path=path,
                ) from exc
            routine._config = config
            flow.add_routine(routine, rid)
        connections = data.get("connections", [])
        if not isinstance(connections, list):
            raise FlowError("'connections' must be a list", flow_id=flow_id, path="connections")
        for i, item in enumerate(connections):
            path = f"connections[{i}]"
            keys = ("source", "event", "target", "slot")
            if not isinstance(item, Mapping) or not all(
                isinstance(item.get(key), str) for key in keys
            ):
                raise FlowError(
                    f"{path} must be a mapping of {', '.join(keys)} (strings)",
                    flow_id=flow_id,
                    path=path,
                )
            try:
                flow.connect(item["source"], item["event"], item["target"], item["slot"])
            except FlowError as exc:
                raise FlowError(f"{path}: {exc}", flow_id=flow_id, path=path) from exc
        return flow


def _new_id() -> str:
    return uuid.uuid4().hex


def _json_data(value: Any, flow_id: str, path: str) -> Any:
    """A deep copy of ``value``, which must be JSON data (nothing of it is called)."""
    try:
        return orjson.loads(orjson.dumps(value))
    except (TypeError, ValueError) as exc:
        raise FlowError(f"{path} is not JSON data: {exc}", flow_id=flow_id, path=path) from exc


def _check_rebuildable(routine: Routine, rid: str, path: str) -> str:
    """The class name to store ``routine`` under, once sure deserialize can rebuild it."""
    routine_cls = type(routine)
    name = routine_class_name(routine_cls)

    def refuse(reason: str) -> RoutineNotSerializableError:
        return RoutineNotSerializableError(
            f"routine {rid!r} ({routine_cls.__qualname__}) cannot be serialized: {reason}",
            path=path,
            class_name=name,
            routine_id=rid,
        )

    if find_routine_class(name) is not routine_cls:
        raise refuse(f"the class registered as {name!r} is another (newer) definition")
    try:
        signature = inspect.signature(routine_cls)
    except (TypeError, ValueError):  # a constructor without a signature: try it below
        signature = None
    if signature is not None:
        required = [
            p.name
            for p in signature.parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if required:
            raise refuse(
                f"its constructor needs arguments ({', '.join(required)}); a serializable "
                "routine constructs with no arguments and keeps its settings in set_config()"
            )
    try:
        fresh = routine_cls()
    except Exception as exc:
        raise refuse(f"{routine_cls.__qualname__}() failed: {type(exc).__name__}: {exc}") from exc
    differences = []
    if list(fresh._slots) != list(routine._slots):
        differences.append(f"slots {list(routine._slots)} (constructor: {list(fresh._slots)})")
    mine = {n: e.params for n, e in routine._events.items()}
    theirs = {n: e.params for n, e in fresh._events.items()}
    if mine != theirs:
        differences.append(f"events {sorted(mine)} (constructor: {sorted(theirs)})")
    if (fresh._logic is None) != (routine._logic is None):
        differences.append("logic set after construction")
    if fresh._policy != routine._policy:
        differences.append(f"policy {routine._policy!r} (constructor: {fresh._policy!r})")
    if differences:
        raise refuse(
            "it differs from what its constructor builds, so deserialize could not restore it: "
            + "; ".join(differences)
        )
    return name
