"""Pipelines: composition with >>, from_steps, and where a single Step is accepted."""

from typing import Any

import pytest

from flujo import Flujo, Pipeline, PipelineRegistry, Step, step
from flujo.exceptions import ConfigurationError


@step
async def inc(x: int) -> int:
    return x + 1


@step
async def double(x: int) -> int:
    return x * 2


@step
def to_text(x: int) -> str:
    return f"n={x}"


def test_rshift_builds_a_pipeline_in_order() -> None:
    pipeline = inc >> double >> to_text
    assert isinstance(pipeline, Pipeline)
    assert pipeline.step_names == ["inc", "double", "to_text"]
    assert len(pipeline) == 3
    assert list(pipeline) == [inc, double, to_text]


async def test_composed_pipeline_passes_outputs_along() -> None:
    result = await Flujo(inc >> double >> to_text, persist_state=False).run_async(4)
    assert result.output == "n=10"
    assert [r.output for r in result.step_history] == [5, 10, "n=10"]


def test_composition_does_not_mutate_operands() -> None:
    first = inc >> double
    longer = first >> to_text
    assert first.step_names == ["inc", "double"]
    assert longer.step_names == ["inc", "double", "to_text"]


def test_pipeline_rshift_pipeline_and_step_rshift_pipeline() -> None:
    left = inc >> double
    right = double >> to_text
    assert (left >> right).step_names == ["inc", "double", "double", "to_text"]
    assert (inc >> right).step_names == ["inc", "double", "to_text"]


def test_from_steps_builds_and_flattens() -> None:
    pipeline = Pipeline.from_steps([inc, double >> double, to_text])
    assert pipeline.step_names == ["inc", "double", "double", "to_text"]


async def test_from_steps_runs() -> None:
    pipeline = Pipeline.from_steps([inc, double])
    result = await Flujo(pipeline, persist_state=False).run_async(1)
    assert result.output == 4


def test_same_step_can_appear_twice() -> None:
    pipeline = inc >> inc
    assert pipeline.step_names == ["inc", "inc"]


@pytest.mark.parametrize("build", [lambda: Pipeline([]), lambda: Pipeline.from_steps([])])
def test_empty_pipeline_is_a_configuration_error(build: Any) -> None:
    with pytest.raises(ConfigurationError):
        build()


def test_pipeline_refuses_non_steps() -> None:
    with pytest.raises(ConfigurationError):
        Pipeline([inc, "not a step"])  # type: ignore[list-item]


async def test_a_single_step_is_accepted_by_flujo() -> None:
    runner = Flujo(inc, persist_state=False)
    assert isinstance(runner.pipeline, Pipeline)
    assert runner.pipeline.step_names == ["inc"]
    assert (await runner.run_async(1)).output == 2


def test_a_single_step_is_accepted_by_the_registry() -> None:
    registry = PipelineRegistry()
    registry.register(inc, "one", "1.0.0")
    got = registry.get("one", "1.0.0")
    assert isinstance(got, Pipeline)
    assert got.step_names == ["inc"]


def test_flujo_needs_a_pipeline_or_a_registry_with_a_name() -> None:
    with pytest.raises(ConfigurationError):
        Flujo(persist_state=False)
    with pytest.raises(ConfigurationError):
        Flujo(registry=PipelineRegistry(), persist_state=False)


def test_flujo_refuses_something_that_is_not_a_pipeline() -> None:
    with pytest.raises(ConfigurationError):
        Flujo("not a pipeline", persist_state=False)  # type: ignore[arg-type]


def test_lambda_and_function_steps_compose() -> None:
    shout = Step.from_callable(lambda s: s.upper(), name="shout")
    pipeline = to_text >> shout
    assert Flujo(inc >> pipeline, persist_state=False).run(1).output == "N=2"
