"""Activation policies: when a routine runs, and which queued messages one activation takes.

A routine's messages wait in one queue per slot. Whenever a message arrives (or the routine's
previous activation has committed), the runtime asks the routine's policy to :meth:`select`
from those queues: the policy answers with how many messages to take from which slots, or None
to keep waiting. The messages taken are the activation's ``slot_data``; they count as consumed
when the activation commits.

A policy must decide from the queues alone (their lengths and the messages in them), so that a
job resumed after a crash, whose queues are rebuilt from the store in the same order, makes
the same decisions. Policies are part of a routine's class: ``Flow.deserialize`` gets them from
the constructor, never from the data.

>>> from collections import deque
>>> all_slots_ready_policy().select({"a": deque([1]), "b": deque()}) is None
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

from flujo.exceptions import ConfigurationError

if TYPE_CHECKING:
    from flujo.routines.job_state import Delivery

__all__ = [
    "ActivationPolicy",
    "AllSlotsReadyPolicy",
    "BatchSizePolicy",
    "ImmediatePolicy",
    "Selection",
    "all_slots_ready_policy",
    "batch_size_policy",
    "immediate_policy",
]

#: What a policy selects: (slot name, how many messages from the front of its queue) pairs.
Selection = Sequence[tuple[str, int]]


class ActivationPolicy:
    """Decides when a routine runs. Subclass it and implement :meth:`select`.

    ``message`` is what the routine's logic receives as ``policy_message``: a read-only mapping
    with the policy's ``name`` and parameters.
    """

    name: ClassVar[str] = "custom"
    __slots__ = ("message",)

    def __init__(self) -> None:
        self.message: Mapping[str, Any] = MappingProxyType({"policy": self.name, **self.params()})

    def params(self) -> dict[str, Any]:
        """The policy's parameters (shown in ``policy_message``)."""
        return {}

    def select(self, queues: Mapping[str, Sequence[Delivery]]) -> Selection | None:
        """What the next activation takes from ``queues`` (slot name -> queued messages, in
        arrival order), or None to wait for more messages."""
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ActivationPolicy)
            and type(other) is type(self)
            and self.params() == other.params()
        )

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.params().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.params().items())
        return f"{type(self).__name__}({args})"


class ImmediatePolicy(ActivationPolicy):
    """Run once per message, as soon as it arrives: each activation takes the oldest queued
    message (of any slot) and nothing else."""

    name = "immediate"
    __slots__ = ()

    def select(self, queues: Mapping[str, Sequence[Delivery]]) -> Selection | None:
        best: str | None = None
        best_id = 0
        for slot, queue in queues.items():
            if queue:
                head = queue[0].id
                if best is None or head < best_id:
                    best, best_id = slot, head
        return None if best is None else ((best, 1),)


class AllSlotsReadyPolicy(ActivationPolicy):
    """Fan-in: run when every slot holds a message; each activation takes the oldest message
    of every slot."""

    name = "all_slots_ready"
    __slots__ = ()

    def select(self, queues: Mapping[str, Sequence[Delivery]]) -> Selection | None:
        if not queues:
            return None
        for queue in queues.values():
            if not queue:
                return None
        return tuple((slot, 1) for slot in queues)


class BatchSizePolicy(ActivationPolicy):
    """Run when a slot holds ``size`` messages; each activation takes ``size`` messages from
    that slot (of several full slots, the one whose oldest message is oldest). Fewer than
    ``size`` messages left when a job settles stay pending (see ``JobState.pending``)."""

    name = "batch_size"
    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigurationError(f"batch_size_policy needs a whole number >= 1, got {size!r}")
        self.size = size
        super().__init__()

    def params(self) -> dict[str, Any]:
        return {"size": self.size}

    def select(self, queues: Mapping[str, Sequence[Delivery]]) -> Selection | None:
        size = self.size
        best: str | None = None
        best_id = 0
        for slot, queue in queues.items():
            if len(queue) >= size:
                head = queue[0].id
                if best is None or head < best_id:
                    best, best_id = slot, head
        return None if best is None else ((best, size),)


_IMMEDIATE = ImmediatePolicy()
_ALL_SLOTS_READY = AllSlotsReadyPolicy()


def immediate_policy() -> ActivationPolicy:
    """Activate on every message, one message per activation (the default)."""
    return _IMMEDIATE


def all_slots_ready_policy() -> ActivationPolicy:
    """Activate when every slot has a message; take one from each (fan-in)."""
    return _ALL_SLOTS_READY


def batch_size_policy(size: int) -> ActivationPolicy:
    """Activate when a slot has ``size`` messages; take that many from it."""
    return BatchSizePolicy(size)
