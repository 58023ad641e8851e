"""State serialization: orjson with a data-only default handler. No pickle, ever.

Every backend serializes through a :class:`Serializer`. Its ``default`` is
:func:`flujo_default_serializer` unless the backend was built with ``serializer_default=``::

    >>> from datetime import datetime, timezone
    >>> from flujo.state.serialization import Serializer
    >>> Serializer().dumps({"at": datetime(2026, 1, 2, tzinfo=timezone.utc)})
    b'{"at":"2026-01-02T00:00:00+00:00"}'

Loading is ``orjson.loads`` and nothing else: stored bytes can only ever become dicts, lists,
strings, numbers, booleans and ``None``. No type tags are written or read, so stored data can
never name code to import or call.

A value that cannot be stored fails here, at checkpoint time, with a
:class:`~flujo.exceptions.SerializationError` whose ``path`` names the culprit. NaN and the
infinities are refused (JSON has no way to say them; orjson alone would write ``null``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from enum import Enum
from pathlib import PurePath
from typing import TYPE_CHECKING, Any
from uuid import UUID

import orjson
from pydantic import BaseModel

from flujo.exceptions import PayloadTooLargeError, SerializationError

if TYPE_CHECKING:
    from flujo.governance import Scrubber

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "Serializer",
    "active_scrubber",
    "dumps",
    "flujo_default_serializer",
    "loads",
]

#: Largest single serialized value (a context field, a step output, a history record) a
#: backend accepts by default: 32 MiB. Pass ``max_payload_bytes=`` to a backend to change it.
DEFAULT_MAX_PAYLOAD_BYTES = 32 * 1024 * 1024

# orjson refuses to nest deeper than this; the culprit search stops there too.
_MAX_DEPTH = 254
_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1

Default = Callable[[Any], Any]


def flujo_default_serializer(obj: Any) -> Any:
    """Turn a value orjson does not know natively into JSON-ready data.

    Handles pydantic models (``model_dump(mode="json")``), datetimes, dates and times (ISO 8601),
    enums (their value), UUIDs, decimals and paths (strings), sets and frozensets (lists),
    dataclasses (dicts of their fields) and UTF-8 ``bytes`` (strings, as pydantic does).
    Anything else raises ``TypeError``, which becomes a
    :class:`~flujo.exceptions.SerializationError` naming the value's path.

    >>> from decimal import Decimal
    >>> flujo_default_serializer(Decimal("1.10"))
    '1.10'
    >>> sorted(flujo_default_serializer({3, 1, 2}))
    [1, 2, 3]
    """
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, (datetime, date, time)):
        return obj.isoformat()
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (UUID, Decimal, PurePath)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        try:
            return sorted(obj)
        except TypeError:
            return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        try:
            return bytes(obj).decode("utf-8")
        except UnicodeDecodeError:
            raise TypeError(
                "bytes that are not UTF-8 text cannot be stored as JSON; "
                "use pydantic's Base64Bytes for binary data"
            ) from None
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")


class Serializer:
    """Serializes values to JSON bytes with orjson, and loads them back.

    ``default`` converts what orjson cannot serialize natively (defaults to
    :func:`flujo_default_serializer`); ``max_bytes`` bounds one serialized value.
    """

    __slots__ = ("_finite_encoder", "default", "max_bytes")

    def __init__(
        self, default: Default | None = None, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    ) -> None:
        self.default: Default = default or flujo_default_serializer
        self.max_bytes = max_bytes
        self._finite_encoder = json.JSONEncoder(
            allow_nan=False, check_circular=False, default=self._finite_default
        )

    def dumps(self, obj: Any, path: str = "value") -> bytes:
        """Serialize ``obj``; raise ``SerializationError`` naming ``path`` (or a path below it)."""
        try:
            data = orjson.dumps(obj, default=self.default)
        except TypeError as exc:
            raise self._explain(obj, path, exc) from exc
        # orjson writes NaN and the infinities as null (and pydantic's JSON mode turns them into
        # None). Only output holding a null can hide one, so the full check runs only then.
        if b"null" in data:
            self.ensure_finite(obj, path)
        if len(data) > self.max_bytes:
            raise PayloadTooLargeError(
                f"{path}: serialized value is {len(data)} bytes, over the limit of "
                f"{self.max_bytes} bytes (max_payload_bytes)",
                path=path,
                size=len(data),
                limit=self.max_bytes,
            )
        return data

    @staticmethod
    def loads(data: bytes | str) -> Any:
        """Parse JSON into plain data. Raises ``orjson.JSONDecodeError`` (a ``ValueError``)."""
        return orjson.loads(data)

    # -- NaN detection -------------------------------------------------------------------------

    def ensure_finite(self, obj: Any, path: str) -> None:
        """Raise ``SerializationError`` naming the NaN or infinity inside ``obj``, if any.

        Walks the raw values (pydantic models by their field values, since their JSON mode
        would already have turned a NaN into None), at C speed in the stdlib encoder.
        """
        try:
            self._finite_encoder.encode(obj)
        except ValueError:
            raise self._explain(obj, path, None) from None
        except (TypeError, RecursionError):
            pass  # not a NaN problem; the serializer reports anything else itself

    def _finite_default(self, obj: Any) -> Any:
        # Hand the encoder the raw values inside obj, so no NaN hides behind a conversion.
        if isinstance(obj, BaseModel):
            values = {name: getattr(obj, name) for name in type(obj).model_fields}
            return {**values, **(obj.__pydantic_extra__ or {})}
        if isinstance(obj, Enum):
            return obj.value
        if isinstance(obj, (datetime, date, time, UUID)):
            return None
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        try:
            return self.default(obj)
        except Exception:  # cannot look inside it; orjson already serialized it somehow
            return None

    # -- error explanation (slow path, only after a failure) -----------------------------------

    def _explain(self, obj: Any, path: str, exc: BaseException | None) -> SerializationError:
        found = _find_culprit(obj, self.default, path, 0, set())
        if found is None:
            reason = str(exc) if exc is not None else "value cannot be serialized"
            return SerializationError(f"{path}: {reason}", path=path)
        where, reason = found
        return SerializationError(f"{where}: {reason}", path=where)


def _leaf_problem(obj: Any) -> str | None:
    """Why a scalar cannot be stored, or None when it can."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{obj!r} is not a finite number; JSON cannot store NaN or infinities"
    if isinstance(obj, int) and not isinstance(obj, bool) and not _INT64_MIN <= obj <= _UINT64_MAX:
        return "integer exceeds the 64-bit range that the state store keeps exactly"
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return "string holds a lone UTF-16 surrogate, which is not valid Unicode text"
    return None


def _children(obj: Any, default: Default) -> tuple[list[tuple[str, Any]], str | None]:
    """The sub-values of a container with their path suffixes, or a reason it is a culprit."""
    if isinstance(obj, dict):
        items = []
        for key, value in obj.items():
            if not isinstance(key, str):
                return [], f"dict key {key!r} is not a string"
            if _leaf_problem(key) is not None:
                return [], f"dict key {key!r} holds a lone UTF-16 surrogate"
            items.append((f"[{json.dumps(key)}]", value))
        return items, None
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)], None
    if isinstance(obj, BaseModel):
        names = list(type(obj).model_fields) + list(obj.__pydantic_extra__ or {})
        return [(f".{name}", getattr(obj, name)) for name in names], None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f".{f.name}", getattr(obj, f.name)) for f in dataclasses.fields(obj)], None
    try:
        converted = default(obj)
    except Exception as exc:  # the default handler's own complaint is the reason
        return [], str(exc) or f"cannot serialize {type(obj).__name__}"
    if converted is obj:
        return [], f"cannot serialize {type(obj).__name__}"
    return [("", converted)], None


def _find_culprit(
    obj: Any, default: Default, path: str, depth: int, stack: set[int]
) -> tuple[str, str] | None:
    """Find the innermost value below ``obj`` that cannot be serialized, as (path, reason)."""
    problem = _leaf_problem(obj)
    if problem is not None:
        return path, problem
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return None
    if depth >= _MAX_DEPTH:
        return path, f"data is nested more than {_MAX_DEPTH} levels deep"
    if id(obj) in stack:
        return path, "circular reference"
    stack.add(id(obj))
    try:
        children, reason = _children(obj, default)
        if reason is not None:
            return path, reason
        for suffix, child in children:
            found = _find_culprit(child, default, path + suffix, depth + 1, stack)
            if found is not None:
                return found
    finally:
        stack.discard(id(obj))
    return None


_DEFAULT = Serializer()


def dumps(obj: Any, *, default: Default | None = None) -> bytes:
    """Serialize ``obj`` to JSON bytes with the default (or given) handler.

    >>> dumps({"a": [1, 2.5, None]})
    b'{"a":[1,2.5,null]}'
    """
    serializer = _DEFAULT if default is None else Serializer(default)
    return serializer.dumps(obj)


def loads(data: bytes | str) -> Any:
    """Parse JSON bytes produced by :func:`dumps`.

    >>> loads(b'{"a":[1,2.5,null]}')
    {'a': [1, 2.5, None]}
    """
    return orjson.loads(data)


#: The variables that turn PII scrubbing on (flujo.governance.ENV_PII_SCRUB / ENV_PII_STRONG),
#: looked at first so that runs without governance never load the scrubber.
_SCRUB_VARIABLES = ("FLUJO_GOVERNANCE_PII_SCRUB", "FLUJO_GOVERNANCE_PII_STRONG")


def active_scrubber() -> Scrubber | None:
    """The PII scrubber the environment asks for (None when scrubbing is off); when there is
    one, flujo's own log records are scrubbed too."""
    environ = os.environ
    if not any(environ.get(name) for name in _SCRUB_VARIABLES):
        return None
    from flujo.governance import current_policy, install_log_scrubbing  # noqa: PLC0415

    scrubber = current_policy().scrubber
    if scrubber is not None:
        install_log_scrubbing()
    return scrubber
