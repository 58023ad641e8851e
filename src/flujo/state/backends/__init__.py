"""State backends: one module per store, all behind :class:`StateBackend`."""

from flujo.state.backends.base import StateBackend
from flujo.state.backends.file import FileBackend
from flujo.state.backends.memory import InMemoryBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend

__all__ = ["FileBackend", "InMemoryBackend", "PostgresBackend", "SQLiteBackend", "StateBackend"]
