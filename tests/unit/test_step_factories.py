"""The step library from ``flujo`` itself, and the ``Step.*`` factories (same semantics)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import flujo
from flujo import (
    BranchFailureStrategy,
    CacheStep,
    ConditionalStep,
    DynamicParallelRouterStep,
    Flujo,
    InMemoryCache,
    LoopStep,
    MapStep,
    MergeStrategy,
    ParallelStep,
    PipelineContext,
    PipelineResult,
    StateMachineStep,
    Step,
    Transition,
)
from flujo.exceptions import (
    ConfigurationError,
    FlujoError,
    IterationLimitError,
    MergeConflictError,
    UnknownBranchError,
)

from .steplib_helpers import Calls, Store, shape


class Ctx(PipelineContext):
    a: int = 0
    b: int = 0
    shared: str = ""


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return Store(request.param, tmp_path)


async def run(pipeline: Any, data: Any, **options: Any) -> PipelineResult[Any, Any]:
    options.setdefault("context_model", Ctx)
    return await Flujo(pipeline, persist_state=False, **options).run_async(data)


inc = Step.from_callable(lambda x: x + 1, name="inc")
double = Step.from_callable(lambda x: x * 2, name="double")


# -- importable from flujo -------------------------------------------------------------------------

LIBRARY = [
    "ConditionalStep",
    "LoopStep",
    "MapStep",
    "ParallelStep",
    "DynamicParallelRouterStep",
    "StateMachineStep",
    "Transition",
    "CacheStep",
    "MergeStrategy",
    "BranchFailureStrategy",
    "CacheBackend",
    "InMemoryCache",
    "SQLiteCache",
    "PostgresCache",
]


@pytest.mark.parametrize("name", LIBRARY)
def test_importable_from_flujo(name: str) -> None:
    assert name in flujo.__all__
    assert getattr(flujo, name) is not None


def test_merge_strategies_and_branch_failure_strategies() -> None:
    assert {m.name for m in MergeStrategy} >= {"NO_MERGE", "OVERWRITE", "CONTEXT_UPDATE"}
    assert {b.name for b in BranchFailureStrategy} == {"PROPAGATE", "IGNORE"}


def test_typed_errors_are_flujo_errors() -> None:
    for error in (UnknownBranchError, IterationLimitError, MergeConflictError):
        assert issubclass(error, FlujoError)
    error = MergeConflictError("m", step_name="p", field="f", branches=["x", "y"])
    assert (error.step_name, error.field, error.branches) == ("p", "f", ["x", "y"])
    assert (UnknownBranchError("m", step_name="s", key="k").key) == "k"
    assert (IterationLimitError("m", step_name="s", limit=3).limit) == 3


def test_every_step_type_is_a_composite_step() -> None:
    steps = [
        ConditionalStep("c", lambda d, c: "a", {"a": inc}),
        LoopStep("l", inc, lambda o, c: True),
        MapStep("m", inc),
        ParallelStep("p", {"a": inc}),
        DynamicParallelRouterStep("r", lambda d, c: "a", {"a": inc}),
        StateMachineStep("s", {"a": inc}, "a", ["a"]),
        CacheStep.cached(inc),
    ]
    for made in steps:
        assert isinstance(made, Step)
        assert made.composite is True
    assert inc.composite is False
    assert (inc >> steps[0]).step_names == ["inc", "c"]


# -- factories -------------------------------------------------------------------------------------


async def test_branch_on() -> None:
    made = Step.branch_on(
        "route", lambda d, c: "big" if d > 5 else "small", {"big": double}, default_branch=inc
    )
    assert isinstance(made, ConditionalStep)
    assert (await run(made, 10)).output == 20
    assert (await run(made, 1)).output == 2
    failing = Step.branch_on("route", lambda d, c: "nope", {"big": double})
    result = await run(failing, 1)
    assert result.error is not None
    assert result.error.type == "UnknownBranchError"


async def test_loop_until() -> None:
    seen: list[int] = []
    made = Step.loop_until(
        "grow",
        inc >> double,
        lambda out, ctx: out > 20,
        max_loops=10,
        iteration_input_mapper=lambda out, ctx, i: seen.append(i) or out,
        loop_output_mapper=lambda out, ctx: f"final={out}",
    )
    assert isinstance(made, LoopStep)
    assert made.max_loops == 10
    assert (await run(made, 0)).output == "final=30"  # 0 -> 2 -> 6 -> 14 -> 30
    assert seen == [0, 1, 2]
    limited = Step.loop_until("forever", inc, lambda o, c: False, max_loops=2)
    result = await run(limited, 0)
    assert result.error is not None
    assert result.error.type == "IterationLimitError"


async def test_map_over() -> None:
    async def slow(x: int) -> int:
        await asyncio.sleep(0.001 * (5 - x))
        return x * x

    made = Step.map_over("squares", Step.from_callable(slow, name="slow"), max_concurrency=5)
    assert isinstance(made, MapStep)
    assert made.max_concurrency == 5
    assert (await run(made, [0, 1, 2, 3, 4])).output == [0, 1, 4, 9, 16]


async def test_parallel() -> None:
    def write(field: str, value: Any) -> Step[Any, Any]:
        def go(x: Any, *, context: Ctx) -> str:
            setattr(context, field, value)
            return field

        return Step.from_callable(go, name=f"write_{field}")

    made = Step.parallel(
        "p",
        {"one": write("shared", "one"), "two": write("shared", "two")},
        merge_strategy=MergeStrategy.OVERWRITE,
    )
    assert isinstance(made, ParallelStep)
    result = await run(made, None)
    assert result.output == {"one": "shared", "two": "shared"}
    assert result.final_pipeline_context.shared == "two"
    conflict = Step.parallel("p", {"one": write("shared", "1"), "two": write("shared", "2")})
    result = await run(conflict, None)
    assert result.error is not None
    assert result.error.type == "MergeConflictError"
    mapped = Step.parallel(
        "p",
        {"one": write("shared", "1"), "two": write("shared", "2")},
        field_mapping={"one": ["shared"], "two": []},
    )
    assert (await run(mapped, None)).final_pipeline_context.shared == "1"
    ignoring = Step.parallel(
        "p",
        {"ok": inc, "bad": Step.from_callable(lambda x: 1 / 0, name="bad")},
        on_branch_failure=BranchFailureStrategy.IGNORE,
    )
    assert (await run(ignoring, 1)).output == {"ok": 2}


async def test_dynamic_parallel_branch() -> None:
    made = Step.dynamic_parallel_branch(
        "r", lambda data, ctx: ["dbl", "inc"] if data > 0 else "inc", {"inc": inc, "dbl": double}
    )
    assert isinstance(made, DynamicParallelRouterStep)
    assert (await run(made, 3)).output == {"inc": 4, "dbl": 6}
    assert (await run(made, -1)).output == {"inc": 0}


async def test_state_machine() -> None:
    made = Step.state_machine(
        "sm",
        {
            "up": Step.from_callable(
                lambda x: Transition("up" if x < 3 else "done", x + 1), name="up"
            ),
            "done": Step.from_callable(lambda x: f"done at {x}", name="done"),
        },
        "up",
        ["done"],
        max_transitions=10,
    )
    assert isinstance(made, StateMachineStep)
    assert made.max_transitions == 10
    assert (await run(made, 0)).output == "done at 4"


async def test_cached() -> None:
    calls = Calls()
    made = Step.cached(Step.from_callable(lambda x: calls.add(x) or x, name="echo"))
    assert isinstance(made, CacheStep)
    assert isinstance(made.cache, InMemoryCache)
    await run(made, "a")
    assert (await run(made, "a")).step_history[0].cache_hit is True
    assert calls.log == ["a"]


@pytest.mark.parametrize(
    "build",
    [
        lambda: Step.branch_on("c", "not callable", {"a": inc}),
        lambda: Step.loop_until("l", inc, lambda o, c: True, max_loops=0),
        lambda: Step.map_over("m", inc, max_concurrency=0),
        lambda: Step.parallel("p", {}),
        lambda: Step.dynamic_parallel_branch("r", 42, {"a": inc}),
        lambda: Step.state_machine("s", {"a": inc}, "b", ["a"]),
        lambda: Step.cached(lambda x: x),  # type: ignore[arg-type,return-value]
    ],
    ids=["branch_on", "loop_until", "map_over", "parallel", "dynamic", "state_machine", "cached"],
)
def test_factories_check_their_arguments(build: Any) -> None:
    with pytest.raises(ConfigurationError):
        build()


async def test_factories_and_classes_give_the_same_runs(store: Store) -> None:
    """One pipeline built twice, with the factories and with the classes: same output, same
    history, and a run stored by one is read back by the other."""

    append = Step.from_callable(lambda xs: [*xs, 1], name="append")

    def build(factories: bool) -> Any:
        if factories:
            return Step.map_over(
                "each",
                Step.loop_until("count", inc, lambda o, c: o % 3 == 0, max_loops=5),
            ) >> Step.branch_on(
                "pick",
                lambda d, c: len(d),
                {2: Step.parallel("p", {"x": append})},
                default_branch=double,
            )
        return MapStep(
            "each", LoopStep("count", inc, lambda o, c: o % 3 == 0, max_loops=5)
        ) >> ConditionalStep(
            "pick",
            lambda d, c: len(d),
            {2: ParallelStep("p", {"x": append})},
            default_branch=double,
        )

    by_factory = await store.run(build(True), [1, 4], context_model=Ctx)
    by_class = await store.run(build(False), [1, 4], context_model=Ctx)
    assert by_factory.output == by_class.output == {"x": [3, 6, 1]}
    assert shape(by_factory.step_history) == shape(by_class.step_history)
    reread = await store.run(build(False), [1, 4], run_id=by_factory.run_id, context_model=Ctx)
    assert reread.status == "completed"
    assert reread.output == by_factory.output
