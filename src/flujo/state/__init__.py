"""Durable state: the backend interface, the built-in backends and the stored run model.

>>> from flujo.state import SQLiteBackend, PostgresBackend, backend_from_uri, WorkflowState

The Postgres driver (asyncpg) is imported only when a PostgresBackend first connects.
"""

from flujo.state.backends.base import StateBackend
from flujo.state.backends.file import FileBackend
from flujo.state.backends.memory import InMemoryBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend
from flujo.state.models import WorkflowState
from flujo.state.serialization import flujo_default_serializer
from flujo.state.uri import backend_from_uri

__all__ = [
    "FileBackend",
    "InMemoryBackend",
    "PostgresBackend",
    "SQLiteBackend",
    "StateBackend",
    "WorkflowState",
    "backend_from_uri",
    "flujo_default_serializer",
]
