"""Every example runs as a test, in a fresh process, in an empty working directory."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from flujo.state import SQLiteBackend

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_example_is_covered() -> None:
    covered = {"demo.py", "fastapi_app.py", "getting_started.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} <= covered


@pytest.mark.slow
def test_getting_started_runs_as_the_spec_writes_it(tmp_path: Path) -> None:
    done = run_example("getting_started.py", tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["workflow.db"]
    state = asyncio.run(SQLiteBackend(tmp_path / "workflow.db").load_state("run1"))
    assert state is not None
    assert state["status"] == "completed"
    assert state["last_step_output"] == "Hello, world!"
    assert state["pipeline_name"] == "hello"
    assert state["pipeline_version"] == "1.0.0"
    # The second runner resumed a completed run: it re-ran nothing.
    assert [r["name"] for r in state["step_history"]] == ["greet"]


@pytest.mark.slow
def test_demo_kills_a_worker_and_resumes_the_run(tmp_path: Path) -> None:
    done = run_example("demo.py", tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "the worker exited with -9" in out
    assert "3 of 5 steps committed" in out
    assert out.count("skipped: committed before the crash") == 3
    assert out.count("ran after the resume") == 2
    assert "status:  completed" in out
    assert "Order " in out
    assert "37.50 EUR charged" in out
    # Only the embedded default store is written to the working directory.
    assert {p.name for p in tmp_path.iterdir()} <= {
        "flujo_ops.db",
        "flujo_ops.db-wal",
        "flujo_ops.db-shm",
    }
    # fetch_order, price and charge_card ran once, in the worker; ship and notify once, after.
    assert out.count("fetch_order  ran in process") == 1
    assert out.count("charge_card  ran in process") == 1
    assert out.count("notify       ran in process") == 1
