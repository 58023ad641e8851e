"""flujo.routines with a state backend: the stored form of a job, resume, conflicts, listing.

Every test runs against the in-memory, file and SQLite backends (Postgres runs in the crash
tests, tests/integration/test_routines_crashes.py). Crashes here are simulated in-process (a
failing routine, a failing store); the real process kills are in the integration tests.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from flujo import Flujo, Step, TaskClient
from flujo.exceptions import (
    CorruptStateError,
    FlowNotFoundError,
    InvalidRunIdError,
    JobFlowMismatchError,
    JobStateError,
    RunNotFoundError,
    SerializationError,
    StateBackendError,
    StateConflictError,
)
from flujo.routines import Flow, FlowRegistry, JobState, JobStatus, Runtime, all_slots_ready_policy
from flujo.routines.store import JOB_VERSION, derive_pending
from flujo.state import FileBackend, InMemoryBackend, SQLiteBackend
from flujo.state.backends.base import Checkpoint, RunHeader, StateBackend

from .test_routines_helpers import Node, Recorder, add_one, chain, runtime_for

GUARD_S = 30


@pytest.fixture(params=["memory", "file", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> StateBackend:
    if request.param == "memory":
        return InMemoryBackend()
    if request.param == "file":
        return FileBackend(tmp_path / "runs")
    return SQLiteBackend(tmp_path / "runs.db")


def load(backend: StateBackend, job_id: str) -> dict[str, Any]:
    state = asyncio.run(backend.load_state(job_id))
    assert state is not None
    return state


def counting_chain(n: int, runs: Recorder, *, fail_at: str | None = None) -> Flow:
    """A chain whose routines note each run and keep x in their state; ``fail_at`` raises
    (after noting the run) the first time."""

    def step(node: Node, slot_data: Any, job_state: JobState) -> None:
        rid = node.routine_id
        runs.add(rid)
        if rid == fail_at and runs.items.count(rid) == 1:
            raise RuntimeError("boom")
        x = slot_data["input"][0]["x"] + 1
        job_state.update_routine_state(rid or "", {"x": x})
        node.emit("output", x=x)

    return chain(n, fn=step)


class Spy(InMemoryBackend):
    """Records every checkpoint; fails the ones ``fail`` says to."""

    def __init__(self) -> None:
        super().__init__()
        self.checkpoints: list[Checkpoint] = []
        self.fail_after: int | None = None

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        if self.fail_after is not None and len(self.checkpoints) >= self.fail_after:
            raise StateBackendError("disk full")
        self.checkpoints.append(checkpoint)
        return await super().write_checkpoint(checkpoint)


# -- the stored form -------------------------------------------------------------------------------


def test_a_job_is_stored_as_a_run(backend: StateBackend) -> None:
    runs = Recorder()
    with runtime_for(counting_chain(3, runs), backend=backend, names={"orders": chain(1)}) as rt:
        state = rt.exec("chain", {"x": 0}, job_id="job-1")
    stored = load(backend, "job-1")
    assert stored["pipeline_name"] == "chain"
    assert stored["pipeline_id"] == "flujo.routines"
    assert stored["pipeline_version"] == JOB_VERSION
    assert stored["step_names"] == ["r0", "r1", "r2"]
    assert stored["metadata"] == {"kind": "routines_job", "flow_id": "chain"}
    assert stored["initial_input"] == {"x": 0}
    assert stored["status"] == "completed"
    assert stored["error"] is None
    assert stored["current_step_index"] == 3
    assert stored["pipeline_context"] == {f"routine.r{i}": {"x": i + 1} for i in range(3)}
    assert stored["step_history"] == state.history
    assert stored["version"] == 1 + 3 + 1  # the header, one per activation, the final status
    pending, next_id, activations = derive_pending("job-1", stored["step_history"])
    assert (pending, next_id, activations) == ({}, 3, 3)  # r2 emits to no one


def test_each_activation_is_one_checkpoint_with_compare_and_swap() -> None:
    spy = Spy()
    runs = Recorder()
    flow = counting_chain(3, runs)
    flow.add_routine(Node(lambda n, d, s: None), "quiet")  # changes no state
    flow.connect("r2", "output", "quiet", "input")
    with runtime_for(flow, backend=spy) as runtime:
        runtime.exec("chain", {"x": 0}, job_id="job-1")
    header, *activations, final = spy.checkpoints
    assert header.expected_version == 0
    assert header.header is not None
    assert [orjson.loads(s)["kind"] for s in header.steps] == ["entry"]
    for version, checkpoint in enumerate(activations, start=1):
        assert checkpoint.expected_version == version
        assert checkpoint.header is None
        assert len(checkpoint.steps) == 1
        assert checkpoint.step_offset == version
        record = orjson.loads(checkpoint.steps[0])
        assert record["kind"] == "activation"
        assert checkpoint.current_step_index == version
        rid = record["routine"]
        expected_context = {} if rid == "quiet" else {f"routine.{rid}"}
        assert set(checkpoint.context) == set(expected_context)
        assert checkpoint.status_changed is False
    assert final.status == "completed"
    assert final.steps == []
    assert final.status_changed is True


def test_a_job_id_already_in_the_store_is_a_conflict(backend: StateBackend) -> None:
    with runtime_for(chain(2), backend=backend) as runtime:
        runtime.exec("chain", {"x": 0}, job_id="taken")
        before = load(backend, "taken")
        with pytest.raises(StateConflictError) as caught:
            runtime.exec("chain", {"x": 5}, job_id="taken")
    assert caught.value.run_id == "taken"
    assert load(backend, "taken") == before


def test_values_that_cannot_be_stored_fail_the_activation_naming_the_path(
    backend: StateBackend,
) -> None:
    flow = chain(3)
    flow.routines["r1"].set_logic(
        lambda d, m, s: flow.routines["r1"].emit("output", x={1, 2, object()})
    )
    flow.add_routine(
        Node(lambda n, d, s: s.update_routine_state("nan", {"v": float("nan")})), "nan"
    )
    with runtime_for(flow, backend=backend) as runtime:
        state = runtime.exec("chain", {"x": 0}, job_id="bad-emit")
    assert state.status is JobStatus.FAILED
    assert state.error is not None
    assert state.error["routine"] in ("r1", "nan")
    stored = load(backend, "bad-emit")
    assert stored["status"] == "failed"
    assert stored["error"]["type"] == "SerializationError"
    kinds = [(r["kind"], r.get("routine")) for r in stored["step_history"]]
    assert ("activation", "r1") not in kinds
    assert ("activation", "nan") not in kinds
    assert ("failure", state.error["routine"]) in kinds
    assert stored["pipeline_context"].get("routine.nan") is None


def test_a_failing_store_stops_the_job_and_resume_finishes_it() -> None:
    spy = Spy()
    spy.fail_after = 3  # the header and two activations land; then the disk is full
    runs = Recorder()
    with runtime_for(counting_chain(5, runs), backend=spy) as runtime:
        state = runtime.exec("chain", {"x": 0}, job_id="full")
    assert state.status is JobStatus.FAILED
    assert state.error is not None
    assert state.error["type"] == "StateBackendError"
    stored = load(spy, "full")
    assert stored["status"] == "running"  # the final status could not be written either
    assert stored["current_step_index"] == 2
    spy.fail_after = None
    runs.items.clear()
    with runtime_for(counting_chain(5, runs), backend=spy) as runtime:
        resumed = runtime.resume("full")
    assert resumed.status is JobStatus.COMPLETED
    assert runs.items == ["r2", "r3", "r4"]  # r2 ran before and did not commit: again
    assert resumed.get_routine_state("r4") == {"x": 5}


# -- resume ----------------------------------------------------------------------------------------


def test_resume_continues_a_failed_job_without_rerunning_committed_work(
    backend: StateBackend,
) -> None:
    runs = Recorder()
    with runtime_for(counting_chain(5, runs, fail_at="r2"), backend=backend) as runtime:
        state = runtime.exec("chain", {"x": 0}, job_id="job-2")
    assert state.status is JobStatus.FAILED
    stored = load(backend, "job-2")
    assert stored["status"] == "failed"
    assert stored["error"]["routine"] == "r2"
    pending, _, _ = derive_pending("job-2", stored["step_history"])
    assert [(d.dst, d.data) for d in pending.values()] == [("r2", {"x": 2})]
    assert runs.items == ["r0", "r1", "r2"]

    runs.items.clear()
    flow = counting_chain(5, runs)
    with runtime_for(flow, backend=backend) as runtime:  # "another process"
        resumed = runtime.resume("job-2")
        assert resumed.status is JobStatus.COMPLETED
        assert runs.items == ["r2", "r3", "r4"]
        assert resumed.get_routine_state("r4") == {"x": 5}
        runs.items.clear()
        again = runtime.resume("job-2")  # completed: returned as stored, nothing runs
    assert again.status is JobStatus.COMPLETED
    assert runs.items == []
    kinds = [r["kind"] for r in load(backend, "job-2")["step_history"]]
    assert kinds == ["entry", "activation", "activation", "failure", "resume"] + ["activation"] * 3


def test_resume_errors_are_typed(backend: StateBackend) -> None:
    with runtime_for(chain(2), backend=backend) as runtime:
        runtime.exec("chain", {"x": 0}, job_id="done")
        with pytest.raises(RunNotFoundError):
            runtime.resume("missing")
        for bad in ("", "..", "../../etc/passwd", "a/b", "x" * 500):
            with pytest.raises(InvalidRunIdError):
                runtime.resume(bad)
    with runtime_for(backend=backend) as runtime:  # no flow registered
        with pytest.raises(FlowNotFoundError):
            runtime.resume("done")
    with runtime_for(chain(3), backend=backend) as runtime:  # same name, other routines
        with pytest.raises(JobFlowMismatchError, match="routines"):
            runtime.resume("done")
    with runtime_for(backend=backend, names={"chain": chain(2, flow_id="other")}) as runtime:
        with pytest.raises(JobFlowMismatchError):
            runtime.resume("done")


def test_resume_refuses_pipeline_runs(backend: StateBackend) -> None:
    pipeline_runner = Flujo(Step.from_callable(lambda x: x, name="s"), state_backend=backend)
    pipeline_runner.run(1, run_id="pipeline-run")
    with runtime_for(chain(1), backend=backend) as runtime:
        with pytest.raises(JobStateError, match="not a routines job"):
            runtime.resume("pipeline-run")


@pytest.mark.parametrize(
    "records",
    [
        [{"kind": "entry", "emitted": "x"}],
        [{"kind": "entry", "emitted": [{"id": "0"}]}],
        [{"kind": "activation", "consumed": ["a"]}],
        [{"kind": "restore", "next_message_id": -1}],
    ],
)
def test_corrupt_stored_records_are_a_typed_error(records: list[Any]) -> None:
    backend = InMemoryBackend()
    dumps = backend.serializer.dumps
    asyncio.run(
        backend.write_checkpoint(
            Checkpoint(
                run_id="corrupt",
                expected_version=0,
                status="running",
                current_step_index=0,
                updated_at=0.0,
                last_step_output=None,
                error=None,
                steps=[dumps(r) for r in records],
                header=RunHeader(
                    pipeline_id="flujo.routines",
                    pipeline_name="chain",
                    pipeline_version=JOB_VERSION,
                    step_names=b'["r0"]',
                    initial_input=b"{}",
                    created_at=0.0,
                    metadata=b'{"kind": "routines_job", "flow_id": "chain"}',
                ),
            )
        )
    )
    with runtime_for(chain(1), backend=backend) as runtime:
        with pytest.raises(CorruptStateError):
            runtime.resume("corrupt")


def test_two_runtimes_on_one_job_one_writer_wins(backend: StateBackend) -> None:
    """A resumes a failed job; B resumes it too (say A looked dead) and finishes it; A's next
    commit is refused (StateConflictError, nothing written); the store holds B's work."""
    started = threading.Event()
    gate = threading.Event()
    attempts = Recorder()

    def stop_at_r1(node: Node, slot_data: Any, job_state: JobState) -> None:
        if node.routine_id == "r1":
            raise RuntimeError("stop here")
        add_one(node, slot_data, job_state)

    def first_resumer_blocks(node: Node, slot_data: Any, job_state: JobState) -> None:
        if node.routine_id == "r1":
            attempts.add(1)
            if len(attempts.items) == 1:
                started.set()
                gate.wait(GUARD_S)
        add_one(node, slot_data, job_state)

    with runtime_for(chain(3, fn=stop_at_r1), backend=backend) as starter:
        assert starter.exec("chain", {"x": 0}, job_id="race").status is JobStatus.FAILED
    runtime_a = runtime_for(chain(3, fn=first_resumer_blocks), backend=backend)
    runtime_b = runtime_for(chain(3, fn=first_resumer_blocks), backend=backend)
    try:
        state_a = runtime_a.resume("race", wait=False)
        assert started.wait(GUARD_S)  # A is inside r1
        state_b = runtime_b.resume("race")  # B loads after A's claim, and finishes the job
        assert state_b.status is JobStatus.COMPLETED
        gate.set()
        assert state_a.wait(GUARD_S)
        assert state_a.status is JobStatus.FAILED
        assert state_a.error is not None
        assert state_a.error["type"] == "StateConflictError"
    finally:
        gate.set()
        runtime_a.shutdown()
        runtime_b.shutdown()
    stored = load(backend, "race")
    assert stored["status"] == "completed"
    activations = [r["routine"] for r in stored["step_history"] if r["kind"] == "activation"]
    assert activations == ["r0", "r1", "r2"]
    assert len(attempts.items) == 2  # r1 ran in both (at-least-once), committed once


def test_exec_of_an_interrupted_job_state_stores_it_and_resume_finishes_it(
    backend: StateBackend,
) -> None:
    runs = Recorder()
    with runtime_for(counting_chain(4, runs, fail_at="r2")) as runtime:  # no store
        failed = runtime.exec("chain", {"x": 0}, job_id="moved")
    assert failed.status is JobStatus.FAILED
    snapshot = JobState.deserialize(failed.serialize())

    runs.items.clear()
    flow = counting_chain(4, runs)
    pauser = flow.routines["r2"]
    original = pauser.logic
    assert original is not None
    pauser.set_logic(lambda d, m, s: (_ for _ in ()).throw(RuntimeError("still failing")))
    with runtime_for(flow, backend=backend) as runtime:
        again = runtime.exec("chain", job_state=snapshot)
        assert again.status is JobStatus.FAILED
    stored = load(backend, "moved")
    kinds = [r["kind"] for r in stored["step_history"]]
    assert kinds[:4] == ["entry", "activation", "activation", "failure"]
    assert "restore" in kinds
    assert stored["pipeline_context"]["routine.r1"] == {"x": 2}
    pauser.set_logic(original)
    with runtime_for(flow, backend=backend) as runtime:
        done = runtime.resume("moved")
    assert done.status is JobStatus.COMPLETED
    assert done.get_routine_state("r3") == {"x": 4}
    assert runs.items == ["r2", "r3"]


def test_exec_of_a_paused_job_state_continues_from_the_store(backend: StateBackend) -> None:
    started = threading.Event()
    gate = threading.Event()

    def slow(node: Node, slot_data: Any, job_state: JobState) -> None:
        if node.routine_id == "r0":
            started.set()
            gate.wait(GUARD_S)
        add_one(node, slot_data, job_state)

    with runtime_for(chain(3, fn=slow), backend=backend) as runtime:
        state = runtime.exec("chain", {"x": 0}, job_id="paused-job", wait=False)
        assert started.wait(GUARD_S)
        runtime.pause_job("paused-job")
        gate.set()
        state.wait(GUARD_S)
        assert state.status is JobStatus.PAUSED
        stored = load(backend, "paused-job")
        assert stored["status"] == "paused"
        assert stored["error"]["message"] == "paused by Runtime.pause_job"
        pending, _, _ = derive_pending("paused-job", stored["step_history"])
        assert [d.dst for d in pending.values()] == ["r1"]
        resumed = runtime.exec("chain", job_state=state)
    assert resumed is state
    assert resumed.status is JobStatus.COMPLETED
    assert load(backend, "paused-job")["status"] == "completed"


def test_jobs_are_listed_by_task_client_next_to_pipeline_runs(backend: StateBackend) -> None:
    Flujo(Step.from_callable(lambda x: x, name="s"), state_backend=backend).run(1, run_id="p-1")
    with runtime_for(backend=backend, names={"orders": chain(2)}) as runtime:
        runtime.exec("orders", {"x": 0}, job_id="job-a")

    async def listing() -> tuple[Any, ...]:
        client = TaskClient(backend)
        every = await client.list_tasks()
        jobs = await client.list_tasks(metadata_filter={"kind": "routines_job"})
        named = await client.list_tasks(pipeline_name="orders")
        detail = await client.get_task("job-a")
        return every, jobs, named, detail

    every, jobs, named, detail = asyncio.run(listing())
    assert {task.run_id for task in every} == {"p-1", "job-a"}
    assert [task.run_id for task in jobs] == ["job-a"]
    assert [task.run_id for task in named] == ["job-a"]
    job = named[0]
    assert job.status == "completed"
    assert job.pipeline_version == JOB_VERSION
    assert job.current_step_index == 2
    assert job.metadata == {"kind": "routines_job", "flow_id": "chain"}
    assert detail is not None
    assert detail.step_names == ["r0", "r1"]
    assert detail.step_history == []  # routines records are not pipeline steps


def test_a_state_uri_is_accepted(tmp_path: Path) -> None:
    registry = FlowRegistry()
    registry.register(chain(2))
    uri = f"sqlite:///{tmp_path / 'jobs.db'}"
    with Runtime(thread_pool_size=2, state_backend=uri, registry=registry) as runtime:
        runtime.exec("chain", {"x": 0}, job_id="uri-job")
        assert isinstance(runtime.state_backend, SQLiteBackend)
    assert load(SQLiteBackend(tmp_path / "jobs.db"), "uri-job")["status"] == "completed"


def test_pii_is_scrubbed_from_stored_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUJO_GOVERNANCE_PII_SCRUB", "1")
    backend = InMemoryBackend()

    def mail(node: Node, slot_data: Any, job_state: JobState) -> None:
        job_state.update_routine_state(node.routine_id or "", {"to": "alice@example.com"})
        node.emit("output", to="alice@example.com")

    with runtime_for(chain(2, fn=mail), backend=backend) as runtime:
        state = runtime.exec("chain", {"owner": "bob@example.com"}, job_id="pii")
    assert state.get_routine_state("r0") == {"to": "alice@example.com"}  # in memory: as is
    stored = orjson.dumps(load(backend, "pii"), default=str)
    assert b"alice@example.com" not in stored
    assert b"bob@example.com" not in stored


# -- the store bridge ------------------------------------------------------------------------------


class SuspendingBackend(InMemoryBackend):
    """Writes that really await (like a network store)."""

    writes_may_suspend = True

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        await asyncio.sleep(0.001)
        return await super().write_checkpoint(checkpoint)


class LyingBackend(InMemoryBackend):
    """Claims its writes never suspend, but they do."""

    writes_may_suspend = False

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        await asyncio.sleep(0.001)
        return await super().write_checkpoint(checkpoint)


def test_backends_whose_writes_suspend_run_on_the_runtime_loop() -> None:
    backend = SuspendingBackend()
    with runtime_for(chain(3), backend=backend) as runtime:
        assert runtime.exec("chain", {"x": 0}, job_id="async").status is JobStatus.COMPLETED
        assert runtime.resume("async").status is JobStatus.COMPLETED
    assert load(backend, "async")["current_step_index"] == 3


def test_a_backend_that_suspends_while_claiming_not_to_is_a_typed_error() -> None:
    with runtime_for(chain(1), backend=LyingBackend()) as runtime:
        with pytest.raises(StateBackendError, match="writes_may_suspend"):
            runtime.exec("chain", {"x": 0})


def test_non_serializable_entry_params_fail_before_anything_runs(backend: StateBackend) -> None:
    runs = Recorder()
    with runtime_for(counting_chain(2, runs), backend=backend) as runtime:
        with pytest.raises(SerializationError):
            runtime.exec("chain", {"x": object()}, job_id="bad-entry")
        assert runtime.get_job("bad-entry") is None
        assert runtime.exec("chain", {"x": 0}, job_id="bad-entry").status == "completed"
    assert runs.items == ["r0", "r1"]


def test_many_concurrent_jobs_on_one_store(tmp_path: Path) -> None:
    """60 fan-out/fan-in jobs at once on 4 threads and one SQLite file: each completes with
    its own result and its own history, and the store agrees."""

    def join(node: Node, slot_data: Any, job_state: JobState) -> None:
        total = sum(messages[0]["x"] for messages in slot_data.values())
        job_state.update_routine_state("join", {"total": total})

    flow = Flow("diamond")
    flow.add_routine(Node(lambda n, d, s: n.emit("output", x=d["input"][0]["x"])), "source")
    flow.add_routine(Node(join, slots=["a", "b"], policy=all_slots_ready_policy()), "join")
    for k, rid in enumerate(["a", "b"], start=1):
        flow.add_routine(Node(lambda n, d, s, k=k: n.emit("output", x=d["input"][0]["x"] * k)), rid)
        flow.connect("source", "output", rid, "input")
        flow.connect(rid, "output", "join", rid)
    backend = SQLiteBackend(tmp_path / "many.db")
    with runtime_for(flow, backend=backend, pool=4) as runtime:
        states = [
            runtime.exec("diamond", {"x": i}, job_id=f"job-{i}", wait=False) for i in range(60)
        ]
        assert runtime.wait_until_all_jobs_finished(timeout=GUARD_S)
    for i, state in enumerate(states):
        assert state.status is JobStatus.COMPLETED, state.error
        assert state.get_routine_state("join") == {"total": 3 * i}
        stored = load(backend, f"job-{i}")
        assert stored["pipeline_context"]["routine.join"] == {"total": 3 * i}
        assert stored["current_step_index"] == 4
