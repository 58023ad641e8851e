"""Shared data builders and hypothesis strategies for the backend contract suite."""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import strategies as st

from flujo.state.backends.base import Checkpoint, RunHeader, StateBackend

CREATED = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
UPDATED = datetime(2026, 1, 2, 3, 5, 6, 123456, tzinfo=UTC)
T0 = CREATED.timestamp()

#: Every run id a backend must refuse, on every method, with InvalidRunIdError.
HOSTILE_RUN_IDS: list[Any] = [
    "../../etc/passwd",
    "",
    ".",
    "..",
    "...",
    ".hidden",
    "run\x00id",
    "\x00",
    "/",
    "a/b",
    "\\",
    "a\\b",
    "..\\..\\windows",
    "C:\\Windows\\system32",
    "~root",
    "run id",
    "run\nid",
    "rün",
    "-rf",
    "a" * 10_000,
    "a" * 129,
    None,
    123,
    1.5,
    b"run",
    ["run"],
    Path("run"),
]


@dataclass(frozen=True)
class Store:
    """Where one test's runs live: a fresh directory, and for Postgres a fresh schema."""

    location: Path
    """A directory unique to the test (file-based backends keep everything under it)."""
    postgres_dsn: str | None = None
    postgres_schema: str | None = None
    """A schema unique to the test, dropped after it (Postgres only)."""


@dataclass(frozen=True)
class BackendFactory:
    """How to open one kind of backend on a per-test store."""

    name: str
    create: Callable[..., StateBackend]
    """``create(store, **kwargs)``: a backend on ``store`` (a :class:`Store`, unique per test);
    ``kwargs`` are StateBackend options such as ``serializer_default``, ``max_payload_bytes``."""
    persistent: bool
    """Whether a second backend opened on the same store sees the first one's runs."""
    marks: tuple[pytest.MarkDecorator, ...] = ()
    prepare: Callable[[Store], Awaitable[None]] | None = None
    """Run once per test before the first backend opens (Postgres: create the schema)."""
    postgres: bool = False
    """Needs the ``postgres_dsn`` fixture (fails under CI=true without a server, else skips)."""


_SEQ = itertools.count()


def unique_run_id(prefix: str = "run") -> str:
    """A run id unique within this process (for tests that reuse one backend)."""
    return f"{prefix}-{os.getpid()}-{next(_SEQ)}"


def sample_state(run_id: str, **overrides: Any) -> dict[str, Any]:
    """A complete WorkflowState-shaped dict with a little of everything in it."""
    state: dict[str, Any] = {
        "run_id": run_id,
        "pipeline_id": "pipe-id",
        "pipeline_name": "ingest",
        "pipeline_version": "1.2.0",
        "current_step_index": 2,
        "pipeline_context": {
            "run_id": run_id,
            "scratchpad": {"notes": ["a", "b"], "count": 3, "ratio": 0.25, "ok": True},
            "user": {"name": "Zoë", "tags": [], "address": None},
            "empty": {},
        },
        "last_step_output": {"rows": [1, 2, 3], "text": "done ✓"},
        "status": "running",
        "created_at": CREATED,
        "updated_at": UPDATED,
        "version": 2,
        "step_names": ["fetch", "parse", "store"],
        "metadata": {"tenant": "acme", "priority": 2},
        "step_history": [
            {
                "index": 0,
                "name": "fetch",
                "success": True,
                "attempts": 1,
                "latency_s": 0.5,
                "error": None,
                "output": "raw",
            },
            {
                "index": 1,
                "name": "parse",
                "success": True,
                "attempts": 2,
                "latency_s": 0.01,
                "error": None,
                "output": {"rows": [1, 2, 3], "text": "done ✓"},
            },
        ],
        "error": None,
        "initial_input": {"url": "https://example.com/data.csv"},
        "usage": {"requests": 3, "input_tokens": 120, "output_tokens": 45, "cost_usd": 0.0012},
        **NOT_QUEUED,
    }
    state.update(overrides)
    return state


#: The queue fields of a run that was never queued (as every backend reports them).
NOT_QUEUED: dict[str, Any] = {
    "queue": None,
    "priority": 0,
    "locked_by": None,
    "lease_expires_at": None,
    "cancel_requested": False,
}


def run_header(
    *,
    pipeline_name: str = "ingest",
    pipeline_version: str = "1.0.0",
    step_names: list[str] | None = None,
    initial_input: bytes = b'"start"',
    created_at: float = T0,
    metadata: dict[str, Any] | None = None,
) -> RunHeader:
    return RunHeader(
        pipeline_id=pipeline_name,
        pipeline_name=pipeline_name,
        pipeline_version=pipeline_version,
        step_names=orjson.dumps(step_names if step_names is not None else ["a", "b", "c"]),
        initial_input=initial_input,
        created_at=created_at,
        metadata=orjson.dumps(metadata if metadata is not None else {}),
    )


_KEEP: Any = object()


def checkpoint(
    backend: StateBackend,
    run_id: str,
    expected_version: int | None,
    *,
    status: str = "running",
    index: int = 0,
    context: dict[str, Any] | None = None,
    steps: list[Any] | None = None,
    step_offset: int = 0,
    output: Any = _KEEP,
    error: dict[str, Any] | None = None,
    header: RunHeader | None = None,
    updated_at: float = T0,
) -> Checkpoint:
    """A checkpoint whose values are serialized by ``backend``'s own serializer."""
    dumps = backend.serializer.dumps
    return Checkpoint(
        run_id=run_id,
        expected_version=expected_version,
        status=status,
        current_step_index=index,
        updated_at=updated_at,
        last_step_output=None if output is _KEEP else dumps(output, "last_step_output"),
        error=None if error is None else dumps(error, "error"),
        context={
            name: dumps(value, f"pipeline_context.{name}")
            for name, value in (context or {}).items()
        },
        steps=[dumps(record, "step") for record in (steps or [])],
        step_offset=step_offset,
        header=header,
    )


def step_record(index: int, name: str, output: Any = None) -> dict[str, Any]:
    return {
        "index": index,
        "name": name,
        "success": True,
        "attempts": 1,
        "latency_s": 0.001,
        "error": None,
        "output": output,
    }


# -- hypothesis: JSON-compatible data --------------------------------------------------------------

#: Text without lone surrogates (category Cs), which JSON as UTF-8 cannot hold.
json_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text
)

json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4)
    ),
    max_leaves=12,
)

json_objects = st.dictionaries(json_text, json_values, max_size=5)
