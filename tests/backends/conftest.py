"""The backend parametrization: every contract test runs once per entry of BACKEND_FACTORIES.

To add a backend (Postgres, say), write a function ``(location, **kwargs) -> StateBackend`` and
append a ``BackendFactory`` (defined in backend_helpers.py) to BACKEND_FACTORIES below::

    def _postgres(location: Path, **kwargs: Any) -> StateBackend:
        # ``location`` is unique per test: derive a schema or database name from it so that
        # tests never see each other's runs.
        return PostgresBackend(dsn, schema=f"t_{abs(hash(location)):x}", **kwargs)

    BACKEND_FACTORIES.append(
        BackendFactory(
            "postgres",
            _postgres,
            persistent=True,
            marks=(pytest.mark.skipif(dsn is None, reason="FLUJO_TEST_POSTGRES_DSN not set"),),
        )
    )

Tests ask for ``backend`` (one open backend on a fresh store), or for ``make_backend`` to open
more backends on the SAME store (``persistent`` factories share it between instances; the
in-memory one does not). Every backend opened through these fixtures is closed after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from backend_helpers import BackendFactory

from flujo.state import FileBackend, InMemoryBackend, SQLiteBackend
from flujo.state.backends.base import StateBackend


def _memory(location: Path, **kwargs: Any) -> StateBackend:
    return InMemoryBackend(**kwargs)


def _sqlite(location: Path, **kwargs: Any) -> StateBackend:
    location.mkdir(parents=True, exist_ok=True)
    return SQLiteBackend(location / "flujo.db", **kwargs)


def _file(location: Path, **kwargs: Any) -> StateBackend:
    return FileBackend(location / "runs", **kwargs)


BACKEND_FACTORIES: list[BackendFactory] = [
    BackendFactory("memory", _memory, persistent=False),
    BackendFactory("sqlite", _sqlite, persistent=True),
    BackendFactory("file", _file, persistent=True),
]


@pytest.fixture(
    params=[pytest.param(f, id=f.name, marks=f.marks) for f in BACKEND_FACTORIES],
)
def backend_factory(request: pytest.FixtureRequest) -> BackendFactory:
    """The kind of backend under test (the suite runs once per kind)."""
    factory: BackendFactory = request.param
    return factory


@pytest.fixture
def store_location(tmp_path: Path) -> Path:
    """Where this test's store lives (file-based backends keep everything under it)."""
    return tmp_path / "store"


@pytest.fixture
async def make_backend(
    backend_factory: BackendFactory, store_location: Path
) -> AsyncIterator[Callable[..., StateBackend]]:
    """Open a backend of the kind under test on this test's store: ``make_backend(**kwargs)``."""
    opened: list[StateBackend] = []

    def make(**kwargs: Any) -> StateBackend:
        backend = backend_factory.create(store_location, **kwargs)
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        await backend.aclose()


@pytest.fixture
def backend(make_backend: Callable[..., StateBackend]) -> StateBackend:
    """One open backend of the kind under test, on a fresh store."""
    return make_backend()
