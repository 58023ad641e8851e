"""The evaluations table (shadow evaluation scores), on every backend that keeps one.

The file backend keeps none: it says so with NotImplementedError (the evaluator then logs
scores instead).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from backend_helpers import BackendFactory, sample_state

from conftest import factory_params
from flujo.domain.usage import Usage
from flujo.exceptions import InvalidRunIdError
from flujo.state import FileBackend
from flujo.state.backends.base import StateBackend, to_datetime
from flujo.state.models import Evaluation

T0 = 1_800_000_000.0


def evaluation(
    run_id: str, step: str, at: float, score: float = 0.5, **extra: object
) -> Evaluation:
    return Evaluation(
        run_id=run_id,
        step_name=step,
        step_path=[0, "branch", 2],
        score=score,
        reasoning="fine ✓",
        judge="test",
        created_at=to_datetime(at),
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture(params=factory_params(lambda f: f.name != "file"))
def backend_factory(request: pytest.FixtureRequest) -> BackendFactory:
    """The backends that keep evaluations (this module's own parametrization)."""
    factory: BackendFactory = request.param
    return factory


async def test_evaluations_round_trip_newest_first(backend: StateBackend) -> None:
    first = evaluation("run-a", "answer", T0, 0.25, usage=Usage(1, 10, 2, 0.001))
    second = evaluation("run-a", "summary", T0 + 1, 1.0)
    other = evaluation("run-b", "answer", T0 + 2, 0.0)
    for item in (first, second, other):
        await backend.save_evaluation(item)

    assert await backend.list_evaluations() == [other, second, first]
    assert await backend.list_evaluations(run_id="run-a") == [second, first]
    assert await backend.list_evaluations(step_name="answer") == [other, first]
    assert await backend.list_evaluations(since=to_datetime(T0 + 1)) == [other, second]
    assert await backend.list_evaluations(limit=1, offset=1) == [second]
    assert await backend.list_evaluations(run_id="run-c") == []
    [stored] = await backend.list_evaluations(run_id="run-a", step_name="answer")
    assert stored.usage == Usage(1, 10, 2, 0.001)
    assert stored.step_path == [0, "branch", 2]
    assert stored.reasoning == "fine ✓"


async def test_hostile_filters_are_values_not_sql(backend: StateBackend) -> None:
    await backend.save_evaluation(evaluation("run-a", "answer", T0))
    for hostile in ("' OR '1'='1", "answer'; DROP TABLE evaluations; --", "%", "_"):
        assert await backend.list_evaluations(step_name=hostile) == []
    assert len(await backend.list_evaluations()) == 1
    with pytest.raises(InvalidRunIdError):
        await backend.list_evaluations(run_id="../etc/passwd")
    with pytest.raises(InvalidRunIdError):
        await backend.save_evaluation(evaluation("bad id/..", "answer", T0))


async def test_evaluations_go_with_their_run(backend: StateBackend) -> None:
    for run_id in ("keep", "drop", "old"):
        await backend.save_state(run_id, sample_state(run_id))
        await backend.save_evaluation(evaluation(run_id, "answer", T0))

    await backend.delete_state("drop")
    assert {e.run_id for e in await backend.list_evaluations()} == {"keep", "old"}

    # A whole-state save replaces the run's state, not its scores.
    await backend.save_state("keep", sample_state("keep"))
    assert [e.run_id for e in await backend.list_evaluations(run_id="keep")] == ["keep"]

    stored = await backend.load_state("old")
    assert stored is not None
    await backend.delete_runs(updated_before=stored["updated_at"] + timedelta(seconds=1))
    assert await backend.list_evaluations() == []


async def test_evaluations_are_shared_by_backends_on_one_store(
    backend_factory: BackendFactory, make_backend: Callable[..., StateBackend]
) -> None:
    writer = make_backend()
    reader = make_backend() if backend_factory.persistent else writer
    await writer.save_evaluation(evaluation("run-a", "answer", T0))
    assert [e.step_name for e in await reader.list_evaluations()] == ["answer"]


async def test_the_file_backend_keeps_no_evaluations(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "runs")
    with pytest.raises(NotImplementedError, match="evaluations"):
        await backend.save_evaluation(evaluation("run-a", "answer", T0))
    with pytest.raises(NotImplementedError, match="evaluations"):
        await backend.list_evaluations()
