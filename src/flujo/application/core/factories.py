"""ExecutorFactory: how a runner gets its executor (and the state providers it hydrates from)::

factory = ExecutorFactory(state_providers={"kg": KnowledgeGraphProvider()})
runner = Flujo(pipeline, context_model=ResearchContext, executor_factory=factory)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from flujo.application.core.executor_core import ExecutorCore
from flujo.exceptions import ConfigurationError

if TYPE_CHECKING:
    from flujo.domain.interfaces import StateProvider

__all__ = ["ExecutorFactory"]


class ExecutorFactory:
    """Makes :class:`ExecutorCore` instances with the given ``state_providers``."""

    def __init__(self, *, state_providers: Mapping[str, StateProvider] | None = None) -> None:
        providers = dict(state_providers or {})
        for name, provider in providers.items():
            if not callable(getattr(provider, "load", None)) or not callable(
                getattr(provider, "save", None)
            ):
                raise ConfigurationError(
                    f"state provider {name!r} must have async load(key) and save(key, data)"
                )
        self.state_providers: dict[str, StateProvider] = providers

    def create_executor(self) -> ExecutorCore:
        """A configured executor."""
        return ExecutorCore(state_providers=self.state_providers)
