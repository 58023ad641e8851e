"""Fixtures shared by every test directory."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import uuid
from collections.abc import AsyncIterator

import pytest

#: The Postgres the tests use (trust auth); override with FLUJO_TEST_POSTGRES_DSN.
POSTGRES_DSN = os.environ.get(
    "FLUJO_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
_reachable: bool | None = None


def _postgres_reachable() -> bool:
    global _reachable  # noqa: PLW0603 - probed once per session
    if _reachable is None:

        async def probe() -> None:
            import asyncpg

            conn = await asyncpg.connect(POSTGRES_DSN, timeout=5)
            await conn.close()

        try:  # on a thread of its own: the caller may be inside a running event loop
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(lambda: asyncio.run(probe())).result()
            _reachable = True
        except Exception:
            _reachable = False
    return _reachable


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The test Postgres DSN. Missing server: fails under CI=true, skips elsewhere."""
    if not _postgres_reachable():
        message = f"PostgreSQL is not reachable at {POSTGRES_DSN}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message}; in CI the Postgres tests must run, not skip")
        pytest.skip(f"{message} (set FLUJO_TEST_POSTGRES_DSN to run the Postgres tests)")
    return POSTGRES_DSN


@pytest.fixture
async def postgres_schema(postgres_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty schema for one test; dropped afterwards."""
    import asyncpg

    schema = f"flujo_test_{uuid.uuid4().hex[:12]}"
    yield schema
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
