"""flujo.routines: the Runtime running jobs in memory (no store)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flujo.exceptions import (
    ConfigurationError,
    FlowNotFoundError,
    InvalidRunIdError,
    JobFlowMismatchError,
    JobStateError,
    PausedException,
    PipelineAbortSignal,
    StateConflictError,
)
from flujo.routines import (
    ActivationPolicy,
    Flow,
    JobState,
    JobStatus,
    Runtime,
    all_slots_ready_policy,
    batch_size_policy,
)

from .test_routines_helpers import Node, Recorder, add_one, chain, relay, runtime_for

GUARD_S = 30  # a deadlock guard for waits, never a speed threshold


def keep(node: Node, slot_data: dict[str, Any], job_state: JobState) -> None:
    """Keep everything received in the routine's state (as a list)."""
    rid = node.routine_id
    assert rid is not None
    seen = job_state.get_routine_state(rid, {}).get("seen", [])
    job_state.update_routine_state(rid, {"seen": [*seen, slot_data]})


def test_a_chain_runs_to_completion_and_records_its_history() -> None:
    flow = chain(5)
    flow.add_routine(Node(keep), "sink")
    flow.connect("r4", "output", "sink", "input")
    with runtime_for(flow) as runtime:
        state = runtime.exec("chain", {"x": 0})
    assert state.status is JobStatus.COMPLETED
    assert str(state.status) == "completed"
    assert state.error is None
    assert state.get_routine_state("sink") == {"seen": [{"input": [{"x": 5}]}]}
    assert state.activations == 6
    assert state.pending == []
    history = state.history
    assert history[0] == {
        "kind": "entry",
        "emitted": [
            {"id": 0, "src": None, "event": None, "dst": "r0", "slot": "input", "data": {"x": 0}}
        ],
    }
    assert history[1] == {
        "kind": "activation",
        "seq": 0,
        "routine": "r0",
        "consumed": [0],
        "emitted": [
            {
                "id": 1,
                "src": "r0",
                "event": "output",
                "dst": "r1",
                "slot": "input",
                "data": {"x": 1},
            }
        ],
    }
    assert [r["routine"] for r in history[1:]] == ["r0", "r1", "r2", "r3", "r4", "sink"]
    assert history[-1]["emitted"] == []


def test_entry_params_go_to_the_first_slot_of_every_unconnected_routine() -> None:
    seen = Recorder()
    flow = Flow("entries")
    flow.add_routine(Node(lambda n, d, s: seen.add((n.routine_id, d))), "a")
    flow.add_routine(Node(lambda n, d, s: seen.add((n.routine_id, d)), slots=["p", "q"]), "b")
    flow.add_routine(Node(lambda n, d, s: seen.add((n.routine_id, d))), "c")
    flow.add_routine(Node(slots=[]), "no_slots")
    flow.connect("a", "output", "c", "input")
    with runtime_for(flow) as runtime:
        state = runtime.exec("entries", {"k": 1})
        assert state.status == "completed"
        assert sorted(seen.items) == [("a", {"input": [{"k": 1}]}), ("b", {"p": [{"k": 1}]})]
        seen.items.clear()
        runtime.exec("entries")  # no entry params: an empty message starts the flow
        assert sorted(seen.items) == [("a", {"input": [{}]}), ("b", {"p": [{}]})]


def test_an_empty_flow_completes_at_once() -> None:
    with runtime_for(Flow("empty")) as runtime:
        assert runtime.exec("empty").status is JobStatus.COMPLETED


def test_independent_routines_run_at_the_same_time() -> None:
    both = threading.Barrier(2, timeout=GUARD_S)  # breaks (and fails the job) if not concurrent

    def meet(node: Node, slot_data: Any, job_state: JobState) -> None:
        both.wait()

    flow = Flow("fanout")
    flow.add_routine(Node(relay), "source")
    for rid in ("left", "right"):
        flow.add_routine(Node(meet), rid)
        flow.connect("source", "output", rid, "input")
    with runtime_for(flow, pool=2) as runtime:
        state = runtime.exec("fanout", {"x": 1})
    assert state.status is JobStatus.COMPLETED, state.error


def test_one_routine_never_runs_two_activations_at_once() -> None:
    lock = threading.Lock()
    inside = [0, 0]  # now, most

    def busy(node: Node, slot_data: Any, job_state: JobState) -> None:
        with lock:
            inside[0] += 1
            inside[1] = max(inside)
        count = job_state.get_routine_state("sink", {}).get("n", 0)
        job_state.update_routine_state("sink", {"n": count + 1})
        with lock:
            inside[0] -= 1

    def burst(node: Node, slot_data: Any, job_state: JobState) -> None:
        for i in range(50):
            node.emit("output", i=i)

    flow = Flow("burst")
    flow.add_routine(Node(burst), "source")
    flow.add_routine(Node(busy), "sink")
    flow.connect("source", "output", "sink", "input")
    with runtime_for(flow, pool=8) as runtime:
        state = runtime.exec("burst", {})
    assert inside[1] == 1
    assert state.get_routine_state("sink") == {"n": 50}  # no lost update


def test_fan_out_fan_in_with_all_slots_ready() -> None:
    def join(node: Node, slot_data: Any, job_state: JobState) -> None:
        total = sum(messages[0]["x"] for messages in slot_data.values())
        job_state.update_routine_state("join", {"total": total, "slots": sorted(slot_data)})

    flow = Flow("diamond")
    flow.add_routine(Node(relay), "source")
    flow.add_routine(Node(join, slots=["a", "b", "c"], policy=all_slots_ready_policy()), "join")
    for i, rid in enumerate(["a", "b", "c"]):
        flow.add_routine(Node(lambda n, d, s, k=i: n.emit("output", x=d["input"][0]["x"] * k)), rid)
        flow.connect("source", "output", rid, "input")
        flow.connect(rid, "output", "join", rid)
    with runtime_for(flow) as runtime:
        state = runtime.exec("diamond", {"x": 10})
    assert state.get_routine_state("join") == {"total": 30, "slots": ["a", "b", "c"]}
    assert [r["routine"] for r in state.history if r["kind"] == "activation"].count("join") == 1


def test_batch_size_policy_runs_full_batches_and_leaves_the_rest_pending() -> None:
    batches = Recorder()

    def burst(node: Node, slot_data: Any, job_state: JobState) -> None:
        for i in range(7):
            node.emit("output", i=i)

    flow = Flow("batches")
    flow.add_routine(Node(burst), "source")
    flow.add_routine(
        Node(
            lambda n, d, s: batches.add([m["i"] for m in d["input"]]), policy=batch_size_policy(3)
        ),
        "sink",
    )
    flow.connect("source", "output", "sink", "input")
    with runtime_for(flow) as runtime:
        state = runtime.exec("batches", {})
    assert batches.items == [[0, 1, 2], [3, 4, 5]]
    assert state.status is JobStatus.COMPLETED
    assert [(p["dst"], p["data"]) for p in state.pending] == [("sink", {"i": 6})]


def test_policy_message_reaches_the_logic() -> None:
    messages = Recorder()
    flow = Flow("policy")
    routine = Node(policy=batch_size_policy(1))
    routine.set_logic(lambda slot_data, message, job_state: messages.add(dict(message)))
    flow.add_routine(routine, "only")
    with runtime_for(flow) as runtime:
        runtime.exec("policy", {})
    assert messages.items == [{"policy": "batch_size", "size": 1}]


def test_a_routine_can_loop_on_itself() -> None:
    def countdown(node: Node, slot_data: Any, job_state: JobState) -> None:
        n = slot_data["input"][0]["n"]
        job_state.update_routine_state("loop", {"last": n})
        if n > 0:
            node.emit("output", n=n - 1)

    flow = Flow("loop")
    flow.add_routine(Node(countdown), "loop")
    flow.add_routine(Node(relay, slots=["kick"]), "start")
    flow.connect("start", "output", "loop", "input")
    flow.connect("loop", "output", "loop", "input")
    with runtime_for(flow) as runtime:
        state = runtime.exec("loop", {"n": 20})
    assert state.get_routine_state("loop") == {"last": 0}
    assert state.activations == 22


def test_fan_out_gives_each_target_its_own_message() -> None:
    def mutate(node: Node, slot_data: Any, job_state: JobState) -> None:
        message = slot_data["input"][0]
        message["touched"] = node.routine_id
        job_state.update_routine_state(node.routine_id or "", {"got": dict(message)})

    flow = Flow("copies")
    flow.add_routine(Node(lambda n, d, s: n.emit("output", v=1)), "source")
    for rid in ("a", "b"):
        flow.add_routine(Node(mutate), rid)
        flow.connect("source", "output", rid, "input")
    with runtime_for(flow) as runtime:
        state = runtime.exec("copies", {})
    assert state.get_routine_state("a") == {"got": {"v": 1, "touched": "a"}}
    assert state.get_routine_state("b") == {"got": {"v": 1, "touched": "b"}}


def test_logic_may_emit_on_another_routine_of_its_flow_only() -> None:
    stranger = Node()
    Flow("elsewhere").add_routine(stranger, "stranger")
    got = Recorder()

    def speak_for_other(node: Node, slot_data: Any, job_state: JobState) -> None:
        other = node._flow.routines["other"]  # type: ignore[union-attr]
        other.emit("output", said=True)

    flow = Flow("ventriloquist")
    flow.add_routine(Node(speak_for_other), "speaker")
    flow.add_routine(Node(slots=[]), "other")
    flow.add_routine(Node(lambda n, d, s: got.add(d)), "listener")
    flow.connect("other", "output", "listener", "input")
    with runtime_for(flow) as runtime:
        assert runtime.exec("ventriloquist", {}).status is JobStatus.COMPLETED
        assert got.items == [{"input": [{"said": True}]}]

        bad = Flow("bad_emit")
        bad.add_routine(Node(lambda n, d, s: stranger.emit("output")), "r")
        runtime.registry.register(bad)
        failed = runtime.exec("bad_emit", {})
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None
    assert failed.error["type"] == "EmitError"


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (lambda n, d, s: n.emit("nope"), "no event"),
        (lambda n, d, s: n.emit("output", wrong=1), "declares"),
    ],
)
def test_a_bad_emit_fails_the_job(fn: Any, message: str) -> None:
    flow = Flow("bad")
    flow.add_routine(Node(fn, params=["x"]), "r")
    with runtime_for(flow) as runtime:
        state = runtime.exec("bad", {})
    assert state.status is JobStatus.FAILED
    assert state.error is not None
    assert state.error["type"] == "EmitError"
    assert message in state.error["message"]


def test_a_failing_activation_changes_nothing_and_the_job_can_continue() -> None:
    attempts = Recorder()

    def flaky(node: Node, slot_data: Any, job_state: JobState) -> None:
        attempts.add(1)
        job_state.update_routine_state("r2", {"touched": True})
        node.emit("output", x=slot_data["input"][0]["x"] + 1)
        if len(attempts.items) == 1:
            raise ValueError("not this time")

    flow = chain(4)
    flow.routines["r2"].set_logic(lambda d, m, s: flaky(flow.routines["r2"], d, s))  # type: ignore[arg-type]
    with runtime_for(flow) as runtime:
        state = runtime.exec("chain", {"x": 0})
        assert state.status is JobStatus.FAILED
        assert state.error == {
            "type": "ValueError",
            "message": "not this time",
            "step": "r2",
            "routine": "r2",
        }
        assert state.get_routine_state("r2") is None  # the failed activation left nothing
        assert [(p["dst"], p["data"]) for p in state.pending] == [("r2", {"x": 2})]
        failure = state.history[-1]
        assert failure["kind"] == "failure"
        assert failure["routine"] == "r2"
        assert failure["inputs"] == [2]
        again = runtime.exec("chain", job_state=state)  # continues with the pending message
    assert again is state
    assert again.status is JobStatus.COMPLETED
    assert again.get_routine_state("r2") == {"touched": True}
    assert [r["routine"] for r in again.history if r["kind"] == "activation"] == [
        "r0",
        "r1",
        "r2",
        "r3",
    ]


def test_paused_and_abort_signals_in_logic_pause_or_cancel_the_job() -> None:
    calls = Recorder()

    def ask(node: Node, slot_data: Any, job_state: JobState) -> None:
        calls.add(1)
        if len(calls.items) == 1:
            raise PausedException("need approval")
        node.emit("output", x=1)

    flow = chain(2)
    flow.routines["r1"].set_logic(lambda d, m, s: ask(flow.routines["r1"], d, s))  # type: ignore[arg-type]
    aborting = Flow("aborting")
    aborting.add_routine(Node(lambda n, d, s: (_ for _ in ()).throw(PipelineAbortSignal())), "r")
    with runtime_for(flow, aborting) as runtime:
        paused = runtime.exec("chain", {"x": 0})
        assert paused.status is JobStatus.PAUSED
        assert paused.error is not None
        assert paused.error["message"] == "need approval"
        assert len(paused.pending) == 1
        resumed = runtime.exec("chain", job_state=paused)
        assert resumed.status is JobStatus.COMPLETED
        assert resumed.pending == []
        cancelled = runtime.exec("aborting", {})
    assert cancelled.status is JobStatus.CANCELLED


def test_a_bad_custom_policy_fails_the_job() -> None:
    class Greedy(ActivationPolicy):
        name = "greedy"

        def select(self, queues: Any) -> Any:
            return (("input", 99),) if queues["input"] else None

    flow = Flow("greedy")
    flow.add_routine(Node(policy=Greedy()), "r")
    with runtime_for(flow) as runtime:
        state = runtime.exec("greedy", {})
    assert state.status is JobStatus.FAILED
    assert state.error is not None
    assert "selected 99" in state.error["message"]


def test_wait_false_returns_at_once_and_waiting_is_event_driven() -> None:
    gate = threading.Event()
    flow = Flow("gated")
    flow.add_routine(Node(lambda n, d, s: gate.wait(GUARD_S)), "r")
    with runtime_for(flow) as runtime:
        state = runtime.exec("gated", {}, wait=False)
        assert state.status is JobStatus.RUNNING
        assert runtime.get_job(state.job_id) is state
        assert state.wait(0) is False
        assert runtime.wait_until_all_jobs_finished(timeout=0) is False
        gate.set()
        assert runtime.wait_until_all_jobs_finished(timeout=GUARD_S) is True
        assert state.wait(0) is True
        assert state.status is JobStatus.COMPLETED
        assert runtime.get_job(state.job_id) is None


def test_pause_and_cancel_a_running_job() -> None:
    started = threading.Event()
    gate = threading.Event()

    def slow(node: Node, slot_data: Any, job_state: JobState) -> None:
        started.set()
        gate.wait(GUARD_S)
        node.emit("output", x=slot_data["input"][0]["x"] + 1)

    for stop, status in (("pause_job", JobStatus.PAUSED), ("cancel_job", JobStatus.CANCELLED)):
        started.clear()
        gate.clear()
        flow = chain(3)
        flow.routines["r0"].set_logic(lambda d, m, s, f=flow: slow(f.routines["r0"], d, s))  # type: ignore[misc]
        with runtime_for(flow) as runtime:
            state = runtime.exec("chain", {"x": 0}, wait=False)
            assert started.wait(GUARD_S)
            assert getattr(runtime, stop)(state.job_id) is True
            gate.set()
            assert state.wait(GUARD_S)
            assert state.status is status
            assert state.activations == 1  # the running activation committed; nothing after
            assert [p["dst"] for p in state.pending] == ["r1"]
            assert getattr(runtime, stop)(state.job_id) is False  # not running any more
            if status is JobStatus.PAUSED:
                assert runtime.exec("chain", job_state=state).status is JobStatus.COMPLETED
                assert state.activations == 3


def test_shutdown_without_waiting_pauses_running_jobs() -> None:
    started = threading.Event()
    gate = threading.Event()

    def slow(node: Node, slot_data: Any, job_state: JobState) -> None:
        started.set()
        gate.wait(GUARD_S)
        node.emit("output", x=1)

    flow = chain(2)
    flow.routines["r0"].set_logic(lambda d, m, s: slow(flow.routines["r0"], d, s))  # type: ignore[arg-type]
    runtime = runtime_for(flow)
    stop = runtime._stop

    def stop_then_release(*args: Any) -> bool:
        stopped = stop(*args)
        gate.set()  # the activation finishes only once the job was told to stop
        return stopped

    runtime._stop = stop_then_release  # type: ignore[method-assign]
    state = runtime.exec("chain", {"x": 0}, wait=False)
    assert started.wait(GUARD_S)
    runtime.shutdown(wait=False)
    assert state.status is JobStatus.PAUSED
    with pytest.raises(ConfigurationError, match="shut down"):
        runtime.exec("chain", {"x": 0})
    runtime.shutdown()  # again: nothing happens
    with runtime_for(flow) as other:
        assert other.exec("chain", job_state=state).status is JobStatus.COMPLETED


def test_exec_with_a_completed_job_state_runs_again_with_its_routine_states() -> None:
    def count(node: Node, slot_data: Any, job_state: JobState) -> None:
        n = job_state.get_routine_state("counter", {}).get("n", 0)
        job_state.update_routine_state("counter", {"n": n + 1, "last": slot_data["input"][0]})

    flow = Flow("counting")
    flow.add_routine(Node(count), "counter")
    with runtime_for(flow) as runtime:
        first = runtime.exec("counting", {"v": 1})
        second = runtime.exec("counting", job_state=first)
        third = runtime.exec("counting", {"v": 3}, job_state=second, job_id="third-job")
    assert second is not first
    assert second.job_id != first.job_id
    assert first.get_routine_state("counter") == {"n": 1, "last": {"v": 1}}
    assert second.get_routine_state("counter") == {"n": 2, "last": {"v": 1}}
    assert third.job_id == "third-job"
    assert third.get_routine_state("counter") == {"n": 3, "last": {"v": 3}}


def test_a_pending_job_state_starts_with_its_id_and_states() -> None:
    flow = Flow("prepared")
    flow.add_routine(Node(lambda n, d, s: s.update_routine_state("r", {"b": 2})), "r")
    prepared = JobState("my-job", "prepared")
    prepared.update_routine_state("r", {"a": 1})
    with runtime_for(flow) as runtime:
        state = runtime.exec("prepared", {"x": 1}, job_state=prepared)
    assert state is prepared
    assert state.job_id == "my-job"
    assert state.get_routine_state("r") == {"a": 1, "b": 2}
    assert state.entry_params == {"x": 1}


def test_job_states_of_another_flow_are_refused() -> None:
    flow = chain(2)
    other = chain(2, flow_id="other")
    with runtime_for(flow, other) as runtime:
        done = runtime.exec("other", {"x": 0})
        for wrong in (JobState(), done, JobState(flow_id="other")):
            with pytest.raises(JobFlowMismatchError) as caught:
                runtime.exec("chain", job_state=wrong)
            assert caught.value.expected_flow_id == "chain"
        stray = JobState(flow_id="chain")
        stray.update_routine_state("not_in_flow", {"x": 1})
        with pytest.raises(JobFlowMismatchError, match="not_in_flow"):
            runtime.exec("chain", job_state=stray)
        with pytest.raises(JobStateError, match="deserialize"):
            runtime.exec("chain", job_state=done.serialize())  # type: ignore[arg-type]


def test_exec_argument_errors_are_typed() -> None:
    with runtime_for(chain(1)) as runtime:
        with pytest.raises(FlowNotFoundError):
            runtime.exec("missing")
        with pytest.raises(ConfigurationError):
            runtime.exec("chain", [1, 2])  # type: ignore[arg-type]
        for bad in ("", "../x", "a/b", "x" * 200, "a\x00"):
            with pytest.raises(InvalidRunIdError):
                runtime.exec("chain", {"x": 0}, job_id=bad)
        done = runtime.exec("chain", {"x": 0})
        failed = JobState(done.job_id, "chain")
        failed.status = JobStatus.FAILED
        with pytest.raises(JobStateError, match="entry_params"):
            runtime.exec("chain", {"x": 1}, job_state=failed)
        with pytest.raises(JobStateError, match="differs"):
            runtime.exec("chain", job_state=failed, job_id="another")
    with pytest.raises(ConfigurationError):
        Runtime(thread_pool_size=0)
    with pytest.raises(ConfigurationError):
        Runtime(state_backend=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="state_backend"):
        Runtime().resume("x")


def test_one_job_id_runs_once_at_a_time() -> None:
    gate = threading.Event()
    flow = Flow("gated")
    flow.add_routine(Node(lambda n, d, s: gate.wait(GUARD_S)), "r")
    with runtime_for(flow) as runtime:
        state = runtime.exec("gated", {}, job_id="only-one", wait=False)
        with pytest.raises(StateConflictError):
            runtime.exec("gated", {}, job_id="only-one")
        with pytest.raises(StateConflictError):
            runtime.exec("gated", job_state=state)
        gate.set()


def test_routine_states_in_logic_read_their_own_writes_and_are_checked() -> None:
    seen = Recorder()

    def writer(node: Node, slot_data: Any, job_state: JobState) -> None:
        job_state.update_routine_state("w", {"a": 1})
        job_state.update_routine_state("w", {"b": 2})
        seen.add(job_state.get_routine_state("w"))
        copy = job_state.get_routine_state("w")
        copy["c"] = 3  # a copy: changing it changes nothing
        job_state.update_routine_state("unknown_routine", {"x": 1})

    flow = Flow("states")
    flow.add_routine(Node(writer), "w")
    with runtime_for(flow) as runtime:
        state = runtime.exec("states", {})
    assert seen.items == [{"a": 1, "b": 2}]
    assert state.status is JobStatus.FAILED
    assert state.error is not None
    assert state.error["type"] == "JobStateError"
    assert state.get_routine_state("w") is None


def test_updating_states_from_outside_a_running_job_is_refused() -> None:
    gate = threading.Event()
    flow = Flow("gated")
    flow.add_routine(Node(lambda n, d, s: gate.wait(GUARD_S)), "r")
    with runtime_for(flow) as runtime:
        state = runtime.exec("gated", {}, wait=False)
        with pytest.raises(JobStateError, match="running"):
            state.update_routine_state("r", {"x": 1})
        gate.set()
        state.wait(GUARD_S)
    state.update_routine_state("r", {"x": 1})
    assert state.get_routine_state("r") == {"x": 1}


def test_snapshot_of_a_running_job_continues_elsewhere() -> None:
    started = threading.Event()
    gate = threading.Event()
    runs = Recorder()

    def step(node: Node, slot_data: Any, job_state: JobState) -> None:
        runs.add(node.routine_id)
        if node.routine_id == "r2":
            started.set()
            gate.wait(GUARD_S)
        add_one(node, slot_data, job_state)

    flow = chain(4, fn=step)
    with runtime_for(flow) as runtime:
        state = runtime.exec("chain", {"x": 0}, wait=False)
        assert started.wait(GUARD_S)
        snapshot = state.serialize()  # r2 is running: its input is still pending
        gate.set()
    assert snapshot["status"] == "running"
    assert [(p["dst"], p["data"]) for p in snapshot["pending"]] == [("r2", {"x": 2})]
    runs.items.clear()
    restored = JobState.deserialize(snapshot)
    with runtime_for(flow) as runtime:
        finished = runtime.exec("chain", job_state=restored)
    assert finished.status is JobStatus.COMPLETED
    assert runs.items == ["r2", "r3"]
    assert finished.history[-1]["emitted"] == []
    assert any(record["kind"] == "resume" for record in finished.history)


def test_the_process_wide_registry_is_used_by_default() -> None:
    from flujo.routines import FlowRegistry

    flow = chain(1, flow_id="default_registry_flow")
    FlowRegistry.get_instance().register(flow)
    try:
        with Runtime(thread_pool_size=1) as runtime:
            assert runtime.exec("default_registry_flow", {"x": 0}).status == "completed"
    finally:
        FlowRegistry.get_instance().unregister("default_registry_flow")


@st.composite
def dags(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]], int | None]:
    """(routine count, edges i -> j with i < j, a routine that fails once or None)."""
    n = draw(st.integers(min_value=1, max_value=7))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    edges = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=10)) if pairs else []
    failing = draw(st.one_of(st.none(), st.integers(min_value=0, max_value=n - 1)))
    return n, sorted(edges), failing


@settings(max_examples=40, deadline=None)
@given(dags())
def test_random_dags_run_every_message_once_even_across_a_failure(
    dag: tuple[int, list[tuple[int, int]], int | None],
) -> None:
    """Every routine forwards each message (immediate policy). The number of activations of
    each routine is the number of paths reaching it; a routine failing once and the job
    continued from its job state changes nothing of that."""
    n, edges, failing = dag
    failed_once: list[int] = []

    def forward(node: Node, slot_data: Any, job_state: JobState) -> None:
        index = int((node.routine_id or "r0")[1:])
        if index == failing and not failed_once:
            failed_once.append(index)
            raise RuntimeError("once")
        count = job_state.get_routine_state(node.routine_id or "", {}).get("n", 0)
        job_state.update_routine_state(node.routine_id or "", {"n": count + 1})
        node.emit("output", hop=slot_data["input"][0].get("hop", 0) + 1)

    flow = Flow("dag")
    for i in range(n):
        flow.add_routine(Node(forward), f"r{i}")
    for i, j in edges:
        flow.connect(f"r{i}", "output", f"r{j}", "input")
    paths = [0] * n  # messages each routine receives
    for j in range(n):
        incoming = [i for i, k in edges if k == j]
        paths[j] = sum(paths[i] for i in incoming) if incoming else 1
    with runtime_for(flow, pool=3) as runtime:
        state = runtime.exec("dag", {})
        if failing is not None and paths[failing]:
            assert state.status is JobStatus.FAILED
            state = runtime.exec("dag", job_state=JobState.deserialize(state.serialize()))
    assert state.status is JobStatus.COMPLETED, state.error
    assert state.pending == []
    for i in range(n):
        assert state.get_routine_state(f"r{i}", {}).get("n", 0) == paths[i]
    activations = [r["routine"] for r in state.history if r["kind"] == "activation"]
    assert len(activations) == sum(paths)
    consumed = [m for r in state.history if r["kind"] == "activation" for m in r["consumed"]]
    assert len(consumed) == len(set(consumed))  # no message consumed twice
