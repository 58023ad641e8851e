"""Every example runs as a test, in a fresh process, in an empty working directory."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flujo.state import SQLiteBackend

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
STEP_DOCS = ROOT / "docs" / "steps"

# examples/steps/<name>.py -> a line its output must contain (the pages show the whole output).
STEP_EXAMPLES = {
    "cache.py": "  [13.0, 1.0] cache_hit=True",
    "conditional.py": "  refund order-1042\ncompleted: refunded order-1042",
    "loop.py": "Resumed:\n  iteration 3: review  -> 21 characters\n",
    "map.py": "Resumed:\n  fetch faq\n  fetch changelog\ncompleted:",
    "nested.py": "finished runs):\n  compress   path [0, 1, 0, 2, 0] ok\n",
    "parallel.py": "Resumed run ran ['reviews']: completed",
    "parallel_merge.py": "CONTEXT_UPDATE: MergeConflictError",
    "state_machine.py": "Resumed:\n  edit 2\n  critique -> approval\n  approval\ncompleted:",
}


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
    covered |= {f"steps/{name}" for name in STEP_EXAMPLES}
    assert {p.relative_to(EXAMPLES).as_posix() for p in EXAMPLES.rglob("*.py")} <= covered


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


def fenced_blocks(page: Path) -> list[tuple[str, str]]:
    """The page's fenced code blocks, as (language, text) in page order."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", page.read_text(), flags=re.MULTILINE | re.DOTALL)


def page_showing(example: Path) -> tuple[Path, str, str]:
    """The docs/steps page that includes ``example``: (page, code block, output block after it)."""
    code = example.read_text()
    first_line = code.splitlines()[0]
    found = []
    for page in sorted(STEP_DOCS.glob("*.md")):
        blocks = fenced_blocks(page)
        for position, (language, text) in enumerate(blocks):
            if language == "python" and text.splitlines()[:1] == [first_line]:
                following = [t for lang, t in blocks[position + 1 :] if lang == "text"]
                found.append((page, text, following[0] if following else ""))
    assert len(found) == 1, f"{example.name} should be shown on exactly one page, found {found}"
    return found[0]


def clean_env() -> dict[str, str]:
    """This environment without FLUJO_* settings, so that examples use the embedded default."""
    return {key: value for key, value in os.environ.items() if not key.startswith("FLUJO_")}


@pytest.mark.parametrize("name", sorted(STEP_EXAMPLES))
def test_step_page_shows_its_example_as_it_is(name: str) -> None:
    example = EXAMPLES / "steps" / name
    page, code, _ = page_showing(example)
    assert code == example.read_text(), f"{page.name} shows an outdated copy of {example}"
    assert f"examples/steps/{name}" in page.read_text()


def test_every_step_page_example_is_a_file() -> None:
    """A page's program that starts like an example file (a docstring line) is that file."""
    firsts = {(EXAMPLES / "steps" / name).read_text().splitlines()[0] for name in STEP_EXAMPLES}
    for page in sorted(STEP_DOCS.glob("*.md")):
        for language, text in fenced_blocks(page):
            if language == "python" and text.startswith('"""'):
                assert text.splitlines()[0] in firsts, f"{page.name}: a program with no file"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STEP_EXAMPLES))
def test_step_example_runs_and_prints_what_its_page_shows(name: str, tmp_path: Path) -> None:
    example = EXAMPLES / "steps" / name
    done = subprocess.run(
        [sys.executable, str(example)],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert STEP_EXAMPLES[name] in done.stdout
    _, _, shown = page_showing(example)
    assert done.stdout == shown
    # Only the embedded default store, in the working directory.
    assert {p.name for p in tmp_path.iterdir()} <= {
        "flujo_ops.db",
        "flujo_ops.db-wal",
        "flujo_ops.db-shm",
    }
