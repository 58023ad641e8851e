"""Shadow evaluation: a judge scores agent steps in the background, never delaying or failing
a run."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from flujo import Flujo, MapStep, ShadowEvalConfig, Step, TaskClient, Usage, UsageLimits, step
from flujo.application.shadow import EvaluationScore, ShadowEvaluator, shadow_config_from_env
from flujo.domain.usage import report_usage
from flujo.exceptions import ConfigurationError
from flujo.state import FileBackend, InMemoryBackend, SQLiteBackend


class Echo:
    """An agent step's agent: answers its input, with usage."""

    async def run(self, data: Any) -> str:
        report_usage(Usage(requests=1, input_tokens=10, output_tokens=2))
        return f"answer to {data}"


class Judge:
    """Scores every output 0.75 and remembers what it saw; its calls cost something."""

    def __init__(self, *, answer: Any = None, delay: float = 0.0, error: bool = False) -> None:
        self.seen: list[dict[str, Any]] = []
        self.answer = answer
        self.delay = delay
        self.error = error

    async def run(self, payload: dict[str, Any]) -> Any:
        self.seen.append(payload)
        report_usage(Usage(requests=1, input_tokens=50, output_tokens=5, cost_usd=0.5))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error:
            raise RuntimeError("judge is down")
        if self.answer is not None:
            return self.answer
        return EvaluationScore(score=0.75, reasoning=f"ok: {payload['output']}")


def config(judge: Any, **changes: Any) -> ShadowEvalConfig:
    return ShadowEvalConfig(judge=judge, sample_rate=1.0, **changes)


def agent_pipeline() -> Any:
    @step
    async def plain(x: str) -> str:  # not an agent step: never scored
        return x

    return plain >> Step("ask", agent=Echo()) >> Step("again", agent=Echo())


def test_agent_steps_are_scored_into_the_evaluations_table(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "runs.db")
    judge = Judge()
    runner = Flujo(agent_pipeline(), state_backend=backend, shadow_eval=config(judge))

    result = runner.run("q", run_id="r1")  # run() waits for pending scores before returning

    assert result.success
    assert [seen["step"] for seen in judge.seen] == ["ask", "again"]
    assert judge.seen[0] == {"step": "ask", "input": "q", "output": "answer to q"}
    scores = asyncio.run(TaskClient(backend).list_evaluations("r1"))
    assert sorted((e.step_name, e.step_path, e.score) for e in scores) == [
        ("again", [2], 0.75),
        ("ask", [1], 0.75),
    ]
    assert all(e.judge == "Judge" for e in scores)
    # The judge's usage is kept with its score, never counted in the run's usage.
    assert all(e.usage == Usage(1, 50, 5, 0.5) for e in scores)
    assert result.usage == Usage(2, 20, 4, 0.0)


async def test_the_run_does_not_wait_for_a_slow_judge() -> None:
    backend = InMemoryBackend()
    judge = Judge(delay=30)
    runner = Flujo(agent_pipeline(), state_backend=backend, shadow_eval=config(judge, timeout_s=60))

    result = await asyncio.wait_for(runner.run_async("q", run_id="r1"), timeout=10)

    assert result.success
    assert runner._shadow is not None
    assert runner._shadow.pending == 2  # still judging, in the background
    await runner._shadow.drain(timeout_s=0.05)  # shutdown: what is late is cancelled
    assert runner._shadow.pending == 0
    assert await backend.list_evaluations() == []


async def test_a_failing_or_nonsense_judge_never_fails_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="flujo.shadow_eval")
    for judge in (Judge(error=True), Judge(answer="great"), Judge(answer={"score": "high"})):
        backend = InMemoryBackend()
        runner = Flujo(agent_pipeline(), state_backend=backend, shadow_eval=config(judge))
        result = await runner.run_async("q")
        await runner.aclose()
        assert result.success
        assert await backend.list_evaluations() == []
    assert "judge is down" in caplog.text
    assert "no numeric score" in caplog.text


async def test_a_judge_that_hangs_times_out(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="flujo.shadow_eval")
    backend = InMemoryBackend()
    runner = Flujo(
        agent_pipeline(),
        state_backend=backend,
        shadow_eval=config(Judge(delay=30), timeout_s=0.05),
    )
    assert (await runner.run_async("q")).success
    await runner.aclose()
    assert "timed out" in caplog.text


@pytest.mark.parametrize(
    ("answer", "score", "reasoning"),
    [
        (0.5, 0.5, ""),
        (1, 1.0, ""),
        ({"score": 0.2, "reasoning": "meh"}, 0.2, "meh"),
        (EvaluationScore(score=0.9, reasoning="good"), 0.9, "good"),
    ],
)
async def test_judges_may_answer_numbers_dicts_or_objects(
    answer: Any, score: float, reasoning: str
) -> None:
    backend = InMemoryBackend()
    runner = Flujo(
        Step("ask", agent=Echo()), state_backend=backend, shadow_eval=config(Judge(answer=answer))
    )
    await runner.run_async("q", run_id="r1")
    await runner.aclose()
    [stored] = await backend.list_evaluations()
    assert (stored.score, stored.reasoning) == (score, reasoning)


def test_sampling_is_a_stable_share_of_step_executions() -> None:
    evaluator = ShadowEvaluator(ShadowEvalConfig(judge=Judge(), sample_rate=0.3), None)
    decisions = [evaluator.sampled(f"run-{i}", (1,)) for i in range(2000)]
    assert 450 < sum(decisions) < 750  # about 30 %
    assert decisions == [evaluator.sampled(f"run-{i}", (1,)) for i in range(2000)]
    never = ShadowEvaluator(ShadowEvalConfig(judge=Judge(), sample_rate=0), None)
    always = ShadowEvaluator(ShadowEvalConfig(judge=Judge(), sample_rate=1), None)
    assert not any(never.sampled(f"run-{i}", (1,)) for i in range(100))
    assert all(always.sampled(f"run-{i}", (1,)) for i in range(100))


def test_nested_agent_steps_are_scored_with_their_path(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "runs.db")
    judge = Judge()

    @step
    async def items(x: str) -> list[str]:
        return [x, x + "!"]

    pipeline = items >> MapStep("map", Step("ask", agent=Echo()))
    Flujo(pipeline, state_backend=backend, shadow_eval=config(judge)).run("q", run_id="r1")
    scores = asyncio.run(backend.list_evaluations(run_id="r1"))
    assert sorted(e.step_path for e in scores) == [[1, 0, 0], [1, 1, 0]]


def test_judge_usage_never_counts_against_the_run_budget() -> None:
    judge = Judge()
    runner = Flujo(
        agent_pipeline(),
        persist_state=False,
        usage_limits=UsageLimits(total_cost_usd_limit=0.1),  # one judgement costs 0.5
        shadow_eval=config(judge),
    )
    assert runner.run("q").success
    assert len(judge.seen) == 2


def test_without_a_store_or_on_the_file_backend_scores_go_to_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="flujo.shadow_eval")
    Flujo(agent_pipeline(), persist_state=False, shadow_eval=config(Judge())).run("q")
    assert caplog.text.count("scored 0.750") == 2
    caplog.clear()
    file_backend = FileBackend(tmp_path / "runs")
    Flujo(agent_pipeline(), state_backend=file_backend, shadow_eval=config(Judge())).run("q")
    assert "keeps no evaluations" in caplog.text
    assert caplog.text.count("scored 0.750") == 2


def test_scores_can_go_to_the_log_by_choice(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="flujo.shadow_eval")
    backend = InMemoryBackend()
    Flujo(agent_pipeline(), state_backend=backend, shadow_eval=config(Judge(), sink="log")).run("q")
    assert caplog.text.count("scored 0.750") == 2
    assert asyncio.run(backend.list_evaluations()) == []


def test_reasoning_is_scrubbed_when_pii_scrubbing_is_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLUJO_GOVERNANCE_PII_SCRUB", "1")
    backend = InMemoryBackend()
    judge = Judge(answer={"score": 0.1, "reasoning": "it leaked ana@example.com"})
    Flujo(Step("ask", agent=Echo()), state_backend=backend, shadow_eval=config(judge)).run("q")
    [stored] = asyncio.run(backend.list_evaluations())
    assert stored.reasoning == "it leaked [REDACTED_EMAIL]"


# -- configuration by environment ---------------------------------------------------------------


def test_the_environment_turns_it_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert shadow_config_from_env({}) is None
    assert shadow_config_from_env({"FLUJO_SHADOW_EVAL_ENABLED": "0"}) is None
    env = {
        "FLUJO_SHADOW_EVAL_ENABLED": "1",
        "FLUJO_SHADOW_EVAL_SINK": "log",
        "FLUJO_SHADOW_EVAL_SAMPLE_RATE": "0.5",
        "FLUJO_SHADOW_EVAL_JUDGE_MODEL": "test",
        "FLUJO_SHADOW_EVAL_TIMEOUT_S": "5",
    }
    assert shadow_config_from_env(env) == ShadowEvalConfig(
        sink="log", sample_rate=0.5, judge_model="test", timeout_s=5
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLUJO_SHADOW_EVAL_SINK", "database")
    monkeypatch.setenv("FLUJO_SHADOW_EVAL_SAMPLE_RATE", "1")
    backend = SQLiteBackend(tmp_path / "runs.db")
    runner = Flujo(Step("ask", agent=Echo()), state_backend=backend)
    assert runner._shadow is not None
    runner.run("q", run_id="r1")
    # pydantic-ai's test model answers with a schema-valid EvaluationScore
    [stored] = asyncio.run(backend.list_evaluations(run_id="r1"))
    assert 0 <= stored.score <= 1
    assert stored.judge == "test"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"FLUJO_SHADOW_EVAL_ENABLED": "maybe"}, "FLUJO_SHADOW_EVAL_ENABLED"),
        ({"FLUJO_SHADOW_EVAL_SINK": "kafka"}, "FLUJO_SHADOW_EVAL_SINK"),
        ({"FLUJO_SHADOW_EVAL_SAMPLE_RATE": "2"}, "FLUJO_SHADOW_EVAL_SAMPLE_RATE"),
        ({"FLUJO_SHADOW_EVAL_SAMPLE_RATE": "lots"}, "FLUJO_SHADOW_EVAL_SAMPLE_RATE"),
        ({"FLUJO_SHADOW_EVAL_TIMEOUT_S": "0"}, "FLUJO_SHADOW_EVAL_TIMEOUT_S"),
    ],
)
def test_bad_settings_are_typed_errors_naming_the_variable(
    env: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        shadow_config_from_env({"FLUJO_SHADOW_EVAL_ENABLED": "1", **env})


def test_enabled_without_a_judge_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLUJO_SHADOW_EVAL_ENABLED", "1")
    with pytest.raises(ConfigurationError, match="FLUJO_SHADOW_EVAL_JUDGE_MODEL"):
        Flujo(Step("ask", agent=Echo()), persist_state=False)
    with pytest.raises(ConfigurationError, match="run"):
        Flujo(Step("ask", agent=Echo()), persist_state=False, shadow_eval=config(object()))
    # Turned off in code, the environment does not matter.
    off = Flujo(
        Step("ask", agent=Echo()),
        persist_state=False,
        shadow_eval=ShadowEvalConfig(enabled=False),
    )
    assert off._shadow is None


async def test_scores_land_in_postgres(postgres_dsn: str, postgres_schema: str) -> None:
    from flujo.state.backends.postgres import PostgresBackend

    backend = PostgresBackend(postgres_dsn, schema=postgres_schema, pool_min=0, pool_max=2)
    await backend.migrate()
    judge = Judge()
    runner = Flujo(agent_pipeline(), state_backend=backend, shadow_eval=config(judge))
    try:
        assert (await runner.run_async("q", run_id="r1")).success
        assert runner._shadow is not None
        await runner._shadow.drain()
        scores = await TaskClient(backend).list_evaluations("r1")
        assert sorted(e.step_name for e in scores) == ["again", "ask"]
        assert all(e.usage == Usage(1, 50, 5, 0.5) for e in scores)
    finally:
        await runner.aclose()
