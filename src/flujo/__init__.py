"""flujo: durable, resumable, type-safe workflows of AI agents and plain functions.

>>> from flujo import Flujo, step
>>> @step
... async def greet(name: str) -> str:
...     return f"Hello, {name}!"
>>> Flujo(greet, persist_state=False).run("world").output
'Hello, world!'
"""

from flujo.application.runner import Flujo
from flujo.client import TaskClient, TaskDetail, TaskSummary
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
