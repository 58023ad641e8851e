"""GranularStep (issue 5): an agent loop checkpointed turn by turn.

A scripted fake agent answers turn ``t`` (the number of assistant messages in the transcript it
is given) with ``script[t]`` and keeps every transcript it saw; counting tools log each call
with its idempotency key. A "crash" is a :class:`Crash` (a ``BaseException`` that escapes
``run_async``, standing in for the process dying) raised by the agent, by a tool, or by the
store right after it wrote a chosen record; the run is then resumed by a fresh ``Flujo`` on the
same store and run id, and the counts say what ran twice.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from flujo import (
    AgentTurn,
    Flujo,
    GranularStep,
    LoopStep,
    MapStep,
    PipelineContext,
    PipelineResult,
    Step,
    ToolCall,
)
from flujo.exceptions import ConfigurationError, StateConflictError
from flujo.state import InMemoryBackend, SQLiteBackend, StateBackend
from flujo.state.backends.base import Checkpoint, RunHeader, now

from .steplib_helpers import Crash

RUN = "run-1"

# -- the fake agent and the counting tools ---------------------------------------------------------


def turn_number(transcript: Sequence[dict[str, Any]]) -> int:
    """Which turn a transcript asks for: one per assistant message already in it."""
    return sum(1 for message in transcript if message["role"] == "assistant")


class ScriptedAgent:
    """Answers turn ``t`` with ``script[t]``; may crash (once) while asked a given turn."""

    def __init__(self, script: Sequence[AgentTurn], *, crash_on_turn: int | None = None) -> None:
        self.script = list(script)
        self.transcripts: list[list[dict[str, Any]]] = []
        self.asked: Counter[int] = Counter()
        self.crash_on_turn = crash_on_turn
        self.fail_on_turn: int | None = None  # raise a plain exception (once) on this turn

    def answer(self, transcript: list[dict[str, Any]]) -> AgentTurn:
        turn = turn_number(transcript)
        self.asked[turn] += 1
        self.transcripts.append(copy.deepcopy(transcript))
        if turn == self.crash_on_turn:
            self.crash_on_turn = None
            raise Crash(f"died while the model was taking turn {turn}")
        if turn == self.fail_on_turn:
            self.fail_on_turn = None
            raise RuntimeError(f"model API error in turn {turn}")
        return self.script[min(turn, len(self.script) - 1)]

    async def turn(self, transcript: list[dict[str, Any]]) -> AgentTurn:
        await asyncio.sleep(0)
        return self.answer(transcript)


class ContextAgent(ScriptedAgent):
    """Declares ``context``: counts its turns in the context's scratchpad."""

    def __init__(self, script: Sequence[AgentTurn]) -> None:
        super().__init__(script)
        self.contexts: list[Any] = []

    async def turn(self, transcript: list[dict[str, Any]], context: PipelineContext) -> AgentTurn:
        self.contexts.append(context)
        context.scratchpad["turns"] = context.scratchpad.get("turns", 0) + 1
        return self.answer(transcript)


class ToolBox:
    """Counting tools: every call is logged as (tool, args, idempotency key or None)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[tuple[str, Any, str | None]] = []
        self.threads: dict[str, int] = {}

    def _log(self, name: str, args: Any, key: str | None) -> None:
        with self._lock:
            self.calls.append((name, args, key))
            self.threads[name] = threading.get_ident()

    def lookup(self, query: str, idempotency_key: str) -> str:
        """Sync, takes the key."""
        self._log("lookup", query, idempotency_key)
        return f"found {query}"

    async def add(self, a: int, b: int) -> int:
        """Async, takes no key."""
        self._log("add", (a, b), None)
        return a + b

    def note(self, **kwargs: Any) -> list[str]:
        """Sync, takes anything (the key included)."""
        self._log("note", dict(kwargs), kwargs.get("idempotency_key"))
        return sorted(kwargs)

    async def fail(self, why: str) -> None:
        self._log("fail", why, None)
        raise ValueError(why)

    def tools(self) -> dict[str, Any]:
        return {"lookup": self.lookup, "add": self.add, "note": self.note, "fail": self.fail}


def final(output: Any) -> AgentTurn:
    return AgentTurn(output)


def calls(*items: tuple[str, dict[str, Any]], text: Any = None) -> AgentTurn:
    return AgentTurn(text, tuple(ToolCall(name, args) for name, args in items))


async def run(
    step: Any,
    data: Any = "question",
    *,
    backend: StateBackend | None = None,
    run_id: str = RUN,
    **options: Any,
) -> PipelineResult[Any, Any]:
    async with Flujo(step, state_backend=backend or InMemoryBackend(), **options) as runner:
        return await runner.run_async(data, run_id=run_id)


# -- the loop --------------------------------------------------------------------------------------


async def test_a_final_answer_on_turn_zero_is_the_output() -> None:
    agent = ScriptedAgent([final({"answer": 42})])
    box = ToolBox()
    result = await run(GranularStep("g", agent, tools=box.tools()))
    assert result.status == "completed"
    assert result.output == {"answer": 42}
    assert agent.asked == {0: 1}
    assert agent.transcripts == [[{"role": "user", "content": "question"}]]
    assert box.calls == []
    # No tool was called: no turn in the history.
    assert result.step_history[0].step_history == []


async def test_tool_turns_then_a_final_answer() -> None:
    box = ToolBox()
    agent = ScriptedAgent(
        [
            calls(("lookup", {"query": "x"}), ("add", {"a": 1, "b": 2}), text="let me look"),
            calls(("note", {"topic": "y"})),
            final("done"),
        ]
    )
    result = await run(GranularStep("g", agent, tools=box.tools()))
    assert result.status == "completed", result.error
    assert result.output == "done"
    assert agent.asked == {0: 1, 1: 1, 2: 1}
    assert [(name, args) for name, args, _ in box.calls] == [
        ("lookup", "x"),
        ("add", (1, 2)),
        ("note", {"topic": "y", "idempotency_key": f"{RUN}:0:1:0"}),
    ]
    # Each turn sees the whole transcript so far.
    user = {"role": "user", "content": "question"}
    assistant0 = {
        "role": "assistant",
        "content": "let me look",
        "tool_calls": [
            {"name": "lookup", "args": {"query": "x"}},
            {"name": "add", "args": {"a": 1, "b": 2}},
        ],
    }
    observations0 = [
        {
            "role": "tool",
            "name": "lookup",
            "idempotency_key": f"{RUN}:0:0:0",
            "content": "found x",
        },
        {"role": "tool", "name": "add", "idempotency_key": f"{RUN}:0:0:1", "content": 3},
    ]
    assistant1 = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"name": "note", "args": {"topic": "y"}}],
    }
    observations1 = [
        {
            "role": "tool",
            "name": "note",
            "idempotency_key": f"{RUN}:0:1:0",
            "content": ["idempotency_key", "topic"],
        }
    ]
    assert agent.transcripts == [
        [user],
        [user, assistant0, *observations0],
        [user, assistant0, *observations0, assistant1, *observations1],
    ]
    # The history shows one "turn t" child per turn that called tools, holding its observations.
    (granular,) = result.step_history
    assert [(c.name, c.path, c.output) for c in granular.step_history] == [
        ("turn 0", (0, 0), observations0),
        ("turn 1", (0, 1), observations1),
    ]


async def test_the_idempotency_key_goes_to_tools_that_accept_it() -> None:
    box = ToolBox()
    agent = ScriptedAgent(
        [
            calls(("lookup", {"query": "a"}), ("add", {"a": 1, "b": 1}), ("note", {})),
            final("ok"),
        ]
    )
    result = await run(GranularStep("g", agent, tools=box.tools()))
    assert result.status == "completed", result.error
    assert box.calls == [
        ("lookup", "a", f"{RUN}:0:0:0"),  # declares idempotency_key
        ("add", (1, 1), None),  # does not: called without it
        ("note", {"idempotency_key": f"{RUN}:0:0:2"}, f"{RUN}:0:0:2"),  # **kwargs
    ]
    # Even a tool that does not take the key has it in its observation.
    assert [o["idempotency_key"] for o in agent.transcripts[1][2:]] == [
        f"{RUN}:0:0:0",
        f"{RUN}:0:0:1",
        f"{RUN}:0:0:2",
    ]


async def test_sync_tools_run_in_a_worker_thread_and_async_tools_in_the_loop() -> None:
    box = ToolBox()
    agent = ScriptedAgent([calls(("lookup", {"query": "a"}), ("add", {"a": 1, "b": 1})), final(1)])
    loop_thread = threading.get_ident()
    result = await run(GranularStep("g", agent, tools=box.tools()))
    assert result.status == "completed", result.error
    assert box.threads["lookup"] != loop_thread
    assert box.threads["add"] == loop_thread


async def test_async_callable_objects_and_sync_tools_returning_awaitables() -> None:
    seen: list[str] = []

    class AsyncTool:
        async def __call__(self, x: int) -> int:
            seen.append("object")
            return x * 10

    async def later(x: int) -> int:
        seen.append("awaitable")
        return x + 1

    agent = ScriptedAgent([calls(("obj", {"x": 2}), ("lazy", {"x": 2})), final("ok")])

    def lazy(x: int) -> Any:  # a sync function that returns an awaitable
        return later(x)

    result = await run(GranularStep("g", agent, tools={"obj": AsyncTool(), "lazy": lazy}))
    assert result.status == "completed", result.error
    assert sorted(seen) == ["awaitable", "object"]
    assert [o["content"] for o in agent.transcripts[1][2:]] == [20, 3]


async def test_a_failing_tool_and_an_unknown_tool_become_error_observations() -> None:
    box = ToolBox()
    agent = ScriptedAgent(
        [calls(("fail", {"why": "disk full"}), ("missing", {"x": 1}), ("add", {"a": 2, "b": 2})),
         final("recovered")]
    )  # fmt: skip
    result = await run(GranularStep("g", agent, tools=box.tools()))
    assert result.status == "completed", result.error
    assert result.output == "recovered"
    failed, unknown, fine = agent.transcripts[1][2:]
    assert failed == {
        "role": "tool",
        "name": "fail",
        "idempotency_key": f"{RUN}:0:0:0",
        "error": "ValueError: disk full",
    }
    assert unknown["name"] == "missing"
    assert unknown["idempotency_key"] == f"{RUN}:0:0:1"
    assert "content" not in unknown
    assert "missing" in unknown["error"]
    assert fine["content"] == 4
    assert "error" not in fine


async def test_max_turns_fails_the_step_with_iteration_limit_error() -> None:
    box = ToolBox()
    agent = ScriptedAgent([calls(("add", {"a": 1, "b": 1}))])  # never answers
    result = await run(GranularStep("g", agent, tools=box.tools(), max_turns=3))
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "IterationLimitError"
    assert "max_turns=3" in result.error.message
    assert result.failed_step == "g"
    assert agent.asked == {0: 1, 1: 1, 2: 1}
    assert len(box.calls) == 3
    assert [c.name for c in result.step_history[0].step_history] == ["turn 0", "turn 1", "turn 2"]


async def test_a_turn_that_is_not_an_agent_turn_fails_the_step() -> None:
    class Chatty:
        async def turn(self, transcript: list[dict[str, Any]]) -> Any:
            return "a plain string"

    result = await run(GranularStep("g", Chatty()))
    assert result.status == "failed"
    assert result.error is not None
    assert result.error.type == "ConfigurationError"
    assert "AgentTurn" in result.error.message


def test_an_agent_without_turn_is_a_configuration_error() -> None:
    class RunOnly:
        async def run(self, data: Any) -> Any:
            return data

    with pytest.raises(ConfigurationError, match="turn"):
        GranularStep("g", RunOnly())
    with pytest.raises(ConfigurationError, match="turn"):
        Step.granular("g", object())


@pytest.mark.parametrize(
    "options",
    [{"max_turns": 0}, {"max_turns": True}, {"tools": {"x": 1}}, {"tools": ["x"]}],
)
def test_bad_options_are_configuration_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        GranularStep("g", ScriptedAgent([final(1)]), **options)


async def test_tools_default_to_the_agents_tools() -> None:
    box = ToolBox()
    agent = ScriptedAgent([calls(("add", {"a": 20, "b": 22})), final("ok")])
    agent.tools = box.tools()  # type: ignore[attr-defined]
    step = Step.granular("g", agent, max_turns=4, enforce_idempotency=True)
    assert isinstance(step, GranularStep)
    assert (step.max_turns, step.enforce_idempotency) == (4, True)
    assert set(step.tools) == {"lookup", "add", "note", "fail"}
    result = await run(step)
    assert result.status == "completed", result.error
    assert box.calls == [("add", (20, 22), None)]
    # Explicit tools win over the agent's.
    assert set(GranularStep("g", agent, tools={"only": box.add}).tools) == {"only"}


async def test_the_context_is_passed_to_turn_when_declared() -> None:
    box = ToolBox()
    agent = ContextAgent([calls(("add", {"a": 1, "b": 1})), final("ok")])
    backend = InMemoryBackend()
    result = await run(GranularStep("g", agent, tools=box.tools()), backend=backend)
    assert result.status == "completed", result.error
    assert len(agent.contexts) == 2
    assert all(c is result.final_pipeline_context for c in agent.contexts)
    assert result.final_pipeline_context is not None
    assert result.final_pipeline_context.scratchpad == {"turns": 2}
    state = await backend.load_state(RUN)
    assert state is not None
    assert state["pipeline_context"]["scratchpad"] == {"turns": 2}
    # An agent that does not declare it is called with the transcript only (the other tests).


async def test_keys_are_deterministic_and_name_the_run_the_path_the_turn_and_the_call() -> None:
    def script() -> list[AgentTurn]:
        return [
            calls(("lookup", {"query": "a"}), ("lookup", {"query": "b"})),
            calls(("lookup", {"query": "c"})),
            final("ok"),
        ]

    keys = []
    for _ in range(2):  # two separate runs with the same id (separate stores)
        box = ToolBox()
        result = await run(GranularStep("g", ScriptedAgent(script()), tools=box.tools()))
        assert result.status == "completed", result.error
        keys.append([key for _, _, key in box.calls])
    assert keys[0] == keys[1] == [f"{RUN}:0:0:0", f"{RUN}:0:0:1", f"{RUN}:0:1:0"]
    step = GranularStep("g", ScriptedAgent(script()))
    assert step.idempotency_key("r", (2, 7, 0), 3, 1) == "r:2.7.0:3:1"
    # Another run gets other keys.
    box = ToolBox()
    await run(GranularStep("g", ScriptedAgent(script()), tools=box.tools()), run_id="other")
    assert box.calls[0][2] == "other:0:0:0"


async def test_a_retried_granular_step_keeps_its_turns_and_keys() -> None:
    box = ToolBox()
    agent = ScriptedAgent(
        [calls(("lookup", {"query": "a"})), calls(("lookup", {"query": "b"})), final("ok")]
    )
    agent.fail_on_turn = 1  # the model API fails once in turn 1; the step retries
    step = GranularStep("g", agent, tools=box.tools(), retries=1, backoff_s=0)
    result = await run(step)
    assert result.status == "completed", result.error
    assert result.step_history[0].attempts == 2
    # Turn 0 (recorded) is neither asked nor run again; turn 1 is asked again.
    assert agent.asked == {0: 1, 1: 2, 2: 1}
    assert box.calls == [("lookup", "a", f"{RUN}:0:0:0"), ("lookup", "b", f"{RUN}:0:1:0")]


async def test_a_granular_step_after_another_step_has_its_index_in_the_path() -> None:
    box = ToolBox()
    agent = ScriptedAgent([calls(("lookup", {"query": "q"})), final("ok")])
    first = Step.from_callable(lambda x: x + "!", name="first")
    result = await run(first >> GranularStep("g", agent, tools=box.tools()), "hi")
    assert result.status == "completed", result.error
    assert agent.transcripts[0] == [{"role": "user", "content": "hi!"}]
    assert box.calls == [("lookup", "q", f"{RUN}:1:0:0")]
    assert [c.path for c in result.step_history[1].step_history] == [(1, 0)]


async def test_granular_inside_a_map() -> None:
    box = ToolBox()

    class PerItem(ScriptedAgent):
        async def turn(self, transcript: list[dict[str, Any]]) -> AgentTurn:
            item = transcript[0]["content"]
            if turn_number(transcript) == 0:
                return calls(("lookup", {"query": item}))
            return final(f"{item}: {transcript[-1]['content']}")

    step = MapStep("each", GranularStep("g", PerItem([]), tools=box.tools()))
    backend = InMemoryBackend()
    result = await run(step, ["a", "b", "c"], backend=backend)
    assert result.status == "completed", result.error
    assert result.output == ["a: found a", "b: found b", "c: found c"]
    assert box.calls == [
        ("lookup", "a", f"{RUN}:0.0.0:0:0"),
        ("lookup", "b", f"{RUN}:0.1.0:0:0"),
        ("lookup", "c", f"{RUN}:0.2.0:0:0"),
    ]
    (mapped,) = result.step_history
    grans = mapped.step_history
    assert [(g.name, g.path) for g in grans] == [("g", (0, i, 0)) for i in range(3)]
    assert [[(t.name, t.path) for t in g.step_history] for g in grans] == [
        [("turn 0", (0, i, 0, 0))] for i in range(3)
    ]
    state = await backend.load_state(RUN)
    assert state is not None
    turns = [tuple(r["path"]) for r in state["step_history"] if r.get("kind") == "turn"]
    assert turns == [(0, 0, 0, 0), (0, 1, 0, 0), (0, 2, 0, 0)]


async def test_granular_inside_a_loop() -> None:
    box = ToolBox()

    class Counting(ScriptedAgent):
        async def turn(self, transcript: list[dict[str, Any]]) -> AgentTurn:
            value = transcript[0]["content"]
            if turn_number(transcript) == 0:
                return calls(("add", {"a": value, "b": 1}), ("lookup", {"query": str(value)}))
            return final(transcript[-2]["content"])

    step = LoopStep(
        "loop",
        GranularStep("g", Counting([]), tools=box.tools()),
        exit_condition_callable=lambda out, ctx: out >= 3,
        max_loops=5,
    )
    result = await run(step, 0)
    assert result.status == "completed", result.error
    assert result.output == 3
    assert [key for name, _, key in box.calls if name == "lookup"] == [
        f"{RUN}:0.{k}.0:0:1" for k in range(3)
    ]
    loop = result.step_history[0]
    grans = [c for c in loop.step_history if c.name == "g"]
    assert [g.path for g in grans] == [(0, k, 0) for k in range(3)]
    assert all([t.name for t in g.step_history] == ["turn 0"] for g in grans)


# -- durability: crashes at every point, resumed in-process ---------------------------------------


class CrashAfterWrite:
    """A store that "dies" right after committing the record at ``(path, kind)`` (once)."""

    crash_after: tuple[tuple[Any, ...], str] | None = None

    async def write_checkpoint(self, checkpoint: Checkpoint) -> int:
        version: int = await super().write_checkpoint(checkpoint)  # type: ignore[misc]
        target = self.crash_after
        if target is not None:
            for raw in checkpoint.steps:
                record = orjson.loads(raw)
                if (tuple(record.get("path") or ()), record.get("kind", "step")) == target:
                    self.crash_after = None
                    raise Crash(f"died after committing {record}")
        return version


class CrashingMemory(CrashAfterWrite, InMemoryBackend):
    pass


class CrashingSQLite(CrashAfterWrite, SQLiteBackend):
    pass


class EffectTool:
    """A tool with a side effect per call, logged with its key; may die once at a given key,
    before or after its effect."""

    def __init__(self) -> None:
        self.effects: list[str] = []
        self.crash_at: tuple[str, str] | None = None  # (key, "before" | "after")

    async def __call__(self, item: str, idempotency_key: str) -> str:
        await asyncio.sleep(0)
        crash = self.crash_at
        if crash == (idempotency_key, "before"):
            self.crash_at = None
            raise Crash(f"died in tool call {idempotency_key} before its effect")
        self.effects.append(idempotency_key)
        if crash == (idempotency_key, "after"):
            self.crash_at = None
            raise Crash(f"died in tool call {idempotency_key} after its effect")
        return f"did {item}"


#: Turn 0 makes 3 tool calls, turn 1 makes 2, turn 2 answers.
CALLS_PER_TURN = (3, 2)
ALL_CALLS = [(t, c) for t, n in enumerate(CALLS_PER_TURN) for c in range(n)]


def durable_script() -> list[AgentTurn]:
    return [
        calls(*[("effect", {"item": f"t{t}c{c}"}) for c in range(n)], text=f"turn {t}")
        for t, n in enumerate(CALLS_PER_TURN)
    ] + [final("all done")]


def key(turn: int, call: int, path: str = "0") -> str:
    return f"{RUN}:{path}:{turn}:{call}"


@dataclass(frozen=True)
class Point:
    """Where the crash happens."""

    where: str  # "model", "after-model", "tool-before", "tool-after", "after-tool", "after-turn"
    turn: int
    call: int = 0

    def __str__(self) -> str:
        return f"{self.where}-t{self.turn}c{self.call}"


POINTS = (
    [Point("model", t) for t in range(3)]
    + [Point("after-model", t) for t in range(3)]
    + [Point(where, t, c) for where in ("tool-before", "tool-after") for t, c in ALL_CALLS]
    + [Point("after-tool", t, c) for t, c in ALL_CALLS]
    + [Point("after-turn", t) for t in range(2)]
)


def expected_counts(point: Point, enforce: bool) -> tuple[dict[int, int], dict[str, int]]:
    """How often each model turn is asked and each tool call's effect happens, in all."""
    asks = dict.fromkeys(range(3), 1)
    effects = {key(t, c): 1 for t, c in ALL_CALLS}
    if point.where == "model":
        asks[point.turn] = 2  # the turn that was being taken is asked again
    elif point.where in ("tool-before", "tool-after"):
        if not enforce:  # the calls of the unfinished turn that did their effect run again
            for c in range(point.call):
                effects[key(point.turn, c)] = 2
        if point.where == "tool-after":  # the call running at the crash runs again
            effects[key(point.turn, point.call)] = 2
    return asks, effects


async def crash_and_resume(
    point: Point, *, enforce: bool, backend: StateBackend, resume_backend: StateBackend
) -> tuple[ScriptedAgent, EffectTool, PipelineResult[Any, Any]]:
    tool = EffectTool()
    agent = ScriptedAgent(durable_script())
    if point.where == "model":
        agent.crash_on_turn = point.turn
    elif point.where == "tool-before":
        tool.crash_at = (key(point.turn, point.call), "before")
    elif point.where == "tool-after":
        tool.crash_at = (key(point.turn, point.call), "after")
    else:
        assert isinstance(backend, CrashAfterWrite)
        if point.where == "after-model":
            backend.crash_after = ((0, point.turn), "model")
        elif point.where == "after-tool":
            backend.crash_after = ((0, point.turn, point.call), "tool")
        else:
            backend.crash_after = ((0, point.turn), "turn")
    step = GranularStep("g", agent, tools={"effect": tool}, enforce_idempotency=enforce)
    runner = Flujo(step, state_backend=backend)
    with pytest.raises(Crash):
        await runner.run_async("go", run_id=RUN)
    # A fresh runner (a new process would have one) on the same store resumes the run.
    async with Flujo(step, state_backend=resume_backend) as resumed:
        result = await resumed.run_async("go", run_id=RUN)
    return agent, tool, result


async def reference_transcripts() -> list[list[dict[str, Any]]]:
    agent = ScriptedAgent(durable_script())
    result = await run(GranularStep("g", agent, tools={"effect": EffectTool()}), "go")
    assert result.status == "completed", result.error
    return agent.transcripts


def check_resumed(
    point: Point,
    enforce: bool,
    agent: ScriptedAgent,
    tool: EffectTool,
    result: PipelineResult[Any, Any],
    reference: list[list[dict[str, Any]]],
) -> None:
    assert result.status == "completed", result.error
    assert result.output == "all done"
    asks, effects = expected_counts(point, enforce)
    assert dict(agent.asked) == asks, f"model turns asked at {point}"
    assert dict(Counter(tool.effects)) == effects, f"tool effects at {point}"
    # Every call ran with its own deterministic key (the same one on both attempts).
    assert set(tool.effects) == {key(t, c) for t, c in ALL_CALLS}
    # Each turn the model took saw the transcript a crash-free run gives it.
    for transcript in agent.transcripts:
        assert transcript == reference[turn_number(transcript)], f"transcript at {point}"
    # The history shows the two tool turns, whatever was replayed.
    (granular,) = result.step_history
    assert [(c.name, c.path) for c in granular.step_history] == [
        ("turn 0", (0, 0)),
        ("turn 1", (0, 1)),
    ]
    assert [o["content"] for o in granular.step_history[0].output] == [
        "did t0c0",
        "did t0c1",
        "did t0c2",
    ]


@pytest.mark.parametrize("enforce", [True, False], ids=["enforce", "no-enforce"])
@pytest.mark.parametrize("point", [p for p in POINTS if p.where != "after-tool"], ids=str)
async def test_crash_and_resume_in_memory(point: Point, enforce: bool) -> None:
    reference = await reference_transcripts()
    backend = CrashingMemory()
    agent, tool, result = await crash_and_resume(
        point, enforce=enforce, backend=backend, resume_backend=backend
    )
    check_resumed(point, enforce, agent, tool, result, reference)


@pytest.mark.parametrize("point", [p for p in POINTS if p.where == "after-tool"], ids=str)
async def test_crash_after_a_recorded_tool_call_never_calls_it_again(point: Point) -> None:
    reference = await reference_transcripts()
    backend = CrashingMemory()
    agent, tool, result = await crash_and_resume(
        point, enforce=True, backend=backend, resume_backend=backend
    )
    check_resumed(point, True, agent, tool, result, reference)


SQLITE_POINTS = [
    (point, enforce)
    for point in (
        Point("model", 1),
        Point("after-model", 0),
        Point("tool-after", 0, 1),
        Point("after-tool", 1, 0),
        Point("after-turn", 0),
    )
    for enforce in (True, False)
    if enforce or point.where != "after-tool"  # no tool records without enforce_idempotency
]


@pytest.mark.parametrize(
    ("point", "enforce"), SQLITE_POINTS, ids=[f"{p}-{e}" for p, e in SQLITE_POINTS]
)
async def test_crash_and_resume_on_sqlite(point: Point, enforce: bool, tmp_path: Path) -> None:
    reference = await reference_transcripts()
    crashed = CrashingSQLite(tmp_path / "runs.db")
    resumed = SQLiteBackend(tmp_path / "runs.db")
    try:
        agent, tool, result = await crash_and_resume(
            point, enforce=enforce, backend=crashed, resume_backend=resumed
        )
    finally:
        await crashed.aclose()
        await resumed.aclose()
    check_resumed(point, enforce, agent, tool, result, reference)


async def test_without_enforce_no_tool_records_are_written() -> None:
    backend = InMemoryBackend()
    result = await run(
        GranularStep("g", ScriptedAgent(durable_script()), tools={"effect": EffectTool()}),
        backend=backend,
    )
    assert result.status == "completed", result.error
    state = await backend.load_state(RUN)
    assert state is not None
    kinds = [(r.get("kind", "step"), r.get("path")) for r in state["step_history"]]
    assert kinds == [
        ("model", [0, 0]),
        ("turn", [0, 0]),
        ("model", [0, 1]),
        ("turn", [0, 1]),
        ("model", [0, 2]),
        ("step", None),
    ]


async def test_with_enforce_each_tool_result_is_recorded_before_the_next_call() -> None:
    backend = InMemoryBackend()
    result = await run(
        GranularStep(
            "g",
            ScriptedAgent(durable_script()),
            tools={"effect": EffectTool()},
            enforce_idempotency=True,
        ),
        backend=backend,
    )
    assert result.status == "completed", result.error
    state = await backend.load_state(RUN)
    assert state is not None
    kinds = [(r.get("kind", "step"), r.get("path")) for r in state["step_history"]]
    assert kinds == [
        ("model", [0, 0]),
        ("tool", [0, 0, 0]),
        ("tool", [0, 0, 1]),
        ("tool", [0, 0, 2]),
        ("turn", [0, 0]),
        ("model", [0, 1]),
        ("tool", [0, 1, 0]),
        ("tool", [0, 1, 1]),
        ("turn", [0, 1]),
        ("model", [0, 2]),
        ("step", None),
    ]
    tool_records = [r for r in state["step_history"] if r.get("kind") == "tool"]
    assert tool_records[0]["output"] == {
        "role": "tool",
        "name": "effect",
        "idempotency_key": key(0, 0),
        "content": "did t0c0",
    }


async def test_the_context_written_by_a_recorded_model_turn_survives_a_crash() -> None:
    backend = CrashingMemory()
    backend.crash_after = ((0, 1), "model")
    agent = ContextAgent(durable_script())
    step = GranularStep("g", agent, tools={"effect": EffectTool()})
    with pytest.raises(Crash):
        await Flujo(step, state_backend=backend).run_async("go", run_id=RUN)
    agent.contexts.clear()
    result = await run(step, "go", backend=backend)
    assert result.status == "completed", result.error
    # Turns 0 and 1 were recorded with their context changes; only turn 2 ran again.
    assert dict(agent.asked) == {0: 1, 1: 1, 2: 1}
    assert result.final_pipeline_context is not None
    assert result.final_pipeline_context.scratchpad == {"turns": 3}


async def test_crash_inside_a_map_item_resumes_that_item_only() -> None:
    tool = EffectTool()

    class PerItem(ScriptedAgent):
        async def turn(self, transcript: list[dict[str, Any]]) -> AgentTurn:
            item = transcript[0]["content"]
            self.asked[(item, turn_number(transcript))] += 1  # type: ignore[index]
            if turn_number(transcript) == 0:
                return calls(("effect", {"item": item}), ("effect", {"item": item + "!"}))
            return final(item.upper())

    agent = PerItem([])
    tool.crash_at = (f"{RUN}:0.1.0:0:1", "after")
    step = MapStep(
        "each", GranularStep("g", agent, tools={"effect": tool}, enforce_idempotency=True)
    )
    backend = InMemoryBackend()
    with pytest.raises(Crash):
        await Flujo(step, state_backend=backend).run_async(["a", "b", "c"], run_id=RUN)
    result = await run(step, ["a", "b", "c"], backend=backend)
    assert result.status == "completed", result.error
    assert result.output == ["A", "B", "C"]
    assert dict(agent.asked) == {(i, t): 1 for i in "abc" for t in (0, 1)}
    counts = Counter(tool.effects)
    assert counts == {
        f"{RUN}:0.{i}.0:0:{c}": 2 if (i, c) == (1, 1) else 1 for i in range(3) for c in range(2)
    }


async def test_crash_inside_a_loop_iteration_resumes_that_iteration() -> None:
    tool = EffectTool()

    class Step1(ScriptedAgent):
        async def turn(self, transcript: list[dict[str, Any]]) -> AgentTurn:
            value = transcript[0]["content"]
            self.asked[(value, turn_number(transcript))] += 1  # type: ignore[index]
            if turn_number(transcript) == 0:
                return calls(("effect", {"item": str(value)}))
            return final(value + 1)

    agent = Step1([])
    backend = CrashingMemory()
    backend.crash_after = ((0, 1, 0, 0), "turn")  # iteration 1's turn 0 committed
    step = LoopStep(
        "loop",
        GranularStep("g", agent, tools={"effect": tool}),
        exit_condition_callable=lambda out, ctx: out >= 3,
    )
    with pytest.raises(Crash):
        await Flujo(step, state_backend=backend).run_async(0, run_id=RUN)
    result = await run(step, 0, backend=backend)
    assert result.status == "completed", result.error
    assert result.output == 3
    assert dict(agent.asked) == {(v, t): 1 for v in range(3) for t in (0, 1)}
    assert Counter(tool.effects) == {f"{RUN}:0.{k}.0:0:0": 1 for k in range(3)}


# -- compare-and-swap on every turn's checkpoint ---------------------------------------------------


async def advance(path: Path) -> None:
    """Another writer (its own backend instance) advances the run by one version (or, before
    the run's first checkpoint, creates it: another process started the same run id)."""
    async with SQLiteBackend(path) as other:
        state = await other.load_state(RUN)
        header = None
        if state is None:
            header = RunHeader(
                pipeline_id="default",
                pipeline_name="default",
                pipeline_version="latest",
                step_names=b'["g"]',
                initial_input=b'"go"',
                created_at=now(),
            )
        await other.write_checkpoint(
            Checkpoint(
                run_id=RUN,
                expected_version=0 if state is None else state["version"],
                status="running",
                current_step_index=0,
                updated_at=now(),
                last_step_output=None,
                error=None,
                header=header,
                status_changed=state is None,
            )
        )


@pytest.mark.parametrize("enforce", [True, False], ids=["enforce", "no-enforce"])
@pytest.mark.parametrize("meddle", ["model turn 0", "model turn 1", "tool turn 0", "tool turn 1"])
async def test_a_stale_writer_fails_with_state_conflict(
    meddle: str, enforce: bool, tmp_path: Path
) -> None:
    path = tmp_path / "runs.db"
    where, _, turn = meddle.rpartition(" ")
    tool = EffectTool()

    class Meddling(ScriptedAgent):
        async def turn(self, transcript: list[dict[str, Any]]) -> AgentTurn:
            if where == "model turn" and turn_number(transcript) == int(turn):
                await advance(path)
            return self.answer(transcript)

    async def meddling_tool(item: str, idempotency_key: str) -> str:
        if where == "tool turn" and idempotency_key == key(int(turn), 0):
            await advance(path)
        return await tool(item, idempotency_key)

    agent = Meddling(durable_script())
    step = GranularStep("g", agent, tools={"effect": meddling_tool}, enforce_idempotency=enforce)
    async with SQLiteBackend(path) as backend:
        with pytest.raises(StateConflictError) as caught:
            async with Flujo(step, state_backend=backend) as runner:
                await runner.run_async("go", run_id=RUN)
        assert caught.value.run_id == RUN
        state = await backend.load_state(RUN)
    assert state is not None
    # The stale writer stopped at the conflict: no later turn was asked, no later tool called,
    # and nothing it wrote after the other writer's version reached the store.
    t = int(turn)
    assert agent.asked[t + 1] == 0
    ran = [key(tt, c) for tt, c in ALL_CALLS if tt < t]
    if where == "tool turn":
        ran += [key(t, c) for c in range(CALLS_PER_TURN[t] if not enforce else 1)]
    assert tool.effects == ran
    assert state["status"] == "running"
    records = [(r.get("kind"), r.get("path")) for r in state["step_history"]]
    assert (("model", [0, t]) in records) is (where == "tool turn")
    assert ("turn", [0, t]) not in records


async def test_a_second_resume_of_the_same_run_is_refused(tmp_path: Path) -> None:
    """Two resumers load the same version; the one that commits second conflicts."""
    path = tmp_path / "runs.db"
    tool = EffectTool()
    crashing = CrashingSQLite(path)
    crashing.crash_after = ((0, 0), "turn")
    step = GranularStep("g", ScriptedAgent(durable_script()), tools={"effect": tool})
    with pytest.raises(Crash):
        await Flujo(step, state_backend=crashing).run_async("go", run_id=RUN)
    await crashing.aclose()

    other_result: list[PipelineResult[Any, Any]] = []

    class Slow(ScriptedAgent):
        async def turn(self, transcript: list[dict[str, Any]]) -> AgentTurn:
            if not other_result:  # the other resumer runs the whole rest of the run meanwhile
                other_step = GranularStep(
                    "g", ScriptedAgent(durable_script()), tools={"effect": tool}
                )
                async with SQLiteBackend(path) as other_backend:
                    other = Flujo(other_step, state_backend=other_backend)
                    other_result.append(await other.run_async("go", run_id=RUN))
            return self.answer(transcript)

    slow_step = GranularStep("g", Slow(durable_script()), tools={"effect": tool})
    async with SQLiteBackend(path) as backend:
        with pytest.raises(StateConflictError):
            await Flujo(slow_step, state_backend=backend).run_async("go", run_id=RUN)
        state = await backend.load_state(RUN)
    assert other_result[0].status == "completed"
    assert state is not None
    assert state["status"] == "completed"
    assert state["last_step_output"] == "all done"


async def test_a_stale_writer_with_retries_stops_at_the_conflict(tmp_path: Path) -> None:
    """A conflict means another writer owns the run: retrying the step must not go on calling
    tools (their results can never be committed) nor treat the refused record as recorded."""
    path = tmp_path / "runs.db"
    tool = EffectTool()

    async def meddling_tool(item: str, idempotency_key: str) -> str:
        if idempotency_key == key(0, 0):
            await advance(path)
        return await tool(item, idempotency_key)

    agent = ScriptedAgent(durable_script())
    step = GranularStep(
        "g",
        agent,
        tools={"effect": meddling_tool},
        enforce_idempotency=True,
        retries=2,
        backoff_s=0,
    )
    async with SQLiteBackend(path) as backend:
        with pytest.raises(StateConflictError):
            async with Flujo(step, state_backend=backend) as runner:
                await runner.run_async("go", run_id=RUN)
    # Call 0 ran (its record was refused); no later call may run for this stale writer.
    assert tool.effects == [key(0, 0)]
