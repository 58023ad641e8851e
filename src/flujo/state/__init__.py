"""Durable state: the backend interface, the built-in backends and the stored run model.

>>> from flujo.state import SQLiteBackend, InMemoryBackend, FileBackend, WorkflowState
"""

from flujo.state.backends.base import StateBackend
from flujo.state.backends.file import FileBackend
from flujo.state.backends.memory import InMemoryBackend
from flujo.state.backends.sqlite import SQLiteBackend
from flujo.state.models import WorkflowState
from flujo.state.serialization import flujo_default_serializer

__all__ = [
    "FileBackend",
    "InMemoryBackend",
    "SQLiteBackend",
    "StateBackend",
    "WorkflowState",
    "flujo_default_serializer",
]
