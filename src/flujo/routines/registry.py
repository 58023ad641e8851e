"""FlowRegistry: flows by name, for ``Runtime.exec(name)`` and for resuming stored jobs.

A stored job remembers the name its flow was run under; ``Runtime.resume(job_id)`` looks that
name up here, so a process that resumes jobs registers the same flows under the same names.
"""

from __future__ import annotations

import threading
from typing import ClassVar

from flujo.exceptions import FlowError, FlowNotFoundError
from flujo.routines.flow import Flow
from flujo.routines.routine import check_id

__all__ = ["FlowRegistry"]


class FlowRegistry:
    """Flows by name. ``FlowRegistry.get_instance()`` is the process-wide one; a runtime uses
    it unless given another (``Runtime(registry=...)``)."""

    _instance: ClassVar[FlowRegistry | None] = None
    _instance_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self) -> None:
        self._flows: dict[str, Flow] = {}
        self._lock = threading.Lock()

    @classmethod
    def get_instance(cls) -> FlowRegistry:
        """The process-wide registry."""
        instance = cls._instance
        if instance is None:
            with cls._instance_lock:
                instance = cls._instance
                if instance is None:
                    instance = cls._instance = cls()
        return instance

    def register_by_name(self, name: str, flow: Flow) -> None:
        """Register ``flow`` under ``name`` (replacing what was there)."""
        check_id(name, "flow name")
        if not isinstance(flow, Flow):
            raise FlowError(f"register_by_name takes a Flow, got {flow!r}", flow_id=None)
        with self._lock:
            self._flows[name] = flow

    def register(self, flow: Flow) -> None:
        """Register ``flow`` under its ``flow_id``."""
        self.register_by_name(flow.flow_id, flow)

    def get(self, name: str) -> Flow | None:
        """The flow registered as ``name``, or None."""
        with self._lock:
            return self._flows.get(name)

    def get_by_name(self, name: str) -> Flow:
        """The flow registered as ``name``; raises FlowNotFoundError when there is none."""
        flow = self.get(name)
        if flow is None:
            shown = name if isinstance(name, str) and len(name) <= 200 else repr(name)[:200]
            raise FlowNotFoundError(
                f"no flow is registered as {shown!r}: use "
                "FlowRegistry.get_instance().register_by_name(name, flow)",
                name=str(name),
            )
        return flow

    def unregister(self, name: str) -> bool:
        """Forget ``name``; False if it was not registered."""
        with self._lock:
            return self._flows.pop(name, None) is not None

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        with self._lock:
            return list(self._flows)

    def clear(self) -> None:
        with self._lock:
            self._flows.clear()
