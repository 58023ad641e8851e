"""HumanInTheLoopStep: pausing a run for a person, answering it, and going on (issue 5).

Every test runs on an InMemoryBackend and on a SQLiteBackend in tmp_path. A run is resumed with
a fresh ``Flujo`` (and, on SQLite, a fresh backend on the same file), as another process would.
Step functions count their calls, so "nothing ran again" is checked, not assumed.

Where a pause inside a composite step resumes:

- loop: in the iteration that paused; earlier iterations are not run again;
- map: in the item that paused; finished items are not run again;
- conditional: in the branch recorded before the pause (the condition is not asked again);
- parallel: finished branches are not run again; the paused branch runs again from its start
  (its steps before the HITL step run twice in all: a branch's own steps are not durable), and
  its HITL step takes the recorded answer instead of asking again;
- state machine: in the state (and turn) that paused.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner, Result

from flujo import (
    ConditionalStep,
    Flujo,
    HumanInTheLoopStep,
    LoopStep,
    MapStep,
    ParallelStep,
    Pipeline,
    PipelineContext,
    PipelineRegistry,
    PipelineResult,
    StateMachineStep,
    Step,
    TaskClient,
    Transition,
    cli,
)
from flujo.exceptions import (
    ConfigurationError,
    HumanInputError,
    PausedException,
    RunNotFoundError,
    StateConflictError,
)
from flujo.state import InMemoryBackend, SQLiteBackend
from flujo.state.backends.base import Checkpoint

from .steplib_helpers import Calls, Store, wait_for_records


class Verdict(BaseModel):
    approved: bool
    note: str = ""


class Color(StrEnum):
    RED = "red"
    GREEN = "green"


class Ctx(PipelineContext):
    customer: str = "ana"
    drafts: list[str] = []


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return Store(request.param, tmp_path)


def counted(calls: Calls, name: str, fn: Any = None) -> Step[Any, Any]:
    """An async step named ``name`` that logs ``(name, input)`` and returns ``fn(input)``."""

    async def run(data: Any) -> Any:
        calls.add((name, _hashable(data)))
        calls.add(name)
        return data if fn is None else fn(data)

    return Step.from_callable(run, name=name)


def _hashable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return value


async def answer(
    store: Store, pipeline: Any, paused: PipelineResult[Any, Any] | str, value: Any, **options: Any
) -> PipelineResult[Any, Any]:
    """Answer a paused run with a fresh runner on a fresh backend (another process, in effect)."""
    async with Flujo(pipeline, state_backend=store.backend(), **options) as runner:
        return await runner.resume_async(paused, value)


def pause_of(state: dict[str, Any]) -> tuple[str, list[Any], str]:
    """(question, path, step name) of a stored paused run."""
    assert state["status"] == "paused", state["status"]
    error = state["error"]
    assert error["type"] == "PausedException"
    return error["message"], error["path"], error["step"]


# -- a top-level pause -----------------------------------------------------------------------------


def approval(calls: Calls, schema: Any = Verdict) -> Pipeline[Any, Any]:
    """prep (+1) >> ask (the HITL step) >> finish (logs what it received, with its type)."""
    ask = HumanInTheLoopStep("ask", message_for_user="Publish it?", input_schema=schema)

    async def finish(value):  # type: ignore[no-untyped-def]  # no declared input type
        calls.add("finish")
        calls.add(("finish type", type(value).__name__))
        return {"got": value.model_dump() if isinstance(value, BaseModel) else value}

    return (
        counted(calls, "prep", lambda x: x + 1) >> ask >> Step.from_callable(finish, name="finish")
    )


async def test_a_top_level_pause_is_stored_with_its_question_and_path(store: Store) -> None:
    calls = Calls()
    result = await store.run(approval(calls), 1)
    assert result.status == "paused"
    assert not result.success
    assert result.output is None
    assert result.failed_step == "ask"
    assert result.error is not None
    assert result.error.type == "PausedException"
    assert result.error.message == "Publish it?"
    state = await store.load(result.run_id)
    assert state["error"] == {
        "type": "PausedException",
        "message": "Publish it?",
        "step": "ask",
        "path": [1],
    }
    assert state["current_step_index"] == 1
    assert [r["name"] for r in state["step_history"]] == ["prep"]
    assert calls.count("prep") == 1
    assert calls.count("finish") == 0


async def test_running_a_paused_run_again_returns_the_stored_pause_and_runs_nothing(
    store: Store,
) -> None:
    calls = Calls()
    pipeline = approval(calls)
    paused = await store.run(pipeline, 1)
    before = await store.load(paused.run_id)
    again = await store.run(pipeline, 99, run_id=paused.run_id)
    assert again.status == "paused"
    assert again.run_id == paused.run_id
    assert again.failed_step == "ask"
    assert again.error is not None
    assert again.error.message == "Publish it?"
    assert [r.name for r in again.step_history] == ["prep"]
    assert await store.load(paused.run_id) == before
    assert calls.count("prep") == 1
    assert calls.count("finish") == 0


def test_sync_run_with_the_run_id_of_a_paused_run_runs_nothing(tmp_path: Path) -> None:
    calls = Calls()
    pipeline = approval(calls)
    path = tmp_path / "sync.db"
    first = Flujo(pipeline, state_backend=SQLiteBackend(path)).run(1)
    assert first.status == "paused"
    again = Flujo(pipeline, state_backend=SQLiteBackend(path)).run(1, run_id=first.run_id)
    assert again.status == "paused"
    assert again.failed_step == "ask"
    assert calls.count("prep") == 1


@pytest.mark.parametrize("by", ["result", "run_id"])
async def test_the_answer_is_the_steps_output_and_flows_to_the_next_step(
    store: Store, by: str
) -> None:
    calls = Calls()
    pipeline = approval(calls)
    paused = await store.run(pipeline, 1)
    target: Any = paused if by == "result" else paused.run_id
    done = await answer(store, pipeline, target, {"approved": True, "note": "ship it"})
    assert done.status == "completed"
    assert done.output == {"got": {"approved": True, "note": "ship it"}}
    assert calls.count(("finish type", "Verdict")) == 1  # typed into input_schema
    assert calls.count("prep") == 1
    assert calls.count("finish") == 1
    assert [r.name for r in done.step_history] == ["prep", "ask", "finish"]
    assert all(r.success for r in done.step_history)
    state = await store.load(paused.run_id)
    assert state["status"] == "completed"
    assert state["error"] is None
    assert [r["name"] for r in state["step_history"]] == ["prep", "ask", "finish"]
    assert state["step_history"][1]["output"] == {"approved": True, "note": "ship it"}


@pytest.mark.parametrize(
    ("schema", "given", "expected", "type_name"),
    [
        (Verdict, {"approved": False}, {"approved": False, "note": ""}, "Verdict"),
        (Verdict, Verdict(approved=True, note="x"), {"approved": True, "note": "x"}, "Verdict"),
        (int, 7, 7, "int"),
        (int, "7", 7, "int"),  # pydantic's lax mode, as input_schema validation does elsewhere
        (Literal["yes", "no"], "no", "no", "str"),
        (Color, "green", "green", "Color"),
        (None, {"free": ["form"]}, {"free": ["form"]}, "dict"),
    ],
)
async def test_the_answer_is_validated_into_input_schema(
    store: Store, schema: Any, given: Any, expected: Any, type_name: str
) -> None:
    calls = Calls()
    pipeline = approval(calls, schema)
    paused = await store.run(pipeline, 1)
    done = await answer(store, pipeline, paused, given)
    assert done.status == "completed"
    assert done.output == {"got": expected}
    assert calls.count(("finish type", type_name)) == 1


@pytest.mark.parametrize(
    ("schema", "wrong"),
    [
        (Verdict, {"note": "no approved field"}),
        (Verdict, "yes"),
        (int, "seven"),
        (int, None),
        (Literal["yes", "no"], "maybe"),
        (Color, "blue"),
    ],
)
async def test_a_wrong_answer_is_refused_and_the_run_stays_paused(
    store: Store, schema: Any, wrong: Any
) -> None:
    calls = Calls()
    pipeline = approval(calls, schema)
    paused = await store.run(pipeline, 1)
    before = await store.load(paused.run_id)
    with pytest.raises(HumanInputError) as caught:
        await answer(store, pipeline, paused, wrong)
    assert caught.value.run_id == paused.run_id
    assert caught.value.errors
    assert "'ask'" in str(caught.value)
    assert "stays paused" in str(caught.value)
    after = await store.load(paused.run_id)
    assert after == before  # nothing written: same version, history, error, context
    assert calls.count("finish") == 0
    # A right answer is still taken.
    fine = {"approved": True} if schema is Verdict else {int: 3, Color: "red"}.get(schema, "yes")
    done = await answer(store, pipeline, paused.run_id, fine)
    assert done.status == "completed"
    assert calls.count("finish") == 1
    assert calls.count("prep") == 1


async def test_answering_twice_is_a_conflict_and_runs_nothing_again(store: Store) -> None:
    calls = Calls()
    pipeline = approval(calls)
    paused = await store.run(pipeline, 1)
    await answer(store, pipeline, paused, {"approved": True})
    after_first = await store.load(paused.run_id)
    with pytest.raises(StateConflictError) as caught:
        await answer(store, pipeline, paused, {"approved": False})
    assert caught.value.run_id == paused.run_id
    with pytest.raises(StateConflictError):
        await answer(store, pipeline, paused.run_id, {"approved": False})
    assert await store.load(paused.run_id) == after_first
    assert calls.count("finish") == 1
    assert calls.count("prep") == 1


class LoadGate:
    """Makes two answerers read the paused state before either commits: the first ``rounds``
    ``load_state`` calls of each wait until the other has made its call too."""

    def __init__(self, rounds: int) -> None:
        self.barrier = asyncio.Barrier(2)
        self.left = 2 * rounds

    def backends(self, store: Store) -> tuple[Any, Any]:
        first, second = store.backend(), store.backend()
        self._wrap(first)
        if second is not first:
            self._wrap(second)
        return first, second

    def _wrap(self, backend: Any) -> None:
        original = backend.load_state

        async def load_state(run_id: str) -> Any:
            state = await original(run_id)
            if self.left > 0:
                self.left -= 1
                await self.barrier.wait()
            return state

        backend.load_state = load_state


async def test_two_answers_at_once_one_wins(store: Store) -> None:
    calls = Calls()
    pipeline = approval(calls)
    paused = await store.run(pipeline, 1)
    gate = LoadGate(rounds=1)
    first, second = gate.backends(store)

    async def respond(backend: Any, note: str) -> PipelineResult[Any, Any]:
        async with Flujo(pipeline, state_backend=backend) as runner:
            return await runner.resume_async(paused, {"approved": True, "note": note})

    outcomes = await asyncio.gather(
        respond(first, "a"), respond(second, "b"), return_exceptions=True
    )
    assert gate.left == 0  # both read the paused run before either committed its answer
    won = [o for o in outcomes if isinstance(o, PipelineResult)]
    lost = [o for o in outcomes if isinstance(o, StateConflictError)]
    assert len(won) == 1, outcomes
    assert len(lost) == 1, outcomes
    assert won[0].status == "completed"
    assert calls.count("finish") == 1
    state = await store.load(paused.run_id)
    assert state["status"] == "completed"
    assert [r["name"] for r in state["step_history"]] == ["prep", "ask", "finish"]


async def test_answering_an_unknown_run_is_run_not_found(store: Store) -> None:
    with pytest.raises(RunNotFoundError) as caught:
        await answer(store, approval(Calls()), "no-such-run", {"approved": True})
    assert caught.value.run_id == "no-such-run"
    assert await store.load_or_none("no-such-run") is None


async def test_answering_a_completed_or_failed_run_is_a_conflict(store: Store) -> None:
    calls = Calls()
    plain = counted(calls, "a") >> counted(calls, "b")
    completed = await store.run(plain, 1)
    assert completed.status == "completed"

    async def boom(x: int) -> int:
        calls.add("boom")
        raise RuntimeError("boom")

    failing = counted(calls, "a") >> Step.from_callable(boom, name="boom")
    failed = await store.run(failing, 1)
    assert failed.status == "failed"
    for pipeline, run in ((plain, completed), (failing, failed)):
        before = await store.load(run.run_id)
        with pytest.raises(StateConflictError) as caught:
            await answer(store, pipeline, run.run_id, "an answer")
        assert run.status in str(caught.value)
        assert await store.load(run.run_id) == before
    assert calls.count("a") == 2
    assert calls.count("b") == 1
    assert calls.count("boom") == 1


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_message_for_user_may_be_a_callable_of_data_and_context(
    store: Store, kind: str
) -> None:
    seen: list[tuple[Any, Any]] = []

    def sync_message(data: Any, context: Any) -> str:
        seen.append((data, context))
        return f"Send {data} to {context.customer}?"

    async def async_message(data: Any, context: Any) -> str:
        await asyncio.sleep(0)
        return sync_message(data, context)

    message = sync_message if kind == "sync" else async_message
    ask = HumanInTheLoopStep("ask", message_for_user=message, input_schema=bool)
    pipeline = counted(Calls(), "prep", lambda x: x * 10) >> ask
    paused = await store.run(
        pipeline, 4, context_model=Ctx, initial_context_data={"customer": "bo"}
    )
    assert paused.status == "paused"
    assert paused.error is not None
    assert paused.error.message == "Send 40 to bo?"
    question, path, name = pause_of(await store.load(paused.run_id))
    assert (question, path, name) == ("Send 40 to bo?", [1], "ask")
    [(data, context)] = seen
    assert data == 40
    assert isinstance(context, Ctx)
    assert context.run_id == paused.run_id
    done = await answer(store, pipeline, paused, True, context_model=Ctx)
    assert done.status == "completed"
    assert done.output is True
    assert len(seen) == 1  # answering does not word the question again


async def test_message_for_user_must_be_text_or_callable() -> None:
    with pytest.raises(ConfigurationError):
        HumanInTheLoopStep("ask", message_for_user=42)  # type: ignore[arg-type]


async def test_a_hitl_step_that_is_the_last_step_completes_the_run(store: Store) -> None:
    calls = Calls()
    pipeline = counted(calls, "prep") >> HumanInTheLoopStep(
        "ask", message_for_user="How many?", input_schema=int
    )
    paused = await store.run(pipeline, 1)
    done = await answer(store, pipeline, paused, "12")
    assert done.status == "completed"
    assert done.output == 12
    state = await store.load(paused.run_id)
    assert state["status"] == "completed"
    assert state["current_step_index"] == 2
    assert state["last_step_output"] == 12
    again = await store.run(pipeline, 1, run_id=paused.run_id)
    assert again.status == "completed"
    assert again.output == 12
    assert calls.count("prep") == 1


async def test_an_answer_that_completes_the_run_is_seen_by_the_post_run_hook(
    store: Store,
) -> None:
    """Answering a last-step pause completes the run: the PostRun hook hears of it, as it does
    when the answer is followed by other steps (and as for any completion)."""
    events: list[tuple[str, str | None]] = []

    def hook(event: Any) -> None:
        result = getattr(event, "result", None)
        events.append((event.event_name, getattr(result, "status", None)))

    for last in (False, True):
        steps: Any = counted(Calls(), "prep") >> HumanInTheLoopStep("ask", "How many?", int)
        if not last:
            steps = steps >> counted(Calls(), "after")
        paused = await store.run(steps, 1, hooks=[hook])
        assert events[-1] == ("post_run", "paused")
        events.clear()
        done = await answer(store, steps, paused, 3, hooks=[hook])
        assert done.status == "completed"
        assert events[-1:] == [("post_run", "completed")], ("last step" if last else "", events)
        events.clear()


async def test_an_answer_that_completes_the_run_honours_delete_on_completion(
    store: Store,
) -> None:
    for last in (False, True):
        steps: Any = counted(Calls(), "prep") >> HumanInTheLoopStep("ask", "How many?", int)
        if not last:
            steps = steps >> counted(Calls(), "after")
        paused = await store.run(steps, 1, delete_on_completion=True)
        done = await answer(store, steps, paused, 3, delete_on_completion=True)
        assert done.status == "completed"
        stored = await store.load_or_none(paused.run_id)
        assert stored is None, ("last step" if last else "", stored and stored["status"])


async def test_a_hitl_step_that_is_the_first_step_gets_the_runs_input(store: Store) -> None:
    calls = Calls()
    ask = HumanInTheLoopStep("ask", message_for_user=lambda data, ctx: f"Is {data} right?")
    pipeline = ask >> counted(calls, "after")
    paused = await store.run(pipeline, "the input")
    assert paused.error is not None
    assert paused.error.message == "Is the input right?"
    assert pause_of(await store.load(paused.run_id))[1] == [0]
    done = await answer(store, pipeline, paused, "yes")
    assert done.output == "yes"
    assert calls.count(("after", "yes")) == 1


async def test_two_pauses_in_one_pipeline(store: Store) -> None:
    calls = Calls()
    first = HumanInTheLoopStep("first", message_for_user="How many?", input_schema=int)
    second = HumanInTheLoopStep(
        "second", message_for_user=lambda d, c: f"Ship {d}?", input_schema=Literal["yes", "no"]
    )
    pipeline = (
        counted(calls, "prep")
        >> first
        >> counted(calls, "mid", lambda n: n * 2)
        >> second
        >> counted(calls, "finish")
    )
    paused = await store.run(pipeline, 1)
    assert pause_of(await store.load(paused.run_id)) == ("How many?", [1], "first")
    again = await answer(store, pipeline, paused, 21)
    assert again.status == "paused"
    assert again.failed_step == "second"
    assert pause_of(await store.load(paused.run_id)) == ("Ship 42?", [3], "second")
    assert calls.count(("mid", 21)) == 1
    assert calls.count("finish") == 0
    done = await answer(store, pipeline, again, "yes")
    assert done.status == "completed"
    assert done.output == "yes"
    assert [r.name for r in done.step_history] == ["prep", "first", "mid", "second", "finish"]
    assert [calls.count(n) for n in ("prep", "mid", "finish")] == [1, 1, 1]


async def test_answering_the_first_pause_again_does_not_answer_the_second(store: Store) -> None:
    """A repeated answer to the first pause (a retried webhook holding the first paused result)
    must not be taken as the answer to the second question: it is a conflict."""
    calls = Calls()
    pipeline = (
        HumanInTheLoopStep("quantity", message_for_user="How many?", input_schema=int)
        >> HumanInTheLoopStep("budget", message_for_user="What budget?", input_schema=int)
        >> counted(calls, "order")
    )
    first = await store.run(pipeline, None)
    second = await answer(store, pipeline, first, 3)
    assert second.status == "paused"
    assert second.failed_step == "budget"
    before = await store.load(first.run_id)
    with pytest.raises(StateConflictError):
        await answer(store, pipeline, first, 3)  # the same answer to "How many?", once more
    assert await store.load(first.run_id) == before
    assert calls.count("order") == 0


async def test_a_pause_without_a_store_cannot_be_answered() -> None:
    calls = Calls()
    runner = Flujo(approval(calls), persist_state=False)
    paused = await runner.run_async(1)
    assert paused.status == "paused"
    assert paused.failed_step == "ask"
    with pytest.raises(ConfigurationError):
        await runner.resume_async(paused, {"approved": True})
    with pytest.raises(ConfigurationError):
        await runner.resume_async(paused.run_id, {"approved": True})
    assert calls.count("finish") == 0


async def test_a_plain_step_raising_paused_exception_is_answered_the_same_way(
    store: Store,
) -> None:
    calls = Calls()

    async def wait(x: int) -> int:
        calls.add("wait")
        raise PausedException("waiting for the warehouse")

    pipeline = Step.from_callable(wait, name="wait") >> counted(calls, "after")
    paused = await store.run(pipeline, 1)
    assert pause_of(await store.load(paused.run_id)) == ("waiting for the warehouse", [0], "wait")
    done = await answer(store, pipeline, paused, {"anything": 1})
    assert done.output == {"anything": 1}
    assert calls.count("wait") == 1


# -- pauses inside composite steps -----------------------------------------------------------------


def loop_asking_in_iteration_3(calls: Calls) -> Pipeline[Any, Any]:
    """start >> loop (5 iterations: work (+1, counts iterations in the context) >> gate) >> end.

    ``gate`` asks a person only in iteration 3; the answer replaces that iteration's output.
    """

    async def work(x: int, *, context: Ctx) -> int:
        calls.add(("work", len(context.drafts)))
        context.drafts.append(f"draft {len(context.drafts)}")
        return x + 1

    gate = ConditionalStep(
        "gate",
        lambda d, c: "ask" if len(c.drafts) == 4 else "skip",
        {
            "ask": HumanInTheLoopStep(
                "ask", message_for_user=_iteration_question, input_schema=int
            ),
            "skip": counted(calls, "skip"),
        },
    )
    loop = LoopStep(
        "loop",
        Step.from_callable(work, name="work") >> gate,
        lambda out, ctx: len(ctx.drafts) >= 5,
        max_loops=5,
    )
    return counted(calls, "start") >> loop >> counted(calls, "end")


def _iteration_question(data: Any, context: Any) -> str:
    return f"Iteration {len(context.drafts) - 1}: keep {data}?"


async def test_a_pause_in_loop_iteration_3_resumes_in_that_iteration(store: Store) -> None:
    calls = Calls()
    pipeline = loop_asking_in_iteration_3(calls)
    paused = await store.run(pipeline, 0, context_model=Ctx)
    assert paused.status == "paused"
    assert paused.failed_step == "ask"
    assert pause_of(await store.load(paused.run_id)) == (
        "Iteration 3: keep 4?",
        [1, 3, 1, "ask", 0],
        "ask",
    )
    assert [calls.count(("work", i)) for i in range(5)] == [1, 1, 1, 1, 0]
    done = await answer(store, pipeline, paused, 100, context_model=Ctx)
    assert done.status == "completed"
    assert done.output == 101  # iteration 4 worked on the answer
    assert [calls.count(("work", i)) for i in range(5)] == [1, 1, 1, 1, 1]  # 0-3 not re-run
    assert calls.count("start") == 1
    assert calls.count("end") == 1
    assert calls.count("skip") == 4
    assert done.final_pipeline_context.drafts == [f"draft {i}" for i in range(5)]
    [loop] = [r for r in done.step_history if r.name == "loop"]
    iterations = {r.path[1] for r in loop.step_history if r.path is not None}
    assert iterations == {0, 1, 2, 3, 4}


async def test_a_loop_asking_every_iteration_is_answered_one_iteration_at_a_time(
    store: Store,
) -> None:
    calls = Calls()
    review = HumanInTheLoopStep(
        "review", message_for_user=lambda d, c: f"Draft {d!r} ok?", input_schema=Verdict
    )

    async def revise(data: Any) -> str:
        calls.add("revise")
        note = data.note if isinstance(data, Verdict) else data
        return f"{note}+"

    loop = LoopStep(
        "revise_until_ok",
        Step.from_callable(revise, name="revise") >> review,
        lambda out, ctx: out.approved,
        max_loops=5,
        loop_output_mapper=lambda out, ctx: out.note,
    )
    pipeline = Pipeline.from_steps([loop, counted(calls, "publish")])
    run = await store.run(pipeline, "v")
    questions = []
    for iteration, verdict in enumerate(
        [{"approved": False, "note": "a"}, {"approved": False, "note": "b"}, {"approved": True}]
    ):
        question, path, _ = pause_of(await store.load(run.run_id))
        questions.append(question)
        assert path == [0, iteration, 1]
        assert calls.count("revise") == iteration + 1
        run = await answer(store, pipeline, run, verdict)
    assert questions == ["Draft 'v+' ok?", "Draft 'a+' ok?", "Draft 'b+' ok?"]
    assert run.status == "completed"
    assert run.output == ""  # the approving verdict's note
    assert calls.count("revise") == 3
    assert calls.count("publish") == 1


async def test_each_map_item_pauses_in_turn(store: Store) -> None:
    calls = Calls()
    ask = HumanInTheLoopStep(
        "ask", message_for_user=lambda d, c: f"Price of {d}?", input_schema=int
    )
    item = counted(calls, "prep", str.upper) >> ask >> counted(calls, "post", lambda p: p * 2)
    pipeline = counted(calls, "start") >> MapStep("prices", item) >> counted(calls, "end")
    run = await store.run(pipeline, ["tea", "jam", "oat"])
    for position, (name, price) in enumerate([("TEA", 3), ("JAM", 5), ("OAT", 7)]):
        assert run.status == "paused"
        question, path, step_name = pause_of(await store.load(run.run_id))
        assert (question, path, step_name) == (f"Price of {name}?", [1, position, 1], "ask")
        assert calls.count("prep") == position + 1  # earlier items are not re-run
        assert calls.count("post") == position
        run = await answer(store, pipeline, run, price)
    assert run.status == "completed"
    assert run.output == [6, 10, 14]
    assert [calls.count(n) for n in ("start", "prep", "post", "end")] == [1, 3, 3, 1]


async def test_map_items_pausing_concurrently_are_all_asked_once(store: Store) -> None:
    ask = HumanInTheLoopStep(
        "ask", message_for_user=lambda d, c: f"Price of {d}?", input_schema=int
    )
    pipeline = Pipeline.from_steps([MapStep("prices", ask, max_concurrency=3)])
    run = await store.run(pipeline, ["tea", "jam", "oat"])
    asked: list[str] = []
    prices = {"tea": 3, "jam": 5, "oat": 7}
    while run.status == "paused":
        question, path, _ = pause_of(await store.load(run.run_id))
        asked.append(question)
        item = question.removeprefix("Price of ").removesuffix("?")
        assert path == [0, ["tea", "jam", "oat"].index(item), 0]
        run = await answer(store, pipeline, run, prices[item])
        assert len(asked) <= 3
    assert run.status == "completed"
    assert run.output == [3, 5, 7]
    assert sorted(asked) == sorted(f"Price of {item}?" for item in prices)


async def test_a_pause_in_a_conditional_branch(store: Store) -> None:
    calls = Calls()

    def choose(data: int, ctx: Any) -> str:
        calls.add("choose")
        return "review" if data > 10 else "auto"

    review = HumanInTheLoopStep("review", message_for_user="Big order: ok?", input_schema=Verdict)
    branches = {
        "review": review >> counted(calls, "apply", lambda v: v.approved),
        "auto": counted(calls, "auto", lambda x: True),
    }
    pipeline = (
        counted(calls, "start", lambda x: x * 10)
        >> ConditionalStep("route", choose, branches)
        >> counted(calls, "end")
    )
    paused = await store.run(pipeline, 2)
    assert pause_of(await store.load(paused.run_id)) == (
        "Big order: ok?",
        [1, "review", 0],
        "review",
    )
    done = await answer(store, pipeline, paused, {"approved": False})
    assert done.status == "completed"
    assert done.output is False
    assert [calls.count(n) for n in ("start", "choose", "apply", "auto", "end")] == [1, 1, 1, 0, 1]


async def test_a_pause_in_a_parallel_branch(store: Store) -> None:
    calls = Calls()

    async def fast(x: int, *, context: Ctx) -> int:
        calls.add("fast")
        return x + 1

    async def prep(x: int, *, context: Ctx) -> int:
        calls.add("prep")
        # Pause only after the sibling branch was checkpointed, so the test knows it finished.
        await wait_for_records(store, context.run_id, (1, "fast_branch"))
        context.drafts.append("from the slow branch")
        return x * 10

    ask = HumanInTheLoopStep("ask", message_for_user=lambda d, c: f"Accept {d}?", input_schema=int)
    parallel = ParallelStep(
        "both",
        {
            "fast_branch": Step.from_callable(fast, name="fast"),
            "slow_branch": Step.from_callable(prep, name="prep") >> ask >> counted(calls, "post"),
        },
    )
    pipeline = counted(calls, "start") >> parallel >> counted(calls, "end")
    paused = await store.run(pipeline, 4, context_model=Ctx)
    assert paused.status == "paused"
    assert pause_of(await store.load(paused.run_id)) == (
        "Accept 40?",
        [1, "slow_branch", 1],
        "ask",
    )
    done = await answer(store, pipeline, paused, 41, context_model=Ctx)
    assert done.status == "completed"
    assert done.output == {"fast_branch": 5, "slow_branch": 41}
    # The finished branch does not run again; the paused one runs again from its start (its
    # steps before the HITL step run twice in all), and takes the recorded answer.
    assert calls.count("fast") == 1
    assert calls.count("prep") == 2
    assert calls.count("post") == 1
    assert [calls.count(n) for n in ("start", "end")] == [1, 1]
    # The re-run branch's context changes are merged once (it worked on a fresh copy).
    assert done.final_pipeline_context.drafts == ["from the slow branch"]


class SlowAckBackend(InMemoryBackend):
    """Commits each checkpoint, then takes a moment to say so (a network store's reply on its
    way back): a task cancelled in that moment has written without knowing it."""

    writes_may_suspend = True  # it awaits inside its writes, as a network store does

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        version = await super().write_checkpoint(checkpoint)
        await asyncio.sleep(0.01)
        return version


async def test_a_pause_while_a_sibling_branch_is_being_checkpointed_still_pauses() -> None:
    """Branch B pauses while branch A's finished-branch checkpoint is being written. The pause
    must be stored (status paused, with its question), not turned into a StateConflictError
    against the run's own sibling write."""
    calls = Calls()
    finished = asyncio.Event()

    async def quick(x: int) -> int:
        calls.add("quick")
        finished.set()  # B pauses as soon as A's step is done and its checkpoint under way
        return x + 1

    async def wait_for_a(x: int) -> int:
        await finished.wait()
        return x

    ask = HumanInTheLoopStep("ask", message_for_user="Go on?", input_schema=int)
    parallel = ParallelStep(
        "both",
        {
            "A": Step.from_callable(quick, name="quick"),
            "B": Step.from_callable(wait_for_a, name="wait_for_a") >> ask,
        },
    )
    backend = SlowAckBackend()
    async with Flujo(parallel, state_backend=backend) as runner:
        paused = await runner.run_async(1)
        assert paused.status == "paused"
        state = await backend.load_state(paused.run_id)
        assert state is not None
        assert pause_of(state) == ("Go on?", [0, "B", 1], "ask")
        done = await runner.resume_async(paused, 7)
    assert done.output == {"A": 2, "B": 7}
    assert calls.count("quick") == 1


async def test_a_pause_in_a_state_machine_state(store: Store) -> None:
    calls = Calls()

    async def draft(topic: str, *, context: Ctx) -> Transition:
        calls.add("draft")
        context.drafts.append(f"about {topic}")
        return Transition("HumanReview", context.drafts[-1])

    async def decide(choice: str, *, context: Ctx) -> Transition:
        calls.add(("decide", choice))
        return Transition("Approve" if choice == "approve" else "Edit", context.drafts[-1])

    async def edit(text: str, *, context: Ctx) -> Transition:
        calls.add("edit")
        context.drafts.append(text + " (edited)")
        return Transition("HumanReview", context.drafts[-1])

    async def publish(text: str) -> str:
        calls.add("publish")
        return f"published: {text}"

    review = HumanInTheLoopStep(
        "review",
        message_for_user=lambda d, c: f"Review {d!r}",
        input_schema=Literal["approve", "edit"],
    )
    machine = StateMachineStep(
        "editorial",
        states={
            "Draft": Step.from_callable(draft, name="draft"),
            "HumanReview": review >> Step.from_callable(decide, name="decide"),
            "Edit": Step.from_callable(edit, name="edit"),
            "Approve": Step.from_callable(publish, name="publish"),
        },
        start_state="Draft",
        end_states=["Approve"],
    )
    pipeline = counted(calls, "start") >> machine
    run = await store.run(pipeline, "cats", context_model=Ctx)
    assert pause_of(await store.load(run.run_id)) == (
        "Review 'about cats'",
        [1, 1, "HumanReview", 0],
        "review",
    )
    run = await answer(store, pipeline, run, "edit", context_model=Ctx)
    assert run.status == "paused"
    assert pause_of(await store.load(run.run_id)) == (
        "Review 'about cats (edited)'",
        [1, 3, "HumanReview", 0],
        "review",
    )
    run = await answer(store, pipeline, run, "approve", context_model=Ctx)
    assert run.status == "completed"
    assert run.output == "published: about cats (edited)"
    assert [calls.count(n) for n in ("start", "draft", "edit", "publish")] == [1, 1, 1, 1]
    assert calls.count(("decide", "edit")) == 1
    assert calls.count(("decide", "approve")) == 1
    assert run.final_pipeline_context.drafts == ["about cats", "about cats (edited)"]


async def test_a_pause_nested_two_deep_loop_inside_map(store: Store) -> None:
    calls = Calls()

    async def revise(data: Any) -> str:
        text = data if isinstance(data, str) else data.note
        calls.add(("revise", text))
        return text + "+"

    review = HumanInTheLoopStep(
        "review", message_for_user=lambda d, c: f"ok {d}?", input_schema=Verdict
    )
    rounds = LoopStep(
        "rounds",
        Step.from_callable(revise, name="revise") >> review,
        lambda out, ctx: out.approved,
        max_loops=5,
        iteration_input_mapper=lambda out, ctx, i: out.note,
        loop_output_mapper=lambda out, ctx: out.note,
    )
    pipeline = counted(calls, "start") >> MapStep("docs", rounds) >> counted(calls, "end")
    run = await store.run(pipeline, ["a", "b"])
    script = [
        ("ok a+?", [1, 0, 0, 0, 1], {"approved": False, "note": "a2"}),
        ("ok a2+?", [1, 0, 0, 1, 1], {"approved": True, "note": "A"}),
        ("ok b+?", [1, 1, 0, 0, 1], {"approved": True, "note": "B"}),
    ]
    for question, path, verdict in script:
        assert run.status == "paused"
        assert pause_of(await store.load(run.run_id))[:2] == (question, path)
        run = await answer(store, pipeline, run, verdict)
    assert run.status == "completed"
    assert run.output == ["A", "B"]
    for text in ("a", "a2", "b"):
        assert calls.count(("revise", text)) == 1
    assert [calls.count(n) for n in ("start", "end")] == [1, 1]


async def test_a_wrong_answer_to_a_nested_pause_changes_nothing(store: Store) -> None:
    calls = Calls()
    pipeline = loop_asking_in_iteration_3(calls)
    paused = await store.run(pipeline, 0, context_model=Ctx)
    before = await store.load(paused.run_id)
    with pytest.raises(HumanInputError):
        await answer(store, pipeline, paused, "not a number", context_model=Ctx)
    assert await store.load(paused.run_id) == before
    done = await answer(store, pipeline, paused, 100, context_model=Ctx)
    assert done.output == 101
    with pytest.raises(StateConflictError):
        await answer(store, pipeline, paused, 100, context_model=Ctx)
    assert calls.count(("work", 4)) == 1


# -- TaskClient ------------------------------------------------------------------------------------


def approval_registry(calls: Calls) -> PipelineRegistry:
    """ "approval" 1.0.0 (prep >> ask >> finish) with Ctx, and a 2.0.0 with other steps."""
    registry = PipelineRegistry()
    registry.register(approval(calls), "approval", "1.0.0", context_model=Ctx)
    registry.register(
        counted(calls, "v2") >> HumanInTheLoopStep("other", message_for_user="?"),
        "approval",
        "2.0.0",
        context_model=Ctx,
    )
    return registry


async def start_approval(store: Store, registry: PipelineRegistry, data: Any, **kw: Any) -> str:
    async with Flujo(
        registry=registry,
        pipeline_name="approval",
        pipeline_version="1.0.0",
        context_model=Ctx,
        state_backend=store.backend(),
    ) as runner:
        result = await runner.run_async(data, **kw)
    assert result.status == "paused"
    return result.run_id


async def test_list_tasks_shows_each_pending_question(store: Store) -> None:
    calls = Calls()
    ask = HumanInTheLoopStep("ask", message_for_user=lambda d, c: f"Approve order {d}?")
    pipeline = counted(calls, "prep") >> ask
    paused = [(await store.run(pipeline, n)).run_id for n in (1, 2, 3)]
    nested = await store.run(loop_asking_in_iteration_3(Calls()), 0, context_model=Ctx)
    completed = await store.run(counted(calls, "plain"), 1)
    async with TaskClient(store.backend()) as client:
        tasks = await client.list_tasks(status="paused")
        everything = await client.list_tasks()
    by_id = {task.run_id: task for task in tasks}
    assert set(by_id) == {*paused, nested.run_id}
    for run_id, n in zip(paused, (1, 2, 3), strict=True):
        assert by_id[run_id].question == f"Approve order {n}?"
        assert by_id[run_id].status == "paused"
        assert by_id[run_id].error is not None
        assert by_id[run_id].error["path"] == [1]
    assert by_id[nested.run_id].question == "Iteration 3: keep 4?"
    [done] = [task for task in everything if task.run_id == completed.run_id]
    assert done.question is None


async def test_resume_task_finds_the_pipeline_by_recorded_name_and_version(store: Store) -> None:
    calls = Calls()
    registry = approval_registry(calls)
    run_id = await start_approval(
        store, registry, 1, initial_context_data={"customer": "cy", "drafts": ["d0"]}
    )
    async with TaskClient(store.backend(), registry=registry) as client:
        [task] = await client.list_tasks(status="paused")
        assert task.question == "Publish it?"
        assert (task.pipeline_name, task.pipeline_version) == ("approval", "1.0.0")
        done = await client.resume_task(run_id, {"approved": True, "note": "go"})
    assert done.status == "completed"
    assert done.output == {"got": {"approved": True, "note": "go"}}
    context = done.final_pipeline_context
    assert isinstance(context, Ctx)  # the context model registered with that version
    assert (context.customer, context.drafts) == ("cy", ["d0"])
    assert calls.count("finish") == 1
    assert calls.count("v2") == 0


async def test_a_second_resume_task_of_the_same_pause_is_a_conflict(store: Store) -> None:
    calls = Calls()
    registry = approval_registry(calls)
    run_id = await start_approval(store, registry, 1)
    async with TaskClient(store.backend(), registry=registry) as client:
        done = await client.resume_task(run_id, {"approved": True, "note": "first"})
        assert done.status == "completed"
    after = await store.load(run_id)
    async with TaskClient(store.backend(), registry=registry) as client:
        assert await client.list_tasks(status="paused") == []
        with pytest.raises(StateConflictError):
            await client.resume_task(run_id, {"approved": False, "note": "second"})
    assert await store.load(run_id) == after
    assert calls.count("finish") == 1


async def test_two_resume_tasks_at_once_one_wins(store: Store) -> None:
    calls = Calls()
    registry = approval_registry(calls)
    run_id = await start_approval(store, registry, 1)

    # Both clients read the paused run (resume_task, then resume_async) before either commits.
    first, second = LoadGate(rounds=2).backends(store)

    async def resume(backend: Any, note: str) -> PipelineResult[Any, Any]:
        async with TaskClient(backend, registry=registry) as client:
            return await client.resume_task(run_id, {"approved": True, "note": note})

    outcomes = await asyncio.gather(resume(first, "a"), resume(second, "b"), return_exceptions=True)
    assert sorted(type(o).__name__ for o in outcomes) == ["PipelineResult", "StateConflictError"]
    assert calls.count("finish") == 1


async def test_resume_task_refuses_a_wrong_answer_and_keeps_the_pause(store: Store) -> None:
    calls = Calls()
    registry = approval_registry(calls)
    run_id = await start_approval(store, registry, 1)
    before = await store.load(run_id)
    async with TaskClient(store.backend(), registry=registry) as client:
        with pytest.raises(HumanInputError):
            await client.resume_task(run_id, {"approved": "perhaps"})
        with pytest.raises(HumanInputError):
            await client.resume_task(run_id)  # no answer at all: None is not a Verdict
        [task] = await client.list_tasks(status="paused")
        assert task.question == "Publish it?"
        with pytest.raises(RunNotFoundError):
            await client.resume_task("no-such-run", {"approved": True})
    assert await store.load(run_id) == before
    assert calls.count("finish") == 0


async def test_resume_task_answers_a_nested_pause(store: Store) -> None:
    calls = Calls()
    registry = PipelineRegistry()
    registry.register(loop_asking_in_iteration_3(calls), "loopy", "1.0.0", context_model=Ctx)
    async with Flujo(
        registry=registry, pipeline_name="loopy", context_model=Ctx, state_backend=store.backend()
    ) as runner:
        paused = await runner.run_async(0)
    async with TaskClient(store.backend(), registry=registry) as client:
        done = await client.resume_task(paused.run_id, 100)
    assert done.status == "completed"
    assert done.output == 101
    assert [calls.count(("work", i)) for i in range(5)] == [1, 1, 1, 1, 1]


# -- flujo resume --input --------------------------------------------------------------------------

FLOWS = """
from pathlib import Path

from pydantic import BaseModel

from flujo import Flujo, HumanInTheLoopStep, PipelineRegistry, step


class Verdict(BaseModel):
    approved: bool
    note: str = ""


def _log(name: str) -> None:
    with Path("calls.log").open("a") as handle:
        handle.write(name + "\\n")


@step
async def prep(x: int) -> int:
    _log("prep")
    return x + 1


@step
async def finish(v: Verdict) -> str:
    _log("finish")
    return f"{v.approved}/{v.note}"


ask = HumanInTheLoopStep(
    "ask", message_for_user=lambda d, c: f"Publish draft {d}?", input_schema=Verdict
)
pipeline = prep >> ask >> finish
registry = PipelineRegistry()
registry.register(pipeline, "approval", "1.0.0")
runner = Flujo(registry=registry, pipeline_name="approval")
"""


@pytest.fixture
def workdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """tmp_path as the working directory with its own SQLite store (as in test_cli.py)."""
    monkeypatch.chdir(tmp_path)
    for variable in ("FLUJO_APP", "FLUJO_CONFIG_PATH", "COLUMNS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("FLUJO_STATE_URI", f"sqlite:///{tmp_path / 'runs.db'}")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the cwd on sys.path
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("hitl_flows_"):
            del sys.modules[name]


def write_flows(directory: Path) -> str:
    name = f"hitl_flows_{uuid.uuid4().hex[:10]}"
    (directory / f"{name}.py").write_text(FLOWS)
    return name


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.app, list(args))


def run_id_of(result: Result) -> str:
    for line in result.stdout.splitlines():
        if line.startswith("Run "):
            return line.split()[1]
    raise AssertionError(f"no run id in {result.stdout!r}")


def logged(directory: Path) -> list[str]:
    path = directory / "calls.log"
    return path.read_text().split() if path.exists() else []


def stored(directory: Path, run_id: str) -> dict[str, Any]:
    async def load() -> dict[str, Any] | None:
        async with SQLiteBackend(directory / "runs.db") as backend:
            return await backend.load_state(run_id)

    state = asyncio.run(load())
    assert state is not None
    return state


@pytest.mark.parametrize("app", ["registry", "pipeline"])
def test_flujo_resume_with_input_answers_a_paused_run(workdir: Path, app: str) -> None:
    module = write_flows(workdir)
    target = f"{module}:runner" if app == "registry" else f"{module}:pipeline"
    started = invoke("run", target, "--input", "4")
    assert started.exit_code == 0, (started.stdout, started.stderr)
    assert "paused" in started.stdout
    assert "Publish draft 5?" in started.stdout
    run_id = run_id_of(started)
    before = stored(workdir, run_id)

    shown = invoke("resume", run_id, "--app", f"{module}:{app}")
    assert shown.exit_code == 0, (shown.stdout, shown.stderr)
    assert "Publish draft 5?" in shown.stdout
    assert "--input" in shown.stdout
    assert stored(workdir, run_id) == before  # answers nothing
    assert logged(workdir) == ["prep"]

    wrong = invoke("resume", run_id, "--app", f"{module}:{app}", "--input", '{"note": "x"}')
    assert wrong.exit_code == cli.EXIT_USAGE, (wrong.stdout, wrong.stderr)
    assert "stays paused" in wrong.stderr
    assert stored(workdir, run_id) == before

    answered = invoke(
        "resume", run_id, "--app", f"{module}:{app}", "--input", '{"approved": true, "note": "ok"}'
    )
    assert answered.exit_code == 0, (answered.stdout, answered.stderr)
    assert json.loads(answered.stdout.split("Output:\n", 1)[1]) == "True/ok"
    assert stored(workdir, run_id)["status"] == "completed"
    assert logged(workdir) == ["prep", "finish"]


@pytest.mark.parametrize("app", ["registry", "pipeline"])
def test_flujo_resume_answering_an_answered_pause_is_a_conflict(workdir: Path, app: str) -> None:
    module = write_flows(workdir)
    target = f"{module}:runner" if app == "registry" else f"{module}:pipeline"
    run_id = run_id_of(invoke("run", target, "--input", "4"))
    first = invoke("resume", run_id, "--app", f"{module}:{app}", "--input", '{"approved": true}')
    assert first.exit_code == 0, (first.stdout, first.stderr)
    after = stored(workdir, run_id)
    twice = invoke("resume", run_id, "--app", f"{module}:{app}", "--input", '{"approved": false}')
    assert logged(workdir) == ["prep", "finish"]
    assert stored(workdir, run_id) == after
    # The second answer is not taken: say so (as resume_async and resume_task do), rather than
    # exit 0 with the stored result as if it had been.
    assert twice.exit_code == cli.EXIT_CONFLICT, (twice.exit_code, twice.stdout, twice.stderr)
