"""Routine: a unit of logic with input slots and output events, and the registry of its classes.

A routine's constructor declares everything about it: its slots (where messages arrive), its
events (what it emits, with the names of their values), its logic and its activation policy,
and its configuration defaults::

    class Doubler(Routine):
        def __init__(self):
            super().__init__()
            self.input = self.add_slot("input")
            self.output = self.add_event("output", ["result"])
            self.set_config(factor=2)

            def double(slot_data, policy_message, job_state):
                value = slot_data["input"][0]["value"]
                self.emit("output", result=value * self.get_config("factor"))

            self.set_logic(double)

Only the configuration (``set_config``) is data: ``Flow.serialize`` stores it with the class's
name, and ``Flow.deserialize`` calls the constructor again (with no arguments) and puts the
configuration back. So a routine class must construct with no arguments, and keeps what it
needs to remember between activations in its job's state (``job_state.update_routine_state``),
never on ``self``: one routine object serves every job of its flow, possibly at once.

Every ``Routine`` subclass is registered under ``"<module>.<qualified name>"`` when it is defined
(the newest definition wins); :func:`register_serializable` adds a stable name of your choice.
Serialized data can name only registered classes: nothing is ever imported by name.
"""

from __future__ import annotations

import inspect
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from flujo.exceptions import ConfigurationError, EmitError, FlowError, InvalidRoutineIdError
from flujo.routines.activation import _local
from flujo.routines.policies import ActivationPolicy, immediate_policy

if TYPE_CHECKING:
    from flujo.routines.flow import Flow
    from flujo.routines.job_state import JobState

__all__ = [
    "MAX_ID_LENGTH",
    "Event",
    "Logic",
    "Routine",
    "Slot",
    "check_id",
    "find_routine_class",
    "register_serializable",
    "routine_class_name",
]

#: The logic of a routine: ``fn(slot_data, policy_message, job_state)``. ``slot_data`` maps each
#: slot the activation took messages from to the list of those messages (dicts of the values
#: emitted); ``policy_message`` describes the policy; ``job_state`` is the job's JobState.
Logic = Callable[[dict[str, list[dict[str, Any]]], Mapping[str, Any], "JobState"], Any]

MAX_ID_LENGTH = 128
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_id(
    value: object, what: str, *, flow_id: str | None = None, path: str | None = None
) -> str:
    """Return ``value`` if it can name a routine, flow, slot or event: 1-128 characters from
    ``A-Z a-z 0-9 . _ -``, not starting with ``.`` or ``-``.

    >>> check_id("processor", "routine id")
    'processor'
    """
    if isinstance(value, str) and len(value) <= MAX_ID_LENGTH and _ID.fullmatch(value):
        return value
    if isinstance(value, str):
        shown = repr(value if len(value) <= 60 else value[:60] + "...")
    else:
        shown = f"a {type(value).__name__}"
    raise InvalidRoutineIdError(
        f"invalid {what} {shown}: use 1-{MAX_ID_LENGTH} letters, digits, '.', '_' or '-', "
        "not starting with '.' or '-'",
        routine_id=value if isinstance(value, str) else repr(value),
        flow_id=flow_id,
        path=path,
    )


class Slot:
    """Where a routine receives messages (``routine.add_slot(name)``)."""

    __slots__ = ("name", "routine")

    def __init__(self, routine: Routine, name: str) -> None:
        self.routine = routine
        self.name = name

    def __repr__(self) -> str:
        return f"Slot({self.name!r})"


class Event:
    """What a routine emits (``routine.add_event(name, params)``); ``params`` are the names of
    the values it carries (None: any)."""

    __slots__ = ("name", "params", "routine")

    def __init__(self, routine: Routine, name: str, params: frozenset[str] | None) -> None:
        self.routine = routine
        self.name = name
        self.params = params

    def emit(self, **values: Any) -> None:
        """Same as ``routine.emit(name, **values)``."""
        self.routine.emit(self.name, **values)

    def __repr__(self) -> str:
        params = None if self.params is None else sorted(self.params)
        return f"Event({self.name!r}, {params!r})"


_classes: dict[str, type[Routine]] = {}
_classes_lock = threading.Lock()


def _register(cls: type[Routine], name: str) -> None:
    with _classes_lock:
        _classes[name] = cls


def routine_class_name(cls: type[Routine]) -> str:
    """The name ``cls`` is serialized under: its registered name, else module.qualname."""
    explicit: str | None = cls.__dict__.get("_flujo_class_name")
    return explicit or f"{cls.__module__}.{cls.__qualname__}"


def find_routine_class(name: str) -> type[Routine] | None:
    """The registered routine class called ``name``, or None. Never imports anything."""
    with _classes_lock:
        return _classes.get(name)


_R = TypeVar("_R", bound="type[Routine]")


@overload
def register_serializable(cls: _R, *, name: str | None = None) -> _R: ...


@overload
def register_serializable(cls: None = None, *, name: str | None = None) -> Callable[[_R], _R]: ...


def register_serializable(
    cls: _R | None = None, *, name: str | None = None
) -> _R | Callable[[_R], _R]:
    """Register a routine class (bare decorator or ``@register_serializable(name="...")``).

    Every subclass of :class:`Routine` is registered when defined, under its module and
    qualified name; a ``name`` gives it a stable name instead, one that survives moving the
    class to another module. Two classes cannot share a name.
    """

    def decorate(routine_cls: _R) -> _R:
        if not (isinstance(routine_cls, type) and issubclass(routine_cls, Routine)):
            raise ConfigurationError(
                f"register_serializable takes a Routine subclass, got {routine_cls!r}"
            )
        if name is not None:
            check_id(name, "routine class name")
            with _classes_lock:
                existing = _classes.get(name)
                default = f"{routine_cls.__module__}.{routine_cls.__qualname__}"
                if existing is not None and (
                    f"{existing.__module__}.{existing.__qualname__}" != default
                ):
                    raise ConfigurationError(
                        f"routine class name {name!r} is taken by {existing.__qualname__} "
                        f"(module {existing.__module__})"
                    )
                routine_cls._flujo_class_name = name  # type: ignore[attr-defined]
                _classes[name] = routine_cls
        return routine_cls

    if cls is not None:
        return decorate(cls)
    return decorate


class Routine:
    """A unit of logic with input slots and output events (see the module docstring)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls, f"{cls.__module__}.{cls.__qualname__}")

    def __init__(self) -> None:
        self._slots: dict[str, Slot] = {}
        self._events: dict[str, Event] = {}
        self._config: dict[str, Any] = {}
        self._logic: Logic | None = None
        self._policy: ActivationPolicy = immediate_policy()
        self._routine_id: str | None = None
        self._flow: Flow | None = None

    # -- declaring -------------------------------------------------------------------------------

    def add_slot(self, name: str) -> Slot:
        """Declare an input slot; messages connected to it queue there."""
        check_id(name, "slot name", flow_id=self._flow_id())
        if name in self._slots:
            raise FlowError(f"routine already has a slot {name!r}", flow_id=self._flow_id())
        slot = self._slots[name] = Slot(self, name)
        self._changed()
        return slot

    def add_event(self, name: str, params: Iterable[str] | None = None) -> Event:
        """Declare an output event carrying values named ``params`` (None: any names)."""
        check_id(name, "event name", flow_id=self._flow_id())
        if name in self._events:
            raise FlowError(f"routine already has an event {name!r}", flow_id=self._flow_id())
        if isinstance(params, str):
            raise ConfigurationError(
                f"add_event({name!r}, params): params is a list of names, not a string"
            )
        names = None
        if params is not None:
            names = frozenset(params)
            for param in names:
                if not isinstance(param, str):
                    raise ConfigurationError(f"event {name!r}: parameter names must be strings")
        event = self._events[name] = Event(self, name, names)
        self._changed()
        return event

    def set_logic(self, logic: Logic) -> None:
        """Set what an activation runs: ``logic(slot_data, policy_message, job_state)``."""
        if not callable(logic):
            raise ConfigurationError(f"set_logic takes a callable, got {logic!r}")
        if inspect.iscoroutinefunction(logic):
            raise ConfigurationError(
                "routine logic runs on the runtime's thread pool and must be a plain function, "
                "not a coroutine function"
            )
        self._logic = logic

    def set_activation_policy(self, policy: ActivationPolicy) -> None:
        """Set when this routine runs (default: :func:`immediate_policy`)."""
        if not isinstance(policy, ActivationPolicy):
            raise ConfigurationError(f"expected an ActivationPolicy, got {policy!r}")
        self._policy = policy

    def set_config(self, **values: Any) -> None:
        """Set configuration values (serialized with the flow; keep them JSON data)."""
        self._config.update(values)

    def get_config(self, key: str, default: Any = None) -> Any:
        """A configuration value, or ``default``."""
        return self._config.get(key, default)

    # -- running ---------------------------------------------------------------------------------

    def emit(self, event: str, **values: Any) -> None:
        """Emit ``event`` with ``values`` from this routine's logic (or another routine's of the
        same flow). The messages are delivered when the running activation commits."""
        activation = _local.activation
        if activation is None:
            raise EmitError(
                f"{type(self).__name__}.emit({event!r}) was called outside routine logic: "
                "emit only from a routine's logic while the runtime runs it",
                routine_id=self._routine_id,
                event=event,
            )
        activation.emit(self, event, values)

    # -- reading ---------------------------------------------------------------------------------

    @property
    def routine_id(self) -> str | None:
        """The id this routine has in its flow (None until added to one)."""
        return self._routine_id

    @property
    def slots(self) -> Mapping[str, Slot]:
        """The slots, by name, in declaration order."""
        return MappingProxyType(self._slots)

    @property
    def events(self) -> Mapping[str, Event]:
        """The events, by name, in declaration order."""
        return MappingProxyType(self._events)

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the configuration."""
        return dict(self._config)

    @property
    def logic(self) -> Logic | None:
        return self._logic

    @property
    def activation_policy(self) -> ActivationPolicy:
        return self._policy

    def get_slot(self, name: str) -> Slot | None:
        return self._slots.get(name)

    def get_event(self, name: str) -> Event | None:
        return self._events.get(name)

    def __repr__(self) -> str:
        where = f" {self._routine_id!r}" if self._routine_id else ""
        return f"<{type(self).__name__}{where}>"

    # -- internals -------------------------------------------------------------------------------

    def _flow_id(self) -> str | None:
        return None if self._flow is None else self._flow.flow_id

    def _changed(self) -> None:
        if self._flow is not None:
            self._flow._plan = None


_register(Routine, f"{Routine.__module__}.{Routine.__qualname__}")
