"""The queue API of the state backends, as a contract over memory, SQLite and Postgres.

Queued runs are created as any run is, by a first checkpoint whose header names a ``queue`` and
a ``priority`` and whose status is ``queued`` (what ``StateManager.queued`` writes). Workers claim
them with a lease (``claim_runs``), renew it (``renew_leases``), release it (``release_runs``);
operators requeue (``requeue_run``), cancel (``request_cancel``) and limit queues
(``set_queue_limit``). A claim moves the run's version on: the writer that held the run before
can no longer checkpoint it.

The file backend keeps no queues (``supports_queues`` is False): it is left out of this
module's parametrization and checked for that alone. Postgres cases run on a fresh schema per
test (``postgres_dsn``/``postgres_schema``); concurrent claimers are separate backend instances
(separate pools) on Postgres and separate connections in threads on SQLite.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
from backend_helpers import BackendFactory, Store, checkpoint, run_header, step_record

from conftest import factory_params
from flujo.exceptions import ConfigurationError, InvalidRunIdError, StateConflictError
from flujo.state import FileBackend
from flujo.state.backends.base import Claim, StateBackend, Wakeup, validate_queue_name

T0 = 1_800_000_000.0
#: A lease that does not run out during a test.
LONG = 600.0
#: A lease that runs out at once (then the test sleeps just past it).
SHORT = 0.05


@pytest.fixture(params=factory_params(lambda f: f.name != "file"))
def backend_factory(request: pytest.FixtureRequest) -> BackendFactory:
    """The backends that queue runs (this module's own parametrization)."""
    factory: BackendFactory = request.param
    return factory


# -- helpers ---------------------------------------------------------------------------------------

_SEQ = itertools.count()


async def enqueue(
    backend: StateBackend,
    run_id: str,
    *,
    queue: str = "default",
    priority: int = 0,
    created_at: float | None = None,
    pipeline: str = "ingest@1.0.0",
) -> int:
    """Store ``run_id`` as a queued run (its first checkpoint); return its version."""
    name, version = pipeline.split("@")
    header = replace(
        run_header(
            pipeline_name=name,
            pipeline_version=version,
            created_at=T0 + next(_SEQ) if created_at is None else created_at,
        ),
        queue=queue,
        priority=priority,
    )
    return await backend.write_checkpoint(
        checkpoint(backend, run_id, 0, status="queued", header=header)
    )


async def state_of(backend: StateBackend, run_id: str) -> dict[str, Any]:
    state = await backend.load_state(run_id)
    assert state is not None, run_id
    return state


async def claim(
    backend: StateBackend,
    worker: str = "w1",
    *,
    limit: int = 10,
    queues: tuple[str, ...] = ("default",),
    lease_s: float = LONG,
    pipelines: list[str] | None = None,
) -> list[str]:
    claims = await backend.claim_runs(
        worker_id=worker, queues=list(queues), limit=limit, lease_s=lease_s, pipelines=pipelines
    )
    for item in claims:
        assert isinstance(item, Claim)
    return [item.run_id for item in claims]


async def finish(backend: StateBackend, run_id: str, status: str = "completed") -> None:
    """Write the final checkpoint of a claimed run, as its worker would."""
    version = (await state_of(backend, run_id))["version"]
    error = None if status == "completed" else {"type": "X", "message": "boom", "step": "a"}
    await backend.write_checkpoint(
        checkpoint(backend, run_id, version, status=status, index=3 if error is None else 0,
                   error=error)
    )  # fmt: skip


async def expire(backend: StateBackend, worker: str, run_ids: list[str]) -> None:
    """Let ``worker``'s leases on ``run_ids`` run out (a worker that stopped renewing)."""
    held = await backend.renew_leases(worker_id=worker, run_ids=run_ids, lease_s=SHORT)
    assert set(held) == set(run_ids)
    await asyncio.sleep(SHORT * 2)


# -- the file backend keeps no queues ----------------------------------------------------------


async def test_file_backend_does_not_queue(tmp_path: Any) -> None:
    backend = FileBackend(tmp_path / "runs")
    assert backend.supports_queues is False
    with pytest.raises(NotImplementedError):
        await backend.claim_runs(worker_id="w", queues=["default"], limit=1, lease_s=1.0)
    with pytest.raises(NotImplementedError):
        await backend.request_cancel("run-1")


async def test_the_queueing_backends_say_so(backend: StateBackend) -> None:
    assert backend.supports_queues is True


# -- claiming --------------------------------------------------------------------------------------


async def test_claim_order_is_priority_then_oldest(backend: StateBackend) -> None:
    await enqueue(backend, "low-old", priority=0, created_at=T0)
    await enqueue(backend, "high-new", priority=5, created_at=T0 + 3)
    await enqueue(backend, "high-old", priority=5, created_at=T0 + 1)
    await enqueue(backend, "low-new", priority=0, created_at=T0 + 4)
    await enqueue(backend, "negative-oldest", priority=-1, created_at=T0 - 100)
    await enqueue(backend, "tie-b", priority=2, created_at=T0 + 2)
    await enqueue(backend, "tie-a", priority=2, created_at=T0 + 2)

    order = []
    while taken := await claim(backend, limit=1):
        order += taken
    assert order == [
        "high-old",
        "high-new",
        "tie-a",  # same priority and age: by run id
        "tie-b",
        "low-old",
        "low-new",
        "negative-oldest",
    ]


async def test_a_batch_claim_takes_the_best_runs(backend: StateBackend) -> None:
    for i in range(6):
        await enqueue(backend, f"run-{i}", priority=i % 3, created_at=T0 + i)
    first = await claim(backend, limit=2)
    assert sorted(first) == ["run-2", "run-5"]  # both priority 2
    assert await claim(backend, limit=0) == []


async def test_limit_bounds_each_claim(backend: StateBackend) -> None:
    for i in range(5):
        await enqueue(backend, f"run-{i}")
    assert len(await claim(backend, limit=2)) == 2
    assert len(await claim(backend, "w2", limit=10)) == 3
    assert await claim(backend, "w3", limit=10) == []


async def test_only_the_queues_asked_for_are_claimed(backend: StateBackend) -> None:
    await enqueue(backend, "mail-1", queue="mail")
    await enqueue(backend, "reports-1", queue="reports")
    await enqueue(backend, "default-1")
    assert await claim(backend, queues=("mail",)) == ["mail-1"]
    assert sorted(await claim(backend, queues=("reports", "default"))) == [
        "default-1",
        "reports-1",
    ]
    assert await claim(backend, queues=("mail", "reports", "default")) == []


async def test_pipelines_filter_claims_only_those_versions(backend: StateBackend) -> None:
    await enqueue(backend, "v1", pipeline="ingest@1.0.0")
    await enqueue(backend, "v2", pipeline="ingest@2.0.0")
    await enqueue(backend, "other", pipeline="report@1.0.0")
    await enqueue(backend, "sneaky", pipeline="ingest@1.0.0' OR '1'='1")

    assert await claim(backend, pipelines=[]) == []  # a worker with no pipelines takes nothing
    assert await claim(backend, pipelines=["ingest@2.0.0"]) == ["v2"]
    assert await claim(backend, pipelines=["report@9.9.9", "ingest@3.0.0"]) == []
    assert await claim(backend, pipelines=["ingest@1.0.0' OR '1'='1"]) == ["sneaky"]
    assert sorted(await claim(backend, pipelines=None)) == ["other", "v1"]

    taken = await backend.claim_runs(
        worker_id="w9", queues=["default"], limit=1, lease_s=LONG, pipelines=["x@1"]
    )
    assert taken == []


async def test_a_claim_returns_the_pipeline_to_run(backend: StateBackend) -> None:
    await enqueue(backend, "run-1", pipeline="report@2.1.0")
    [taken] = await backend.claim_runs(worker_id="w1", queues=["default"], limit=5, lease_s=LONG)
    assert taken == Claim("run-1", "report", "2.1.0")
    assert (taken.run_id, taken.pipeline_name, taken.pipeline_version) == (
        "run-1",
        "report",
        "2.1.0",
    )


async def test_a_claim_marks_the_run_running_leased_and_one_version_on(
    backend: StateBackend,
) -> None:
    queued_version = await enqueue(backend, "run-1")
    before = await state_of(backend, "run-1")
    assert before["version"] == queued_version
    assert (before["status"], before["locked_by"], before["lease_expires_at"]) == (
        "queued",
        None,
        None,
    )

    start = await backend.store_time()
    assert await claim(backend, "worker-a", lease_s=LONG) == ["run-1"]
    after = await state_of(backend, "run-1")
    assert after["status"] == "running"
    assert after["locked_by"] == "worker-a"
    assert after["version"] == queued_version + 1
    lease = after["lease_expires_at"]
    assert isinstance(lease, datetime)
    assert lease.tzinfo is not None
    assert lease.timestamp() >= start + LONG - 1  # measured on the store's clock
    assert after["queue"] == "default"

    # Whoever wrote the run before the claim (version v) can no longer checkpoint it.
    stale = checkpoint(backend, "run-1", queued_version, status="running", index=1)
    with pytest.raises(StateConflictError) as caught:
        await backend.write_checkpoint(stale)
    assert caught.value.expected_version == queued_version
    assert caught.value.actual_version == queued_version + 1
    unchanged = await state_of(backend, "run-1")
    assert unchanged["current_step_index"] == 0
    assert unchanged["version"] == queued_version + 1

    # The claimer checkpoints with the version it now holds.
    record = step_record(0, "a", "out")
    await backend.write_checkpoint(
        checkpoint(backend, "run-1", queued_version + 1, index=1, steps=[record], output="out")
    )
    progressed = await state_of(backend, "run-1")
    assert progressed["current_step_index"] == 1
    assert progressed["locked_by"] == "worker-a"  # a checkpoint keeps the lease
    assert progressed["status"] == "running"


async def test_a_held_run_is_not_claimed_again(backend: StateBackend) -> None:
    await enqueue(backend, "run-1")
    assert await claim(backend, "w1") == ["run-1"]
    assert await claim(backend, "w2") == []
    assert await claim(backend, "w1") == []  # not even by its holder


async def test_runs_that_are_not_queued_are_never_claimed(backend: StateBackend) -> None:
    # A run started in-process has no queue: no worker takes it, whatever its status.
    for status in ("running", "failed", "paused"):
        run_id = f"plain-{status}"
        await backend.write_checkpoint(
            checkpoint(backend, run_id, 0, status=status, header=run_header())
        )
    await enqueue(backend, "done")
    assert await claim(backend) == ["done"]
    await finish(backend, "done")
    await backend.release_runs(worker_id="w1", run_ids=["done"])
    assert await claim(backend, "w2") == []


# -- leases ------------------------------------------------------------------------------------


async def test_renew_leases_reports_held_runs_and_cancel_flags(backend: StateBackend) -> None:
    for run_id in ("a", "b", "c"):
        await enqueue(backend, run_id)
    assert sorted(await claim(backend, "w1", limit=2)) == ["a", "b"]
    assert await claim(backend, "w2") == ["c"]
    lease_before = (await state_of(backend, "a"))["lease_expires_at"]

    held = await backend.renew_leases(
        worker_id="w1", run_ids=["a", "b", "c", "x"], lease_s=LONG * 2
    )
    assert held == {"a": False, "b": False}  # c is w2's; x does not exist
    assert (await state_of(backend, "a"))["lease_expires_at"] > lease_before
    assert await backend.renew_leases(worker_id="w1", run_ids=[], lease_s=LONG) == {}

    assert await backend.request_cancel("b") == "running"
    held = await backend.renew_leases(worker_id="w1", run_ids=["a", "b"], lease_s=LONG)
    assert held == {"a": False, "b": True}

    # A run that finished is no longer held (its worker stops renewing it).
    await finish(backend, "a")
    held = await backend.renew_leases(worker_id="w1", run_ids=["a", "b"], lease_s=LONG)
    assert held == {"b": True}
    assert await backend.renew_leases(worker_id="w3", run_ids=["b", "c"], lease_s=LONG) == {}


async def test_an_expired_lease_is_taken_over_by_another_worker(backend: StateBackend) -> None:
    await enqueue(backend, "run-1")
    assert await claim(backend, "w1") == ["run-1"]
    held_version = (await state_of(backend, "run-1"))["version"]
    await backend.write_checkpoint(
        checkpoint(backend, "run-1", held_version, index=1, steps=[step_record(0, "a")])
    )
    held_version += 1
    assert await claim(backend, "w2") == []  # still leased

    await expire(backend, "w1", ["run-1"])
    assert await claim(backend, "w2", lease_s=LONG) == ["run-1"]
    taken = await state_of(backend, "run-1")
    assert taken["locked_by"] == "w2"
    assert taken["status"] == "running"
    assert taken["version"] == held_version + 1
    assert taken["current_step_index"] == 1  # the new holder resumes after the last checkpoint

    # The old holder lost it: no renewal, no checkpoint, and its release does nothing.
    assert await backend.renew_leases(worker_id="w1", run_ids=["run-1"], lease_s=LONG) == {}
    with pytest.raises(StateConflictError):
        await backend.write_checkpoint(
            checkpoint(backend, "run-1", held_version, index=2, steps=[step_record(1, "b")],
                       step_offset=1)
        )  # fmt: skip
    await backend.release_runs(worker_id="w1", run_ids=["run-1"])
    assert await state_of(backend, "run-1") == taken


async def test_a_short_lease_runs_out_by_itself(backend: StateBackend) -> None:
    await enqueue(backend, "run-1")
    assert await claim(backend, "w1", lease_s=SHORT) == ["run-1"]
    await asyncio.sleep(SHORT * 2)
    assert await claim(backend, "w2") == ["run-1"]
    assert (await state_of(backend, "run-1"))["locked_by"] == "w2"


async def test_an_expired_lease_can_be_claimed_by_its_old_holder_too(
    backend: StateBackend,
) -> None:
    await enqueue(backend, "run-1")
    assert await claim(backend, "w1") == ["run-1"]
    version = (await state_of(backend, "run-1"))["version"]
    await expire(backend, "w1", ["run-1"])
    assert await claim(backend, "w1") == ["run-1"]
    assert (await state_of(backend, "run-1"))["version"] == version + 1


async def test_next_lease_expiry(backend: StateBackend) -> None:
    assert await backend.next_lease_expiry(["default"]) is None
    await enqueue(backend, "a")
    await enqueue(backend, "b", queue="other")
    assert await backend.next_lease_expiry(["default", "other"]) is None  # queued: no lease

    start = await backend.store_time()
    assert await claim(backend, "w1", lease_s=LONG) == ["a"]
    end = await backend.store_time()
    expiry = await backend.next_lease_expiry(["default"])
    assert expiry is not None
    assert start + LONG <= expiry <= end + LONG
    assert await backend.next_lease_expiry(["other"]) is None

    assert await claim(backend, "w2", queues=("other",), lease_s=LONG / 2) == ["b"]
    sooner = await backend.next_lease_expiry(["default", "other"])
    assert sooner is not None
    assert sooner < expiry  # the earliest of them
    assert await backend.next_lease_expiry(["default"]) == expiry

    await backend.release_runs(worker_id="w1", run_ids=["a"])
    await finish(backend, "b")
    await backend.release_runs(worker_id="w2", run_ids=["b"])
    assert await backend.next_lease_expiry(["default", "other"]) is None


async def test_store_time_is_epoch_seconds(backend: StateBackend) -> None:
    first = await backend.store_time()
    second = await backend.store_time()
    assert isinstance(first, float)
    assert first <= second
    assert first > T0 - 10 * 365 * 86400  # a plausible epoch, not a monotonic clock


# -- releasing, requeueing -----------------------------------------------------------------------


async def test_release_hands_a_running_run_back_to_its_queue(backend: StateBackend) -> None:
    await enqueue(backend, "run-1", priority=3)
    assert await claim(backend, "w1") == ["run-1"]
    held = await state_of(backend, "run-1")

    await backend.release_runs(worker_id="w2", run_ids=["run-1"])  # not w2's to release
    assert await state_of(backend, "run-1") == held

    await backend.release_runs(worker_id="w1", run_ids=["run-1", "no-such-run"])
    released = await state_of(backend, "run-1")
    assert released["status"] == "queued"
    assert released["locked_by"] is None
    assert released["lease_expires_at"] is None
    assert released["version"] == held["version"] + 1  # what still runs of it cannot write
    assert released["priority"] == 3
    with pytest.raises(StateConflictError):
        await backend.write_checkpoint(checkpoint(backend, "run-1", held["version"], index=1))

    assert await claim(backend, "w2") == ["run-1"]  # and another worker takes it
    await backend.release_runs(worker_id="w1", run_ids=[])


@pytest.mark.parametrize("status", ["completed", "failed", "paused", "cancelled"])
async def test_release_of_a_finished_run_keeps_its_status(
    backend: StateBackend, status: str
) -> None:
    await enqueue(backend, "run-1")
    assert await claim(backend, "w1") == ["run-1"]
    await finish(backend, "run-1", status)
    finished = await state_of(backend, "run-1")
    await backend.release_runs(worker_id="w1", run_ids=["run-1"])
    released = await state_of(backend, "run-1")
    assert released["status"] == status
    assert released["version"] == finished["version"]
    assert released["locked_by"] is None
    assert released["lease_expires_at"] is None
    assert await claim(backend, "w2") == []


async def test_requeue_a_failed_run(backend: StateBackend) -> None:
    await enqueue(backend, "run-1", priority=1)
    assert await claim(backend, "w1") == ["run-1"]
    await finish(backend, "run-1", "failed")
    await backend.release_runs(worker_id="w1", run_ids=["run-1"])
    failed = await state_of(backend, "run-1")

    assert await backend.requeue_run("run-1") is True
    queued = await state_of(backend, "run-1")
    assert queued["status"] == "queued"
    assert queued["queue"] == "default"
    assert queued["priority"] == 1
    assert queued["version"] == failed["version"] + 1
    assert (queued["locked_by"], queued["lease_expires_at"]) == (None, None)
    assert await claim(backend, "w2") == ["run-1"]


async def test_requeue_overrides_queue_and_priority(backend: StateBackend) -> None:
    await enqueue(backend, "run-1", priority=1)
    await enqueue(backend, "rival", queue="urgent", priority=5)
    assert await claim(backend, "w1") == ["run-1"]
    await finish(backend, "run-1", "failed")

    assert await backend.requeue_run("run-1", queue="urgent", priority=9) is True
    moved = await state_of(backend, "run-1")
    assert (moved["queue"], moved["priority"], moved["status"]) == ("urgent", 9, "queued")
    assert await claim(backend, "w2") == []  # no longer in "default"
    assert await claim(backend, "w2", queues=("urgent",), limit=1) == ["run-1"]  # 9 beats 5


async def test_requeue_refuses_runs_that_are_not_failed_or_abandoned(
    backend: StateBackend,
) -> None:
    await enqueue(backend, "done")
    await enqueue(backend, "busy")
    await enqueue(backend, "waiting")
    assert sorted(await claim(backend, "w1", limit=2)) == ["busy", "done"]
    await finish(backend, "done")
    before = {run_id: await state_of(backend, run_id) for run_id in ("done", "waiting", "busy")}

    assert await backend.requeue_run("done") is False
    assert await backend.requeue_run("waiting") is False  # already queued
    assert await backend.requeue_run("busy") is False  # its lease is alive
    assert await backend.requeue_run("busy", queue="other", priority=7) is False
    assert await backend.requeue_run("no-such-run") is False
    for run_id, state in before.items():
        assert await state_of(backend, run_id) == state

    await expire(backend, "w1", ["busy"])  # abandoned: its worker stopped renewing
    assert await backend.requeue_run("busy") is True
    assert (await state_of(backend, "busy"))["status"] == "queued"


async def test_requeue_of_a_run_that_never_had_a_queue(backend: StateBackend) -> None:
    await backend.write_checkpoint(
        checkpoint(backend, "plain", 0, status="failed", header=run_header())
    )
    assert await backend.requeue_run("plain") is False  # no queue to go back to
    assert (await state_of(backend, "plain"))["status"] == "failed"
    assert await backend.requeue_run("plain", queue="rescue") is True
    state = await state_of(backend, "plain")
    assert (state["status"], state["queue"]) == ("queued", "rescue")
    assert await claim(backend, queues=("rescue",)) == ["plain"]


async def test_requeue_clears_a_cancel_request(backend: StateBackend) -> None:
    await enqueue(backend, "run-1")
    assert await claim(backend, "w1") == ["run-1"]
    assert await backend.request_cancel("run-1") == "running"
    await finish(backend, "run-1", "failed")
    assert await backend.requeue_run("run-1") is True
    assert (await state_of(backend, "run-1"))["cancel_requested"] is False


# -- cancelling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["queued", "paused"])
async def test_cancel_a_waiting_run_at_once(backend: StateBackend, status: str) -> None:
    if status == "queued":
        await enqueue(backend, "run-1")
    else:
        await backend.write_checkpoint(
            checkpoint(backend, "run-1", 0, status="paused", header=run_header(),
                       error={"type": "PausedException", "message": "ok?", "step": "b"})
        )  # fmt: skip
    before = await state_of(backend, "run-1")
    assert await backend.request_cancel("run-1") == "cancelled"
    after = await state_of(backend, "run-1")
    assert after["status"] == "cancelled"
    assert after["cancel_requested"] is True
    assert after["error"]["type"] == "CancelRequested"
    assert after["version"] == before["version"] + 1  # a resumer holding it cannot write
    assert (after["locked_by"], after["lease_expires_at"]) == (None, None)
    assert await claim(backend) == []  # never starts
    # Cancelling again changes nothing.
    assert await backend.request_cancel("run-1") == "cancelled"
    assert await state_of(backend, "run-1") == after


async def test_cancel_a_running_run_flags_it(backend: StateBackend) -> None:
    await enqueue(backend, "run-1")
    assert await claim(backend, "w1") == ["run-1"]
    before = await state_of(backend, "run-1")
    assert await backend.request_cancel("run-1") == "running"
    after = await state_of(backend, "run-1")
    assert after["status"] == "running"  # it stops at its next step boundary, by itself
    assert after["cancel_requested"] is True
    assert after["locked_by"] == "w1"
    assert after["version"] == before["version"]  # its worker can still checkpoint the stop
    await backend.write_checkpoint(
        checkpoint(backend, "run-1", before["version"], status="cancelled", index=1)
    )
    assert (await state_of(backend, "run-1"))["status"] == "cancelled"


@pytest.mark.parametrize("status", ["completed", "failed", "cancelled"])
async def test_cancel_a_finished_run_changes_nothing(backend: StateBackend, status: str) -> None:
    await enqueue(backend, "run-1")
    assert await claim(backend, "w1") == ["run-1"]
    await finish(backend, "run-1", status)
    before = await state_of(backend, "run-1")
    assert await backend.request_cancel("run-1") == status
    assert await state_of(backend, "run-1") == before


async def test_cancel_an_unknown_run(backend: StateBackend) -> None:
    assert await backend.request_cancel("no-such-run") is None
    for hostile in ("../../etc/passwd", "", "a" * 10_000, "x'; DROP TABLE runs; --"):
        with pytest.raises(InvalidRunIdError):
            await backend.request_cancel(hostile)
        with pytest.raises(InvalidRunIdError):
            await backend.requeue_run(hostile)


# -- queue limits ----------------------------------------------------------------------------------


async def test_set_and_read_queue_limits(backend: StateBackend) -> None:
    assert await backend.queue_limits() == {}
    await backend.set_queue_limit("default", 2)
    await backend.set_queue_limit("paused-queue", 0)
    assert await backend.queue_limits() == {"default": 2, "paused-queue": 0}
    await backend.set_queue_limit("default", 5)
    assert await backend.queue_limits() == {"default": 5, "paused-queue": 0}
    await backend.set_queue_limit("default", None)
    await backend.set_queue_limit("never-set", None)
    assert await backend.queue_limits() == {"paused-queue": 0}
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ConfigurationError):
            await backend.set_queue_limit("default", bad)  # type: ignore[arg-type]
    assert await backend.queue_limits() == {"paused-queue": 0}


async def test_a_queue_limit_holds_across_claims(backend: StateBackend) -> None:
    await backend.set_queue_limit("default", 2)
    for i in range(5):
        await enqueue(backend, f"run-{i}")
    await enqueue(backend, "elsewhere", queue="other")

    first = await claim(backend, "w1", limit=10)
    assert len(first) == 2
    assert await claim(backend, "w2", limit=10) == []
    assert await claim(backend, "w2", queues=("default", "other")) == ["elsewhere"]  # no limit

    await finish(backend, first[0])  # a finished run frees its slot
    await backend.release_runs(worker_id="w1", run_ids=[first[0]])
    assert len(await claim(backend, "w2", limit=10)) == 1
    assert await claim(backend, "w3", limit=10) == []

    await expire(backend, "w1", [first[1]])  # an expired lease frees its slot too
    taken = await claim(backend, "w3", limit=10)
    assert len(taken) == 1

    await backend.set_queue_limit("default", None)
    assert len(await claim(backend, "w4", limit=10)) == 2  # the rest, unlimited


async def test_a_zero_limit_holds_a_queue(backend: StateBackend) -> None:
    await backend.set_queue_limit("default", 0)
    await enqueue(backend, "run-1")
    assert await claim(backend) == []
    await backend.set_queue_limit("default", 1)
    assert await claim(backend) == ["run-1"]


# -- concurrent claimers -------------------------------------------------------------------------


async def _claim_until_empty(backend: StateBackend, worker: str, limit: int) -> list[str]:
    taken: list[str] = []
    while found := await claim(backend, worker, limit=limit):
        taken += found
        await asyncio.sleep(0)
    return taken


def _assert_each_once(batches: list[list[str]], expected: set[str]) -> None:
    counts = Counter(run_id for batch in batches for run_id in batch)
    doubled = {run_id: n for run_id, n in counts.items() if n > 1}
    assert not doubled, f"claimed more than once: {doubled}"
    assert set(counts) == expected


async def test_concurrent_claimers_on_one_backend_never_share_a_run(
    backend: StateBackend,
) -> None:
    expected = {f"run-{i:03d}" for i in range(60)}
    for run_id in sorted(expected):
        await enqueue(backend, run_id)
    batches = await asyncio.gather(*(_claim_until_empty(backend, f"w{i}", 3) for i in range(8)))
    _assert_each_once(list(batches), expected)
    for run_id in expected:
        state = await state_of(backend, run_id)
        owner = next(f"w{i}" for i, batch in enumerate(batches) if run_id in batch)
        assert state["locked_by"] == owner


async def _separate_claimers(
    backend_factory: BackendFactory,
    make_backend: Callable[..., StateBackend],
    *,
    claimers: int,
    limit: int,
) -> list[list[str]]:
    """Claim until empty with ``claimers`` backends of their own, claiming at the same time:
    Postgres backends (one pool each) on one event loop, SQLite backends (one connection
    each) in threads."""
    if backend_factory.name == "postgres":
        backends = [make_backend(pool_max=2) for _ in range(claimers)]
        return list(
            await asyncio.gather(
                *(_claim_until_empty(b, f"w{i}", limit) for i, b in enumerate(backends))
            )
        )
    assert backend_factory.name == "sqlite"
    backends = [make_backend() for _ in range(claimers)]
    barrier = threading.Barrier(claimers)

    def in_thread(i: int) -> list[str]:
        async def go() -> list[str]:
            barrier.wait()
            try:
                return await _claim_until_empty(backends[i], f"w{i}", limit)
            finally:
                await backends[i].aclose()

        return asyncio.run(go())

    return list(await asyncio.gather(*(asyncio.to_thread(in_thread, i) for i in range(claimers))))


@pytest.mark.parametrize(
    "backend_factory",
    factory_params(lambda f: f.persistent and f.name != "file"),
    indirect=True,
)
async def test_concurrent_claimers_of_separate_backends_never_share_a_run(
    backend_factory: BackendFactory,
    make_backend: Callable[..., StateBackend],
) -> None:
    setup = make_backend()
    expected = {f"run-{i:03d}" for i in range(120)}
    for run_id in sorted(expected):
        await enqueue(setup, run_id)
    batches = await _separate_claimers(backend_factory, make_backend, claimers=6, limit=4)
    _assert_each_once(batches, expected)
    for i, batch in enumerate(batches):
        for run_id in batch:
            assert (await state_of(setup, run_id))["locked_by"] == f"w{i}"


@pytest.mark.parametrize(
    "backend_factory",
    factory_params(lambda f: f.persistent and f.name != "file"),
    indirect=True,
)
async def test_concurrent_claimers_of_separate_backends_never_exceed_a_limit(
    backend_factory: BackendFactory,
    make_backend: Callable[..., StateBackend],
) -> None:
    setup = make_backend()
    await setup.set_queue_limit("default", 3)
    for i in range(40):
        await enqueue(setup, f"run-{i:03d}")
    batches = await _separate_claimers(backend_factory, make_backend, claimers=6, limit=2)
    taken = [run_id for batch in batches for run_id in batch]
    assert len(taken) == 3
    assert len(set(taken)) == 3
    running = await setup.list_runs(status="running")
    assert len(running) == 3


async def test_concurrent_claimers_on_one_backend_never_exceed_a_limit(
    backend: StateBackend,
) -> None:
    await backend.set_queue_limit("default", 3)
    for i in range(40):
        await enqueue(backend, f"run-{i:03d}")
    batches = await asyncio.gather(*(claim(backend, f"w{i}", limit=2) for i in range(8)))
    taken = [run_id for batch in batches for run_id in batch]
    assert len(taken) == 3
    assert len(set(taken)) == 3


# -- workers registry ------------------------------------------------------------------------------


async def test_register_list_and_remove_workers(backend: StateBackend) -> None:
    assert await backend.list_workers() == []
    info = {"host": "box-1", "pid": 42, "queues": ["default"], "pipelines": ["p@1.0.0"]}
    await backend.register_worker("w1", info)
    await asyncio.sleep(0.01)  # distinct heartbeat times (the list is most recent first)
    await backend.register_worker("w2", {"host": "box-2", "queues": ["mail"]})

    workers = await backend.list_workers()
    assert [w["worker_id"] for w in workers] == ["w2", "w1"]
    first = workers[1]
    assert first["info"] == info
    assert isinstance(first["started_at"], datetime)
    assert isinstance(first["heartbeat_at"], datetime)

    await asyncio.sleep(0.01)
    await backend.register_worker("w1", {**info, "active": 3})  # a heartbeat
    workers = await backend.list_workers()
    assert [w["worker_id"] for w in workers] == ["w1", "w2"]
    refreshed = workers[0]
    assert refreshed["info"]["active"] == 3
    assert refreshed["started_at"] == first["started_at"]
    assert refreshed["heartbeat_at"] > first["heartbeat_at"]

    await backend.remove_worker("w1")
    await backend.remove_worker("never-registered")
    assert [w["worker_id"] for w in await backend.list_workers()] == ["w2"]


async def test_a_worker_entry_not_refreshed_for_long_is_forgotten(
    backend: StateBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed worker never removes its entry: the next registration or heartbeat of any
    worker removes entries older than WORKER_FORGET_S (an hour; shortened here)."""
    module = importlib.import_module(type(backend).__module__)
    monkeypatch.setattr(module, "WORKER_FORGET_S", 0.2)
    await backend.register_worker("dead", {})
    await backend.register_worker("live", {})
    assert {w["worker_id"] for w in await backend.list_workers()} == {"dead", "live"}
    await asyncio.sleep(0.3)
    await backend.register_worker("live", {})  # a heartbeat
    assert [w["worker_id"] for w in await backend.list_workers()] == ["live"]


async def test_hostile_worker_ids_are_values(backend: StateBackend) -> None:
    hostile = "w'); DELETE FROM flujo_workers; --"
    await backend.register_worker(hostile, {"note": "' OR 1=1 --"})
    await backend.register_worker("plain", {})
    assert {w["worker_id"] for w in await backend.list_workers()} == {hostile, "plain"}
    await enqueue(backend, "run-1")
    assert await claim(backend, hostile) == ["run-1"]
    assert (await state_of(backend, "run-1"))["locked_by"] == hostile
    await backend.remove_worker(hostile)
    assert [w["worker_id"] for w in await backend.list_workers()] == ["plain"]


# -- notifications ---------------------------------------------------------------------------------

#: A wait that only ends early when woken (the tests guard it with a shorter bound, so a wait
#: that was not woken fails instead of passing late).
WAIT_S = 120.0
GUARD_S = 30.0


async def _woken_by(waiter: StateBackend, wake: Callable[[], Any]) -> set[str]:
    """Wait on ``waiter`` and call ``wake`` until the wait ends; return what it returned."""
    waiting = asyncio.ensure_future(waiter.wait_for_work(WAIT_S))

    async def keep_waking() -> None:
        while not waiting.done():
            await wake()
            await asyncio.sleep(0.01)

    waker = asyncio.ensure_future(keep_waking())
    try:
        return await asyncio.wait_for(waiting, GUARD_S)
    finally:
        waker.cancel()
        await asyncio.gather(waker, return_exceptions=True)


async def test_notify_work_wakes_a_waiter_in_this_process(backend: StateBackend) -> None:
    woken = await _woken_by(backend, lambda: backend.notify_work("default"))
    assert woken == set()


async def test_a_wait_without_work_times_out_empty(backend: StateBackend) -> None:
    assert await backend.wait_for_work(0.01) == set()


async def test_notify_cancel_reports_the_run(backend: StateBackend) -> None:
    woken = await _woken_by(backend, lambda: backend.notify_cancel("run-7"))
    assert "run-7" in woken
    # A cancellation announced while nobody waits is reported by the next wait.
    await backend.notify_cancel("run-8")
    assert "run-8" in await asyncio.wait_for(backend.wait_for_work(WAIT_S), GUARD_S)


@pytest.mark.parametrize(
    "backend_factory",
    factory_params(lambda f: f.postgres),
    indirect=True,
)
async def test_postgres_notify_reaches_another_backend_instance(
    make_backend: Callable[..., StateBackend],
) -> None:
    sender, listener = make_backend(), make_backend()
    assert getattr(listener, "notifies_other_processes", False) is True
    await listener.wait_for_work(0.01)  # LISTENs from here on (its own connection)

    # request_cancel of a running run announces it (no notify_cancel needed)...
    await enqueue(sender, "run-10")
    assert await claim(sender, "w1") == ["run-10"]
    waiting = asyncio.ensure_future(listener.wait_for_work(WAIT_S))
    await asyncio.sleep(0)
    assert await sender.request_cancel("run-10") == "running"
    assert "run-10" in await asyncio.wait_for(waiting, GUARD_S)

    # ... and a release wakes the waiters (the run is back in its queue).
    waiting = asyncio.ensure_future(listener.wait_for_work(WAIT_S))
    await asyncio.sleep(0)
    await sender.release_runs(worker_id="w1", run_ids=["run-10"])
    assert await asyncio.wait_for(waiting, GUARD_S) == set()

    woken = await _woken_by(listener, lambda: sender.notify_work("default"))
    assert woken == set()
    woken = await _woken_by(listener, lambda: sender.notify_cancel("run-9"))
    assert "run-9" in woken


@pytest.mark.parametrize(
    "backend_factory",
    factory_params(lambda f: f.postgres),
    indirect=True,
)
async def test_postgres_notifications_stay_in_their_schema(
    backend_factory: BackendFactory,
    make_backend: Callable[..., StateBackend],
    store: Store,
    postgres_dsn: str,
) -> None:
    # Another store (schema) on the same server gets its own channel.
    from flujo.state.backends.postgres import PostgresBackend

    mine = make_backend()
    other = PostgresBackend(postgres_dsn, schema=f"{store.postgres_schema}_x", pool_min=0)
    try:
        assert other.channel != mine.channel  # type: ignore[attr-defined]
    finally:
        await other.aclose()


# -- hostile queue names -----------------------------------------------------------------------

HOSTILE_QUEUES: list[Any] = [
    "",
    "a" * 65,
    "a" * 10_000,
    "default'; DROP TABLE runs; --",
    "x' OR '1'='1",
    "q\x00",
    "q\n",
    "with space",
    ".hidden",
    "-dash",
    "../etc",
    "a/b",
    "ünï",
    None,
    5,
    b"default",
]


def test_queue_names() -> None:
    assert validate_queue_name("default") == "default"
    assert validate_queue_name("a" * 64) == "a" * 64
    assert validate_queue_name("Mail_2.high-prio") == "Mail_2.high-prio"
    for bad in HOSTILE_QUEUES:
        with pytest.raises(ConfigurationError):
            validate_queue_name(bad)


async def test_hostile_queue_names_are_refused(backend: StateBackend) -> None:
    await enqueue(backend, "run-1")
    assert await claim(backend) == ["run-1"]
    await finish(backend, "run-1", "failed")
    before = await state_of(backend, "run-1")
    for bad in HOSTILE_QUEUES:
        with pytest.raises(ConfigurationError):
            await backend.claim_runs(worker_id="w", queues=[bad], limit=1, lease_s=LONG)
        with pytest.raises(ConfigurationError):
            await backend.claim_runs(worker_id="w", queues=["default", bad], limit=1, lease_s=LONG)
        with pytest.raises(ConfigurationError):
            await backend.set_queue_limit(bad, 1)
        if bad is not None:  # None means: keep the run's queue
            with pytest.raises(ConfigurationError):
                await backend.requeue_run("run-1", queue=bad)
    assert await state_of(backend, "run-1") == before
    assert await backend.queue_limits() == {}


async def test_hostile_queue_names_are_refused_by_next_lease_expiry(
    backend: StateBackend,
) -> None:
    for bad in HOSTILE_QUEUES:
        with pytest.raises(ConfigurationError):
            await backend.next_lease_expiry([bad])


async def test_the_longest_queue_name_works(backend: StateBackend) -> None:
    name = "q" * 64
    await enqueue(backend, "run-1", queue=name)
    await backend.set_queue_limit(name, 1)
    assert await backend.queue_limits() == {name: 1}
    assert await claim(backend, queues=(name,)) == ["run-1"]


# -- summaries and load_state ----------------------------------------------------------------------


async def test_summaries_and_state_show_the_queue_fields(backend: StateBackend) -> None:
    await enqueue(backend, "run-1", queue="reports", priority=7)
    [summary] = await backend.list_runs()
    assert summary["run_id"] == "run-1"
    assert summary["status"] == "queued"
    assert summary["queue"] == "reports"
    assert summary["priority"] == 7
    assert summary["locked_by"] is None
    assert summary["lease_expires_at"] is None
    assert summary["cancel_requested"] is False
    assert [s["run_id"] for s in await backend.list_runs(status="queued")] == ["run-1"]

    assert await claim(backend, "w1", queues=("reports",)) == ["run-1"]
    assert await backend.request_cancel("run-1") == "running"
    [summary] = await backend.list_runs()
    state = await state_of(backend, "run-1")
    for view in (summary, state):
        assert view["status"] == "running"
        assert view["queue"] == "reports"
        assert view["priority"] == 7
        assert view["locked_by"] == "w1"
        assert isinstance(view["lease_expires_at"], datetime)
        assert view["cancel_requested"] is True
    assert summary["lease_expires_at"] == state["lease_expires_at"]


async def test_negative_and_large_priorities(backend: StateBackend) -> None:
    await enqueue(backend, "low", priority=-(2**31))
    await enqueue(backend, "high", priority=2**31 - 1)
    assert await claim(backend, limit=1) == ["high"]
    assert (await state_of(backend, "low"))["priority"] == -(2**31)


# -- the in-process wakeup -------------------------------------------------------------------------


async def test_wakeup_keeps_a_cancellation_when_the_waiter_is_cancelled() -> None:
    """A worker waits for work, a run finishing and a stop at once; when another of those
    ends the wait first, the wait is cancelled. A cancellation announced in that moment must
    still reach the worker's next wait (else it is noticed only at the next heartbeat)."""
    wakeup = Wakeup()
    waiting = asyncio.ensure_future(wakeup.wait(WAIT_S))
    await asyncio.sleep(0)  # now waiting
    wakeup.wake(cancelled="run-1")
    waiting.cancel()  # the worker stopped waiting for another reason, at the same moment
    await asyncio.gather(waiting, return_exceptions=True)
    assert await wakeup.wait(0.01) == {"run-1"}
