"""The one place a checkpoint is written: context + progress -> Checkpoint -> backend.

A checkpoint carries only what changed since the previous one: the new step record (appended),
the context fields whose value changed, the new progress and status. Its cost therefore follows
what a step changed, not how long the run is or how large its untouched context is.

How a context field is found unchanged: a field holding an immutable value (``str``, ``bytes``,
numbers, ``None``) that is the very object last committed is skipped without serializing it;
any other field is serialized and written only if its bytes differ from the last committed
bytes. Fields declared as plain JSON types (``str``, ``int``, ``dict[str, Any]``,
``list[...]`` and the like, with no custom serializer) are serialized by the backend's
serializer directly; every other field goes through the context model's own pydantic
serializer (JSON mode), so custom field types and serializers are honoured.
"""

from __future__ import annotations

import asyncio
import types
import typing
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from flujo.exceptions import SerializationError
from flujo.state.backends.base import Checkpoint, RunHeader, now
from flujo.state.serialization import active_scrubber

if TYPE_CHECKING:
    from flujo.domain.models import StepError, StepResult
    from flujo.domain.usage import RunMeter, Usage
    from flujo.state.backends.base import StateBackend

__all__ = ["StateManager"]


_IMMUTABLE = frozenset({str, int, float, bool, type(None), bytes})


class StateManager:
    """Writes the checkpoints of one run, with compare-and-swap on the stored version."""

    __slots__ = (
        "_fields",
        "_header",
        "_initial",
        "_lock",
        "_plain",
        "_scrubber",
        "_status",
        "_usage",
        "backend",
        "context",
        "history_len",
        "meter",
        "run_id",
        "serializer",
        "version",
    )

    def __init__(
        self,
        backend: StateBackend,
        run_id: str,
        context: BaseModel,
        *,
        version: int,
        history_len: int,
        header: RunHeader | None,
        stored_context: dict[str, Any] | None = None,
        status: str | None = None,
        meter: RunMeter | None = None,
    ) -> None:
        self.backend = backend
        self.serializer = backend.serializer
        self.run_id = run_id
        self.context = context
        self.version = version
        self.history_len = history_len
        self._header = header
        self._lock = asyncio.Lock()  # composite steps may record sub-steps concurrently
        self._status = status  # the stored status (None: not stored yet)
        # The run's usage, committed with every checkpoint whenever it changed.
        self.meter = meter
        self._usage: Usage | None = None if meter is None else meter.total
        # FLUJO_GOVERNANCE_PII_SCRUB: every value written is scrubbed (read once per run).
        self._scrubber = active_scrubber()
        self._plain = plain_json_fields(type(context))
        # field name -> (the value object last committed, its committed JSON bytes)
        self._fields: dict[str, tuple[Any, bytes]] = {}
        # A new run stores its whole starting context with its first checkpoint, as it was
        # before any step ran (a first step that fails leaves it untouched).
        self._initial: dict[str, bytes] = {}
        if header is not None:
            self._initial, pending = self._context_changes(every_field=True)
            self._remember(pending)
        if stored_context:
            values = _field_values(context)
            for name, stored in stored_context.items():
                if name in values:
                    self._fields[name] = (values[name], orjson.dumps(stored))

    # -- the checkpoints a run writes ------------------------------------------------------------

    async def step_completed(self, result: StepResult, *, completed: bool) -> None:
        """Commit a successful step: its record, its output, the context it left."""
        async with self._lock:
            output = self.serializer.dumps(result.output, f"output of step {result.name!r}")
            context, pending = self._context_changes()
            await self._commit(
                status="completed" if completed else "running",
                current_step_index=result.index + 1,
                last_step_output=output,
                error=None,
                context=context,
                records=[_record(result, output)],
            )
            self._remember(pending)

    async def step_recorded(
        self,
        result: StepResult,
        *,
        top_index: int,
        kind: str = "step",
        extras: dict[str, Any] | None = None,
    ) -> None:
        """Commit a sub-step of the composite step at ``top_index`` (the run's progress stays
        at that step): its record, its output and, if it succeeded, the context it left."""
        async with self._lock:
            where = f"step {result.name!r} at {list(result.location)}"
            if result.success:
                output = self.serializer.dumps(result.output, f"output of {where}")
                context, pending = self._context_changes()
            else:
                output, context, pending = b"null", {}, []
            extra = {
                key: self.serializer.dumps(value, f"{key} of {where}")
                for key, value in (extras or {}).items()
            }
            await self._commit(
                status="running",
                current_step_index=top_index,
                last_step_output=None,
                error=None,
                context=context,
                records=[_record(result, output, kind=kind, extras=extra)],
            )
            self._remember(pending)

    async def step_failed(self, result: StepResult) -> None:
        """Commit a failed step's record and the run's ``failed`` status; context unchanged."""
        async with self._lock:
            await self._commit(
                status="failed",
                current_step_index=result.index,
                last_step_output=None,
                error=_error(result.error, result.name),
                context={},
                records=[_record(result, b"null")],
            )

    async def stopped(
        self,
        status: Literal["paused", "cancelled"],
        *,
        index: int,
        reason: StepError,
        step_name: str | None,
        path: tuple[int | str, ...] | None = None,
    ) -> None:
        """Commit a pause or a cancellation at step ``index`` (context as last committed);
        ``path`` locates a nested step that paused."""
        async with self._lock:
            await self._commit(
                status=status,
                current_step_index=index,
                last_step_output=None,
                error=_error(reason, step_name, path),
                context={},
                records=[],
            )

    async def queued(self) -> None:
        """Commit a new run as queued (its header and starting context; nothing ran yet)."""
        async with self._lock:
            await self._commit(
                status="queued",
                current_step_index=0,
                last_step_output=None,
                error=None,
                context={},
                records=[],
            )

    def rollback_context(self) -> None:
        """Put the context back as last committed (after a failed step), in place."""
        fields = self._fields
        if not fields:
            return
        context = self.context
        committed = b"{" + b",".join(orjson.dumps(n) + b":" + d for n, (_, d) in fields.items())
        try:
            fresh = type(context).model_validate_json(committed + b"}", by_name=True)
        except ValueError:  # cannot happen for data this manager committed; keep what we have
            return
        context.__dict__.update(fresh.__dict__)
        if context.__pydantic_extra__ is not None:
            context.__pydantic_extra__.clear()
            context.__pydantic_extra__.update(fresh.__pydantic_extra__ or {})
        values = _field_values(context)
        self._remember([(name, values[name], data) for name, (_, data) in fields.items()])

    # -- internals -------------------------------------------------------------------------------

    async def _commit(
        self,
        *,
        status: str,
        current_step_index: int,
        last_step_output: bytes | None,
        error: bytes | None,
        context: dict[str, bytes],
        records: list[bytes],
    ) -> None:
        header = self._header
        if header is not None:
            context = {**self._initial, **context}
        usage = None
        meter = self.meter
        if meter is not None and meter.total is not self._usage:
            usage = meter.total
        checkpoint = Checkpoint(
            run_id=self.run_id,
            expected_version=self.version,
            status=status,
            current_step_index=current_step_index,
            updated_at=now(),
            last_step_output=last_step_output,
            error=error,
            context=context,
            steps=records,
            step_offset=self.history_len,
            header=header,
            status_changed=status != self._status,
            usage=None if usage is None else orjson.dumps(usage.to_dict()),
        )
        if self._scrubber is not None:
            from flujo.governance import scrub_checkpoint  # noqa: PLC0415 - loaded with it

            checkpoint = scrub_checkpoint(checkpoint, self._scrubber)
        if self.backend.writes_may_suspend:
            self.version = await self._write_through_cancellation(checkpoint)
        else:  # no await inside the write: a cancellation lands before it or after this line
            self.version = await self.backend.write_checkpoint(checkpoint)
        self._status = status
        self.history_len += len(records)
        self._header = None
        self._initial = {}
        if usage is not None:
            self._usage = usage

    async def _write_through_cancellation(self, checkpoint: Checkpoint) -> int:
        """Write ``checkpoint`` even if this task is cancelled meanwhile.

        Sub-steps run side by side (map items, parallel branches), and the first one to fail or
        pause cancels the others. A write cut off half-way would leave its outcome unknown and
        this run's version behind the store's; so the write finishes, its version is kept, and
        the cancellation goes on afterwards.
        """
        task = asyncio.ensure_future(self.backend.write_checkpoint(checkpoint))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self.version = await task
            self._status = checkpoint.status
            self.history_len += len(checkpoint.steps)
            self._header = None
            self._initial = {}
            raise

    def _remember(self, pending: list[tuple[str, Any, bytes]]) -> None:
        fields = self._fields
        for name, value, data in pending:
            fields[name] = (value, data)

    def _context_changes(
        self, *, every_field: bool = False
    ) -> tuple[dict[str, bytes], list[tuple[str, Any, bytes]]]:
        """Serialize the context fields that may have changed; return those that did.

        Returns (changed field -> bytes, [(field, value, bytes)] to remember once committed).
        """
        context = self.context
        values = context.__dict__ if not context.__pydantic_extra__ else _field_values(context)
        cache = self._fields
        plain = self._plain
        dumps = self.serializer.dumps
        changed: dict[str, bytes] = {}
        pending: list[tuple[str, Any, bytes]] = []
        typed: list[str] = []
        for name, value in values.items():
            cached = cache.get(name)
            if (
                cached is not None
                and not every_field
                and cached[0] is value
                and type(value) in _IMMUTABLE
            ):
                continue
            if name not in plain:
                typed.append(name)
                continue
            data = dumps(value, f"pipeline_context.{name}")
            if every_field or cached is None or cached[1] != data:
                changed[name] = data
            pending.append((name, value, data))
        if typed:
            dumped = self._dump_fields(set(typed))
            for name in typed:
                path = f"pipeline_context.{name}"
                data = dumps(dumped[name], path)
                if b"null" in data:  # the JSON dump turns NaN into None; check the raw value
                    self.serializer.ensure_finite(values[name], path)
                cached = cache.get(name)
                if every_field or cached is None or cached[1] != data:
                    changed[name] = data
                pending.append((name, values[name], data))
        return changed, pending

    def _dump_fields(self, names: set[str]) -> dict[str, Any]:
        """The named fields as JSON data, through the context model's own serializer."""
        try:
            return self.context.model_dump(
                mode="json",
                include=names,
                by_alias=False,
                round_trip=True,
                warnings=False,
                fallback=self.serializer.default,
            )
        except (PydanticSerializationError, TypeError, ValueError) as exc:
            # Find the culprit with the plain serializer, which names the path.
            values = _field_values(self.context)
            for name in sorted(names):
                self.serializer.dumps(values[name], f"pipeline_context.{name}")
            raise SerializationError(
                f"pipeline_context: cannot serialize the context ({exc})", path="pipeline_context"
            ) from exc


def _field_values(context: BaseModel) -> dict[str, Any]:
    """The context's fields and extra fields, by name."""
    extra = context.__pydantic_extra__
    if extra:
        return {**{n: context.__dict__[n] for n in type(context).model_fields}, **extra}
    fields = type(context).model_fields
    values = context.__dict__
    return {name: values[name] for name in fields}


def _record(
    result: StepResult,
    output: bytes,
    *,
    kind: str = "step",
    extras: dict[str, bytes] | None = None,
) -> bytes:
    """A step record as JSON, with the already-serialized output (and extras) spliced in."""
    head: dict[str, Any] = {
        "index": result.index,
        "name": result.name,
        "success": result.success,
        "attempts": result.attempts,
        "latency_s": result.latency_s,
        "error": None if result.error is None else result.error.to_dict(),
    }
    if result.path is not None:
        head["path"] = result.path
    if kind != "step":
        head["kind"] = kind
    if result.cache_hit:
        head["cache_hit"] = True
    if result.usage:
        head["usage"] = result.usage.to_dict()
    record = orjson.dumps(head)[:-1] + b',"output":' + output
    for key, value in (extras or {}).items():
        record += b"," + orjson.dumps(key) + b":" + value
    return record + b"}"


def _error(
    error: StepError | None, step_name: str | None, path: tuple[int | str, ...] | None = None
) -> bytes | None:
    if error is None:
        return None
    data: dict[str, Any] = {"type": error.type, "message": error.message, "step": step_name}
    if path is not None:
        data["path"] = list(path)
    return orjson.dumps(data)


_PLAIN_TYPES = frozenset({str, int, float, bool, type(None), dict, list, Any})
_plain_cache: dict[type[BaseModel], frozenset[str]] = {}


def plain_json_fields(model: type[BaseModel]) -> frozenset[str]:
    """Fields of ``model`` whose declared type is plain JSON data with no custom serializer."""
    found = _plain_cache.get(model)
    if found is not None:
        return found
    custom: set[str] = set()
    for decorator in model.__pydantic_decorators__.field_serializers.values():
        custom.update(decorator.info.fields)
    if "*" in custom:
        found = frozenset()
    else:
        found = frozenset(
            name
            for name, info in model.model_fields.items()
            if name not in custom and not info.metadata and _is_plain(info.annotation)
        )
    _plain_cache[model] = found
    return found


def _is_plain(annotation: Any) -> bool:
    if annotation in _PLAIN_TYPES:
        return True
    origin = typing.get_origin(annotation)
    if origin in (dict, list, typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if origin is dict and args and args[0] is not str:
            return False
        return all(_is_plain(arg) for arg in args)
    return False
