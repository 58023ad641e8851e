"""Every error flujo raises, and the two control-flow signals.

All errors derive from :class:`FlujoError`; each carries, as attributes, the data a caller
needs to act on it (run id, step name, field path). Catch ``FlujoError`` to handle any of them::

    from flujo.exceptions import FlujoError, PausedException, PipelineAbortSignal

    try:
        result = await runner.run_result_async("input")
    except (PausedException, PipelineAbortSignal):
        raise
    except FlujoError as exc:
        log.error("flujo failed: %s", exc)

The signals (:class:`PausedException`, :class:`PipelineAbortSignal`) are not errors: they derive
from :class:`FlujoSignal`, a ``BaseException``, so that a step's ``except Exception:`` cannot
swallow them by accident (the same reason ``asyncio.CancelledError`` is a ``BaseException``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "RUN_STOPPERS",
    "ConfigurationError",
    "ContextReferenceError",
    "ContextValidationError",
    "CorruptStateError",
    "EmitError",
    "FlowError",
    "FlowNotFoundError",
    "FlujoError",
    "FlujoSignal",
    "HumanInputError",
    "InvalidMetadataError",
    "InvalidRoutineIdError",
    "InvalidRunIdError",
    "IterationLimitError",
    "JobFlowMismatchError",
    "JobStateError",
    "MergeConflictError",
    "PausedException",
    "PayloadTooLargeError",
    "PipelineAbortSignal",
    "PipelineMismatchError",
    "PipelineNotFoundError",
    "RoutineNotSerializableError",
    "RunNotFoundError",
    "SchemaVersionError",
    "SerializationError",
    "StateBackendError",
    "StateConflictError",
    "StepTimeoutError",
    "StructuredOutputError",
    "ToolNotAllowedError",
    "UnknownBranchError",
    "UnknownRoutineClassError",
    "UsageLimitExceededError",
]


class FlujoError(Exception):
    """Something went wrong in flujo."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())


class ConfigurationError(FlujoError):
    """flujo was configured or called in a way that cannot work."""


class ContextValidationError(FlujoError, ValueError):
    """Data given for the pipeline context does not fit the context model.

    ``field`` names the first offending field (dotted path), ``errors`` holds pydantic's
    error list.
    """

    def __init__(self, message: str, *, field: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.field = field
        self.errors = errors


class SerializationError(FlujoError, TypeError):
    """A value could not be serialized into the state store.

    ``path`` names where the value sits, for example ``pipeline_context.scratchpad["doc"]``.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class PayloadTooLargeError(SerializationError):
    """A serialized value is larger than the backend's ``max_payload_bytes``."""

    def __init__(self, message: str, *, path: str, size: int, limit: int) -> None:
        super().__init__(message, path=path)
        self.size = size
        self.limit = limit


class InvalidRunIdError(FlujoError, ValueError):
    """A run id is not acceptable (empty, too long, or holding path or control characters)."""

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class InvalidMetadataError(FlujoError, ValueError):
    """Run metadata, or a metadata filter, has a key or value flujo refuses (``key`` names it)."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class StateConflictError(FlujoError):
    """Another writer advanced this run first (compare-and-swap on the state version failed).

    Nothing was written. ``expected_version`` is what this writer last saw;
    ``actual_version`` is what the store holds (``None`` if unknown or absent).
    """

    def __init__(
        self,
        message: str,
        *,
        run_id: str,
        expected_version: int,
        actual_version: int | None,
    ) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.expected_version = expected_version
        self.actual_version = actual_version


class PipelineMismatchError(FlujoError):
    """A stored run cannot be resumed on this pipeline: its name, version or steps differ."""

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class PipelineNotFoundError(FlujoError, LookupError):
    """No pipeline is registered under this name (and version)."""

    def __init__(self, message: str, *, name: str, version: str | None) -> None:
        super().__init__(message)
        self.name = name
        self.version = version


class RunNotFoundError(FlujoError, LookupError):
    """No run with this id is stored."""

    def __init__(self, message: str, *, run_id: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class CorruptStateError(FlujoError):
    """Stored state could not be read back: truncated, garbage, or of an unknown shape."""

    def __init__(self, message: str, *, run_id: str | None) -> None:
        super().__init__(message)
        self.run_id = run_id


class StateBackendError(FlujoError):
    """The state store failed (cannot open, read-only, disk full, connection lost)."""


class SchemaVersionError(StateBackendError):
    """The store's schema is older or newer than this version of flujo understands."""

    def __init__(self, message: str, *, found: int, expected: int) -> None:
        super().__init__(message)
        self.found = found
        self.expected = expected


class StepTimeoutError(FlujoError, TimeoutError):
    """A step ran longer than its ``timeout_s``."""

    def __init__(self, message: str, *, step_name: str, timeout_s: float) -> None:
        super().__init__(message)
        self.step_name = step_name
        self.timeout_s = timeout_s


class HumanInputError(FlujoError, ValueError):
    """Human input given to resume a paused run does not fit the step's ``input_schema``.

    Nothing was written: the run stays paused. ``errors`` holds pydantic's error list.
    """

    def __init__(self, message: str, *, run_id: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.errors = errors


class ContextReferenceError(FlujoError):
    """A ContextReference was read before it was hydrated (its provider is missing or failed)."""

    def __init__(self, message: str, *, provider_id: str, key: str) -> None:
        super().__init__(message)
        self.provider_id = provider_id
        self.key = key


class UnknownBranchError(FlujoError):
    """A branch step chose a branch (or a state machine a state) that does not exist."""

    def __init__(self, message: str, *, step_name: str, key: str) -> None:
        super().__init__(message)
        self.step_name = step_name
        self.key = key


class IterationLimitError(FlujoError):
    """A loop reached ``max_loops`` (or a state machine ``max_transitions``) without ending."""

    def __init__(self, message: str, *, step_name: str, limit: int) -> None:
        super().__init__(message)
        self.step_name = step_name
        self.limit = limit


class MergeConflictError(FlujoError):
    """Parallel branches changed the same context field and no mapping says which one wins."""

    def __init__(self, message: str, *, step_name: str, field: str, branches: list[str]) -> None:
        super().__init__(message)
        self.step_name = step_name
        self.field = field
        self.branches = branches


class UsageLimitExceededError(FlujoError):
    """A run reached one of its usage limits (cost, tokens or requests); no agent call starts.

    ``usage`` is the run's usage so far (a :class:`flujo.Usage`), ``limits`` the
    :class:`flujo.UsageLimits` in force, ``limit`` the name of the limit that was reached.
    The runner checkpoints the run as failed before raising it and sets ``result``.
    """

    def __init__(self, message: str, *, usage: Any, limits: Any, limit: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.limits = limits
        self.limit = limit
        self.result: Any = None
        """The failed run's PipelineResult (set by the runner)."""
        self.step_result: Any = None
        """The StepResult of the step that was stopped (set by flujo as it propagates)."""


class ToolNotAllowedError(FlujoError):
    """An agent called a tool that ``FLUJO_GOVERNANCE_TOOL_ALLOWLIST`` does not list."""

    def __init__(self, message: str, *, tool: str, allowed: frozenset[str]) -> None:
        super().__init__(message)
        self.tool = tool
        self.allowed = allowed


class StructuredOutputError(FlujoError, ValueError):
    """A model's text could not be turned into the step's output type.

    ``raw_text`` is the text the model produced (scrubbed when PII scrubbing is on);
    ``output_type`` names the type it had to fit.
    """

    def __init__(self, message: str, *, raw_text: str, output_type: str) -> None:
        super().__init__(message)
        self.raw_text = raw_text
        self.output_type = output_type


#: Errors that are not a step's failure but stop the whole run: problems of the store itself
#: (another writer won, the database failed) and a usage limit reached. They are raised to the
#: caller, never retried, and never turned into a failed step by composite steps.
RUN_STOPPERS: tuple[type[FlujoError], ...] = (
    StateConflictError,
    StateBackendError,
    UsageLimitExceededError,
)


class FlujoSignal(BaseException):
    """Base of flujo's control-flow signals; deliberately not an ``Exception``."""


class PausedException(FlujoSignal):
    """Raised by a step to pause the run (for example, to wait for a human).

    The runner catches it, stores the run with status ``paused`` and returns a paused result.
    ``step_name`` and ``path`` say which step paused (filled in by flujo as it propagates).
    """

    def __init__(self, message: str = "Paused") -> None:
        super().__init__(message)
        self.message = message
        self.step_name: str | None = None
        self.path: tuple[int | str, ...] | None = None


class PipelineAbortSignal(FlujoSignal):
    """Raised by a step or a hook to stop the run now; the run is stored as ``cancelled``."""

    def __init__(self, message: str = "Aborted") -> None:
        super().__init__(message)
        self.message = message


class CancelRequested(PipelineAbortSignal):
    """A run stops because its cancellation was requested (``TaskClient.cancel``, ``flujo runs
    cancel``); it is stored as ``cancelled`` with this error type, whether it was queued, paused
    or running."""

    def __init__(self, message: str = "cancelled by request") -> None:
        super().__init__(message)


# -- flujo.routines: the event-driven model --------------------------------------------------------


class FlowError(FlujoError):
    """A flow (routines, slots, events and their connections) is defined or described wrongly.

    ``flow_id`` names the flow (None when the routine is not in a flow yet); ``path`` says where
    in serialized flow data the problem sits (``"routines.processor.class"``), or None.
    """

    def __init__(self, message: str, *, flow_id: str | None, path: str | None = None) -> None:
        super().__init__(message)
        self.flow_id = flow_id
        self.path = path


class InvalidRoutineIdError(FlowError, ValueError):
    """A routine id (or a flow, slot or event name) is not acceptable: empty, too long, or
    holding characters other than letters, digits, ``.``, ``_`` and ``-``."""

    def __init__(
        self, message: str, *, routine_id: str, flow_id: str | None, path: str | None = None
    ) -> None:
        super().__init__(message, flow_id=flow_id, path=path)
        self.routine_id = routine_id


class UnknownRoutineClassError(FlowError, LookupError):
    """Serialized flow data names a routine class this program does not know.

    Classes are found only among the ``Routine`` subclasses defined (or registered with
    ``register_serializable``) in the running program; nothing is ever imported by name.
    """

    def __init__(
        self, message: str, *, class_name: str, flow_id: str | None, path: str | None = None
    ) -> None:
        super().__init__(message, flow_id=flow_id, path=path)
        self.class_name = class_name


class RoutineNotSerializableError(SerializationError):
    """A routine cannot be serialized: its class needs constructor arguments, is not the class
    registered under its name, or its slots, events or logic differ from what its constructor
    builds (so they would not survive ``Flow.deserialize``)."""

    def __init__(self, message: str, *, path: str, class_name: str, routine_id: str) -> None:
        super().__init__(message, path=path)
        self.class_name = class_name
        self.routine_id = routine_id


class FlowNotFoundError(FlujoError, LookupError):
    """No flow is registered under this name in the FlowRegistry."""

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name


class EmitError(FlujoError):
    """``Routine.emit`` was called outside a routine's logic, for an event the routine does not
    have, or with values the event does not declare."""

    def __init__(self, message: str, *, routine_id: str | None, event: str) -> None:
        super().__init__(message)
        self.routine_id = routine_id
        self.event = event


class JobStateError(FlujoError, ValueError):
    """A job state cannot be used: serialized data of the wrong shape, a stored run that is not
    a routines job, or a job state given where it cannot go."""

    def __init__(self, message: str, *, job_id: str | None) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobFlowMismatchError(JobStateError):
    """A job state belongs to another flow (``flow_id``) than the one it was given to
    (``expected_flow_id``), or names routines or slots that flow does not have."""

    def __init__(
        self, message: str, *, job_id: str | None, flow_id: str | None, expected_flow_id: str
    ) -> None:
        super().__init__(message, job_id=job_id)
        self.flow_id = flow_id
        self.expected_flow_id = expected_flow_id
