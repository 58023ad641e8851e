"""The data a run works with and returns: context, resources, step results, the run's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from flujo.domain.usage import NO_USAGE, Usage

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "AppResources",
    "BackgroundLaunched",
    "ContextReference",
    "PipelineContext",
    "PipelineResult",
    "RunStatus",
    "StepError",
    "StepResult",
]

#: The states a run can be in. ``running`` also describes a run whose process died: resuming
#: it continues from its last checkpoint.
RunStatus = Literal["queued", "running", "paused", "completed", "failed", "cancelled"]


class PipelineContext(BaseModel):
    """The typed, durable state of one run, shared by its steps.

    Subclass it to declare your own fields; every field is checkpointed after each step and
    restored on resume. Assignments are validated, and unknown fields are refused, so a typo
    fails loudly instead of silently vanishing::

        from pydantic import Field
        from flujo import PipelineContext

        class ResearchContext(PipelineContext):
            user_id: str
            results: list[dict[str, str]] = Field(default_factory=list)

    A step receives the context by declaring a ``context`` parameter.
    """

    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    run_id: str = ""
    """The id of the run this context belongs to (set by the runner before the first step)."""

    scratchpad: dict[str, Any] = Field(default_factory=dict)
    """Free-form JSON-serializable data for steps that need no declared field."""


RefT = TypeVar("RefT")


class _Unset:
    """No value yet; survives copying (pydantic deep-copies private attribute defaults)."""

    __slots__ = ()

    def __copy__(self) -> _Unset:
        return self

    def __deepcopy__(self, memo: Any) -> _Unset:
        return self

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


class ContextReference(BaseModel, Generic[RefT]):
    """A context field that points at data kept elsewhere, in a state provider.

    Only the pointer (``provider_id``, ``key``) is checkpointed, never the data::

        class DocContext(PipelineContext):
            # stored as {"provider_id": "s3", "key": "bucket/file.pdf"}
            raw_document: ContextReference[bytes] = ContextReference(
                provider_id="s3", key="bucket/file.pdf"
            )

        runner = Flujo(pipeline, context_model=DocContext, state_providers={"s3": S3Provider()})

    Before each step the runner hydrates every reference from its provider
    (``await provider.load(key)``); the step reads it with :meth:`get` and replaces it with
    :meth:`set`; after the step succeeds the runner saves it back (``await provider.save(key,
    value)``). A reference whose provider is missing is left unhydrated (a warning is logged)
    and :meth:`get` raises :class:`~flujo.exceptions.ContextReferenceError`.
    """

    provider_id: str
    """Which of the runner's ``state_providers`` holds the data."""
    key: str
    """Where the data is, for that provider."""
    _value: Any = PrivateAttr(default=_UNSET)

    @property
    def hydrated(self) -> bool:
        """Whether the data has been loaded (or set) in this process."""
        return self._value is not _UNSET

    def get(self) -> RefT:
        """The data; raises ContextReferenceError if it was never hydrated."""
        if self._value is _UNSET:
            from flujo.exceptions import ContextReferenceError  # noqa: PLC0415

            raise ContextReferenceError(
                f"context reference {self.provider_id}:{self.key} was not hydrated: the runner "
                f"has no state provider {self.provider_id!r} (pass state_providers=...)",
                provider_id=self.provider_id,
                key=self.key,
            )
        value: RefT = self._value
        return value

    def set(self, value: RefT) -> None:
        """Replace the data (saved to the provider after the step succeeds)."""
        self._value = value


class AppResources(BaseModel):
    """Long-lived objects (database pools, API clients) injected into steps, never persisted.

    Subclass it and pass an instance as ``Flujo(resources=...)``; a step receives it by
    declaring a ``resources`` parameter::

        class ServiceResources(AppResources):
            db_conn: Any

        async def my_step(data: str, *, resources: ServiceResources) -> str: ...
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)


class BackgroundLaunched(BaseModel):
    """The output of a background step: its task was launched (and runs on its own).

    ``task_id`` is the task's run id: ``runner.run_async(None, run_id=task_id)`` (or
    ``TaskClient.get_task``) finds it; ``queue`` is where it waits for a worker in queue mode.
    """

    model_config = ConfigDict(frozen=True)

    task_id: str
    queue: str | None = None
    status: Literal["launched"] = "launched"


@dataclass(frozen=True, slots=True)
class StepError:
    """Why a step failed: the exception's type name and message."""

    type: str
    """The exception class name, for example ``"ValueError"``."""
    message: str
    """``str()`` of the exception."""

    @classmethod
    def from_exception(cls, exc: BaseException) -> StepError:
        """Describe ``exc``."""
        return cls(type(exc).__name__, str(exc))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepError:
        """Rebuild from the stored form."""
        return cls(str(data.get("type", "")), str(data.get("message", "")))

    def to_dict(self) -> dict[str, str]:
        """The stored form."""
        return {"type": self.type, "message": self.message}

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type


@dataclass(slots=True)
class StepResult:
    """What one execution of a step produced. ``run_stream`` yields these as steps finish."""

    name: str
    """The step's name."""
    output: Any = None
    """The step's return value (after a resume, earlier steps' outputs are their JSON form)."""
    success: bool = True
    """Whether the step succeeded."""
    attempts: int = 1
    """How many times the step was tried (1 plus retries used)."""
    latency_s: float = 0.0
    """Wall time of the step, retries and backoff included, in seconds."""
    error: StepError | None = None
    """Why the step failed, when it did."""
    index: int = 0
    """The step's position in its pipeline (0-based)."""
    path: tuple[int | str, ...] | None = None
    """Where a nested step ran, from the top-level step's index down, e.g. ``(2, 7, 0)`` for
    the first step of item 7 of a map that is top-level step 2. None for a top-level step."""
    step_history: list[StepResult] = field(default_factory=list)
    """The results of the steps a composite step (loop, map, branch, ...) ran, in order."""
    cache_hit: bool = False
    """True when a cached step returned a stored output instead of running."""
    usage: Usage | None = None
    """What the agent calls the step made (all its attempts and sub-steps) used: requests,
    tokens, cost. None when it made none."""

    @property
    def location(self) -> tuple[int | str, ...]:
        """The step's path in the run (``(index,)`` for a top-level step)."""
        return self.path if self.path is not None else (self.index,)

    def to_dict(self) -> dict[str, Any]:
        """The stored form of this result (without its children, which are stored apart)."""
        data: dict[str, Any] = {
            "index": self.index,
            "name": self.name,
            "output": self.output,
            "success": self.success,
            "attempts": self.attempts,
            "latency_s": self.latency_s,
            "error": None if self.error is None else self.error.to_dict(),
        }
        if self.path is not None:
            data["path"] = list(self.path)
        if self.cache_hit:
            data["cache_hit"] = True
        if self.usage:
            data["usage"] = self.usage.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepResult:
        """Rebuild a result from its stored form."""
        error = data.get("error")
        path = data.get("path")
        usage = data.get("usage")
        return cls(
            name=str(data.get("name", "")),
            output=data.get("output"),
            success=bool(data.get("success", False)),
            attempts=int(data.get("attempts", 1)),
            latency_s=float(data.get("latency_s", 0.0)),
            error=StepError.from_dict(error) if isinstance(error, dict) else None,
            index=int(data.get("index", 0)),
            path=tuple(path) if isinstance(path, list) else None,
            cache_hit=bool(data.get("cache_hit", False)),
            usage=Usage.from_dict(usage) if isinstance(usage, dict) else None,
        )


def build_history(records: Iterable[Mapping[str, Any]]) -> list[StepResult]:
    """Stored step records (flat, in the order they were written) as a tree.

    A composite step's record is written after its children's, so each nested record goes
    under the latest record whose location is the longest prefix of its own path; top-level
    records form the root list. Children of a step still in progress (no record yet) go under
    a placeholder for it, marked unsuccessful, at the end.
    """
    results = [
        StepResult.from_dict(record)
        for record in records
        if record.get("kind", "step") in ("step", "branch", "turn")  # not bookkeeping records
    ]
    latest: dict[tuple[int | str, ...], StepResult] = {}
    for result in results:
        latest[result.location] = result
    roots: list[StepResult] = []
    placeholders: dict[tuple[int | str, ...], StepResult] = {}
    for result in results:
        if result.path is None:
            roots.append(result)
            continue
        parent = None
        for cut in range(len(result.path) - 1, 0, -1):
            parent = latest.get(result.path[:cut])
            if parent is not None:
                break
        if parent is None:
            top = result.path[:1]
            parent = placeholders.get(top)
            if parent is None:
                index = top[0] if isinstance(top[0], int) else 0
                # attempts=0 marks a placeholder: no record of this step exists yet
                parent = StepResult(name=f"step {index}", success=False, attempts=0, index=index)
                placeholders[top] = parent
        parent.step_history.append(result)
    roots.extend(placeholders.values())
    for result in results:  # siblings in path order, as the live steps list them
        if len(result.step_history) > 1:
            result.step_history.sort(key=lambda child: _path_key(child.location))
    for placeholder in placeholders.values():
        placeholder.step_history.sort(key=lambda child: _path_key(child.location))
    return roots


def _path_key(path: tuple[int | str, ...]) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a path: numbers by value, names by text, numbers before names."""
    return tuple((0, part) if isinstance(part, int) else (1, str(part)) for part in path)


OutT = TypeVar("OutT")
CtxT = TypeVar("CtxT", bound=PipelineContext)


@dataclass(slots=True)
class PipelineResult(Generic[OutT, CtxT]):
    """The outcome of a run: its status, output, step history and final context.

    >>> result = PipelineResult(run_id="r1", status="completed", output=3)
    >>> result.success
    True
    """

    run_id: str
    """The run's id; pass it as ``run(..., run_id=...)`` to resume or re-read the run."""
    status: RunStatus
    """``completed``, ``failed``, ``paused`` or ``cancelled`` (``running`` is never returned)."""
    output: OutT | None = None
    """The last step's output when the run completed, else ``None``."""
    step_history: list[StepResult] = field(default_factory=list)
    """Every step execution of the run, in order, including those of earlier processes."""
    final_pipeline_context: CtxT | None = None
    """The context as the run left it."""
    error: StepError | None = None
    """Why the run failed, paused or was cancelled."""
    failed_step: str | None = None
    """The name of the step that failed, paused or aborted the run."""
    pause_path: tuple[int | str, ...] | None = None
    """Where a paused run paused (the paused step's location); resume_async checks it."""
    usage: Usage = NO_USAGE
    """What the run's agent calls used, in every process that worked on it: requests, tokens
    and cost (see :class:`~flujo.UsageLimits`)."""

    @property
    def success(self) -> bool:
        """True when the run completed."""
        return self.status == "completed"
