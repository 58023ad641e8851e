"""backend_from_uri: the one place a state URI becomes a backend (drivers load lazily).

>>> backend_from_uri("memory://")                          # doctest: +ELLIPSIS
<flujo.state.backends.memory.InMemoryBackend object at ...>

- ``memory://``: :class:`InMemoryBackend`
- ``file:///absolute/dir``, ``file://relative/dir``: :class:`FileBackend`
- ``sqlite:///relative.db``, ``sqlite:////absolute.db`` (``?synchronous=FULL``): SQLiteBackend
- ``postgresql://user:pass@host:5432/db`` (also ``postgres://``): :class:`PostgresBackend`
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from flujo.exceptions import ConfigurationError

if TYPE_CHECKING:
    from flujo.state.backends.base import StateBackend

__all__ = ["backend_from_uri", "redact_uri"]


_USERINFO_SECRET = re.compile(r"(?<=:)[^:@/?#]*(?=@)")
_QUERY_SECRET = re.compile(r"(?i)((?:^|[?&;])(?:password|passwd|pwd|sslpassword)=)[^&;#]*")


def redact_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***`` (for messages and ``flujo config show``).

    Works on malformed URIs too: whatever sits between a ``:`` and an ``@`` is hidden, and so are
    ``password=`` query parameters.

    >>> redact_uri("postgresql://flujo:s3cret@db/flujo?password=x&sslmode=require")
    'postgresql://flujo:***@db/flujo?password=***&sslmode=require'
    """
    text = str(uri)
    return _QUERY_SECRET.sub(r"\1***", _USERINFO_SECRET.sub("***", text))


def backend_from_uri(
    uri: str,
    *,
    postgres_pool_min: int = 1,
    postgres_pool_max: int = 10,
    **backend_options: Any,
) -> StateBackend:
    """The state backend a URI names, with its driver imported only now.

    ``backend_options`` (``serializer_default=``, ``max_payload_bytes=``) go to the backend.
    """
    if not isinstance(uri, str) or "://" not in uri:
        raise ConfigurationError(
            f"state URI {redact_uri(str(uri))!r} is not a URI; use e.g. sqlite:///flujo_ops.db, "
            "postgresql://user@host/db, file:///var/flujo or memory://"
        )
    scheme, _, rest = uri.partition("://")
    scheme = scheme.lower()
    shown = redact_uri(uri)
    if scheme == "memory":
        if rest:
            raise ConfigurationError(f"state URI {shown!r}: memory:// takes no path or options")
        from flujo.state.backends.memory import InMemoryBackend  # noqa: PLC0415

        return InMemoryBackend(**backend_options)
    if scheme == "file":
        directory, _, query = rest.partition("?")
        if query:
            raise ConfigurationError(f"state URI {shown!r}: file:// takes no options")
        if not directory:
            raise ConfigurationError(f"state URI {shown!r} names no directory")
        from flujo.state.backends.file import FileBackend  # noqa: PLC0415

        return FileBackend(Path.cwd() / directory, **backend_options)
    if scheme == "sqlite":
        return _sqlite(uri, rest, backend_options)
    if scheme in ("postgresql", "postgres"):
        from flujo.state.backends.postgres import PostgresBackend  # noqa: PLC0415

        dsn, schema = _postgres_schema(uri)
        return PostgresBackend(
            dsn,
            pool_min=postgres_pool_min,
            pool_max=postgres_pool_max,
            schema=schema,
            **backend_options,
        )
    raise ConfigurationError(
        f"state URI scheme {scheme!r} is not supported (use sqlite, postgresql, file or memory): "
        f"{redact_uri(uri)!r}"
    )


_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _postgres_schema(uri: str) -> tuple[str, str | None]:
    """Take flujo's ``schema=`` option (or a one-schema ``search_path=``) out of a DSN.

    The schema is then created by ``flujo migrate`` and set as the connections' search_path.
    """
    base, sep, query = uri.partition("?")
    if not sep:
        return uri, None
    params = parse_qsl(query, keep_blank_values=True)
    names = {key for key, _ in params}
    for key in ("schema", "search_path"):
        value = dict(params).get(key)
        if value is None or (key == "search_path" and "schema" in names):
            continue
        if _IDENTIFIER.fullmatch(value) is None:
            if key == "schema":
                raise ConfigurationError(
                    f"state URI {redact_uri(uri)!r}: schema must be a plain lower-case identifier"
                )
            return uri, None  # a list of schemas: passed to the server as it is
        rest = [(k, v) for k, v in params if k != key]
        return base + ("?" + urlencode(rest) if rest else ""), value
    return uri, None


def _sqlite(uri: str, rest: str, options: dict[str, Any]) -> StateBackend:
    from flujo.state.backends.sqlite import SQLiteBackend  # noqa: PLC0415

    uri = redact_uri(uri)
    if not rest.startswith("/"):
        raise ConfigurationError(
            f"state URI {uri!r}: write sqlite:///relative.db or sqlite:////absolute/path.db"
        )
    location, _, query = rest[1:].partition("?")
    if not location:
        raise ConfigurationError(f"state URI {uri!r} names no database file")
    params = dict(parse_qsl(query))
    unknown = set(params) - {"synchronous", "busy_timeout_s"}
    if unknown:
        raise ConfigurationError(f"state URI {uri!r}: unknown option(s) {sorted(unknown)}")
    if "synchronous" in params:
        options["synchronous"] = params["synchronous"].upper()
    if "busy_timeout_s" in params:
        try:
            options["busy_timeout_s"] = float(params["busy_timeout_s"])
        except ValueError as exc:
            raise ConfigurationError(f"state URI {uri!r}: busy_timeout_s is not a number") from exc
    return SQLiteBackend(Path.cwd() / location, **options)
