"""Logging: flujo configures no handlers and is silent at INFO and above in a normal run."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from flujo import Flujo, PipelineContext, step
from flujo.state import InMemoryBackend, SQLiteBackend

CHECK_HANDLERS = """
import json, logging
def handlers():
    found = {"<root>": [type(h).__name__ for h in logging.getLogger().handlers]}
    for name, obj in logging.Logger.manager.loggerDict.items():
        if isinstance(obj, logging.Logger) and obj.handlers:
            found[name] = [type(h).__name__ for h in obj.handlers]
    return found
before = handlers()
import flujo
import flujo.state
from flujo.state.backends import sqlite, file, memory
after = handlers()
print(json.dumps({"before": before, "after": after}))
"""


def test_importing_flujo_adds_no_handlers(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK_HANDLERS],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    data = json.loads(out.stdout)
    assert data["after"] == data["before"]


class Ctx(PipelineContext):
    n: int = 0


@step
async def bump(x: int, *, context: Ctx) -> int:
    context.n += 1
    return x + 1


def _loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.INFO
    ]


async def test_normal_run_emits_nothing_at_info_or_above(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    attempts = {"n": 0}

    @step(retries=2, backoff_s=0)
    def flaky_once(x: int) -> int:
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise RuntimeError("transient")
        return x

    caplog.set_level(logging.DEBUG)
    async with Flujo(
        bump >> flaky_once >> bump,
        context_model=Ctx,
        state_backend=SQLiteBackend(tmp_path / "log.db"),
    ) as runner:
        result = await runner.run_async(1, run_id="quiet")
        again = await runner.run_async(1, run_id="quiet")
    assert result.status == again.status == "completed"
    assert result.step_history[1].attempts == 2
    assert _loud(caplog) == []


async def test_in_memory_and_unpersisted_runs_are_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await Flujo(bump >> bump, context_model=Ctx, state_backend=InMemoryBackend()).run_async(1)
    await Flujo(bump, context_model=Ctx, persist_state=False).run_async(1)
    assert _loud(caplog) == []
