"""flujo: durable, resumable, type-safe workflows of AI agents and plain functions.

>>> from flujo import Flujo, step
>>> @step
... async def greet(name: str) -> str:
...     return f"Hello, {name}!"
>>> Flujo(greet, persist_state=False).run("world").output
'Hello, world!'
"""

from typing import TYPE_CHECKING, Any

from flujo.application.runner import Flujo
from flujo.domain.events import HookEvent, PostRun, PostStep, PreRun, StepFailure
from flujo.domain.models import (
    AppResources,
    PipelineContext,
    PipelineResult,
    StepError,
    StepResult,
)
from flujo.domain.pipeline import Pipeline, PipelineRegistry
from flujo.domain.step import Step, StepConfig, step
from flujo.exceptions import FlujoError, PausedException, PipelineAbortSignal

if TYPE_CHECKING:
    from flujo.client import TaskClient, TaskDetail, TaskSummary

__version__ = "0.1.0"

__all__ = [
    "AppResources",
    "Flujo",
    "FlujoError",
    "HookEvent",
    "PausedException",
    "Pipeline",
    "PipelineAbortSignal",
    "PipelineContext",
    "PipelineRegistry",
    "PipelineResult",
    "PostRun",
    "PostStep",
    "PreRun",
    "Step",
    "StepConfig",
    "StepError",
    "StepFailure",
    "StepResult",
    "TaskClient",
    "TaskDetail",
    "TaskSummary",
    "__version__",
    "step",
]


def __getattr__(name: str) -> Any:
    # The TaskClient and its models load on first use: most programs only run pipelines.
    if name in ("TaskClient", "TaskDetail", "TaskSummary"):
        from flujo import client  # noqa: PLC0415

        value = getattr(client, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
