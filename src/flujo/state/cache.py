"""Cache backends for :class:`~flujo.domain.cache.CacheStep`: in memory, SQLite, Postgres.

A cache maps a key (a hash of a step's identity and input) to the step's serialized output.
The in-memory cache is a bounded LRU; the persistent ones keep entries in the ``flujo_cache``
table of a SQLite or Postgres store (created with the store's schema), so they survive
restarts and are shared by every process using the store.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from flujo.exceptions import ConfigurationError

if TYPE_CHECKING:
    from flujo.state.backends.postgres import PostgresBackend
    from flujo.state.backends.sqlite import SQLiteBackend

__all__ = ["CacheBackend", "InMemoryCache", "PostgresCache", "SQLiteCache"]


class CacheBackend(ABC):
    """Where cached step outputs live."""

    @abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None."""

    @abstractmethod
    async def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``."""

    async def aclose(self) -> None:  # noqa: B027 - optional, nothing to release by default
        """Release connections."""


class InMemoryCache(CacheBackend):
    """A bounded, least-recently-used cache in this process (the default).

    >>> import asyncio
    >>> cache = InMemoryCache(maxsize=2)
    >>> asyncio.run(cache.set("a", b"1")); asyncio.run(cache.get("a"))
    b'1'
    """

    def __init__(self, maxsize: int = 1024) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigurationError(f"maxsize must be an int >= 1, got {maxsize!r}")
        self.maxsize = maxsize
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    async def get(self, key: str) -> bytes | None:
        """The value under ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    async def set(self, key: str, value: bytes) -> None:
        """Store ``value``, evicting the least recently used entry when full."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class _StoreCache(CacheBackend):
    """Cached outputs in the ``flujo_cache`` table of a state store."""

    backend: SQLiteBackend | PostgresBackend

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None."""
        return await self.backend.cache_get(key)

    async def set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``."""
        await self.backend.cache_set(key, value)

    async def aclose(self) -> None:
        """Release the store's connections."""
        await self.backend.aclose()


class SQLiteCache(_StoreCache):
    """Cached outputs in a SQLite store's ``flujo_cache`` table.

    Pass the :class:`~flujo.state.SQLiteBackend` your runs use (to share its file and
    connection) or a path.
    """

    def __init__(self, backend_or_path: SQLiteBackend | str | Path) -> None:
        from flujo.state.backends.sqlite import SQLiteBackend  # noqa: PLC0415

        if isinstance(backend_or_path, SQLiteBackend):
            self.backend = backend_or_path
        else:
            self.backend = SQLiteBackend(Path(backend_or_path))


class PostgresCache(_StoreCache):
    """Cached outputs in a Postgres store's ``flujo_cache`` table (created by ``flujo migrate``).

    Pass the :class:`~flujo.state.PostgresBackend` your runs use (to share its pool) or a DSN.
    """

    def __init__(self, backend_or_dsn: PostgresBackend | str) -> None:
        from flujo.state.backends.postgres import PostgresBackend  # noqa: PLC0415

        if isinstance(backend_or_dsn, PostgresBackend):
            self.backend = backend_or_dsn
        else:
            self.backend = PostgresBackend(backend_or_dsn)
