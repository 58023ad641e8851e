"""The backend parametrization: every contract test runs once per entry of BACKEND_FACTORIES.

To add a backend, write a function ``(store, **kwargs) -> StateBackend`` (``store`` is a
``Store``, unique per test, defined in backend_helpers.py) and append a ``BackendFactory`` to
BACKEND_FACTORIES below. A factory whose store needs setting up first (Postgres: create and
migrate a schema) gives an async ``prepare(store)``.

Tests ask for ``backend`` (one open backend on a fresh store), or for ``make_backend`` to open
more backends on the SAME store (``persistent`` factories share it between instances; the
in-memory one does not). Every backend opened through these fixtures is closed after the test.

Postgres runs with the ``postgres_dsn`` and ``postgres_schema`` fixtures of tests/conftest.py:
one fresh schema per test (every backend of the test opens on it), dropped afterwards. Without
a server the Postgres cases fail under CI=true and skip elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from backend_helpers import BackendFactory, Store

from flujo.state import FileBackend, InMemoryBackend, SQLiteBackend
from flujo.state.backends.base import StateBackend
from flujo.state.backends.postgres import PostgresBackend


def _memory(store: Store, **kwargs: Any) -> StateBackend:
    return InMemoryBackend(**kwargs)


def _sqlite(store: Store, **kwargs: Any) -> StateBackend:
    store.location.mkdir(parents=True, exist_ok=True)
    return SQLiteBackend(store.location / "flujo.db", **kwargs)


def _file(store: Store, **kwargs: Any) -> StateBackend:
    return FileBackend(store.location / "runs", **kwargs)


def _postgres(store: Store, **kwargs: Any) -> StateBackend:
    assert store.postgres_dsn is not None
    assert store.postgres_schema is not None
    # Small pools: a test opens up to eight backends on one schema.
    kwargs.setdefault("pool_min", 0)
    kwargs.setdefault("pool_max", 4)
    return PostgresBackend(store.postgres_dsn, schema=store.postgres_schema, **kwargs)


async def _migrate_postgres(store: Store) -> None:
    backend = _postgres(store)
    try:
        assert await backend.migrate() == [1, 2]
    finally:
        await backend.aclose()


BACKEND_FACTORIES: list[BackendFactory] = [
    BackendFactory("memory", _memory, persistent=False),
    BackendFactory("sqlite", _sqlite, persistent=True),
    BackendFactory("file", _file, persistent=True),
    BackendFactory(
        "postgres", _postgres, persistent=True, prepare=_migrate_postgres, postgres=True
    ),
]


def factory_params(keep: Callable[[BackendFactory], bool] = lambda f: True) -> list[Any]:
    """``BACKEND_FACTORIES`` kept by ``keep``, as pytest params: for a module's own
    ``backend_factory`` override, or ``parametrize("backend_factory", ..., indirect=True)``."""
    return [pytest.param(f, id=f.name, marks=f.marks) for f in BACKEND_FACTORIES if keep(f)]


@pytest.fixture(params=factory_params())
def backend_factory(request: pytest.FixtureRequest) -> BackendFactory:
    """The kind of backend under test (the suite runs once per kind)."""
    factory: BackendFactory = request.param
    return factory


@pytest.fixture
def store_location(tmp_path: Path) -> Path:
    """Where this test's store lives (file-based backends keep everything under it)."""
    return tmp_path / "store"


@pytest.fixture
def store(
    backend_factory: BackendFactory, store_location: Path, request: pytest.FixtureRequest
) -> Store:
    """This test's store; for Postgres, a fresh schema (the Postgres fixtures are only
    requested by the Postgres cases, so the others never skip for want of a server)."""
    if not backend_factory.postgres:
        return Store(store_location)
    return Store(
        store_location,
        postgres_dsn=request.getfixturevalue("postgres_dsn"),
        postgres_schema=request.getfixturevalue("postgres_schema"),
    )


@pytest.fixture
async def make_backend(
    backend_factory: BackendFactory, store: Store
) -> AsyncIterator[Callable[..., StateBackend]]:
    """Open a backend of the kind under test on this test's store: ``make_backend(**kwargs)``."""
    if backend_factory.prepare is not None:
        await backend_factory.prepare(store)
    opened: list[StateBackend] = []

    def make(**kwargs: Any) -> StateBackend:
        backend = backend_factory.create(store, **kwargs)
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        await backend.aclose()


@pytest.fixture
def backend(make_backend: Callable[..., StateBackend]) -> StateBackend:
    """One open backend of the kind under test, on a fresh store."""
    return make_backend()
