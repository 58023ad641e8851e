"""Steps: the units of work a pipeline runs, and how each one is configured."""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import sys
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Concatenate,
    Generic,
    Literal,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

from flujo.domain.usage import check_usage_limits
from flujo.exceptions import ConfigurationError

if TYPE_CHECKING:
    from flujo.application.core.frame import Frame
    from flujo.domain.cache import CacheStep
    from flujo.domain.control import ConditionalStep, LoopStep, MapStep, StateMachineStep
    from flujo.domain.granular import GranularStep
    from flujo.domain.parallel import DynamicParallelRouterStep, ParallelStep
    from flujo.domain.pipeline import Pipeline

__all__ = ["Step", "StepConfig", "step"]

InT = TypeVar("InT")
OutT = TypeVar("OutT")
NewOutT = TypeVar("NewOutT")
P = ParamSpec("P")


@dataclass(frozen=True, slots=True)
class StepConfig:
    """How a step is executed: retries with exponential backoff, a timeout, threading.

    >>> StepConfig(retries=2, timeout_s=5.0).retries
    2
    """

    retries: int = 0
    """Extra attempts after a failure (0: fail on the first error)."""
    timeout_s: float | None = None
    """Fail an attempt that runs longer than this many seconds (``None``: no limit)."""
    backoff_s: float = 0.5
    """Wait before the first retry; doubles for each further retry."""
    backoff_max_s: float = 30.0
    """Upper bound of the wait between retries."""
    run_in_thread: bool = True
    """Run a plain (non-async) function in a worker thread, so it never blocks the event loop.

    Set it to ``False`` for cheap functions, or ones bound to the calling thread; they then run
    inline on the event loop (and ``timeout_s`` cannot interrupt them)."""
    execution_mode: Literal["foreground", "background"] = "foreground"
    """``"background"``: the step is launched as a durable background task (a run of its own)
    and the pipeline goes on at once with a :class:`~flujo.BackgroundLaunched` outcome."""
    queue: str | None = None
    """The queue a background step's tasks wait in for a worker (default: its run's queue,
    else ``"default"``)."""

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigurationError(f"retries must be an int >= 0, got {self.retries!r}")
        if self.timeout_s is not None and not (
            isinstance(self.timeout_s, (int, float))
            and not isinstance(self.timeout_s, bool)
            and math.isfinite(self.timeout_s)
            and self.timeout_s > 0
        ):
            raise ConfigurationError(f"timeout_s must be a number > 0, got {self.timeout_s!r}")
        for name in ("backoff_s", "backoff_max_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigurationError(f"{name} must be a number >= 0, got {value!r}")
        if not isinstance(self.run_in_thread, bool):
            raise ConfigurationError(f"run_in_thread must be a bool, got {self.run_in_thread!r}")
        if self.execution_mode not in ("foreground", "background"):
            raise ConfigurationError(
                f"execution_mode must be 'foreground' or 'background', got {self.execution_mode!r}"
            )
        if self.queue is not None:
            from flujo.state.backends.base import validate_queue_name  # noqa: PLC0415

            validate_queue_name(self.queue)


def _config(
    base: StepConfig | None,
    *,
    retries: int | None,
    timeout_s: float | None,
    backoff_s: float | None,
    backoff_max_s: float | None,
    run_in_thread: bool | None,
    execution_mode: str | None = None,
    queue: str | None = None,
) -> StepConfig:
    config = base or StepConfig()
    changes: dict[str, Any] = {
        key: value
        for key, value in (
            ("retries", retries),
            ("timeout_s", timeout_s),
            ("backoff_s", backoff_s),
            ("backoff_max_s", backoff_max_s),
            ("run_in_thread", run_in_thread),
            ("execution_mode", execution_mode),
            ("queue", queue),
        )
        if value is not None
    }
    return replace(config, **changes) if changes else config


def _is_async_callable(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def _hints(fn: Any) -> tuple[Any, Any]:
    """The declared input type (first parameter) and output type of ``fn``, or ``Any``."""
    target = fn.func if isinstance(fn, functools.partial) else fn
    if not inspect.isroutine(target) and callable(target) and not isinstance(target, type):
        target = type(target).__call__  # a callable object: its __call__ declares the types
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolved forward references and the like: fall back to Any
        return Any, Any
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    in_type = hints.get(params[0].name, Any) if params else Any
    return in_type, hints.get("return", Any)


class Step(Generic[InT, OutT]):
    """One unit of work: a function or an agent, run with retries and a timeout.

    Build steps with :func:`step` or :meth:`Step.from_callable`, or wrap an agent (any object
    with ``async run(data, **kwargs)``) with ``Step(name=..., agent=...)``. Compose them with
    ``>>``::

        @step
        async def double(x: int) -> int:
            return x * 2

        shout = Step.from_callable(lambda s: s.upper(), name="shout")
        pipeline = double >> Step.from_callable(str, name="to_text") >> shout

    A step function receives the previous step's output as its first argument. If it declares
    a parameter named ``context`` it also gets the run's typed context; one named ``resources``
    gets the runner's :class:`~flujo.domain.models.AppResources`.
    """

    name: str
    config: StepConfig
    #: True for steps that run other steps (loops, maps, branches, ...): they run in a Frame.
    composite: ClassVar[bool] = False
    #: True for composite steps whose sub-steps go through the executor (they hydrate state
    #: references themselves); a granular step's turns do not, so it is hydrated as a whole.
    runs_sub_steps: ClassVar[bool] = False

    def __init__(
        self,
        name: str,
        agent: Any = None,
        *,
        config: StepConfig | None = None,
        retries: int | None = None,
        timeout_s: float | None = None,
        backoff_s: float | None = None,
        backoff_max_s: float | None = None,
        run_in_thread: bool | None = None,
        execution_mode: Literal["foreground", "background"] | None = None,
        queue: str | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a step needs a non-empty name, got {name!r}")
        self.name = name
        self.config = _config(
            config,
            retries=retries,
            timeout_s=timeout_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            run_in_thread=run_in_thread,
            execution_mode=execution_mode,
            queue=queue,
        )
        self._target: Callable[..., Any] | None = None
        self.input_type: Any = Any
        self.output_type: Any = Any
        if agent is not None:
            agent = _as_agent(agent)
            run = getattr(agent, "run", None)
            if run is None or not callable(run):
                raise ConfigurationError(
                    f"step {name!r}: agent {type(agent).__name__} has no run(data, **kwargs) method"
                )
            self._bind(run)
            declared = getattr(agent, "output_type", None)
            if self.output_type is Any and declared is not None:
                self.output_type = declared  # how stored outputs are typed again on resume
        self.agent = agent

    def _bind(self, target: Callable[..., Any]) -> None:
        """Inspect ``target`` once, so that each call is a plain call."""
        params: Mapping[str, inspect.Parameter]
        try:
            params = inspect.signature(target).parameters
            known = True
        except (TypeError, ValueError):  # some builtins hide their signature
            params, known = {}, False
        kinds = {p.kind for p in params.values()}
        self._target = target
        self._is_async = _is_async_callable(target)
        self._wants_context = "context" in params and params["context"].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.VAR_POSITIONAL,
        )
        self._wants_resources = "resources" in params and params["resources"].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.VAR_POSITIONAL,
        )
        positional = [
            p
            for p in params.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            and p.name not in ("context", "resources")
        ]
        self._takes_data = (
            not known or bool(positional) or inspect.Parameter.VAR_POSITIONAL in kinds
        )
        self.input_type, self.output_type = _hints(target)

    @overload
    @classmethod
    def from_callable(
        cls,
        fn: Callable[Concatenate[InT, P], Awaitable[OutT]],
        *,
        name: str | None = None,
        config: StepConfig | None = None,
        retries: int | None = None,
        timeout_s: float | None = None,
        backoff_s: float | None = None,
        backoff_max_s: float | None = None,
        run_in_thread: bool | None = None,
        execution_mode: Literal["foreground", "background"] | None = None,
        queue: str | None = None,
    ) -> Step[InT, OutT]: ...

    @overload
    @classmethod
    def from_callable(
        cls,
        fn: Callable[Concatenate[InT, P], OutT],
        *,
        name: str | None = None,
        config: StepConfig | None = None,
        retries: int | None = None,
        timeout_s: float | None = None,
        backoff_s: float | None = None,
        backoff_max_s: float | None = None,
        run_in_thread: bool | None = None,
        execution_mode: Literal["foreground", "background"] | None = None,
        queue: str | None = None,
    ) -> Step[InT, OutT]: ...

    @overload
    @classmethod
    def from_callable(
        cls,
        fn: Callable[[], Awaitable[OutT]] | Callable[[], OutT],
        *,
        name: str | None = None,
        config: StepConfig | None = None,
        retries: int | None = None,
        timeout_s: float | None = None,
        backoff_s: float | None = None,
        backoff_max_s: float | None = None,
        run_in_thread: bool | None = None,
        execution_mode: Literal["foreground", "background"] | None = None,
        queue: str | None = None,
    ) -> Step[Any, OutT]: ...

    @classmethod
    def from_callable(
        cls,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        config: StepConfig | None = None,
        retries: int | None = None,
        timeout_s: float | None = None,
        backoff_s: float | None = None,
        backoff_max_s: float | None = None,
        run_in_thread: bool | None = None,
        execution_mode: Literal["foreground", "background"] | None = None,
        queue: str | None = None,
    ) -> Step[Any, Any]:
        """Make a step from a sync or async function (lambdas included).

        >>> inc = Step.from_callable(lambda x: x + 1, name="inc")
        >>> inc.name
        'inc'
        """
        if not callable(fn):
            raise ConfigurationError(f"Step.from_callable needs a callable, got {fn!r}")
        target = fn
        while isinstance(target, functools.partial):
            target = target.func
        step_name = name or getattr(target, "__name__", None) or type(target).__name__
        new: Step[Any, Any] = cls(
            step_name,
            config=config,
            retries=retries,
            timeout_s=timeout_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            run_in_thread=run_in_thread,
            execution_mode=execution_mode,
            queue=queue,
        )
        new._bind(fn)
        return new

    async def _invoke(self, data: Any, context: Any, resources: Any) -> Any:
        """Call the step's function or agent once (no retries, no timeout)."""
        target = self._target
        if target is None:
            raise ConfigurationError(f"step {self.name!r} has neither a function nor an agent")
        kwargs: dict[str, Any] = {}
        if self._wants_context:
            kwargs["context"] = context
        if self._wants_resources:
            kwargs["resources"] = resources
        args = (data,) if self._takes_data else ()
        if self.agent is not None:
            check_usage_limits()  # no agent call starts once the run reached a usage limit
        if self._is_async:
            return await target(*args, **kwargs)
        if self.config.run_in_thread:
            result = await asyncio.to_thread(_in_thread, target, *args, **kwargs)
        else:
            result = target(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _run(self, data: Any, frame: Frame) -> Any:
        """Run a composite step in ``frame`` (composite step types override this)."""
        raise NotImplementedError(f"{type(self).__name__} is not a composite step")

    def _locate(self, rest: tuple[int | str, ...]) -> tuple[Step[Any, Any], tuple[int | str, ...]]:
        """The sub-step at the start of ``rest`` (a path below this step) and what is left of
        the path; composite step types override this."""
        raise LookupError(f"step {self.name!r} has no sub-steps (path {list(rest)})")

    # -- factories of the step library (same arguments as the classes) --------------------------

    @staticmethod
    def branch_on(
        name: str,
        condition_callable: Any,
        branches: Any,
        default_branch: Any = None,
        **options: Any,
    ) -> ConditionalStep[Any, Any]:
        """A :class:`~flujo.ConditionalStep`: run the branch ``condition_callable`` picks."""
        from flujo.domain.control import ConditionalStep  # noqa: PLC0415 - they import this module

        return ConditionalStep(name, condition_callable, branches, default_branch, **options)

    @staticmethod
    def loop_until(
        name: str,
        loop_body_pipeline: Any,
        exit_condition_callable: Any,
        max_loops: int = 5,
        **options: Any,
    ) -> LoopStep[Any, Any]:
        """A :class:`~flujo.LoopStep`: repeat the body until the exit condition holds."""
        from flujo.domain.control import LoopStep  # noqa: PLC0415

        return LoopStep(name, loop_body_pipeline, exit_condition_callable, max_loops, **options)

    @staticmethod
    def map_over(
        name: str, item_pipeline: Any, max_concurrency: int = 1, **options: Any
    ) -> MapStep[Any, Any]:
        """A :class:`~flujo.MapStep`: run the item pipeline over each item of a list."""
        from flujo.domain.control import MapStep  # noqa: PLC0415

        return MapStep(name, item_pipeline, max_concurrency, **options)

    @staticmethod
    def parallel(name: str, branches: Any, **options: Any) -> ParallelStep[Any, Any]:
        """A :class:`~flujo.ParallelStep`: run branches concurrently, merge their contexts."""
        from flujo.domain.parallel import ParallelStep  # noqa: PLC0415

        return ParallelStep(name, branches, **options)

    @staticmethod
    def dynamic_parallel_branch(
        name: str, router_agent: Any, branches: Any, **options: Any
    ) -> DynamicParallelRouterStep[Any, Any]:
        """A :class:`~flujo.DynamicParallelRouterStep`: a router picks the branches to run."""
        from flujo.domain.parallel import DynamicParallelRouterStep  # noqa: PLC0415

        return DynamicParallelRouterStep(name, router_agent, branches, **options)

    @staticmethod
    def state_machine(
        name: str, states: Any, start_state: str, end_states: Any, **options: Any
    ) -> StateMachineStep[Any, Any]:
        """A :class:`~flujo.StateMachineStep`: run states until an end state has run."""
        from flujo.domain.control import StateMachineStep  # noqa: PLC0415

        return StateMachineStep(name, states, start_state, end_states, **options)

    @staticmethod
    def granular(
        name: str,
        agent: Any,
        *,
        max_turns: int = 10,
        enforce_idempotency: bool = False,
        **options: Any,
    ) -> GranularStep[Any, Any]:
        """A :class:`~flujo.GranularStep`: an agent loop checkpointed after every turn."""
        from flujo.domain.granular import GranularStep  # noqa: PLC0415

        return GranularStep(
            name, agent, max_turns=max_turns, enforce_idempotency=enforce_idempotency, **options
        )

    @staticmethod
    def cached(
        step: Step[InT, OutT], cache_backend: Any = None, *, context_fields: Any = ()
    ) -> CacheStep[InT, OutT]:
        """A :class:`~flujo.CacheStep`: ``step`` memoized (an in-memory LRU by default)."""
        from flujo.domain.cache import CacheStep  # noqa: PLC0415

        return CacheStep(step, cache_backend, context_fields=context_fields)

    def __rshift__(
        self, other: Step[OutT, NewOutT] | Pipeline[OutT, NewOutT]
    ) -> Pipeline[InT, NewOutT]:
        from flujo.domain.pipeline import Pipeline  # noqa: PLC0415 - the two modules refer to each other

        return Pipeline.from_steps([self]) >> other

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _as_agent(agent: Any) -> Any:
    """A pydantic-ai Agent wrapped in flujo's adapter; any other agent as it is."""
    if "pydantic_ai" in sys.modules:
        from flujo.agents import as_agent  # noqa: PLC0415 - the optional extra, when in use

        return as_agent(agent)
    return agent


def _in_thread(target: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``target`` in a worker thread; a StopIteration cannot cross into a future (asyncio
    would leave the step waiting forever), so it becomes a RuntimeError, as in a coroutine."""
    try:
        return target(*args, **kwargs)
    except StopIteration as exc:
        raise RuntimeError(f"step function raised StopIteration: {exc}") from exc


class _StepDecorator(Protocol):
    @overload
    def __call__(
        self, fn: Callable[Concatenate[InT, P], Awaitable[OutT]], /
    ) -> Step[InT, OutT]: ...

    @overload
    def __call__(self, fn: Callable[Concatenate[InT, P], OutT], /) -> Step[InT, OutT]: ...

    @overload
    def __call__(
        self, fn: Callable[[], Awaitable[OutT]] | Callable[[], OutT], /
    ) -> Step[Any, OutT]: ...


@overload
def step(fn: Callable[Concatenate[InT, P], Awaitable[OutT]], /) -> Step[InT, OutT]: ...


@overload
def step(fn: Callable[Concatenate[InT, P], OutT], /) -> Step[InT, OutT]: ...


@overload
def step(fn: Callable[[], Awaitable[OutT]] | Callable[[], OutT], /) -> Step[Any, OutT]: ...


@overload
def step(
    *,
    name: str | None = None,
    config: StepConfig | None = None,
    retries: int | None = None,
    timeout_s: float | None = None,
    backoff_s: float | None = None,
    backoff_max_s: float | None = None,
    run_in_thread: bool | None = None,
    execution_mode: Literal["foreground", "background"] | None = None,
    queue: str | None = None,
) -> _StepDecorator: ...


def step(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    config: StepConfig | None = None,
    retries: int | None = None,
    timeout_s: float | None = None,
    backoff_s: float | None = None,
    backoff_max_s: float | None = None,
    run_in_thread: bool | None = None,
    execution_mode: Literal["foreground", "background"] | None = None,
    queue: str | None = None,
) -> Step[Any, Any] | _StepDecorator:
    """Turn a function into a :class:`Step`, bare or with keywords::

    @step
    async def greet(name: str) -> str:
        return f"Hello, {name}!"

    @step(name="fetch", retries=3, timeout_s=10)
    def fetch(url: str) -> str: ...
    """

    def decorate(func: Callable[..., Any]) -> Step[Any, Any]:
        return Step.from_callable(
            func,
            name=name,
            config=config,
            retries=retries,
            timeout_s=timeout_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            run_in_thread=run_in_thread,
            execution_mode=execution_mode,
            queue=queue,
        )

    if fn is not None:
        return decorate(fn)
    return typing.cast(_StepDecorator, decorate)
