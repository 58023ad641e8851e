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
    BackgroundLaunched,
    PipelineContext,
    PipelineResult,
    StepError,
    StepResult,
)
from flujo.domain.pipeline import Pipeline, PipelineRegistry
from flujo.domain.step import Step, StepConfig, step
from flujo.domain.usage import Usage, UsageLimits
from flujo.exceptions import FlujoError, PausedException, PipelineAbortSignal

if TYPE_CHECKING:
    from flujo.application.shadow import EvaluationScore, ShadowEvalConfig
    from flujo.client import TaskClient, TaskDetail, TaskSummary
    from flujo.domain.cache import CacheStep
    from flujo.domain.control import (
        ConditionalStep,
        LoopStep,
        MapStep,
        StateMachineStep,
        Transition,
    )
    from flujo.domain.granular import AgentTurn, GranularStep, ToolCall
    from flujo.domain.human import HumanInTheLoopStep
    from flujo.domain.parallel import (
        BranchFailureStrategy,
        DynamicParallelRouterStep,
        MergeStrategy,
        ParallelStep,
    )
    from flujo.state.cache import CacheBackend, InMemoryCache, PostgresCache, SQLiteCache

__version__ = "0.1.0"

__all__ = [
    "AgentTurn",
    "AppResources",
    "BackgroundLaunched",
    "BranchFailureStrategy",
    "CacheBackend",
    "CacheStep",
    "ConditionalStep",
    "DynamicParallelRouterStep",
    "EvaluationScore",
    "Flujo",
    "FlujoError",
    "GranularStep",
    "HookEvent",
    "HumanInTheLoopStep",
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
    "ShadowEvalConfig",
    "StateMachineStep",
    "Step",
    "StepConfig",
    "StepError",
    "StepFailure",
    "StepResult",
    "TaskClient",
    "TaskDetail",
    "TaskSummary",
    "ToolCall",
    "Transition",
    "Usage",
    "UsageLimits",
    "__version__",
    "step",
]


#: Names loaded on first use (most programs only run pipelines of plain steps).
_LAZY = {
    "EvaluationScore": "flujo.application.shadow",
    "ShadowEvalConfig": "flujo.application.shadow",
    "TaskClient": "flujo.client",
    "TaskDetail": "flujo.client",
    "TaskSummary": "flujo.client",
    "CacheStep": "flujo.domain.cache",
    "HumanInTheLoopStep": "flujo.domain.human",
    "GranularStep": "flujo.domain.granular",
    "AgentTurn": "flujo.domain.granular",
    "ToolCall": "flujo.domain.granular",
    "ConditionalStep": "flujo.domain.control",
    "LoopStep": "flujo.domain.control",
    "MapStep": "flujo.domain.control",
    "StateMachineStep": "flujo.domain.control",
    "Transition": "flujo.domain.control",
    "BranchFailureStrategy": "flujo.domain.parallel",
    "DynamicParallelRouterStep": "flujo.domain.parallel",
    "MergeStrategy": "flujo.domain.parallel",
    "ParallelStep": "flujo.domain.parallel",
    "CacheBackend": "flujo.state.cache",
    "InMemoryCache": "flujo.state.cache",
    "PostgresCache": "flujo.state.cache",
    "SQLiteCache": "flujo.state.cache",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib  # noqa: PLC0415

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
