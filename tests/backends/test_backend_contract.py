"""The StateBackend contract, run against every backend in conftest.BACKEND_FACTORIES."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import enum
import math
import os
import subprocess
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any

import orjson
import pytest
from backend_helpers import (
    CREATED,
    HOSTILE_RUN_IDS,
    NOT_QUEUED,
    T0,
    UPDATED,
    BackendFactory,
    checkpoint,
    json_objects,
    json_values,
    run_header,
    sample_state,
    step_record,
    unique_run_id,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from flujo.exceptions import (
    FlujoError,
    InvalidRunIdError,
    PayloadTooLargeError,
    SerializationError,
    StateConflictError,
)
from flujo.state import FileBackend, InMemoryBackend, SQLiteBackend, WorkflowState
from flujo.state.backends.base import SUMMARY_FIELDS, Checkpoint, StateBackend, to_datetime
from flujo.state.backends.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import MIGRATIONS as SQLITE_MIGRATIONS

MakeBackend = Callable[..., StateBackend]

HYPOTHESIS = settings(
    max_examples=25,
    deadline=None,
    database=None,  # write nothing into the working directory
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _is_plain_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_is_plain_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain_json(v) for k, v in value.items())
    return False


def _without_timestamps(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in ("created_at", "updated_at")}


# -- save_state / load_state / delete_state --------------------------------------------------------


async def test_save_load_round_trip_of_a_full_state(backend: StateBackend) -> None:
    state = sample_state("run-1")
    await backend.save_state("run-1", state)

    loaded = await backend.load_state("run-1")

    assert loaded == state
    assert set(loaded) == set(WorkflowState.model_fields)
    assert WorkflowState.model_validate(loaded) == WorkflowState.model_validate(state)
    assert loaded["created_at"] == CREATED
    assert loaded["updated_at"] == UPDATED
    assert loaded["created_at"].tzinfo is not None


async def test_save_accepts_a_dumped_workflow_state(backend: StateBackend) -> None:
    model = WorkflowState.model_validate(sample_state("run-py"))
    await backend.save_state("run-py", model.model_dump())
    await backend.save_state("run-json", model.model_dump(mode="json") | {"run_id": "run-json"})

    from_python = await backend.load_state("run-py")
    from_json = await backend.load_state("run-json")

    assert from_python is not None
    assert from_json is not None
    assert WorkflowState.model_validate(from_python) == model
    assert WorkflowState.model_validate(from_json) == model.model_copy(
        update={"run_id": "run-json"}
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"pipeline_context": ["not", "a", "dict"]},
        {"created_at": "not a date"},
        {"updated_at": object()},
        {"current_step_index": "three"},
        {"version": "latest"},
    ],
)
async def test_a_malformed_state_dict_is_refused_and_stores_nothing(
    backend: StateBackend, changes: dict[str, Any]
) -> None:
    await backend.save_state("kept", sample_state("kept"))
    with pytest.raises(SerializationError):
        await backend.save_state("kept", sample_state("kept", **changes))
    with pytest.raises(SerializationError):
        await backend.save_state("new", sample_state("new", **changes))
    assert await backend.load_state("kept") == sample_state("kept")
    assert await backend.load_state("new") is None


async def test_load_of_an_absent_run_is_none(backend: StateBackend) -> None:
    assert await backend.load_state("never-saved") is None
    await backend.save_state("other", sample_state("other"))
    assert await backend.load_state("never-saved") is None


async def test_save_replaces_the_whole_state(backend: StateBackend) -> None:
    await backend.save_state("run-1", sample_state("run-1"))
    smaller = sample_state(
        "run-1",
        pipeline_context={"only": 1},
        step_history=[],
        status="completed",
        current_step_index=3,
        version=7,
        last_step_output=None,
        error={"type": "X", "message": "m", "step": None},
    )
    await backend.save_state("run-1", smaller)

    assert await backend.load_state("run-1") == smaller


async def test_stored_state_is_a_copy(backend: StateBackend) -> None:
    state = sample_state("run-1")
    await backend.save_state("run-1", state)
    original = copy.deepcopy(state)

    state["pipeline_context"]["scratchpad"]["notes"].append("mutated after save")
    loaded = await backend.load_state("run-1")
    assert loaded is not None
    loaded["pipeline_context"]["scratchpad"]["notes"].append("mutated after load")
    loaded["step_history"].clear()

    assert await backend.load_state("run-1") == original


async def test_delete_state(backend: StateBackend) -> None:
    await backend.save_state("run-1", sample_state("run-1"))
    await backend.save_state("run-2", sample_state("run-2"))

    await backend.delete_state("run-1")

    assert await backend.load_state("run-1") is None
    assert await backend.load_state("run-2") == sample_state("run-2")
    assert [r["run_id"] for r in await backend.list_runs()] == ["run-2"]


async def test_delete_of_an_absent_run_is_a_no_op(backend: StateBackend) -> None:
    await backend.delete_state("never-saved")  # on a store that was never written
    await backend.save_state("run-1", sample_state("run-1"))
    await backend.delete_state("never-saved")
    await backend.delete_state("run-1")
    await backend.delete_state("run-1")  # twice

    assert await backend.load_state("run-1") is None
    assert await backend.list_runs() == []


async def test_a_deleted_run_can_be_created_again(backend: StateBackend) -> None:
    await backend.save_state("run-1", sample_state("run-1"))
    await backend.delete_state("run-1")

    version = await backend.write_checkpoint(
        checkpoint(backend, "run-1", 0, header=run_header(), context={"fresh": True})
    )

    assert version == 1
    loaded = await backend.load_state("run-1")
    assert loaded is not None
    assert loaded["pipeline_context"] == {"fresh": True}
    assert loaded["step_history"] == []


@pytest.mark.parametrize("run_id", ["A", "0", "_x", "run.v1-final_2", "x..y", "a.", "a" * 128])
async def test_valid_edge_case_run_ids_round_trip(backend: StateBackend, run_id: str) -> None:
    await backend.save_state(run_id, sample_state(run_id))
    assert await backend.load_state(run_id) == sample_state(run_id)
    assert [r["run_id"] for r in await backend.list_runs()] == [run_id]
    await backend.delete_state(run_id)
    assert await backend.load_state(run_id) is None


async def test_runs_survive_reopening(
    backend_factory: BackendFactory, make_backend: MakeBackend
) -> None:
    if not backend_factory.persistent:
        pytest.skip("this backend keeps runs in memory only")
    first = make_backend()
    await first.save_state("run-1", sample_state("run-1"))
    await first.write_checkpoint(
        checkpoint(first, "run-2", 0, header=run_header(), context={"a": 1}, steps=[{"i": 0}])
    )
    await first.aclose()

    second = make_backend()
    assert await second.load_state("run-1") == sample_state("run-1")
    loaded = await second.load_state("run-2")
    assert loaded is not None
    assert loaded["pipeline_context"] == {"a": 1}
    assert loaded["step_history"] == [{"i": 0}]
    assert {r["run_id"] for r in await second.list_runs()} == {"run-1", "run-2"}


# -- list_runs -------------------------------------------------------------------------------------

FAILURE = {"type": "ValueError", "message": "bad row 7", "step": "parse"}

# run id, pipeline, status, created_at, updated_at. Creation order (the listing order) is not
# update order: r-old was created first but updated last.
RUN_SPECS = [
    ("r-old", "ingest", "completed", 100.0, 900.0),
    ("r-mid", "ingest", "running", 200.0, 300.0),
    ("r-paused", "ingest", "paused", 250.0, 260.0),
    ("r-new", "report", "running", 300.0, 310.0),
    ("r-newest", "report", "failed", 400.0, 410.0),
]
#: Every run of RUN_SPECS, newest created first.
ALL_RUNS = ["r-newest", "r-new", "r-paused", "r-mid", "r-old"]


async def _save_runs(backend: StateBackend) -> None:
    for run_id, name, status, created, updated in RUN_SPECS:
        state = sample_state(
            run_id,
            pipeline_name=name,
            pipeline_id=f"{name}-id",
            status=status,
            created_at=to_datetime(created),
            updated_at=to_datetime(updated),
            metadata={"run": run_id, "pipeline": name},
            error=FAILURE if status == "failed" else None,
        )
        await backend.save_state(run_id, state)


def _ids(runs: list[dict[str, Any]]) -> list[str]:
    return [run["run_id"] for run in runs]


async def test_list_runs_of_an_empty_store(backend: StateBackend) -> None:
    assert await backend.list_runs() == []
    assert await backend.list_runs(status="running", pipeline_name="x", limit=5) == []
    assert await backend.list_runs(metadata_filter={"k": "v"}, since=CREATED, offset=3) == []


async def test_list_runs_orders_newest_created_first(backend: StateBackend) -> None:
    await _save_runs(backend)
    # Not by update: r-old, updated last, is listed last.
    assert _ids(await backend.list_runs()) == ALL_RUNS


async def test_list_runs_breaks_creation_ties_by_run_id_descending(backend: StateBackend) -> None:
    for run_id in ["b", "a", "c", "a2"]:
        await backend.save_state(run_id, sample_state(run_id, created_at=CREATED))
    await backend.save_state("older", sample_state("older", created_at=to_datetime(T0 - 1)))

    assert _ids(await backend.list_runs()) == ["c", "b", "a2", "a", "older"]


async def test_list_runs_summaries(backend: StateBackend) -> None:
    await _save_runs(backend)
    runs = await backend.list_runs()

    for run in runs:
        assert set(run) == set(SUMMARY_FIELDS)
    assert runs[0] == {
        "run_id": "r-newest",
        "pipeline_id": "report-id",
        "pipeline_name": "report",
        "pipeline_version": "1.2.0",
        "status": "failed",
        "current_step_index": 2,
        "version": 2,
        "created_at": to_datetime(400.0),
        "updated_at": to_datetime(410.0),
        "metadata": {"run": "r-newest", "pipeline": "report"},
        "error": FAILURE,
        "usage": {"requests": 3, "input_tokens": 120, "output_tokens": 45, "cost_usd": 0.0012},
        **NOT_QUEUED,
    }
    assert runs[1]["error"] is None
    assert runs[1]["metadata"] == {"run": "r-new", "pipeline": "report"}


async def test_summaries_follow_checkpoints(backend: StateBackend) -> None:
    """Summaries show the run as last written: error and metadata included."""
    header = run_header(metadata={"tenant": "acme", "tags": ["x"], "n": 1.5})
    await backend.write_checkpoint(checkpoint(backend, "r", 0, header=header))
    await backend.write_checkpoint(checkpoint(backend, "r", 1, status="failed", error=FAILURE))

    [summary] = await backend.list_runs()
    assert summary["status"] == "failed"
    assert summary["error"] == FAILURE
    assert summary["metadata"] == {"tenant": "acme", "tags": ["x"], "n": 1.5}

    await backend.write_checkpoint(checkpoint(backend, "r", 2, status="running", index=1))
    [summary] = await backend.list_runs()
    assert summary["error"] is None
    assert summary["current_step_index"] == 1
    assert summary["version"] == 3
    assert summary["metadata"] == {"tenant": "acme", "tags": ["x"], "n": 1.5}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"status": "running"}, ["r-new", "r-mid"]),
        ({"status": "completed"}, ["r-old"]),
        ({"status": "cancelled"}, []),
        ({"pipeline_name": "ingest"}, ["r-paused", "r-mid", "r-old"]),
        ({"pipeline_name": "report"}, ["r-newest", "r-new"]),
        ({"pipeline_name": "nope"}, []),
        ({"status": "running", "pipeline_name": "ingest"}, ["r-mid"]),
        ({"status": "failed", "pipeline_name": "ingest"}, []),
        ({"limit": 2}, ["r-newest", "r-new"]),
        ({"limit": 1, "pipeline_name": "ingest"}, ["r-paused"]),
        ({"limit": 100}, ALL_RUNS),
        ({"limit": 0}, []),
        ({"offset": 2}, ["r-paused", "r-mid", "r-old"]),
        ({"offset": 1, "limit": 2}, ["r-new", "r-paused"]),
        ({"offset": 5}, []),
        ({"offset": 1, "limit": 1, "pipeline_name": "ingest"}, ["r-mid"]),
        ({"since": to_datetime(250.0)}, ["r-newest", "r-new", "r-paused"]),
        ({"since": to_datetime(250.000001)}, ["r-newest", "r-new"]),
        ({"since": to_datetime(100.0)}, ALL_RUNS),
        ({"since": to_datetime(401.0)}, []),
        ({"since": to_datetime(150.0), "status": "running"}, ["r-new", "r-mid"]),
        ({"metadata_filter": {"pipeline": "ingest"}}, ["r-paused", "r-mid", "r-old"]),
        ({"metadata_filter": {"pipeline": "ingest"}, "status": "paused"}, ["r-paused"]),
        ({"metadata_filter": {"run": "r-old", "pipeline": "ingest"}}, ["r-old"]),
        ({"metadata_filter": {"run": "r-old", "pipeline": "report"}}, []),
        ({"metadata_filter": {}}, ALL_RUNS),
        ({"metadata_filter": None}, ALL_RUNS),
        (
            {"metadata_filter": {"pipeline": "ingest"}, "since": to_datetime(200.0), "limit": 1},
            ["r-paused"],
        ),
    ],
)
async def test_list_runs_filters_and_paging(
    backend: StateBackend, filters: dict[str, Any], expected: list[str]
) -> None:
    await _save_runs(backend)
    assert _ids(await backend.list_runs(**filters)) == expected


async def test_list_runs_returns_100_by_default(backend: StateBackend) -> None:
    for i in range(101):
        header = run_header(created_at=T0 + i)
        # Updated in the opposite order, so only creation order gives the expected listing.
        await backend.write_checkpoint(
            checkpoint(backend, f"r{i:03}", 0, header=header, updated_at=T0 + 1000 - i)
        )
    runs = await backend.list_runs()
    assert len(runs) == 100
    assert runs[0]["run_id"] == "r100"
    assert runs[-1]["run_id"] == "r001"
    assert _ids(await backend.list_runs(offset=100)) == ["r000"]


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_holds_nul(v) for v in value)
    return False


def _refuses_nul_in_names(backend: StateBackend) -> bool:
    """Postgres keeps names in text columns, which cannot hold NUL: pipeline id, name and
    version, status and context field names (and metadata, in JSONB). It refuses NUL there with
    SerializationError naming the part; state values (stored as ``json``) hold NUL like on every
    other backend."""
    return isinstance(backend, PostgresBackend)


def _field_names_hold_nul(*contexts: dict[str, Any]) -> bool:
    return any("\x00" in name for context in contexts for name in context)


@pytest.mark.parametrize(
    "hostile",
    [
        "' OR '1'='1",
        "running' --",
        'x"; DROP TABLE runs; --',
        "%",
        "_",
        "*",
        "$.status",
        "running\x00",
    ],
)
async def test_list_runs_filter_values_are_data_not_queries(
    backend: StateBackend, hostile: str
) -> None:
    await _save_runs(backend)
    quoted = sample_state("r-quoted", pipeline_name=hostile)
    if _holds_nul(hostile) and _refuses_nul_in_names(backend):
        with pytest.raises(SerializationError):
            await backend.save_state("r-quoted", quoted)
        stored = []
    else:
        await backend.save_state("r-quoted", quoted)
        stored = ["r-quoted"]

    assert await backend.list_runs(status=hostile) == []
    assert _ids(await backend.list_runs(pipeline_name=hostile)) == stored
    assert len(await backend.list_runs()) == 5 + len(stored)  # nothing was dropped


async def test_a_checkpoint_does_not_reorder_the_listing(backend: StateBackend) -> None:
    await _save_runs(backend)
    await backend.write_checkpoint(
        checkpoint(backend, "r-old", 2, status="running", index=3, updated_at=5000.0)
    )

    runs = await backend.list_runs()

    assert _ids(runs) == ALL_RUNS  # still listed by creation
    old = runs[-1]
    assert old["status"] == "running"
    assert old["version"] == 3
    assert old["current_step_index"] == 3
    assert old["created_at"] == to_datetime(100.0)
    assert old["updated_at"] == to_datetime(5000.0)
    assert _ids(await backend.list_runs(status="completed")) == []
    assert _ids(await backend.list_runs(status="running")) == ["r-new", "r-mid", "r-old"]


# -- write_checkpoint: incremental writes ----------------------------------------------------------


async def test_first_checkpoint_creates_the_run(backend: StateBackend) -> None:
    header = run_header(
        pipeline_name="etl",
        pipeline_version="2.0.0",
        step_names=["load", "clean"],
        initial_input=b'{"path":"in.csv"}',
        created_at=T0,
    )
    version = await backend.write_checkpoint(
        checkpoint(
            backend,
            "run-1",
            0,
            header=header,
            context={"run_id": "run-1", "scratchpad": {}, "count": 0},
            steps=[step_record(0, "load", [1, 2])],
            output=[1, 2],
            index=1,
            updated_at=T0 + 1,
        )
    )

    assert version == 1
    loaded = await backend.load_state("run-1")
    assert loaded == {
        "run_id": "run-1",
        "pipeline_id": "etl",
        "pipeline_name": "etl",
        "pipeline_version": "2.0.0",
        "status": "running",
        "current_step_index": 1,
        "version": 1,
        "created_at": to_datetime(T0),
        "updated_at": to_datetime(T0 + 1),
        "step_names": ["load", "clean"],
        "initial_input": {"path": "in.csv"},
        "last_step_output": [1, 2],
        "error": None,
        "metadata": {},
        "usage": None,
        **NOT_QUEUED,
        "pipeline_context": {"run_id": "run-1", "scratchpad": {}, "count": 0},
        "step_history": [step_record(0, "load", [1, 2])],
    }
    WorkflowState.model_validate(loaded)


async def test_checkpoints_append_steps_and_update_changed_fields(backend: StateBackend) -> None:
    ctx = {"run_id": "run-1", "scratchpad": {"n": 0}, "untouched": "same", "count": 0}
    v = await backend.write_checkpoint(
        checkpoint(backend, "run-1", 0, header=run_header(), context=ctx, updated_at=T0)
    )
    assert v == 1

    v = await backend.write_checkpoint(
        checkpoint(
            backend,
            "run-1",
            1,
            context={"count": 1},
            steps=[step_record(0, "a", "out-a")],
            step_offset=0,
            output="out-a",
            index=1,
            updated_at=T0 + 1,
        )
    )
    assert v == 2

    v = await backend.write_checkpoint(
        checkpoint(
            backend,
            "run-1",
            2,
            context={"count": 2, "scratchpad": {"n": 2, "more": [1]}, "new_field": None},
            steps=[step_record(1, "b", {"b": 1}), step_record(2, "c", None)],
            step_offset=1,
            output={"b": 1},
            index=3,
            status="completed",
            updated_at=T0 + 2,
        )
    )
    assert v == 3

    loaded = await backend.load_state("run-1")
    assert loaded is not None
    assert loaded["version"] == 3
    assert loaded["status"] == "completed"
    assert loaded["current_step_index"] == 3
    assert loaded["pipeline_context"] == {
        "run_id": "run-1",
        "scratchpad": {"n": 2, "more": [1]},
        "untouched": "same",
        "count": 2,
        "new_field": None,
    }
    assert loaded["step_history"] == [
        step_record(0, "a", "out-a"),
        step_record(1, "b", {"b": 1}),
        step_record(2, "c", None),
    ]
    assert loaded["last_step_output"] == {"b": 1}
    assert loaded["created_at"] == to_datetime(T0)
    assert loaded["updated_at"] == to_datetime(T0 + 2)
    assert loaded["step_names"] == ["a", "b", "c"]
    assert loaded["initial_input"] == "start"
    WorkflowState.model_validate(loaded)


async def test_versions_grow_by_one_per_checkpoint(backend: StateBackend) -> None:
    versions = [await backend.write_checkpoint(checkpoint(backend, "r", 0, header=run_header()))]
    for i in range(5):
        versions.append(
            await backend.write_checkpoint(
                checkpoint(backend, "r", versions[-1], steps=[{"i": i}], step_offset=i)
            )
        )
    assert versions == [1, 2, 3, 4, 5, 6]
    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["version"] == 6
    assert loaded["step_history"] == [{"i": i} for i in range(5)]


async def test_a_checkpoint_without_output_keeps_the_stored_output(backend: StateBackend) -> None:
    await backend.write_checkpoint(
        checkpoint(backend, "r", 0, header=run_header(), output={"kept": True})
    )
    await backend.write_checkpoint(checkpoint(backend, "r", 1, status="paused"))

    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["last_step_output"] == {"kept": True}
    assert loaded["status"] == "paused"

    await backend.write_checkpoint(checkpoint(backend, "r", 2, output=None))
    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["last_step_output"] is None


async def test_a_first_checkpoint_without_output_stores_none(backend: StateBackend) -> None:
    await backend.write_checkpoint(checkpoint(backend, "r", 0, header=run_header()))
    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["last_step_output"] is None


async def test_error_is_set_and_cleared_by_checkpoints(backend: StateBackend) -> None:
    error = {"type": "ValueError", "message": "bad row 7", "step": "parse"}
    await backend.write_checkpoint(checkpoint(backend, "r", 0, header=run_header()))
    await backend.write_checkpoint(checkpoint(backend, "r", 1, status="failed", error=error))

    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["error"] == error
    assert loaded["status"] == "failed"
    assert WorkflowState.model_validate(loaded).error == error

    await backend.write_checkpoint(checkpoint(backend, "r", 2, status="running"))
    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["error"] is None


async def test_a_checkpoint_continues_a_saved_state(backend: StateBackend) -> None:
    state = sample_state("run-1")  # version 2, two step records
    await backend.save_state("run-1", state)

    version = await backend.write_checkpoint(
        checkpoint(
            backend,
            "run-1",
            2,
            context={"scratchpad": {"after": "save"}},
            steps=[step_record(2, "store", "ok")],
            step_offset=2,
            output="ok",
            index=3,
            status="completed",
        )
    )

    assert version == 3
    loaded = await backend.load_state("run-1")
    assert loaded is not None
    assert loaded["step_history"] == [*state["step_history"], step_record(2, "store", "ok")]
    assert loaded["pipeline_context"] == {
        **state["pipeline_context"],
        "scratchpad": {"after": "save"},
    }
    assert loaded["created_at"] == CREATED
    assert loaded["step_names"] == state["step_names"]
    assert loaded["initial_input"] == state["initial_input"]


async def test_a_checkpoint_with_expected_version_none_is_unconditional(
    backend: StateBackend,
) -> None:
    await backend.write_checkpoint(checkpoint(backend, "r", 0, header=run_header()))
    await backend.write_checkpoint(checkpoint(backend, "r", 1))

    version = await backend.write_checkpoint(checkpoint(backend, "r", None, context={"x": 1}))

    assert version == 3
    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["pipeline_context"] == {"x": 1}


async def test_a_step_offset_inside_the_history_replaces_records_from_there(
    backend: StateBackend,
) -> None:
    """Checkpoint.step_offset is "the position in the run's step history of steps[0]"."""
    await backend.write_checkpoint(
        checkpoint(backend, "r", 0, header=run_header(), steps=[{"i": 0}, {"i": 1}, {"i": 2}])
    )

    await backend.write_checkpoint(checkpoint(backend, "r", 1, steps=[{"i": "x"}], step_offset=1))

    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["step_history"] == [{"i": 0}, {"i": "x"}]


# -- write_checkpoint: compare-and-swap ------------------------------------------------------------


async def _advanced_run(backend: StateBackend, run_id: str = "r") -> dict[str, Any]:
    await backend.write_checkpoint(
        checkpoint(backend, run_id, 0, header=run_header(), context={"a": 1}, output="o1")
    )
    await backend.write_checkpoint(
        checkpoint(backend, run_id, 1, context={"a": 2}, steps=[{"i": 0}], output="o2", index=1)
    )
    state = await backend.load_state(run_id)
    assert state is not None
    assert state["version"] == 2
    return state


@pytest.mark.parametrize("stale", [0, 1, 3, 99])
async def test_a_stale_checkpoint_conflicts_and_writes_nothing(
    backend: StateBackend, stale: int
) -> None:
    before = await _advanced_run(backend)
    runs_before = await backend.list_runs()

    with pytest.raises(StateConflictError) as info:
        await backend.write_checkpoint(
            checkpoint(
                backend,
                "r",
                stale,
                header=run_header(pipeline_name="other") if stale == 0 else None,
                context={"a": "overwritten", "b": "new"},
                steps=[{"i": "stale"}],
                step_offset=1,
                output="stale",
                status="completed",
                index=9,
                error={"type": "E", "message": "m", "step": None},
                updated_at=T0 + 100,
            )
        )

    assert info.value.run_id == "r"
    assert info.value.expected_version == stale
    assert info.value.actual_version == 2
    assert isinstance(info.value, FlujoError)
    assert await backend.load_state("r") == before
    assert await backend.list_runs() == runs_before


async def test_creating_a_run_that_exists_conflicts(backend: StateBackend) -> None:
    await backend.write_checkpoint(
        checkpoint(backend, "r", 0, header=run_header(), context={"first": True})
    )
    before = await backend.load_state("r")

    with pytest.raises(StateConflictError) as info:
        await backend.write_checkpoint(
            checkpoint(backend, "r", 0, header=run_header(), context={"second": True})
        )

    assert info.value.expected_version == 0
    assert info.value.actual_version == 1
    assert await backend.load_state("r") == before


async def test_creating_a_run_over_a_saved_state_conflicts(backend: StateBackend) -> None:
    await backend.save_state("r", sample_state("r"))
    with pytest.raises(StateConflictError):
        await backend.write_checkpoint(checkpoint(backend, "r", 0, header=run_header()))
    assert await backend.load_state("r") == sample_state("r")


async def test_advancing_an_absent_run_conflicts_and_creates_nothing(backend: StateBackend) -> None:
    with pytest.raises(StateConflictError) as info:
        await backend.write_checkpoint(
            checkpoint(backend, "ghost", 3, header=run_header(), context={"a": 1})
        )
    assert info.value.expected_version == 3
    assert info.value.actual_version is None
    assert await backend.load_state("ghost") is None
    assert await backend.list_runs() == []


async def test_the_loser_of_a_race_retries_after_reloading(backend: StateBackend) -> None:
    await _advanced_run(backend)
    # Two writers both saw version 2; the first one wins.
    assert await backend.write_checkpoint(checkpoint(backend, "r", 2, context={"w": "one"})) == 3
    with pytest.raises(StateConflictError):
        await backend.write_checkpoint(checkpoint(backend, "r", 2, context={"w": "two"}))

    reloaded = await backend.load_state("r")
    assert reloaded is not None
    assert reloaded["pipeline_context"]["w"] == "one"
    version = await backend.write_checkpoint(
        checkpoint(backend, "r", reloaded["version"], context={"w": "two"})
    )
    assert version == 4


async def test_two_backends_on_one_store_cannot_both_advance_a_run(
    backend_factory: BackendFactory, make_backend: MakeBackend
) -> None:
    if not backend_factory.persistent:
        pytest.skip("in-memory backends do not share a store")
    first, second = make_backend(), make_backend()
    await first.write_checkpoint(checkpoint(first, "r", 0, header=run_header()))
    # Both writers load version 1 (the second one also writes, so it has the run cached).
    assert await second.write_checkpoint(checkpoint(second, "r", 1, context={"by": "second"})) == 2
    assert await first.write_checkpoint(checkpoint(first, "r", 2, context={"by": "first"})) == 3
    assert await first.write_checkpoint(checkpoint(first, "r", 3, context={"by": "first"})) == 4
    before = await first.load_state("r")

    with pytest.raises(StateConflictError):
        await second.write_checkpoint(checkpoint(second, "r", 2, context={"by": "second"}))

    assert await second.load_state("r") == before
    assert await first.load_state("r") == before


async def test_concurrent_writers_from_threads_let_exactly_one_win(
    backend_factory: BackendFactory, make_backend: MakeBackend
) -> None:
    """Eight threads, each with its own event loop (and, where the store is shared, its own
    backend, closed in that loop), race to advance version 1."""
    writers = 8
    first = make_backend()
    await first.write_checkpoint(checkpoint(first, "r", 0, header=run_header()))
    shared = not backend_factory.persistent
    backends = [first] if shared else [make_backend() for _ in range(writers)]

    async def write(backend: StateBackend, cp: Checkpoint) -> None:
        try:
            await backend.write_checkpoint(cp)
        finally:
            if not shared:
                await backend.aclose()

    def attempt(i: int) -> str:
        backend = backends[i % len(backends)]
        cp = checkpoint(backend, "r", 1, context={"winner": i}, steps=[{"by": i}])
        try:
            asyncio.run(write(backend, cp))
        except StateConflictError:
            return "conflict"
        return "won"

    outcomes = await asyncio.gather(*(asyncio.to_thread(attempt, i) for i in range(writers)))

    assert sorted(outcomes) == ["conflict"] * (writers - 1) + ["won"]
    loaded = await first.load_state("r")
    assert loaded is not None
    assert loaded["version"] == 2
    winner = loaded["pipeline_context"]["winner"]
    assert loaded["step_history"] == [{"by": winner}]


async def test_a_checkpoint_for_a_new_run_needs_a_header(backend: StateBackend) -> None:
    with pytest.raises(FlujoError):
        await backend.write_checkpoint(checkpoint(backend, "r", 0, header=None))
    assert await backend.load_state("r") is None


# -- the NUL character -----------------------------------------------------------------------------


async def test_nul_in_state_values_round_trips(backend: StateBackend) -> None:
    """NUL ("\\x00") anywhere in a state value (context values and the keys inside them, step
    records, last output, initial input, error, step names) is stored and comes back exactly,
    through save_state and through checkpoints, on every backend."""
    state = sample_state(
        "r",
        pipeline_context={"run_id": "r", "text": "a\x00b", "deep": {"k\x00": ["x", "\x00"]}},
        last_step_output="\x00",
        initial_input={"in": "nul\x00", "\x00": None},
        step_history=[{**step_record(0, "a\x00", "x\x00"), "error": "e\x00"}],
        error={"type": "E\x00", "message": "bad\x00", "step": "a\x00"},
        step_names=["a\x00", "\x00"],
    )
    await backend.save_state("r", state)

    assert await backend.load_state("r") == state
    [summary] = await backend.list_runs()
    assert summary["error"] == state["error"]

    header = run_header(step_names=["s\x00"], initial_input=orjson.dumps({"in": "\x00"}))
    await backend.write_checkpoint(
        checkpoint(
            backend,
            "c",
            0,
            header=header,
            context={"v": "\x00", "n": {"\x00": 1}},
            steps=[step_record(0, "s\x00", "\x00")],
            output=["\x00"],
            index=1,
            updated_at=T0 + 1,
        )
    )
    error = {"type": "E", "message": "m\x00", "step": "t\x00"}
    await backend.write_checkpoint(
        checkpoint(
            backend,
            "c",
            1,
            status="failed",
            context={"v": "x\x00y"},
            steps=[step_record(1, "t\x00", {"\x00": "\x00\x00"})],
            step_offset=1,
            output={"\x00": "\x00"},
            index=2,
            error=error,
            updated_at=T0 + 2,
        )
    )

    loaded = await backend.load_state("c")
    assert loaded is not None
    assert loaded["step_names"] == ["s\x00"]
    assert loaded["initial_input"] == {"in": "\x00"}
    assert loaded["pipeline_context"] == {"v": "x\x00y", "n": {"\x00": 1}}
    assert loaded["step_history"] == [
        step_record(0, "s\x00", "\x00"),
        step_record(1, "t\x00", {"\x00": "\x00\x00"}),
    ]
    assert loaded["last_step_output"] == {"\x00": "\x00"}
    assert loaded["error"] == error
    assert loaded["status"] == "failed"
    assert loaded["version"] == 2


# (what the state holds, where Postgres says the NUL is)
NUL_IN_NAMES = [
    pytest.param({"pipeline_id": "p\x00"}, "pipeline_id", id="pipeline_id"),
    pytest.param({"pipeline_name": "pipe\x00line"}, "pipeline_name", id="pipeline_name"),
    pytest.param({"pipeline_version": "1.0\x00"}, "pipeline_version", id="pipeline_version"),
    pytest.param({"status": "running\x00"}, "status", id="status"),
    pytest.param(
        {"pipeline_context": {"ok": 1, "field\x00": 1}},
        "pipeline_context field name",
        id="context-field-name",
    ),
    pytest.param({"metadata": {"tenant": "a\x00"}}, "metadata", id="metadata-value"),
    pytest.param({"metadata": {"tags": ["\x00"]}}, "metadata", id="metadata-nested"),
]


@pytest.mark.parametrize(("changes", "part"), NUL_IN_NAMES)
async def test_nul_in_names_and_metadata(
    backend: StateBackend, changes: dict[str, Any], part: str
) -> None:
    """Names and metadata with NUL: stored exactly, except on Postgres, whose text columns and
    JSONB cannot hold it: there SerializationError names the part and nothing is written."""
    await backend.save_state("kept", sample_state("kept"))
    runs_before = await backend.list_runs()
    changed = sample_state("kept", version=7, **changes)
    new = sample_state("new", **changes)

    if not _refuses_nul_in_names(backend):
        await backend.save_state("kept", changed)
        await backend.save_state("new", new)
        assert await backend.load_state("kept") == changed
        assert await backend.load_state("new") == new
        return

    for run_id, state in (("kept", changed), ("new", new)):
        with pytest.raises(SerializationError) as info:
            await backend.save_state(run_id, state)
        assert info.value.path.startswith(part), info.value.path
        assert isinstance(info.value, FlujoError)
    assert await backend.load_state("kept") == sample_state("kept")
    assert await backend.load_state("new") is None
    assert await backend.list_runs() == runs_before


# -- round trips of arbitrary JSON data (hypothesis) -----------------------------------------------


@HYPOTHESIS
@given(
    context=json_objects,
    output=json_values,
    history=st.lists(json_objects, max_size=3),
    initial_input=json_values,
    error=st.none() | json_objects,
)
async def test_save_state_round_trips_json_data(
    backend: StateBackend,
    context: dict[str, Any],
    output: Any,
    history: list[dict[str, Any]],
    initial_input: Any,
    error: dict[str, Any] | None,
) -> None:
    if _refuses_nul_in_names(backend):  # NUL in values is stored; in field names, refused
        assume(not _field_names_hold_nul(context))
    run_id = unique_run_id()
    state = sample_state(
        run_id,
        pipeline_context=context,
        last_step_output=output,
        step_history=history,
        initial_input=initial_input,
        error=error,
    )
    await backend.save_state(run_id, state)

    assert await backend.load_state(run_id) == state
    await backend.delete_state(run_id)


@HYPOTHESIS
@given(
    updates=st.lists(
        st.tuples(
            json_objects,  # changed context fields
            st.lists(json_objects, max_size=2),  # new step records
            st.none() | st.tuples(json_values),  # new output, or keep the stored one
        ),
        min_size=1,
        max_size=4,
    ),
    initial=json_objects,
)
async def test_checkpoints_round_trip_json_data(
    backend: StateBackend,
    initial: dict[str, Any],
    updates: list[tuple[dict[str, Any], list[dict[str, Any]], tuple[Any] | None]],
) -> None:
    if _refuses_nul_in_names(backend):  # NUL in values is stored; in field names, refused
        assume(not _field_names_hold_nul(initial, *(changed for changed, _, _ in updates)))
    run_id = unique_run_id()
    version = await backend.write_checkpoint(
        checkpoint(backend, run_id, 0, header=run_header(), context=initial)
    )
    context, history, output = dict(initial), [], None
    for changed, records, new_output in updates:
        kwargs: dict[str, Any] = {} if new_output is None else {"output": new_output[0]}
        version = await backend.write_checkpoint(
            checkpoint(
                backend,
                run_id,
                version,
                context=changed,
                steps=records,
                step_offset=len(history),
                index=len(history) + len(records),
                **kwargs,
            )
        )
        context.update(changed)
        history.extend(records)
        if new_output is not None:
            output = new_output[0]

        loaded = await backend.load_state(run_id)
        assert loaded is not None
        assert loaded["version"] == version
        assert loaded["pipeline_context"] == context
        assert loaded["step_history"] == history
        assert loaded["last_step_output"] == output
    assert version == len(updates) + 1
    await backend.delete_state(run_id)


# -- hostile run ids -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Absolute:
    """Stands for an absolute path inside the test's tmp_path (made per test)."""

    traversal: bool

    def resolve(self, outside: Path) -> str:
        if self.traversal:
            return f"{outside}/../outside/escape"
        return str(outside / "escape")


def _hostile_id_param(run_id: Any) -> Any:
    shown = repr(run_id)
    return pytest.param(run_id, id=shown if len(shown) <= 30 else shown[:27] + "...")


HOSTILE_PARAMS = [
    *(_hostile_id_param(run_id) for run_id in HOSTILE_RUN_IDS),
    pytest.param(_Absolute(traversal=False), id="absolute-path"),
    pytest.param(_Absolute(traversal=True), id="absolute-path-traversal"),
]


async def _call(backend: StateBackend, method: str, run_id: Any) -> Any:
    if method == "save_state":
        return await backend.save_state(run_id, sample_state("x"))
    if method == "load_state":
        return await backend.load_state(run_id)
    if method == "delete_state":
        return await backend.delete_state(run_id)
    cp = Checkpoint(
        run_id=run_id,
        expected_version=0,
        status="running",
        current_step_index=0,
        updated_at=T0,
        last_step_output=b"1",
        error=None,
        context={"a": b"1"},
        steps=[b"{}"],
        header=run_header(),
    )
    return await backend.write_checkpoint(cp)


@pytest.mark.parametrize("method", ["save_state", "load_state", "delete_state", "write_checkpoint"])
@pytest.mark.parametrize("run_id", HOSTILE_PARAMS)
async def test_hostile_run_ids_are_refused(
    backend: StateBackend,
    tmp_path: Path,
    store_location: Path,
    method: str,
    run_id: Any,
) -> None:
    outside = tmp_path / "outside"
    if isinstance(run_id, _Absolute):
        run_id = run_id.resolve(outside)
    # Give the store something to lose first, so a refused call on a live store is tested too.
    await backend.save_state("victim", sample_state("victim"))

    with pytest.raises(InvalidRunIdError) as info:
        await _call(backend, method, run_id)

    assert info.value.run_id == (run_id if isinstance(run_id, str) else repr(run_id))
    assert isinstance(info.value, FlujoError)
    assert isinstance(info.value, ValueError)
    assert await backend.load_state("victim") == sample_state("victim")
    assert [r["run_id"] for r in await backend.list_runs()] == ["victim"]
    # Nothing is created anywhere but in the store itself.
    assert not outside.exists()
    assert {p.name for p in tmp_path.iterdir()} <= {store_location.name}
    stray = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file() and p.suffix == ".json" and p.name != "victim.json"
    ]
    assert stray == []


# -- values that cannot be stored ------------------------------------------------------------------


def _circular_list() -> list[Any]:
    items: list[Any] = [1]
    items.append(items)
    return items


def _circular_dict() -> dict[str, Any]:
    d: dict[str, Any] = {"ok": 1}
    d["self"] = {"again": d}
    return d


def _deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"d": value}
    return value


class _Opaque:
    pass


# (value placed in pipeline_context["bad"], the exact path expected, or a prefix ending in "...")
BAD_VALUES = [
    pytest.param(_Opaque(), "pipeline_context.bad", id="unencodable-object"),
    pytest.param(
        {"inner": {"deep": _Opaque()}}, 'pipeline_context.bad["inner"]["deep"]', id="nested"
    ),
    pytest.param([1, 2, lambda: None], "pipeline_context.bad[2]", id="function-in-list"),
    pytest.param(math.nan, "pipeline_context.bad", id="nan"),
    pytest.param(math.inf, "pipeline_context.bad", id="inf"),
    pytest.param(-math.inf, "pipeline_context.bad", id="-inf"),
    pytest.param({"x": [0.5, math.nan]}, 'pipeline_context.bad["x"][1]', id="nested-nan"),
    pytest.param(_circular_list(), "pipeline_context.bad[1]", id="circular-list"),
    pytest.param(_circular_dict(), 'pipeline_context.bad["self"]["again"]', id="circular-dict"),
    pytest.param(_deep(300), 'pipeline_context.bad["d"]...', id="300-levels"),
    pytest.param(2**64, "pipeline_context.bad", id="int-over-64-bits"),
    pytest.param(-(2**63) - 1, "pipeline_context.bad", id="int-under-int64"),
    pytest.param({"n": [10**30]}, 'pipeline_context.bad["n"][0]', id="nested-huge-int"),
    pytest.param({1: "one"}, "pipeline_context.bad", id="int-key"),
    pytest.param({"ok": {(1, 2): "tuple"}}, 'pipeline_context.bad["ok"]', id="tuple-key"),
    pytest.param({None: 1}, "pipeline_context.bad", id="none-key"),
    pytest.param("abc\ud800def", "pipeline_context.bad", id="lone-surrogate"),
    pytest.param({"s": ["\udfff"]}, 'pipeline_context.bad["s"][0]', id="nested-surrogate"),
    pytest.param(b"\xff\xfe", "pipeline_context.bad", id="non-utf8-bytes"),
]


def _assert_path(path: str, expected: str) -> None:
    if expected.endswith("..."):
        assert path.startswith(expected[:-3])
    else:
        assert path == expected


@pytest.mark.parametrize(("bad", "expected_path"), BAD_VALUES)
async def test_unstorable_context_values_fail_with_a_path_and_keep_the_stored_state(
    backend: StateBackend, bad: Any, expected_path: str
) -> None:
    await backend.save_state("r", sample_state("r"))
    state = sample_state("r", pipeline_context={"fine": 1, "bad": bad}, version=3)

    with pytest.raises(SerializationError) as info:
        await backend.save_state("r", state)

    _assert_path(info.value.path, expected_path)
    assert info.value.path in str(info.value)
    assert isinstance(info.value, FlujoError)
    assert await backend.load_state("r") == sample_state("r")


@pytest.mark.parametrize(("bad", "expected_path"), BAD_VALUES)
async def test_unstorable_values_fail_before_a_new_run_is_created(
    backend: StateBackend, bad: Any, expected_path: str
) -> None:
    with pytest.raises(SerializationError):
        await backend.save_state("r", sample_state("r", pipeline_context={"bad": bad}))
    assert await backend.load_state("r") is None
    assert await backend.list_runs() == []


@pytest.mark.parametrize(
    ("field", "value", "expected_path"),
    [
        ("last_step_output", {"v": math.nan}, 'last_step_output["v"]'),
        ("initial_input", [_Opaque()], "initial_input[0]"),
        ("step_history", [{"ok": 1}, {"output": math.inf}], 'step_history[1]["output"]'),
        ("error", {"type": "E", "message": "\ud800", "step": None}, 'error["message"]'),
        ("step_names", ["a", 2**70], "step_names[1]"),
    ],
)
async def test_unstorable_values_in_other_fields(
    backend: StateBackend, field: str, value: Any, expected_path: str
) -> None:
    await backend.save_state("r", sample_state("r"))

    with pytest.raises(SerializationError) as info:
        await backend.save_state("r", sample_state("r", **{field: value}))

    assert info.value.path == expected_path
    assert await backend.load_state("r") == sample_state("r")


async def test_a_value_over_max_payload_bytes_is_refused(make_backend: MakeBackend) -> None:
    backend = make_backend(max_payload_bytes=1_000_000)
    await backend.save_state("r", sample_state("r"))
    big = "x" * 10_000_000

    with pytest.raises(PayloadTooLargeError) as info:
        await backend.save_state("r", sample_state("r", pipeline_context={"a": 1, "big": big}))

    assert info.value.limit == 1_000_000
    assert info.value.size > 10_000_000
    assert info.value.path == "pipeline_context.big"
    assert isinstance(info.value, SerializationError)
    assert await backend.load_state("r") == sample_state("r")


@pytest.mark.parametrize("field", ["last_step_output", "initial_input"])
async def test_payload_limit_applies_to_every_stored_value(
    make_backend: MakeBackend, field: str
) -> None:
    backend = make_backend(max_payload_bytes=1000)
    with pytest.raises(PayloadTooLargeError) as info:
        await backend.save_state("r", sample_state("r", **{field: "y" * 2000}))
    assert info.value.path == field
    assert await backend.load_state("r") is None


async def test_a_value_at_the_payload_limit_is_stored(make_backend: MakeBackend) -> None:
    backend = make_backend(max_payload_bytes=1000)
    exactly = "z" * 998  # 1000 bytes once quoted
    state = sample_state("r", pipeline_context={"v": exactly})
    await backend.save_state("r", state)
    assert await backend.load_state("r") == state


# -- what the default serializer (and a custom one) can store --------------------------------------


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Address(BaseModel):
    city: str
    since: datetime
    tags: set[str] = set()


class Customer(BaseModel):
    name: str
    color: Color
    address: Address
    previous: list[Address] = []
    balance: Decimal = Decimal("0")


@dataclasses.dataclass
class Point:
    x: int
    y: float
    label: Color = Color.BLUE


@dataclasses.dataclass
class Shape:
    points: list[Point]
    origin: Point


async def test_common_python_types_are_stored_as_json(backend: StateBackend) -> None:
    at = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
    uid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    customer = Customer(
        name="Ada",
        color=Color.RED,
        address=Address(city="Lima", since=at, tags={"b", "a"}),
        previous=[Address(city="Cusco", since=at)],
        balance=Decimal("12.50"),
    )
    context = {
        "customer": customer,
        "aware": at,
        "naive": datetime(2026, 3, 4, 5, 6, 7),
        "day": date(2026, 3, 4),
        "clock": time(5, 6, 7),
        "color": Color.BLUE,
        "level": Level.HIGH,
        "uid": uid,
        "amount": Decimal("1.10"),
        "path": PurePosixPath("/data/in.csv"),
        "tags": {"z", "x", "y"},
        "frozen": frozenset({3, 1, 2}),
        "shape": Shape(points=[Point(1, 2.5)], origin=Point(0, 0.0, Color.RED)),
        "text_bytes": b"hello",
        "tuple": (1, "two"),
    }
    await backend.save_state(
        "r", sample_state("r", pipeline_context=context, last_step_output=customer)
    )

    loaded = await backend.load_state("r")

    assert loaded is not None
    stored = loaded["pipeline_context"]
    assert stored == {
        "customer": customer.model_dump(mode="json"),
        "aware": "2026-03-04T05:06:07.890000+00:00",
        "naive": "2026-03-04T05:06:07",
        "day": "2026-03-04",
        "clock": "05:06:07",
        "color": "blue",
        "level": 2,
        "uid": "12345678-1234-5678-1234-567812345678",
        "amount": "1.10",
        "path": "/data/in.csv",
        "tags": ["x", "y", "z"],
        "frozen": [1, 2, 3],
        "shape": {
            "points": [{"x": 1, "y": 2.5, "label": "blue"}],
            "origin": {"x": 0, "y": 0.0, "label": "red"},
        },
        "text_bytes": "hello",
        "tuple": [1, "two"],
    }
    assert datetime.fromisoformat(stored["customer"]["address"]["since"]) == at
    assert Customer.model_validate(stored["customer"]) == customer
    assert Customer.model_validate(loaded["last_step_output"]) == customer
    assert datetime.fromisoformat(stored["aware"]) == at
    assert _is_plain_json(_without_timestamps(loaded))


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents


async def test_a_custom_serializer_default_is_used(make_backend: MakeBackend) -> None:
    seen: list[type] = []

    def default(obj: Any) -> Any:
        seen.append(type(obj))
        if isinstance(obj, Money):
            return {"cents": obj.cents, "currency": "EUR"}
        if isinstance(obj, Decimal):
            return float(obj)  # flujo's default would give the string "0.5"
        raise TypeError(f"custom default cannot store {type(obj).__name__}")

    backend = make_backend(serializer_default=default)
    state = sample_state(
        "r",
        pipeline_context={"price": Money(150), "rate": Decimal("0.5"), "list": [Money(1)]},
        last_step_output=Money(7),
    )
    await backend.save_state("r", state)

    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["pipeline_context"] == {
        "price": {"cents": 150, "currency": "EUR"},
        "rate": 0.5,
        "list": [{"cents": 1, "currency": "EUR"}],
    }
    assert loaded["last_step_output"] == {"cents": 7, "currency": "EUR"}
    assert Money in seen
    assert Decimal in seen

    # Checkpoints go through the same serializer.
    await backend.write_checkpoint(checkpoint(backend, "r", 2, context={"later": Money(9)}))
    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["pipeline_context"]["later"] == {"cents": 9, "currency": "EUR"}

    # What the custom default refuses fails with a path, storing nothing.
    with pytest.raises(SerializationError) as info:
        await backend.save_state("r", sample_state("r", pipeline_context={"x": {"y": _Opaque()}}))
    assert info.value.path == 'pipeline_context.x["y"]'
    assert "custom default cannot store _Opaque" in str(info.value)
    assert (await backend.load_state("r")) == loaded


async def test_without_a_custom_default_unknown_types_fail(backend: StateBackend) -> None:
    with pytest.raises(SerializationError) as info:
        await backend.save_state("r", sample_state("r", pipeline_context={"price": Money(1)}))
    assert info.value.path == "pipeline_context.price"
    assert "Money" in str(info.value)


# -- loading runs no code --------------------------------------------------------------------------

LOOKS_LIKE_CODE: dict[str, Any] = {
    "__class__": "os.system",
    "__reduce__": ["os.system", ["touch /tmp/flujo-pwned"]],
    "py/object": "subprocess.Popen",
    "$type": "System.Diagnostics.Process",
    "lc": 1,
    "type": "constructor",
    "id": ["os", "system"],
    "kwargs": {"command": "touch /tmp/flujo-pwned"},
    "yaml": "!!python/object/apply:os.system ['touch /tmp/flujo-pwned']",
    "tag": "!!python/object:__main__.Evil",
    "pickle": "gASVIAAAAAAAAACMAm9zlIwGc3lzdGVtlJOUjAhlY2hvIGhplIWUUpQu",
}


async def test_loading_runs_no_code(backend: StateBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []

    def record(*args: Any, **kwargs: Any) -> None:
        calls.append(args)

    monkeypatch.setattr(os, "system", record)
    monkeypatch.setattr(subprocess, "Popen", record)
    state = sample_state(
        "r",
        pipeline_context={"payload": LOOKS_LIKE_CODE, **LOOKS_LIKE_CODE},
        last_step_output=LOOKS_LIKE_CODE,
        initial_input="!!python/object/apply:os.system ['id']",
        step_history=[{**step_record(0, "s"), "output": LOOKS_LIKE_CODE}],
        error={"type": "!!python/name:os.system", "message": "m", "step": None},
    )
    await backend.save_state("r", state)
    await backend.write_checkpoint(
        checkpoint(
            backend,
            "r",
            2,
            context={"more": LOOKS_LIKE_CODE},
            steps=[LOOKS_LIKE_CODE],
            step_offset=1,
        )
    )

    loaded = await backend.load_state("r")

    assert loaded is not None
    assert loaded["pipeline_context"]["payload"] == LOOKS_LIKE_CODE
    assert loaded["pipeline_context"]["more"] == LOOKS_LIKE_CODE
    assert loaded["last_step_output"] == LOOKS_LIKE_CODE
    assert loaded["step_history"][-1] == LOOKS_LIKE_CODE
    assert loaded["initial_input"] == "!!python/object/apply:os.system ['id']"
    assert _is_plain_json(
        {k: v for k, v in loaded.items() if k not in ("created_at", "updated_at")}
    )
    assert calls == []
    assert not Path("/tmp/flujo-pwned").exists()


# -- schema: migrate() and schema_version() ------------------------------------------------------


def _schema_expectations(backend: StateBackend) -> tuple[int | None, list[int]]:
    """(schema_version, what the first migrate() applies) for a backend of this suite.

    The suite migrates a Postgres schema before the test (its ``prepare``); a SQLite store
    migrates itself when first opened; memory and files have no schema.
    """
    if isinstance(backend, PostgresBackend):
        return len(POSTGRES_MIGRATIONS), []
    if isinstance(backend, SQLiteBackend):
        return len(SQLITE_MIGRATIONS), list(range(1, len(SQLITE_MIGRATIONS) + 1))
    assert isinstance(backend, (InMemoryBackend, FileBackend)), f"add {backend!r} here"
    return None, []


async def test_migrate_and_schema_version(
    backend_factory: BackendFactory, make_backend: MakeBackend
) -> None:
    """Every backend has ``async migrate() -> list[int]`` (the migrations it applied; idempotent)
    and ``async schema_version() -> int | None`` (None for a store without a schema)."""
    backend = make_backend()
    version, first = _schema_expectations(backend)

    assert await backend.migrate() == first
    assert await backend.migrate() == []
    assert await backend.schema_version() == version

    await backend.save_state("r", sample_state("r"))
    assert await backend.migrate() == []
    assert await backend.schema_version() == version
    assert await backend.load_state("r") == sample_state("r")
    if backend_factory.persistent:
        other = make_backend()
        assert await other.migrate() == []
        assert await other.schema_version() == version
        assert await other.load_state("r") == sample_state("r")


# -- closing ---------------------------------------------------------------------------------------


async def test_aclose_then_reuse(backend: StateBackend) -> None:
    await backend.save_state("r", sample_state("r"))
    await backend.aclose()

    assert await backend.load_state("r") == sample_state("r")
    await backend.write_checkpoint(checkpoint(backend, "r", 2, context={"after": "close"}))
    await backend.aclose()
    await backend.aclose()  # closing twice is fine

    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["version"] == 3
    assert loaded["pipeline_context"]["after"] == "close"
    assert [r["run_id"] for r in await backend.list_runs()] == ["r"]
    await backend.delete_state("r")
    await backend.aclose()
    assert await backend.load_state("r") is None


async def test_aclose_on_a_backend_never_used(backend: StateBackend) -> None:
    await backend.aclose()
    assert await backend.list_runs() == []


async def test_async_context_manager_closes_and_the_backend_still_works(
    backend: StateBackend,
) -> None:
    async with backend as entered:
        assert entered is backend
        await backend.save_state("r", sample_state("r"))
    assert await backend.load_state("r") == sample_state("r")
