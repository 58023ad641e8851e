"""What agents cost (requests, tokens, dollars) and the limits a run must stay under.

Every agent call reports its :class:`Usage` with :func:`report_usage`; flujo adds it to the
step that made the call (``StepResult.usage``, stored in the step's record) and to the run
(``PipelineResult.usage``, committed with every checkpoint, so it survives a crash and counts
across resumes). Before each agent call, :func:`check_usage_limits` refuses to start it once
the run has reached one of its :class:`UsageLimits`::

    from flujo import Flujo, UsageLimits

    runner = Flujo(pipeline, usage_limits=UsageLimits(total_cost_usd_limit=1.0))

A call that crosses a limit finishes (its cost is known only afterwards); the next one is
refused with :class:`~flujo.exceptions.UsageLimitExceededError`.
"""

from __future__ import annotations

import math
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from flujo.exceptions import UsageLimitExceededError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "NO_USAGE",
    "RunMeter",
    "StepMeter",
    "StoredUsage",
    "Usage",
    "UsageLimits",
    "check_usage_limits",
    "count_recorded",
    "current_step_meter",
    "report_usage",
]


@dataclass(frozen=True, slots=True)
class Usage:
    """Requests, tokens and cost of one or more agent calls.

    >>> Usage(requests=1, input_tokens=10, output_tokens=5) + Usage(requests=1, cost_usd=0.5)
    Usage(requests=2, input_tokens=10, output_tokens=5, cost_usd=0.5)
    """

    requests: int = 0
    """Model requests made."""
    input_tokens: int = 0
    """Tokens sent to the model."""
    output_tokens: int = 0
    """Tokens the model produced."""
    cost_usd: float = 0.0
    """What the calls cost, in US dollars, by the price table (0 for an unknown model)."""

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.requests + other.requests,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cost_usd + other.cost_usd,
        )

    def __sub__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(
            self.requests - other.requests,
            self.input_tokens - other.input_tokens,
            self.output_tokens - other.output_tokens,
            self.cost_usd - other.cost_usd,
        )

    def __bool__(self) -> bool:
        return bool(self.requests or self.input_tokens or self.output_tokens or self.cost_usd)

    def to_dict(self) -> dict[str, Any]:
        """The stored form."""
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Usage:
        """Rebuild from the stored form (missing or unreadable numbers count as 0)."""
        if not data:
            return cls()
        return cls(
            _count(data.get("requests")),
            _count(data.get("input_tokens")),
            _count(data.get("output_tokens")),
            _amount(data.get("cost_usd")),
        )


#: No usage (shared: a Usage never changes).
NO_USAGE = Usage()


def _usage_from_data(value: Any) -> Any:
    if value is None or isinstance(value, dict):
        return Usage.from_dict(value)
    return value


StoredUsage = Annotated[Usage, BeforeValidator(_usage_from_data)]
"""A pydantic field type: a :class:`Usage`, also read from its stored form (a dict, or None
for no usage)."""


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _amount(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value) if math.isfinite(value) and value > 0 else 0.0


class UsageLimits(BaseModel):
    """The most a run may use; ``None`` means no limit.

    >>> limits = UsageLimits(total_cost_usd_limit=1.0, request_limit=10)
    >>> limits.reached(Usage(requests=10))
    'request_limit'

    An agent call starts only while the run's usage is below every limit. Set them on the
    runner (``Flujo(usage_limits=...)``) or in ``flujo.toml``::

        [budgets]
        total_cost_usd_limit = 5.0
        total_tokens_limit = 200000
        request_limit = 100
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    total_cost_usd_limit: float | None = Field(None, ge=0)
    """The most the run may spend, in US dollars."""
    total_tokens_limit: int | None = Field(None, ge=0)
    """The most input plus output tokens the run may use."""
    request_limit: int | None = Field(None, ge=0)
    """The most model requests the run may make."""

    @field_validator("total_cost_usd_limit")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("total_tokens_limit", "request_limit", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected an integer, not a boolean")
        return value

    def reached(self, usage: Usage) -> str | None:
        """The name of the first limit ``usage`` has reached, or None."""
        if self.total_cost_usd_limit is not None and usage.cost_usd >= self.total_cost_usd_limit:
            return "total_cost_usd_limit"
        if self.total_tokens_limit is not None and usage.total_tokens >= self.total_tokens_limit:
            return "total_tokens_limit"
        if self.request_limit is not None and usage.requests >= self.request_limit:
            return "request_limit"
        return None

    def describe(self, limit: str) -> str:
        """``limit`` with its value, for messages."""
        value = getattr(self, limit)
        return f"{limit}={value:g}" if isinstance(value, float) else f"{limit}={value}"


class RunMeter:
    """The usage of one run: what earlier processes committed plus what this one reported.

    Safe to add to from worker threads (a sync step calling an agent).
    """

    __slots__ = ("_lock", "limits", "top", "total")

    def __init__(self, limits: UsageLimits | None = None, stored: Usage | None = None) -> None:
        self.limits = limits
        self.total = stored or NO_USAGE
        self._lock = threading.Lock()
        self.top = StepMeter(self)
        """The meter of the top-level step running (they run one after another)."""

    def step_meter(self, parent: StepMeter | None) -> StepMeter:
        """A meter for a step starting now: the top-level one (reset) for a top-level step,
        a new one for a sub-step of ``parent``."""
        if parent is None:
            top = self.top
            top.usage = NO_USAGE
            return top
        return StepMeter(self, parent)

    def add(self, usage: Usage) -> None:
        """Count ``usage`` for the run."""
        with self._lock:
            self.total = self.total + usage

    def check(self, pending: Usage | None = None) -> None:
        """Raise UsageLimitExceededError if the run has reached one of its limits (counting
        ``pending``: usage of a call in progress, not reported yet)."""
        limits = self.limits
        if limits is None:
            return
        total = self.total if pending is None else self.total + pending
        limit = limits.reached(total)
        if limit is not None:
            raise UsageLimitExceededError(
                f"usage limit reached ({limits.describe(limit)}): the run has used "
                f"{total.requests} requests, {total.total_tokens} tokens and "
                f"${total.cost_usd:.6f}; no further agent call starts",
                usage=total,
                limits=limits,
                limit=limit,
            )


class StepMeter:
    """The usage of one step execution (all its attempts), counted into its run's meter.

    A sub-step's meter has its composite step's meter as ``parent``: usage reported by the
    sub-step counts for the composite step too (and once for the run).
    """

    __slots__ = ("parent", "run", "usage")

    def __init__(self, run: RunMeter, parent: StepMeter | None = None) -> None:
        self.run = run
        self.parent = parent
        self.usage = NO_USAGE

    def add(self, usage: Usage) -> None:
        """Count ``usage`` for this step, the steps it runs in, and the run."""
        run = self.run
        with run._lock:
            meter: StepMeter | None = self
            while meter is not None:
                meter.usage = meter.usage + usage
                meter = meter.parent
            run.total = run.total + usage

    def add_recorded(self, usage: Usage) -> None:
        """Count, for display only, the usage of a sub-step an earlier attempt recorded (the
        run counted it when it ran)."""
        with self.run._lock:
            meter: StepMeter | None = self
            while meter is not None:
                meter.usage = meter.usage + usage
                meter = meter.parent


_CURRENT: ContextVar[StepMeter | None] = ContextVar("flujo_step_meter", default=None)


def current_step_meter() -> StepMeter | None:
    """The meter of the step running in this task (or thread), if any."""
    return _CURRENT.get()


def report_usage(usage: Usage) -> None:
    """Count an agent call's usage for the step (and run) that made it.

    Outside a run (an agent called directly) this does nothing. flujo's pydantic-ai adapter
    calls it for you; call it from your own agents to have their usage counted and limited::

        from flujo import Usage
        from flujo.domain.usage import report_usage

        report_usage(Usage(requests=1, input_tokens=120, output_tokens=40, cost_usd=0.0003))
    """
    meter = _CURRENT.get()
    if meter is not None and usage:
        meter.add(usage)


def count_recorded(usage: Usage | None) -> None:
    """A composite step re-used a sub-step an earlier attempt recorded: show its usage in the
    composite step's usage (the run counted it when it ran)."""
    meter = _CURRENT.get()
    if meter is not None and usage:
        meter.add_recorded(usage)


def check_usage_limits() -> None:
    """Refuse to start an agent call if the current run has reached a usage limit.

    Raises :class:`~flujo.exceptions.UsageLimitExceededError`; does nothing outside a run.
    """
    meter = _CURRENT.get()
    if meter is not None:
        meter.run.check()
