"""WorkflowState: the stored record of one run."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flujo.domain.usage import NO_USAGE, StoredUsage

__all__ = ["Evaluation", "WorkflowState"]


class WorkflowState(BaseModel):
    """Everything stored about a run: where it is, its context, and how it got there.

    ``current_step_index`` is the number of completed top-level steps, so a resumed run
    continues with ``pipeline.steps[current_step_index]``. ``version`` grows by one with every
    committed checkpoint; a writer that saw an older version is refused (compare-and-swap).
    """

    model_config = ConfigDict(extra="ignore")

    run_id: str
    """The run's id."""
    pipeline_id: str
    """An identifier of the pipeline definition (defaults to its name)."""
    pipeline_name: str
    """The name the run's pipeline is registered (or was run) under."""
    pipeline_version: str
    """The pipeline version the run started on; a resume must run the same version."""
    current_step_index: int
    """How many top-level steps have completed."""
    pipeline_context: dict[str, Any]
    """The typed context, as JSON data (one entry per field)."""
    last_step_output: Any | None = None
    """The newest completed step's output (the next step's input), as JSON data."""
    status: Literal["queued", "running", "paused", "completed", "failed", "cancelled"]
    """Where the run stands; a ``running`` run whose process died is resumed by its id; a
    ``queued`` one waits for a worker."""
    created_at: datetime
    """When the run's first checkpoint was written."""
    updated_at: datetime
    """When the run's newest checkpoint was written."""
    version: int = 0
    """The compare-and-swap counter: the number of checkpoints committed."""
    step_names: list[str] = Field(default_factory=list)
    """The names of the pipeline's steps when the run started."""
    step_history: list[dict[str, Any]] = Field(default_factory=list)
    """Every step execution, in order (see :class:`~flujo.domain.models.StepResult`)."""
    error: dict[str, Any] | None = None
    """Why the run failed, paused or was cancelled: ``{"type", "message", "step"}``."""
    initial_input: Any | None = None
    """The input the run started with."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """JSON metadata given when the run started (``run_async(..., metadata=...)``)."""
    usage: dict[str, Any] | None = None
    """What the run's agent calls used so far: ``{"requests", "input_tokens", "output_tokens",
    "cost_usd"}`` (None when no agent call was counted)."""
    queue: str | None = None
    """The queue of a run submitted to workers (None for a run started in-process)."""
    priority: int = 0
    """Higher runs first among a queue's queued runs."""
    locked_by: str | None = None
    """The worker holding the run's lease, while one does."""
    lease_expires_at: datetime | None = None
    """When that lease runs out unless the worker renews it."""
    cancel_requested: bool = False
    """Set by ``TaskClient.cancel`` on a running run: it stops at its next step boundary."""


class Evaluation(BaseModel):
    """A judge's score of one step output (shadow evaluation), as stored in ``evaluations``.

    >>> Evaluation(run_id="r1", step_name="answer", step_path=[2], score=0.9).score
    0.9
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    eval_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    """The evaluation's id."""
    run_id: str
    """The run whose step was scored."""
    step_name: str
    """The step that was scored."""
    step_path: list[int | str]
    """Where the step ran in the run (``[index]`` for a top-level step)."""
    score: float = Field(allow_inf_nan=False)
    """The judge's score (0 to 1 for flujo's default judge)."""
    reasoning: str = ""
    """Why, in the judge's words (scrubbed when PII scrubbing is on)."""
    judge: str = ""
    """Which judge scored it (its name or model)."""
    usage: StoredUsage = NO_USAGE
    """What the judge's own calls used (not counted in the run's usage or limits)."""
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    """When the score was written."""
