"""Durable state: the backend interface, the built-in backends and the stored run model.

>>> from flujo.state import SQLiteBackend, PostgresBackend, backend_from_uri, WorkflowState

Each backend module is imported on first use of its name (so ``import flujo`` stays light);
the Postgres driver (asyncpg) only when a PostgresBackend first connects.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flujo.state.backends.base import StateBackend
from flujo.state.models import WorkflowState
from flujo.state.serialization import flujo_default_serializer
from flujo.state.uri import backend_from_uri

if TYPE_CHECKING:
    from flujo.state.backends.file import FileBackend
    from flujo.state.backends.memory import InMemoryBackend
    from flujo.state.backends.postgres import PostgresBackend
    from flujo.state.backends.sqlite import SQLiteBackend

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

_BACKENDS = {
    "FileBackend": "flujo.state.backends.file",
    "InMemoryBackend": "flujo.state.backends.memory",
    "PostgresBackend": "flujo.state.backends.postgres",
    "SQLiteBackend": "flujo.state.backends.sqlite",
}


def __getattr__(name: str) -> Any:
    module = _BACKENDS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
