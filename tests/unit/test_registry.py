"""PipelineRegistry: named, versioned pipelines with semantic version ordering."""

from typing import Any

import pytest

from flujo import Flujo, Pipeline, PipelineRegistry, step
from flujo.exceptions import ConfigurationError, FlujoError, PipelineNotFoundError


@step
async def up(x: str) -> str:
    return x.upper()


@step
async def down(x: str) -> str:
    return x.lower()


@step
async def rev(x: str) -> str:
    return x[::-1]


def test_register_and_get() -> None:
    registry = PipelineRegistry()
    registry.register(up, "shout", "1.0.0")
    registry.register(down >> rev, "shout", "1.2.0")
    one = registry.get("shout", "1.0.0")
    two = registry.get("shout", "1.2.0")
    assert one is not None
    assert one.step_names == ["up"]
    assert two is not None
    assert two.step_names == ["down", "rev"]


def test_get_unknown_name_or_version_is_none() -> None:
    registry = PipelineRegistry()
    registry.register(up, "shout", "1.0.0")
    assert registry.get("nope", "1.0.0") is None
    assert registry.get("shout", "2.0.0") is None
    assert registry.get_latest("nope") is None
    assert registry.get_latest_version("nope") is None


def test_registered_pipeline_object_is_returned() -> None:
    registry = PipelineRegistry()
    pipeline = up >> down
    registry.register(pipeline, "p", "1.0.0")
    assert registry.get("p", "1.0.0") is pipeline


def test_latest_uses_semantic_order_not_text_order() -> None:
    registry = PipelineRegistry()
    registry.register(up, "p", "1.9.0")
    registry.register(down, "p", "1.10.0")
    registry.register(rev, "p", "1.2.0")
    assert registry.get_latest_version("p") == "1.10.0"
    latest = registry.get_latest("p")
    assert latest is not None
    assert latest.step_names == ["down"]
    assert registry.get("p", "latest") is latest


def test_latest_independent_of_registration_order() -> None:
    registry = PipelineRegistry()
    for version in ["2.0.0", "10.0.0", "9.99.99"]:
        registry.register(up, "p", version)
    assert registry.get_latest_version("p") == "10.0.0"


def test_prereleases_sort_below_their_release() -> None:
    registry = PipelineRegistry()
    registry.register(up, "p", "2.0.0-rc.1")
    registry.register(down, "p", "1.9.0")
    assert registry.get_latest_version("p") == "2.0.0-rc.1"
    registry.register(rev, "p", "2.0.0")
    assert registry.get_latest_version("p") == "2.0.0"
    registry.register(up, "p", "2.0.0-rc.2")
    assert registry.get_latest_version("p") == "2.0.0"


def test_semver_precedence_example_from_the_semver_spec() -> None:
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.1.0",
        "2.0.0",
    ]
    registry = PipelineRegistry()
    for version in reversed(ordered):
        registry.register(up, "p", version)
    assert registry.versions("p") == ordered
    assert registry.get_latest_version("p") == "2.0.0"


@pytest.mark.parametrize(
    "version",
    ["", "latest", "v1.0.0", "1.0.0.0", "01.0.0", "1.02.0", "1.0.0-", "1..0", "abc", " 1.0.0"],
)
def test_invalid_version_is_a_configuration_error(version: str) -> None:
    registry = PipelineRegistry()
    with pytest.raises(ConfigurationError):
        registry.register(up, "p", version)


def test_non_string_version_is_a_configuration_error() -> None:
    registry = PipelineRegistry()
    with pytest.raises(ConfigurationError):
        registry.register(up, "p", 1)  # type: ignore[arg-type]


def test_get_with_invalid_version_is_a_configuration_error() -> None:
    registry = PipelineRegistry()
    registry.register(up, "p", "1.0.0")
    with pytest.raises(ConfigurationError):
        registry.get("p", "one")


@pytest.mark.parametrize("name", ["", None])
def test_empty_name_is_a_configuration_error(name: Any) -> None:
    with pytest.raises(ConfigurationError):
        PipelineRegistry().register(up, name, "1.0.0")


def test_reregistering_a_different_pipeline_is_refused() -> None:
    registry = PipelineRegistry()
    registry.register(up, "p", "1.0.0")
    with pytest.raises(ConfigurationError):
        registry.register(down, "p", "1.0.0")
    got = registry.get("p", "1.0.0")
    assert got is not None
    assert got.step_names == ["up"]


def test_reregistering_the_same_pipeline_is_allowed() -> None:
    registry = PipelineRegistry()
    pipeline = up >> down
    registry.register(pipeline, "p", "1.0.0")
    registry.register(pipeline, "p", "1.0.0")
    # A new Pipeline object with the very same steps is the same pipeline.
    registry.register(Pipeline.from_steps([up, down]), "p", "1.0.0")
    assert registry.versions("p") == ["1.0.0"]


def test_same_version_under_other_names_is_independent() -> None:
    registry = PipelineRegistry()
    registry.register(up, "a", "1.0.0")
    registry.register(down, "b", "1.0.0")
    assert registry.names() == ["a", "b"]


def test_runner_uses_the_latest_registered_version_by_default() -> None:
    registry = PipelineRegistry()
    registry.register(up, "p", "1.9.0")
    registry.register(rev, "p", "1.10.0")
    result = Flujo(registry=registry, pipeline_name="p", persist_state=False).run("abc")
    assert result.output == "cba"


def test_runner_uses_a_pinned_version() -> None:
    registry = PipelineRegistry()
    registry.register(up, "p", "1.0.0")
    registry.register(rev, "p", "2.0.0")
    runner = Flujo(
        registry=registry, pipeline_name="p", pipeline_version="1.0.0", persist_state=False
    )
    assert runner.run("abc").output == "ABC"


@pytest.mark.parametrize(("name", "version"), [("missing", "latest"), ("p", "3.0.0")])
def test_runner_with_unregistered_pipeline_raises_not_found(name: str, version: str) -> None:
    registry = PipelineRegistry()
    registry.register(up, "p", "1.0.0")
    runner = Flujo(
        registry=registry, pipeline_name=name, pipeline_version=version, persist_state=False
    )
    with pytest.raises(PipelineNotFoundError) as info:
        runner.run("x")
    assert isinstance(info.value, FlujoError)
    assert info.value.name == name
