"""Pipelines (steps in sequence) and the registry of named, versioned pipelines."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from flujo.domain.models import PipelineContext
from flujo.domain.step import Step
from flujo.exceptions import ConfigurationError

__all__ = ["Pipeline", "PipelineRegistry", "parse_version"]

InT = TypeVar("InT")
OutT = TypeVar("OutT")
NewOutT = TypeVar("NewOutT")


class Pipeline(Generic[InT, OutT]):
    """Steps run in order, each receiving the previous step's output.

    >>> from flujo import Step
    >>> inc = Step.from_callable(lambda x: x + 1, name="inc")
    >>> double = Step.from_callable(lambda x: x * 2, name="double")
    >>> (inc >> double).step_names
    ['inc', 'double']

    ``Pipeline.from_steps([...])`` builds one from a list. A :class:`Step` is accepted wherever
    a pipeline is.
    """

    __slots__ = ("steps",)

    def __init__(self, steps: Iterable[Step[Any, Any]]) -> None:
        self.steps: tuple[Step[Any, Any], ...] = tuple(steps)
        if not self.steps:
            raise ConfigurationError("a pipeline needs at least one step")
        for item in self.steps:
            if not isinstance(item, Step):
                raise ConfigurationError(f"pipelines hold steps, got {item!r}")

    @classmethod
    def from_steps(cls, steps: Iterable[Step[Any, Any] | Pipeline[Any, Any]]) -> Pipeline[Any, Any]:
        """A pipeline of ``steps`` in order; nested pipelines are flattened."""
        flat: list[Step[Any, Any]] = []
        for item in steps:
            if isinstance(item, Pipeline):
                flat.extend(item.steps)
            else:
                flat.append(item)
        return Pipeline(flat)

    @staticmethod
    def coerce(item: Step[InT, OutT] | Pipeline[InT, OutT]) -> Pipeline[InT, OutT]:
        """``item`` as a pipeline (a step becomes a one-step pipeline)."""
        if isinstance(item, Pipeline):
            return item
        if isinstance(item, Step):
            return Pipeline([item])
        raise ConfigurationError(f"expected a Step or a Pipeline, got {item!r}")

    def step_at(self, path: tuple[int | str, ...]) -> Step[Any, Any]:
        """The step at ``path`` (as in ``StepResult.location``), through composite steps.

        >>> from flujo import Step
        >>> Pipeline.from_steps([Step.from_callable(str, name="a")]).step_at((0,)).name
        'a'
        """
        first = path[0] if path else None
        if not isinstance(first, int) or not 0 <= first < len(self.steps):
            raise LookupError(f"no step at {list(path)} in {self!r}")
        step, rest = self.steps[first], path[1:]
        while rest:
            step, rest = step._locate(rest)
        return step

    @property
    def step_names(self) -> list[str]:
        """The names of the steps, in order."""
        return [s.name for s in self.steps]

    def __rshift__(
        self, other: Step[OutT, NewOutT] | Pipeline[OutT, NewOutT]
    ) -> Pipeline[InT, NewOutT]:
        return Pipeline([*self.steps, *Pipeline.coerce(other).steps])

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[Step[Any, Any]]:
        return iter(self.steps)

    def __repr__(self) -> str:
        return f"Pipeline({' >> '.join(self.step_names)})"


# Semantic versions (https://semver.org), with MINOR and PATCH optional: "2" == "2.0" == "2.0.0".
_VERSION = re.compile(
    r"(0|[1-9]\d*)(?:\.(0|[1-9]\d*))?(?:\.(0|[1-9]\d*))?"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
)

VersionKey = tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]


def parse_version(version: str) -> VersionKey:
    """A sort key for a semantic version; prereleases sort before their release.

    >>> parse_version("1.0.0-rc.1") < parse_version("1.0.0") < parse_version("1.10.0")
    True
    """
    match = _VERSION.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise ConfigurationError(
            f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. '1.2.0')"
        )
    major, minor, patch, pre = match.groups()
    if pre is None:
        return (int(major), int(minor or 0), int(patch or 0), 1, ())
    idents = tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in pre.split(".")
    )
    return (int(major), int(minor or 0), int(patch or 0), 0, idents)


class PipelineRegistry:
    """Named, versioned pipelines, so that a stored run can be resumed on the version it began.

    >>> from flujo import Step
    >>> registry = PipelineRegistry()
    >>> registry.register(Step.from_callable(str.upper, name="up"), "shout", "1.0.0")
    >>> registry.register(Step.from_callable(str.lower, name="down"), "shout", "1.2.0")
    >>> registry.get_latest_version("shout")
    '1.2.0'

    A registered version is immutable: registering another pipeline under the same name and
    version is a :class:`~flujo.exceptions.ConfigurationError`.
    """

    def __init__(self) -> None:
        self._pipelines: dict[str, dict[VersionKey, tuple[str, Pipeline[Any, Any]]]] = {}
        self._contexts: dict[tuple[str, VersionKey], type[PipelineContext]] = {}

    def register(
        self,
        pipeline: Step[Any, Any] | Pipeline[Any, Any],
        name: str,
        version: str,
        *,
        context_model: type[PipelineContext] | None = None,
    ) -> None:
        """Register ``pipeline`` (or a step) as ``name`` at ``version``.

        ``context_model`` (default :class:`PipelineContext`) is the context its runs use, so
        that a :class:`~flujo.TaskClient` can resume them from the registry alone.
        """
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"a pipeline name must be a non-empty string, got {name!r}")
        key = parse_version(version)
        item = Pipeline.coerce(pipeline)
        versions = self._pipelines.setdefault(name, {})
        existing = versions.get(key)
        if existing is not None and existing[1] is not item and existing[1].steps != item.steps:
            raise ConfigurationError(
                f"pipeline {name!r} version {existing[0]!r} is already registered; "
                "register changes under a new version"
            )
        versions[key] = (version, item)
        self._contexts[(name, key)] = context_model or PipelineContext

    def get(self, name: str, version: str) -> Pipeline[Any, Any] | None:
        """The pipeline registered as ``name`` at ``version`` (``"latest"`` allowed), or None."""
        if version == "latest":
            return self.get_latest(name)
        entry = self._pipelines.get(name, {}).get(parse_version(version))
        return None if entry is None else entry[1]

    def get_context_model(self, name: str, version: str) -> type[PipelineContext] | None:
        """The context model registered with ``name`` at ``version``, or None."""
        if version == "latest":
            version = self.get_latest_version(name) or ""
        try:
            return self._contexts.get((name, parse_version(version)))
        except ConfigurationError:
            return None

    def get_latest(self, name: str) -> Pipeline[Any, Any] | None:
        """The highest registered version of ``name``, or None."""
        latest = self.get_latest_version(name)
        return None if latest is None else self.get(name, latest)

    def get_latest_version(self, name: str) -> str | None:
        """The highest registered version string of ``name``, or None."""
        versions = self._pipelines.get(name)
        if not versions:
            return None
        return versions[max(versions)][0]

    def names(self) -> list[str]:
        """Every registered pipeline name."""
        return sorted(self._pipelines)

    def versions(self, name: str) -> list[str]:
        """The registered versions of ``name``, lowest first."""
        return [v for _, (v, _) in sorted(self._pipelines.get(name, {}).items())]
