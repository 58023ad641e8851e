"""flujo.routines: JobState, its serialized form, files, and hostile data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from flujo.exceptions import (
    InvalidRoutineIdError,
    InvalidRunIdError,
    JobStateError,
    SerializationError,
)
from flujo.routines import JobState, JobStatus

from .test_routines_helpers import Node, chain, runtime_for


def finished_job() -> JobState:
    flow = chain(3)
    flow.add_routine(Node(lambda n, d, s: s.update_routine_state("sink", d["input"][0])), "sink")
    flow.connect("r2", "output", "sink", "input")
    with runtime_for(flow) as runtime:
        return runtime.exec("chain", {"x": 0}, job_id="job-1")


def test_a_new_job_state() -> None:
    state = JobState()
    assert len(state.job_id) == 32
    assert state.flow_id is None
    assert state.status is JobStatus.PENDING
    assert state.routine_states == {}
    assert state.history == []
    assert state.pending == []
    assert state.activations == 0
    assert state.wait(0) is True  # not running
    named = JobState("job-7", "flow", entry_params={"a": 1})
    assert (named.job_id, named.flow_id, named.flow_name) == ("job-7", "flow", "flow")
    assert named.entry_params == {"a": 1}
    assert "job-7" in repr(named)


@pytest.mark.parametrize("bad", ["", "..", "../../etc/passwd", "/tmp/x", "a/b", "a\x00", "x" * 129])
def test_bad_job_ids_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRunIdError):
        JobState(bad)
    data = finished_job().serialize()
    data["job_id"] = bad
    with pytest.raises(InvalidRunIdError):
        JobState.deserialize(data)


def test_routine_states_outside_logic() -> None:
    state = JobState("j", "f")
    assert state.get_routine_state("r") is None
    assert state.get_routine_state("r", {}) == {}
    state.update_routine_state("r", {"a": 1})
    state.update_routine_state("r", {"b": 2})
    assert state.get_routine_state("r") == {"a": 1, "b": 2}
    state.get_routine_state("r")["a"] = 99  # a copy
    assert state.routine_states == {"r": {"a": 1, "b": 2}}
    with pytest.raises(JobStateError):
        state.update_routine_state("r", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(InvalidRoutineIdError):
        state.update_routine_state("../r", {})


def test_serialize_is_json_data_and_deserialize_gives_it_back() -> None:
    state = finished_job()
    data = state.serialize()
    assert json.loads(json.dumps(data)) == data
    assert data["format"] == "flujo.routines.job_state/1"
    assert data["job_id"] == "job-1"
    assert data["flow_id"] == "chain"
    assert data["status"] == "completed"
    assert data["routine_states"] == {"sink": {"x": 3}}
    assert data["entry_params"] == {"x": 0}
    assert data["activations"] == 4
    assert data["next_message_id"] == 4
    assert data["pending"] == []
    assert [r["kind"] for r in data["history"]] == ["entry"] + ["activation"] * 4
    restored = JobState.deserialize(data)
    assert restored.serialize() == data
    assert restored.status is JobStatus.COMPLETED
    assert restored.get_routine_state("sink") == {"x": 3}
    assert restored.flow_name == "chain"


def test_serialize_names_the_path_of_a_value_that_is_not_json() -> None:
    state = JobState("j", "f")
    state.update_routine_state("r", {"bad": float("nan")})
    with pytest.raises(SerializationError) as caught:
        state.serialize()
    assert "routine_states" in caught.value.path


def test_save_is_atomic_and_load_reads_it(tmp_path: Path) -> None:
    state = finished_job()
    target = tmp_path / "state.json"
    target.write_text("old contents")
    state.save(target)
    assert JobState.load(target).serialize() == state.serialize()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left
    state.save(str(tmp_path / "again.json"))
    assert JobState.load(str(tmp_path / "again.json")).job_id == "job-1"


def test_save_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    state = JobState("j", "f")
    target = tmp_path / "state.json"
    state.save(target)
    before = target.read_bytes()
    state.update_routine_state("r", {"bad": {1, 2, object()}})
    with pytest.raises(SerializationError):
        state.save(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_save_works_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    JobState("j", "f").save("here.json")
    assert JobState.load("here.json").job_id == "j"


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b"[1, 2]", b"null", b'"text"'])
def test_loading_a_garbage_file_is_a_typed_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.json"
    path.write_bytes(content)
    with pytest.raises(JobStateError):
        JobState.load(path)


def mutated(change: Any) -> dict[str, Any]:
    data = finished_job().serialize()
    data["pending"] = [
        {"id": 4, "src": "r2", "event": "output", "dst": "sink", "slot": "input", "data": {}}
    ]
    data["next_message_id"] = 5
    change(data)
    return data


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda d: d.pop("format"), "format"),
        (lambda d: d.update(format="flujo.routines.job_state/99"), "format"),
        (lambda d: d.update(status="exploded"), "status"),
        (lambda d: d.update(flow_id="../f"), "flow_id"),
        (lambda d: d.update(flow_name=5), "flow_name"),
        (lambda d: d.update(error="boom"), "error"),
        (lambda d: d.update(entry_params=[1]), "entry_params"),
        (lambda d: d.update(created_at="yesterday"), "created_at"),
        (lambda d: d.update(updated_at=True), "updated_at"),
        (lambda d: d.update(routine_states=[]), "routine_states"),
        (lambda d: d.update(routine_states={"r": 5}), "routine_states.r"),
        (lambda d: d.update(routine_states={"../r": {}}), "routine_states"),
        (lambda d: d.update(history={}), "history"),
        (lambda d: d.update(history=[1]), "history"),
        (lambda d: d.update(pending={}), "pending"),
        (lambda d: d["pending"].append("x"), "pending[1]"),
        (lambda d: d["pending"][0].update(id=-1), "pending[0]"),
        (lambda d: d["pending"][0].update(id=True), "pending[0]"),
        (lambda d: d["pending"][0].update(id="4"), "pending[0]"),
        (lambda d: d["pending"][0].update(dst=None), "pending[0]"),
        (lambda d: d["pending"][0].update(data=[]), "pending[0]"),
        (lambda d: d["pending"][0].update(src=5), "pending[0]"),
        (lambda d: d["pending"].append(dict(d["pending"][0])), "pending[1]"),
        (lambda d: d.update(next_message_id=2), "next_message_id"),
        (lambda d: d.update(activations=-1), "activations"),
        (lambda d: d.update(extra=object()), "data"),
    ],
)
def test_malformed_job_state_data_is_a_typed_error(change: Any, where: str) -> None:
    with pytest.raises(JobStateError) as caught:
        JobState.deserialize(mutated(change))
    assert where in str(caught.value)
    assert caught.value.job_id == "job-1"


@pytest.mark.parametrize("data", [None, [], "state", 42, {"job_id": 5}, {}])
def test_garbage_instead_of_job_state_data_is_a_typed_error(data: Any) -> None:
    with pytest.raises((JobStateError, InvalidRunIdError)):
        JobState.deserialize(data)


def test_deserialize_takes_data_only() -> None:
    """A dict that looks like a class reference stays a dict; nothing is called or imported."""
    data = mutated(lambda d: None)
    data["routine_states"] = {"sink": {"__class__": "os.system", "args": ["rm -rf /"]}}
    data["pending"][0]["data"] = {"$type": "subprocess.Popen", "__reduce__": ["os.system"]}
    state = JobState.deserialize(data)
    assert state.get_routine_state("sink") == {"__class__": "os.system", "args": ["rm -rf /"]}
    assert state.pending[0]["data"] == {"$type": "subprocess.Popen", "__reduce__": ["os.system"]}


def test_deserialize_copies_what_it_is_given() -> None:
    data = mutated(lambda d: None)
    state = JobState.deserialize(data)
    data["routine_states"]["sink"]["x"] = "changed"
    data["pending"][0]["data"]["x"] = "changed"
    assert state.get_routine_state("sink") == {"x": 3}
    assert state.pending[0]["data"] == {}


def test_pending_is_sorted_by_message_id() -> None:
    data = mutated(lambda d: None)
    first = dict(data["pending"][0], id=2)
    data["pending"].append(first)
    state = JobState.deserialize(data)
    assert [p["id"] for p in state.pending] == [2, 4]


def test_history_and_pending_are_copies() -> None:
    state = finished_job()
    state.history.clear()
    state.pending.append({})
    assert len(state.history) == 5
    assert state.pending == []


def test_save_fsyncs_through_a_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    os.symlink(real, link)
    JobState("j", "f").save(link / "s.json")
    assert (real / "s.json").is_file()
