"""The activation in progress on this thread: where ``emit`` and routine state updates go.

The runtime runs a routine's logic on a pool thread with the :class:`Activation` set as this
thread's current one. ``Routine.emit`` and ``JobState.update_routine_state`` called by the logic
write into it; nothing leaves it until the activation commits (its messages are delivered, its
state updates applied, its inputs consumed, all at once). Logic that fails leaves no trace.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from flujo.exceptions import EmitError

if TYPE_CHECKING:
    from flujo.routines.flow import Plan
    from flujo.routines.job_state import JobState
    from flujo.routines.routine import Routine

__all__ = ["Activation", "current_activation"]


class Activation:
    """One run of one routine's logic in one job, until it commits."""

    __slots__ = ("emits", "plan", "rid", "routine", "state", "states")

    def __init__(self, state: JobState, plan: Plan, rid: str, routine: Routine) -> None:
        self.state = state
        self.plan = plan
        self.rid = rid
        self.routine = routine
        self.emits: list[tuple[str, str, dict[str, Any]]] = []
        """(routine id, event, values) in the order emitted."""
        self.states: dict[str, dict[str, Any]] | None = None
        """Routine states this activation set (routine id -> whole new state)."""

    def emit(self, routine: Routine, event: str, values: dict[str, Any]) -> None:
        """Buffer ``routine``'s ``event`` with ``values``; checked against the event's params."""
        if routine is self.routine:
            rid = self.rid
        else:  # logic may emit on another routine of the same flow
            found = self.plan.ids.get(id(routine))
            if found is None or self.plan.routines[found] is not routine:
                raise EmitError(
                    f"{type(routine).__name__}.emit({event!r}): that routine is not part of "
                    f"flow {self.plan.flow_id!r}, whose routine {self.rid!r} is running",
                    routine_id=routine.routine_id,
                    event=event,
                )
            rid = found
        declared = routine._events.get(event)
        if declared is None:
            raise EmitError(
                f"routine {rid!r} has no event {event!r} (it has {sorted(routine._events)})",
                routine_id=rid,
                event=event,
            )
        params = declared.params
        if params is not None and not params.issuperset(values):
            unknown = sorted(set(values) - params)
            raise EmitError(
                f"event {event!r} of routine {rid!r} declares {sorted(params)}, not {unknown}",
                routine_id=rid,
                event=event,
            )
        self.emits.append((rid, event, values))


class _Local(threading.local):
    activation: Activation | None = None


_local = _Local()


def current_activation() -> Activation | None:
    """The activation whose logic is running on this thread, or None."""
    return _local.activation
