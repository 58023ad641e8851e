"""Protocols that user objects satisfy. Nothing here is imported at run time by flujo itself."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["Agent", "StateProvider"]


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


@runtime_checkable
class StateProvider(Protocol):
    """Where the data behind a :class:`~flujo.domain.models.ContextReference` lives.

    Implement (or subclass) it, and pass instances as ``Flujo(state_providers={"kg": ...})``::

        class KnowledgeGraphProvider(StateProvider):
            async def load(self, key: str) -> list[dict]:
                return await db.fetch_graph(key)

            async def save(self, key: str, data: list[dict]) -> None:
                await db.store_graph(key, data)
    """

    async def load(self, key: str) -> Any:
        """The data stored under ``key``."""
        ...

    async def save(self, key: str, data: Any) -> None:
        """Store ``data`` under ``key``."""
        ...
