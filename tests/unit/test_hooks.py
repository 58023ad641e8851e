"""Hooks: pre_run, post_step, on_step_failure, post_run; sync and async; failures in hooks."""

import logging
from typing import Any

import pytest

from flujo import (
    Flujo,
    HookEvent,
    PipelineAbortSignal,
    PipelineContext,
    PipelineResult,
    PostRun,
    PostStep,
    PreRun,
    StepFailure,
    StepResult,
    step,
)
from flujo.state import InMemoryBackend


@step
async def inc(x: int) -> int:
    return x + 1


@step
async def explode(x: int) -> int:
    raise ValueError("kaboom")


class Recorder:
    def __init__(self) -> None:
        self.events: list[HookEvent] = []

    def __call__(self, event: HookEvent) -> None:
        self.events.append(event)

    @property
    def names(self) -> list[str]:
        return [e.event_name for e in self.events]


async def test_events_of_a_successful_run() -> None:
    rec = Recorder()
    result = await Flujo(inc >> inc, hooks=[rec], persist_state=False).run_async(1, run_id="h1")
    assert rec.names == ["pre_run", "post_step", "post_step", "post_run"]
    pre, s1, s2, post = rec.events
    assert isinstance(pre, PreRun)
    assert (pre.run_id, pre.initial_input, pre.resumed) == ("h1", 1, False)
    assert pre.context is result.final_pipeline_context
    assert isinstance(s1, PostStep)
    assert isinstance(s2, PostStep)
    assert (s1.step_result.name, s1.step_result.output, s1.step_result.index) == ("inc", 2, 0)
    assert (s2.step_result.output, s2.step_result.index) == (3, 1)
    assert s1.run_id == "h1"
    assert isinstance(post, PostRun)
    assert post.result is result
    assert post.run_id == "h1"


async def test_sync_and_async_hooks_are_both_called() -> None:
    sync_seen: list[str] = []
    async_seen: list[str] = []

    def sync_hook(event: HookEvent) -> None:
        sync_seen.append(event.event_name)

    async def async_hook(event: HookEvent) -> None:
        async_seen.append(event.event_name)

    await Flujo(inc, hooks=[sync_hook, async_hook], persist_state=False).run_async(1)
    assert sync_seen == async_seen == ["pre_run", "post_step", "post_run"]


async def test_post_step_runs_after_the_checkpoint_committed() -> None:
    backend = InMemoryBackend()
    observed: list[tuple[int, list[str], str]] = []

    async def check_store(event: HookEvent) -> None:
        if isinstance(event, PostStep):
            state = await backend.load_state(event.run_id)
            assert state is not None
            observed.append(
                (
                    state["current_step_index"],
                    [r["name"] for r in state["step_history"]],
                    state["status"],
                )
            )

    @step
    async def named(x: int) -> int:
        return x

    await Flujo(inc >> named >> inc, hooks=[check_store], state_backend=backend).run_async(
        1, run_id="hooked"
    )
    assert observed == [
        (1, ["inc"], "running"),
        (2, ["inc", "named"], "running"),
        (3, ["inc", "named", "inc"], "completed"),
    ]


async def test_on_step_failure_and_post_run_of_a_failed_run() -> None:
    rec = Recorder()
    result = await Flujo(inc >> explode >> inc, hooks=[rec], persist_state=False).run_async(1)
    assert rec.names == ["pre_run", "post_step", "on_step_failure", "post_run"]
    failure = rec.events[2]
    assert isinstance(failure, StepFailure)
    assert failure.step_result.name == "explode"
    assert failure.step_result.success is False
    assert failure.step_result.error is not None
    assert failure.step_result.error.type == "ValueError"
    post = rec.events[3]
    assert isinstance(post, PostRun)
    assert post.result.status == "failed"
    assert result.status == "failed"


async def test_on_step_failure_runs_once_after_retries() -> None:
    rec = Recorder()

    @step(retries=2, backoff_s=0)
    async def always(x: int) -> int:
        raise RuntimeError("no")

    await Flujo(always, hooks=[rec], persist_state=False).run_async(1)
    assert rec.names.count("on_step_failure") == 1
    failure = rec.events[rec.names.index("on_step_failure")]
    assert isinstance(failure, StepFailure)
    assert failure.step_result.attempts == 3


async def test_failing_hook_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()

    def broken(event: HookEvent) -> None:
        raise RuntimeError(f"hook broke on {event.event_name}")

    async def broken_async(event: HookEvent) -> None:
        raise KeyError("async hook broke")

    with caplog.at_level(logging.DEBUG):
        result = await Flujo(
            inc >> inc, hooks=[broken, broken_async, rec], persist_state=False
        ).run_async(1)
    assert result.status == "completed"
    assert result.output == 3
    # Hooks after the broken ones still run, for every event.
    assert rec.names == ["pre_run", "post_step", "post_step", "post_run"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 8
    assert all(r.exc_info is not None for r in errors)
    assert {type(r.exc_info[1]) for r in errors if r.exc_info} == {RuntimeError, KeyError}
    assert any("hook broke on post_step" in str(r.exc_info[1]) for r in errors if r.exc_info)


async def test_abort_signal_from_post_step_hook_cancels_the_run() -> None:
    backend = InMemoryBackend()
    ran: list[int] = []

    @step
    async def track(x: int) -> int:
        ran.append(x)
        return x + 1

    def stop_after_first(event: HookEvent) -> None:
        if isinstance(event, PostStep) and event.step_result.index == 0:
            raise PipelineAbortSignal("enough")

    rec = Recorder()
    result = await Flujo(
        track >> track >> track, hooks=[stop_after_first, rec], state_backend=backend
    ).run_async(1, run_id="abort")
    assert ran == [1]
    assert result.status == "cancelled"
    assert result.success is False
    assert result.error is not None
    assert result.error.type == "PipelineAbortSignal"
    assert result.error.message == "enough"
    assert rec.names[-1] == "post_run"
    state = await backend.load_state("abort")
    assert state is not None
    assert state["status"] == "cancelled"
    assert state["current_step_index"] == 1
    assert state["error"]["type"] == "PipelineAbortSignal"


async def test_abort_signal_from_pre_run_hook_runs_nothing() -> None:
    backend = InMemoryBackend()
    ran: list[int] = []

    @step
    async def track(x: int) -> int:
        ran.append(x)
        return x

    def veto(event: HookEvent) -> None:
        if isinstance(event, PreRun):
            raise PipelineAbortSignal("vetoed")

    result = await Flujo(track, hooks=[veto], state_backend=backend).run_async(1, run_id="veto")
    assert ran == []
    assert result.status == "cancelled"
    state = await backend.load_state("veto")
    assert state is not None
    assert state["status"] == "cancelled"
    assert state["current_step_index"] == 0


async def test_abort_signal_after_the_last_step_agrees_with_the_store() -> None:
    backend = InMemoryBackend()

    def late_abort(event: HookEvent) -> None:
        if isinstance(event, PostStep):
            raise PipelineAbortSignal("too late")

    result = await Flujo(inc, hooks=[late_abort], state_backend=backend).run_async(1, run_id="late")
    state = await backend.load_state("late")
    assert state is not None
    assert result.status == state["status"]


async def test_abort_signal_from_failure_and_post_run_hooks_does_not_escape() -> None:
    def abort_everything(event: HookEvent) -> None:
        if isinstance(event, (StepFailure, PostRun)):
            raise PipelineAbortSignal("ignored")

    result = await Flujo(explode, hooks=[abort_everything], persist_state=False).run_async(1)
    assert result.status == "failed"


async def test_pre_run_is_marked_resumed_on_resume() -> None:
    backend = InMemoryBackend()
    broken = {"on": True}

    @step
    async def flaky(x: int) -> int:
        if broken["on"]:
            raise RuntimeError("down")
        return x

    first = Recorder()
    await Flujo(inc >> flaky, hooks=[first], state_backend=backend).run_async(1, run_id="re")
    broken["on"] = False
    second = Recorder()
    await Flujo(inc >> flaky, hooks=[second], state_backend=backend).run_async(1, run_id="re")
    pre_first, pre_second = first.events[0], second.events[0]
    assert isinstance(pre_first, PreRun)
    assert isinstance(pre_second, PreRun)
    assert (pre_first.resumed, pre_second.resumed) == (False, True)
    assert second.names == ["pre_run", "post_step", "post_run"]


async def test_hook_sees_the_live_context() -> None:
    class Ctx(PipelineContext):
        n: int = 0

    @step
    async def bump(x: int, *, context: Ctx) -> int:
        context.n += 1
        return x

    seen: list[int] = []

    def hook(event: HookEvent) -> None:
        if isinstance(event, PostStep):
            seen.append(event.context.n)  # type: ignore[attr-defined]

    await Flujo(bump >> bump, context_model=Ctx, hooks=[hook], persist_state=False).run_async(0)
    assert seen == [1, 2]


def test_post_run_result_types() -> None:
    results: list[Any] = []

    def hook(event: HookEvent) -> None:
        if isinstance(event, PostRun):
            results.append(event.result)
        if isinstance(event, PostStep):
            results.append(event.step_result)

    Flujo(inc, hooks=[hook], persist_state=False).run(1)
    assert [type(r) for r in results] == [StepResult, PipelineResult]
