"""Shadow evaluation: a judge agent scores agent steps' outputs in the background.

Turned on by the environment (or ``Flujo(shadow_eval=ShadowEvalConfig(...))``)::

    FLUJO_SHADOW_EVAL_ENABLED=1
    FLUJO_SHADOW_EVAL_SINK=database          # or "log"
    FLUJO_SHADOW_EVAL_SAMPLE_RATE=0.1        # share of agent steps scored (default 0.1)
    FLUJO_SHADOW_EVAL_JUDGE_MODEL=openai:gpt-4o-mini   # a pydantic-ai model (flujo[ai])
    FLUJO_SHADOW_EVAL_TIMEOUT_S=30

After an agent step succeeds, a sampled share of them is handed to the judge in a background
task: the run never waits for it, and a judge that fails, hangs or is slow never fails or
delays the run (its errors are logged). Scores land in the store's ``evaluations`` table
(``flujo_evaluations`` on Postgres), readable with ``TaskClient.list_evaluations``. Pending
evaluations are awaited (up to the timeout) by ``runner.aclose()`` and at the end of the
synchronous ``runner.run()``.

The judge is any agent (``async run(payload)``) answering with a number, an object with a
``score`` (and optionally ``reasoning``), or such a dict. Its usage is kept with the score,
never counted against the run's usage limits.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flujo.domain.usage import _CURRENT, RunMeter
from flujo.exceptions import ConfigurationError
from flujo.state.models import Evaluation
from flujo.state.serialization import active_scrubber

if TYPE_CHECKING:
    from flujo.state.backends.base import StateBackend

__all__ = [
    "JUDGE_PROMPT",
    "EvaluationScore",
    "ShadowEvalConfig",
    "ShadowEvaluator",
    "shadow_config_from_env",
]

logger = logging.getLogger("flujo.shadow_eval")

ENV_ENABLED = "FLUJO_SHADOW_EVAL_ENABLED"
ENV_SINK = "FLUJO_SHADOW_EVAL_SINK"
ENV_SAMPLE_RATE = "FLUJO_SHADOW_EVAL_SAMPLE_RATE"
ENV_JUDGE_MODEL = "FLUJO_SHADOW_EVAL_JUDGE_MODEL"
ENV_TIMEOUT = "FLUJO_SHADOW_EVAL_TIMEOUT_S"

JUDGE_PROMPT = (
    "You are a strict reviewer of an AI workflow. You receive a JSON object with the step's "
    "name, its input and its output. Score how well the output fulfils the input, from 0 (wrong "
    "or useless) to 1 (fully correct and complete), and explain the score in one or two "
    "sentences."
)
"""The instructions of the judge flujo builds from ``FLUJO_SHADOW_EVAL_JUDGE_MODEL``."""


class EvaluationScore(BaseModel):
    """What flujo's default judge answers: a score from 0 to 1 and why."""

    score: float = Field(ge=0, le=1)
    reasoning: str = ""


class ShadowEvalConfig(BaseModel):
    """How shadow evaluation runs.

    >>> ShadowEvalConfig(judge=my_judge, sample_rate=0.25)    # doctest: +SKIP
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")

    enabled: bool = True
    """Whether agent steps are scored at all."""
    sink: Literal["database", "log"] = "database"
    """Where scores go: the store's ``evaluations`` table, or the ``flujo.shadow_eval`` log."""
    sample_rate: float = Field(0.1, ge=0, le=1)
    """The share of agent step executions scored (decided by a hash of run id and step path,
    so a retried or resumed step gets the same decision)."""
    judge: Any = None
    """The judge agent; built from ``judge_model`` when not given."""
    judge_model: str | None = None
    """A pydantic-ai model name for the default judge (needs ``flujo[ai]``)."""
    timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False)
    """How long one judgement may take (and how long ``aclose()`` waits for pending ones)."""


def shadow_config_from_env(environ: Mapping[str, str] | None = None) -> ShadowEvalConfig | None:
    """The configuration the environment asks for, or None when shadow evaluation is off."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_ENABLED, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return None
    if raw not in ("1", "true", "yes", "on"):
        raise ConfigurationError(f"{ENV_ENABLED}={env[ENV_ENABLED]!r}: expected 1 or 0")
    values: dict[str, Any] = {}
    if env.get(ENV_SINK, "").strip():
        values["sink"] = env[ENV_SINK].strip().lower()
    if env.get(ENV_SAMPLE_RATE, "").strip():
        values["sample_rate"] = env[ENV_SAMPLE_RATE].strip()
    if env.get(ENV_JUDGE_MODEL, "").strip():
        values["judge_model"] = env[ENV_JUDGE_MODEL].strip()
    if env.get(ENV_TIMEOUT, "").strip():
        values["timeout_s"] = env[ENV_TIMEOUT].strip()
    try:
        return ShadowEvalConfig(**values)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = str(first["loc"][0]) if first["loc"] else "sink"
        variable = {
            "sink": ENV_SINK,
            "sample_rate": ENV_SAMPLE_RATE,
            "timeout_s": ENV_TIMEOUT,
        }.get(name, ENV_ENABLED)
        raise ConfigurationError(f"{variable}: {first['msg']}") from exc


class ShadowEvaluator:
    """Scores agent step outputs in background tasks; never raises into a run."""

    def __init__(self, config: ShadowEvalConfig, backend: StateBackend | None) -> None:
        self.config = config
        self.backend = backend
        judge = config.judge
        if judge is None:
            if not config.judge_model:
                raise ConfigurationError(
                    "shadow evaluation needs a judge: pass Flujo(shadow_eval=ShadowEvalConfig("
                    f"judge=...)) or set {ENV_JUDGE_MODEL} to a pydantic-ai model name"
                )
            from flujo.agents import make_agent  # noqa: PLC0415 - the optional extra

            judge = make_agent(
                config.judge_model,
                JUDGE_PROMPT,
                output_type=EvaluationScore,
                name="flujo-judge",
            )
        if not callable(getattr(judge, "run", None)):
            raise ConfigurationError(
                f"the shadow evaluation judge needs an async run(payload) method, got "
                f"{type(judge).__name__}"
            )
        self.judge = judge
        self.judge_name = str(
            getattr(judge, "model_name", None)
            or getattr(judge, "name", None)
            or type(judge).__name__
        )
        self._sink = config.sink
        if self._sink == "database" and backend is None:
            self._sink = "log"  # nothing to store into (persist_state=False)
        self._pending: set[asyncio.Task[None]] = set()
        self._warned = False

    def sampled(self, run_id: str, path: tuple[int | str, ...]) -> bool:
        """Whether the step at ``path`` of ``run_id`` is scored (the same answer every time)."""
        rate = self.config.sample_rate
        if rate >= 1:
            return True
        if rate <= 0:
            return False
        digest = hashlib.sha256(f"{run_id}:{list(path)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < rate

    def submit(
        self, run_id: str, step_name: str, path: tuple[int | str, ...], data: Any, output: Any
    ) -> None:
        """Score ``output`` in the background, if sampled. Never raises."""
        try:
            if not self.config.enabled or not self.sampled(run_id, path):
                return
            # The judge runs outside the step: its usage is not the run's (own meter).
            context = contextvars.copy_context()
            context.run(_CURRENT.set, RunMeter().step_meter(None))
            task = asyncio.get_running_loop().create_task(
                self._evaluate(run_id, step_name, path, data, output), context=context
            )
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        except Exception:
            logger.exception("could not start the shadow evaluation of step %r", step_name)

    async def _evaluate(
        self, run_id: str, step_name: str, path: tuple[int | str, ...], data: Any, output: Any
    ) -> None:
        payload = {"step": step_name, "input": data, "output": output}
        try:
            async with asyncio.timeout(self.config.timeout_s):
                verdict = await self.judge.run(payload)
            score, reasoning = _score_of(verdict)
            meter = _CURRENT.get()
            scrubber = active_scrubber()
            if scrubber is not None:
                reasoning = scrubber.scrub_text(reasoning)
            evaluation = Evaluation(
                run_id=run_id,
                step_name=step_name,
                step_path=list(path),
                score=score,
                reasoning=reasoning,
                judge=self.judge_name,
                usage=meter.usage if meter is not None else None,
            )
            await self._write(evaluation)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            logger.warning(
                "shadow evaluation of step %r of run %s timed out after %gs",
                step_name,
                run_id,
                self.config.timeout_s,
            )
        except Exception as exc:
            logger.warning(
                "shadow evaluation of step %r of run %s failed: %s: %s",
                step_name,
                run_id,
                type(exc).__name__,
                exc,
            )

    async def _write(self, evaluation: Evaluation) -> None:
        if self._sink == "database" and self.backend is not None:
            try:
                await self.backend.save_evaluation(evaluation)
                return
            except NotImplementedError:
                if not self._warned:
                    self._warned = True
                    logger.warning(
                        "%s keeps no evaluations; shadow evaluation scores go to the log",
                        type(self.backend).__name__,
                    )
                self._sink = "log"
        logger.info(
            "shadow evaluation: run %s step %r at %s scored %.3f by %s: %s",
            evaluation.run_id,
            evaluation.step_name,
            evaluation.step_path,
            evaluation.score,
            evaluation.judge,
            evaluation.reasoning,
        )

    @property
    def pending(self) -> int:
        """How many evaluations are still running."""
        return len(self._pending)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait for pending evaluations (of this event loop) up to ``timeout_s``, then cancel
        what is left."""
        loop = asyncio.get_running_loop()
        tasks = [task for task in self._pending if task.get_loop() is loop]
        if not tasks:
            return
        # Each judgement stops itself at timeout_s; a little more lets them say so.
        wait = timeout_s if timeout_s is not None else self.config.timeout_s + 1.0
        _, late = await asyncio.wait(tasks, timeout=wait)
        for task in late:
            task.cancel()
        if late:
            logger.warning("cancelled %d shadow evaluation(s) still running at shutdown", len(late))
            await asyncio.gather(*late, return_exceptions=True)


def _score_of(verdict: Any) -> tuple[float, str]:
    """The score and reasoning in a judge's answer."""
    reasoning: Any = ""
    if isinstance(verdict, Mapping):
        score, reasoning = verdict.get("score"), verdict.get("reasoning", "")
    elif isinstance(verdict, (int, float)) and not isinstance(verdict, bool):
        score = verdict
    else:
        score, reasoning = getattr(verdict, "score", None), getattr(verdict, "reasoning", "")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise ValueError(f"the judge answered {verdict!r}, which holds no numeric score")
    return float(score), "" if reasoning is None else str(reasoning)
