"""Protocols that user objects satisfy. Nothing here is imported at run time by flujo itself."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["Agent"]


@runtime_checkable
class Agent(Protocol):
    """Anything with ``async run(data, **kwargs)`` is an agent and can back a step::

        class Shout:
            async def run(self, data: str, **kwargs: Any) -> str:
                return data.upper()

        shout = Step(name="shout", agent=Shout())

    If ``run`` declares ``context`` or ``resources`` parameters, the step passes them.
    """

    async def run(self, data: Any, **kwargs: Any) -> Any:
        """Process ``data`` and return the step's output."""
        ...
