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
from flujo.domain.cache import CacheStep
from flujo.domain.control import ConditionalStep, LoopStep, MapStep, StateMachineStep, Transition
from flujo.domain.events import HookEvent, PostRun, PostStep, PreRun, StepFailure
from flujo.domain.models import (
    AppResources,
    PipelineContext,
    PipelineResult,
    StepError,
    StepResult,
)
from flujo.domain.parallel import (
    BranchFailureStrategy,
    DynamicParallelRouterStep,
    MergeStrategy,
    ParallelStep,
)
from flujo.domain.pipeline import Pipeline, PipelineRegistry
from flujo.domain.step import Step, StepConfig, step
from flujo.exceptions import FlujoError, PausedException, PipelineAbortSignal
from flujo.state.cache import CacheBackend, InMemoryCache, PostgresCache, SQLiteCache

if TYPE_CHECKING:
    from flujo.client import TaskClient, TaskDetail, TaskSummary

__version__ = "0.1.0"

__all__ = [
    "AppResources",
    "BranchFailureStrategy",
    "CacheBackend",
    "CacheStep",
    "ConditionalStep",
    "DynamicParallelRouterStep",
    "Flujo",
    "FlujoError",
    "HookEvent",
    "InMemoryCache",
    "LoopStep",
    "MapStep",
    "MergeStrategy",
    "ParallelStep",
    "PausedException",
    "Pipeline",
    "PipelineAbortSignal",
    "PipelineContext",
    "PipelineRegistry",
    "PipelineResult",
    "PostRun",
    "PostStep",
    "PostgresCache",
    "PreRun",
    "SQLiteCache",
    "StateMachineStep",
    "Step",
    "StepConfig",
    "StepError",
    "StepFailure",
    "StepResult",
    "TaskClient",
    "TaskDetail",
    "TaskSummary",
    "Transition",
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
