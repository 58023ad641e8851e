"""CacheStep: memoize a step on a stable hash of its identity, input and chosen context fields."""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from typing_extensions import TypeVar

from flujo.application.core.frame import ChildFailed, typed_output
from flujo.domain.control import _Composite
from flujo.domain.step import Step
from flujo.exceptions import ConfigurationError
from flujo.state.cache import CacheBackend, InMemoryCache
from flujo.state.serialization import Serializer, active_scrubber, flujo_default_serializer

if TYPE_CHECKING:
    from flujo.application.core.frame import Frame

__all__ = ["CacheStep"]

InT = TypeVar("InT", default=Any)
OutT = TypeVar("OutT", default=Any)

_SERIALIZER = Serializer()


class CacheStep(_Composite[InT, OutT]):
    """Run ``wrapped`` once per distinct input; later calls return the stored output.

    >>> summarize = CacheStep.cached(Step.from_callable(len, name="count"))   # in-memory LRU
    >>> persistent = CacheStep.cached(
    ...     Step.from_callable(len, name="count"), SQLiteCache("cache.db")
    ... )                                                                      # doctest: +SKIP

    The key is a SHA-256 of the step's identity (its name and the qualified name of its function
    or agent class), its input and the values of ``context_fields``, serialized as canonical
    JSON, so equal inputs hit whatever their dict order. A hit is marked ``cache_hit=True`` in
    the step history. Outputs are stored as JSON and come back validated into the step's
    declared output type. Failures are not cached.
    """

    def __init__(
        self,
        wrapped: Step[InT, OutT],
        cache_backend: CacheBackend | None = None,
        *,
        context_fields: Sequence[str] = (),
        name: str | None = None,
    ) -> None:
        if not isinstance(wrapped, Step):
            raise ConfigurationError(f"CacheStep wraps a Step, got {wrapped!r}")
        super().__init__(name or wrapped.name)
        if cache_backend is not None and not isinstance(cache_backend, CacheBackend):
            raise ConfigurationError(
                f"cache_backend must be a CacheBackend, got {type(cache_backend).__name__}"
            )
        self.wrapped = wrapped
        self.cache = InMemoryCache() if cache_backend is None else cache_backend
        self.context_fields = tuple(context_fields)
        self.input_type = wrapped.input_type
        self.output_type = wrapped.output_type

    @classmethod
    def cached(
        cls,
        step: Step[InT, OutT],
        cache_backend: CacheBackend | None = None,
        *,
        context_fields: Sequence[str] = (),
    ) -> CacheStep[InT, OutT]:
        """``step``, memoized in ``cache_backend`` (an in-memory LRU by default)."""
        return cls(step, cache_backend, context_fields=context_fields)

    def _locate(self, rest: tuple[int | str, ...]) -> tuple[Step[Any, Any], tuple[int | str, ...]]:
        return self.wrapped, rest[1:]

    def identity(self) -> str:
        """What tells this step apart in a cache shared by several steps: its name and the
        qualified name of its function, agent class or step class."""
        wrapped = self.wrapped
        target: Any = wrapped.agent if wrapped.agent is not None else wrapped._target
        while isinstance(target, functools.partial):
            target = target.func
        if target is None:
            origin: Any = type(wrapped)
        elif inspect.isroutine(target) or isinstance(target, type):
            origin = target
        else:
            origin = type(target)
        qualname = getattr(origin, "__qualname__", type(origin).__qualname__)
        return f"{wrapped.name}|{getattr(origin, '__module__', '')}.{qualname}"

    def cache_key(self, data: Any, context: Any) -> str:
        """The key for ``data`` in ``context``."""
        fields = {}
        for field in self.context_fields:
            if not hasattr(context, field):
                raise ConfigurationError(
                    f"cached step {self.name!r}: the context has no field {field!r}"
                )
            fields[field] = getattr(context, field)
        payload = {"step": self.identity(), "input": data, "context": fields}
        try:
            blob = orjson.dumps(
                payload, default=flujo_default_serializer, option=orjson.OPT_SORT_KEYS
            )
        except TypeError:
            _SERIALIZER.dumps(payload, f"cache key of step {self.name!r}")  # names the culprit
            raise
        return "flujo-cache:" + hashlib.sha256(blob).hexdigest()

    async def _run(self, data: Any, frame: Frame) -> Any:
        key = self.cache_key(data, frame.context)
        stored = await self.cache.get(key)
        if stored is not None:
            frame.cache_hit = True
            return typed_output(orjson.loads(stored), self.wrapped)
        path = (*frame.path, 0)
        inner = frame.child(path) if self.wrapped.composite else None
        result = await frame.scope.executor.execute(
            self.wrapped, data, frame.context, frame.resources, 0, inner, path
        )
        frame.children.append(result)
        if not result.success:
            raise ChildFailed(result)
        value = _SERIALIZER.dumps(result.output, f"output of {self.name!r}")
        scrubber = active_scrubber()  # FLUJO_GOVERNANCE_PII_SCRUB: cached outputs too
        if scrubber is not None:
            value = scrubber.scrub_json(value)
        await self.cache.set(key, value)
        return result.output
