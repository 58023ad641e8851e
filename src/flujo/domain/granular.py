"""GranularStep: an agent loop (model turn, tool calls, observations) checkpointed turn by turn.

An agent for a granular step has ``async turn(transcript, **kwargs) -> AgentTurn``: given the
transcript so far (a list of messages), it takes one model turn and answers either with tool
calls to make or with its final output. The step runs the loop and commits, durably:

- each model turn as soon as it returns (a resume never asks the model again for it);
- with ``enforce_idempotency=True``, each tool call's result as soon as the tool returns (a
  resume returns the recorded result instead of calling the tool again);
- each finished turn (its tool results): the transcript so far.

Every tool call gets an idempotency key made of the run id, the step's path, the turn and the
call's index: the same key on every attempt. The window that stays at-least-once: a tool call
that ran but whose result was not committed when the process died (or any call of an
unfinished turn without ``enforce_idempotency``) runs again on resume, with the same key. A
tool closes the window by using the key: pass it to an API that accepts idempotency keys, or
store it with the effect under a unique constraint and return the stored result when it is
already there.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from typing_extensions import TypeVar

from flujo.application.core.frame import call_user
from flujo.domain.control import _Composite
from flujo.domain.models import StepError, StepResult
from flujo.domain.step import _as_agent, _in_thread
from flujo.domain.usage import Usage, check_usage_limits, count_recorded, current_step_meter
from flujo.exceptions import RUN_STOPPERS, ConfigurationError, IterationLimitError
from flujo.governance import current_policy

if TYPE_CHECKING:
    from flujo.application.core.frame import Frame

__all__ = ["AgentTurn", "GranularStep", "ToolCall"]

InT = TypeVar("InT", default=Any)
OutT = TypeVar("OutT", default=Any)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool the model asked for, with its arguments."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AgentTurn:
    """What one model turn produced: tool calls to make, or (with none) the final output."""

    output: Any = None
    """The final output (when there are no tool calls), or the model's text alongside calls."""
    tool_calls: Sequence[ToolCall] = ()

    @property
    def final(self) -> bool:
        """True when the model asked for no tool: ``output`` is the step's output."""
        return not self.tool_calls


class GranularStep(_Composite[InT, OutT]):
    """Run ``agent`` turn by turn, checkpointing after every turn (see the module docs).

    >>> research = GranularStep(
    ...     "research", agent=ResearchAgent(), tools={"search": search}, max_turns=8,
    ...     enforce_idempotency=True,
    ... )                                                           # doctest: +SKIP

    ``tools`` maps names to callables (sync or async) called with the model's arguments as
    keywords, plus ``idempotency_key=`` when they accept it; defaults to ``agent.tools``. A tool
    that raises, or a name that is not a tool, becomes an observation holding the error, for
    the model to handle. More than ``max_turns`` turns fail the step with
    :class:`~flujo.exceptions.IterationLimitError`. The transcript is a list of messages:
    ``{"role": "user", "content": input}``, ``{"role": "assistant", "content": ...,
    "tool_calls": [...]}`` and ``{"role": "tool", "name": ..., "content": result,
    "idempotency_key": ...}`` (``"error"`` instead of ``"content"`` for a failed call).
    """

    runs_sub_steps: ClassVar[bool] = False  # its turns are not steps: hydrated as a whole

    def __init__(
        self,
        name: str,
        agent: Any,
        *,
        tools: Mapping[str, Callable[..., Any]] | None = None,
        max_turns: int = 10,
        enforce_idempotency: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(name, **options)
        agent = _as_agent(agent)  # a pydantic_ai.Agent takes its turns through the adapter
        turn = getattr(agent, "turn", None)
        if not callable(turn):
            raise ConfigurationError(
                f"granular step {name!r}: the agent needs async turn(transcript, **kwargs)"
            )
        tools = tools if tools is not None else getattr(agent, "tools", None) or {}
        if not isinstance(tools, Mapping) or not all(callable(t) for t in tools.values()):
            raise ConfigurationError(f"granular step {name!r}: tools must map names to callables")
        if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
            raise ConfigurationError(f"granular step {name!r}: max_turns must be an int >= 1")
        self.turn_agent = agent
        self.tools = dict(tools)
        self.max_turns = max_turns
        self.enforce_idempotency = bool(enforce_idempotency)
        self._turn_takes_context = "context" in _parameters(turn)

    def idempotency_key(
        self, run_id: str, path: tuple[int | str, ...], turn: int, call: int
    ) -> str:
        """The key of tool call ``call`` of turn ``turn``: the same on every attempt."""
        return f"{run_id}:{'.'.join(str(part) for part in path)}:{turn}:{call}"

    async def _run(self, data: Any, frame: Frame) -> Any:
        transcript: list[dict[str, Any]] = [{"role": "user", "content": data}]
        for turn in range(self.max_turns):
            at = (*frame.path, turn)
            decided = frame.recorded(at, "model")
            if decided is not None:
                outcome = _turn_from_record(decided.result.output)
                count_recorded(decided.result.usage)
            else:
                meter = current_step_meter()
                before = meter.usage if meter is not None else Usage()
                outcome = await self._ask(transcript, frame)
                used = (meter.usage - before) if meter is not None else None
                decision = StepResult(f"{self.name}:model", _turn_record(outcome), path=at)
                decision.usage = used or None  # what this turn cost, kept with it
                await frame.record(decision, kind="model")
            transcript.append(
                {
                    "role": "assistant",
                    "content": outcome.output,
                    "tool_calls": [
                        {"name": c.name, "args": dict(c.args)} for c in outcome.tool_calls
                    ],
                }
            )
            if outcome.final:
                return outcome.output
            finished = frame.recorded(at, "turn")
            if finished is not None:
                observations = list(finished.result.output)
                frame.children.append(finished.result)
            else:
                observations = await self._call_tools(outcome.tool_calls, frame, turn)
                await frame.record(StepResult(f"turn {turn}", observations, path=at), kind="turn")
            transcript.extend(observations)
        raise IterationLimitError(
            f"granular step {self.name!r} used max_turns={self.max_turns} without a final answer",
            step_name=self.name,
            limit=self.max_turns,
        )

    async def _ask(self, transcript: list[dict[str, Any]], frame: Frame) -> AgentTurn:
        check_usage_limits()  # no model turn starts once the run reached a usage limit
        turn = self.turn_agent.turn
        if self._turn_takes_context:
            outcome = await call_user(turn, list(transcript), context=frame.context)
        else:
            outcome = await call_user(turn, list(transcript))
        if not isinstance(outcome, AgentTurn):
            raise ConfigurationError(
                f"granular step {self.name!r}: agent.turn returned {type(outcome).__name__}, "
                "not an AgentTurn"
            )
        return outcome

    async def _call_tools(
        self, calls: Sequence[ToolCall], frame: Frame, turn: int
    ) -> list[dict[str, Any]]:
        observations = []
        policy = current_policy()
        for index, call in enumerate(calls):
            at = (*frame.path, turn, index)
            recorded = frame.recorded(at, "tool") if self.enforce_idempotency else None
            if recorded is not None:
                observations.append(dict(recorded.result.output))
                continue
            # A tool the governance allowlist does not name fails the step before it runs.
            policy.check_tool(call.name)
            key = self.idempotency_key(frame.scope.run_id, frame.path, turn, index)
            observation = await self._call_tool(call, key)
            if self.enforce_idempotency:
                await frame.record(
                    StepResult(f"{self.name}:{call.name}", observation, path=at), kind="tool"
                )
            observations.append(observation)
        return observations

    async def _call_tool(self, call: ToolCall, key: str) -> dict[str, Any]:
        observation: dict[str, Any] = {"role": "tool", "name": call.name, "idempotency_key": key}
        tool = self.tools.get(call.name)
        if tool is None:
            observation["error"] = f"unknown tool {call.name!r}; tools: {sorted(self.tools)}"
            return observation
        kwargs = dict(call.args)
        parameters = _parameters(tool)
        if "idempotency_key" in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        ):
            kwargs["idempotency_key"] = key
        try:
            if inspect.iscoroutinefunction(tool) or inspect.iscoroutinefunction(
                getattr(tool, "__call__", None)  # noqa: B004
            ):
                result = await tool(**kwargs)
            else:
                result = await asyncio.to_thread(_in_thread, tool, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
        except RUN_STOPPERS:
            raise
        except Exception as exc:  # the model sees the failure and decides what to do
            observation["error"] = str(StepError.from_exception(exc))
            return observation
        observation["content"] = result
        return observation


def _parameters(fn: Any) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


def _turn_record(outcome: AgentTurn) -> dict[str, Any]:
    return {
        "output": outcome.output,
        "tool_calls": [{"name": c.name, "args": dict(c.args)} for c in outcome.tool_calls],
    }


def _turn_from_record(stored: Any) -> AgentTurn:
    calls = tuple(
        ToolCall(str(call.get("name", "")), dict(call.get("args") or {}))
        for call in (stored.get("tool_calls") or [])
    )
    return AgentTurn(stored.get("output"), calls)
