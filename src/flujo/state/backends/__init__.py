"""State backends: one module per store, all behind :class:`StateBackend` (loaded on use)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flujo.state.backends.base import StateBackend

if TYPE_CHECKING:
    from flujo.state.backends.file import FileBackend
    from flujo.state.backends.memory import InMemoryBackend
    from flujo.state.backends.postgres import PostgresBackend
    from flujo.state.backends.sqlite import SQLiteBackend

__all__ = ["FileBackend", "InMemoryBackend", "PostgresBackend", "SQLiteBackend", "StateBackend"]


def __getattr__(name: str) -> Any:
    import flujo.state  # noqa: PLC0415 - one table of backend modules, kept there

    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(flujo.state, name)
    globals()[name] = value
    return value
