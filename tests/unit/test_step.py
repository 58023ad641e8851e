"""Steps: how they are built (decorator, from_callable, agents) and what they receive."""

import functools
import threading
from typing import Any

import pytest

from flujo import AppResources, Flujo, PipelineContext, Step, StepConfig, step
from flujo.exceptions import ConfigurationError


class CountContext(PipelineContext):
    count: int = 0


class FakePool:
    """An arbitrary (non-pydantic) object, like a database pool."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def execute(self, query: str) -> str:
        self.queries.append(query)
        return f"ran {query}"


class ServiceResources(AppResources):
    db_conn: FakePool
    search_client: Any = None


async def run_one(pipeline: Any, data: Any, **kwargs: Any) -> Any:
    runner = Flujo(pipeline, persist_state=False, **kwargs)
    result = await runner.run_async(data)
    assert result.status == "completed", result.error
    return result


# -- building steps --------------------------------------------------------------------------


async def test_bare_decorator_on_async_function() -> None:
    @step
    async def greet(name: str) -> str:
        return f"Hello, {name}!"

    assert isinstance(greet, Step)
    assert greet.name == "greet"
    assert greet.config == StepConfig()
    assert (await run_one(greet, "world")).output == "Hello, world!"


async def test_bare_decorator_on_sync_function() -> None:
    @step
    def double(x: int) -> int:
        return x * 2

    assert double.name == "double"
    assert (await run_one(double, 21)).output == 42


async def test_decorator_with_keywords_sets_name_and_config() -> None:
    @step(name="fetch", retries=3, timeout_s=10)
    async def fetch_url(url: str) -> str:
        return url.upper()

    assert fetch_url.name == "fetch"
    assert fetch_url.config.retries == 3
    assert fetch_url.config.timeout_s == 10
    assert (await run_one(fetch_url, "u")).output == "U"


def test_decorator_keywords_override_a_given_config() -> None:
    @step(config=StepConfig(retries=1, backoff_s=0.25), retries=4)
    def f(x: int) -> int:
        return x

    assert f.config.retries == 4
    assert f.config.backoff_s == 0.25


def test_decorator_with_empty_keywords_keeps_function_name() -> None:
    @step()
    def my_func(x: int) -> int:
        return x

    assert my_func.name == "my_func"


async def test_from_callable_with_lambda() -> None:
    shout = Step.from_callable(lambda s: s.upper(), name="shout")
    assert shout.name == "shout"
    assert (await run_one(shout, "hi")).output == "HI"


def test_from_callable_lambda_without_name_gets_a_name() -> None:
    inc = Step.from_callable(lambda x: x + 1)
    assert isinstance(inc.name, str)
    assert inc.name


async def test_from_callable_with_async_function_and_keywords() -> None:
    async def work(x: int) -> int:
        return x + 1

    s = Step.from_callable(work, name="w", retries=2, timeout_s=1.5)
    assert (s.name, s.config.retries, s.config.timeout_s) == ("w", 2, 1.5)
    assert (await run_one(s, 1)).output == 2


async def test_zero_argument_functions_get_no_input() -> None:
    @step
    def seven() -> int:
        return 7

    @step
    async def hello() -> str:
        return "hello"

    result = await run_one(seven >> hello, "ignored")
    assert [r.output for r in result.step_history] == [7, "hello"]


async def test_zero_argument_function_with_keyword_only_context() -> None:
    @step
    async def bump(*, context: CountContext) -> int:
        context.count += 1
        return context.count

    result = await run_one(bump >> bump, None, context_model=CountContext)
    assert result.output == 2


async def test_callable_object_sync() -> None:
    class Multiply:
        def __init__(self, factor: int) -> None:
            self.factor = factor

        def __call__(self, x: int) -> int:
            return x * self.factor

    s = Step.from_callable(Multiply(3), name="times3")
    assert (await run_one(s, 5)).output == 15


async def test_callable_object_async_with_context() -> None:
    class AsyncAdd:
        async def __call__(self, x: int, *, context: CountContext) -> int:
            context.count += x
            return x + 1

    s = Step.from_callable(AsyncAdd(), name="add")
    result = await run_one(s, 4, context_model=CountContext)
    assert result.output == 5
    assert result.final_pipeline_context.count == 4


async def test_functools_partial_sync_and_async() -> None:
    def add(a: int, b: int) -> int:
        return a + b

    async def scale(x: int, factor: int) -> int:
        return x * factor

    add10 = Step.from_callable(functools.partial(add, 10), name="add10")
    triple = Step.from_callable(functools.partial(scale, factor=3), name="triple")
    assert (await run_one(add10 >> triple, 1)).output == 33


async def test_partial_of_function_declaring_context() -> None:
    def tag(x: str, label: str, *, context: CountContext) -> str:
        context.count += 1
        return f"{label}:{x}"

    s = Step.from_callable(functools.partial(tag, label="L"), name="tag")
    result = await run_one(s, "v", context_model=CountContext)
    assert result.output == "L:v"
    assert result.final_pipeline_context.count == 1


# -- agents ----------------------------------------------------------------------------------


class ShoutAgent:
    def __init__(self) -> None:
        self.kwargs_seen: list[dict[str, Any]] = []

    async def run(self, data: str, **kwargs: Any) -> str:
        self.kwargs_seen.append(kwargs)
        return data.upper()


class ContextAgent:
    async def run(self, data: str, *, context: CountContext, **kwargs: Any) -> str:
        context.count += 10
        return f"{data}:{context.run_id}"


async def test_agent_step() -> None:
    agent = ShoutAgent()
    shout = Step(name="shout", agent=agent)
    assert shout.name == "shout"
    assert shout.agent is agent
    result = await run_one(shout, "hey", context_model=CountContext)
    assert result.output == "HEY"
    # **kwargs does not declare context/resources: nothing is injected.
    assert agent.kwargs_seen == [{}]


async def test_agent_declaring_context_receives_it() -> None:
    s = Step(name="ctx_agent", agent=ContextAgent())
    result = await run_one(s, "x", context_model=CountContext)
    assert result.output == f"x:{result.run_id}"
    assert result.final_pipeline_context.count == 10


def test_agent_without_run_method_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        Step(name="bad", agent=object())


def test_agent_step_with_keywords() -> None:
    s = Step(name="a", agent=ShoutAgent(), retries=2, timeout_s=3)
    assert (s.config.retries, s.config.timeout_s) == (2, 3)


@pytest.mark.parametrize("name", ["", None, 3])
def test_step_needs_a_non_empty_name(name: Any) -> None:
    with pytest.raises(ConfigurationError):
        Step(name=name, agent=ShoutAgent())


def test_from_callable_refuses_a_non_callable() -> None:
    with pytest.raises(ConfigurationError):
        Step.from_callable(42, name="x")  # type: ignore[call-overload]


# -- injection -------------------------------------------------------------------------------


async def test_no_injection_when_not_declared() -> None:
    # If context or resources were passed, this would fail with a TypeError.
    @step
    async def plain(x: int) -> int:
        return x + 1

    res = ServiceResources(db_conn=FakePool())
    result = await run_one(plain, 1, context_model=CountContext, resources=res)
    assert result.output == 2


async def test_var_keyword_does_not_receive_context_or_resources() -> None:
    seen: list[dict[str, Any]] = []

    @step
    async def f(x: int, **kwargs: Any) -> int:
        seen.append(kwargs)
        return x

    await run_one(f, 1, resources=ServiceResources(db_conn=FakePool()))
    assert seen == [{}]


async def test_positional_context_parameter() -> None:
    @step
    def f(x: int, context: CountContext) -> int:
        context.count = x
        return x

    result = await run_one(f, 9, context_model=CountContext)
    assert result.final_pipeline_context.count == 9


async def test_keyword_only_context_parameter() -> None:
    @step
    async def f(data: str, *, context: CountContext) -> str:
        context.count += len(data)
        return data

    result = await run_one(f, "abcd", context_model=CountContext)
    assert result.final_pipeline_context.count == 4


async def test_context_is_the_same_object_across_steps() -> None:
    seen: list[Any] = []

    @step
    async def a(x: int, *, context: CountContext) -> int:
        seen.append(context)
        return x

    result = await run_one(a >> a, 1, context_model=CountContext)
    assert seen[0] is seen[1] is result.final_pipeline_context
    assert isinstance(seen[0], CountContext)


async def test_resources_with_arbitrary_types_are_injected() -> None:
    pool = FakePool()
    res = ServiceResources(db_conn=pool, search_client=object())
    got: list[Any] = []

    @step
    async def query(q: str, *, resources: ServiceResources) -> str:
        got.append(resources)
        return resources.db_conn.execute(q)

    result = await run_one(query, "SELECT 1", resources=res)
    assert result.output == "ran SELECT 1"
    assert got == [res]
    assert got[0] is res
    assert pool.queries == ["SELECT 1"]


async def test_manual_signature_data_context_resources() -> None:
    # The production manual's shape: async def my_step(data, context, resources)
    pool = FakePool()

    async def my_step(data: str, context: CountContext, resources: ServiceResources) -> str:
        context.count += 1
        return resources.db_conn.execute(data)

    s = Step.from_callable(my_step, name="my_step")
    result = await run_one(
        s, "q", context_model=CountContext, resources=ServiceResources(db_conn=pool)
    )
    assert result.output == "ran q"
    assert result.final_pipeline_context.count == 1


async def test_resources_are_none_when_runner_has_none() -> None:
    got: list[Any] = []

    @step
    async def f(x: int, *, resources: Any) -> int:
        got.append(resources)
        return x

    await run_one(f, 1)
    assert got == [None]


def test_resources_must_be_app_resources() -> None:
    @step
    def f(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError):
        Flujo(f, persist_state=False, resources={"db": 1})  # type: ignore[arg-type]


# -- threads ---------------------------------------------------------------------------------


def test_sync_step_runs_in_worker_thread_by_default() -> None:
    seen: list[int] = []

    @step
    def where(x: int) -> int:
        seen.append(threading.get_ident())
        return x

    Flujo(where, persist_state=False).run(1)
    assert seen
    assert seen[0] != threading.get_ident()


def test_sync_step_runs_inline_with_run_in_thread_false() -> None:
    seen: list[int] = []

    @step(run_in_thread=False)
    def where(x: int) -> int:
        seen.append(threading.get_ident())
        return x

    Flujo(where, persist_state=False).run(1)
    assert seen == [threading.get_ident()]


def test_declared_types_are_recorded() -> None:
    @step
    async def to_len(x: str) -> int:
        return len(x)

    assert to_len.input_type is str
    assert to_len.output_type is int


def test_a_sync_step_raising_stop_iteration_fails_instead_of_hanging() -> None:
    """StopIteration cannot cross from a worker thread into a future; it becomes a failure."""

    def first_even(numbers: list[int]) -> int:
        return next(n for n in numbers if n % 2 == 0)

    result = Flujo(Step.from_callable(first_even), persist_state=False).run([1, 3])
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "RuntimeError"
    assert "StopIteration" in result.error.message
