"""Every example runs as a test, in a fresh process, in an empty working directory."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flujo.state import SQLiteBackend

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"
STEP_DOCS = DOCS / "steps"

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

# examples/<name>.py shown on a page of docs/ -> (the page, lines its output must contain).
PAGE_EXAMPLES = {
    "agents_demo.py": (
        "agents.md",
        "trip-1: completed\n  plan     ok     Trip(city='Lisbon', days=3)\n",
        "  postcard ok     'Greetings from Lisbon: 3 days of sun!'\n",
        "trip-2: UsageLimitExceededError (request_limit)\n  run failed at step 'postcard'\n",
        "  resumed with the same budget: stopped again\n  postcard requests: 0\n",
        "  resumed with request_limit=5: completed, 'Greetings from Lisbon: 3 days of sun!'\n",
    ),
    "human_in_the_loop.py": (
        "human-in-the-loop.md",
        "status: paused, at step 'approve'\nProcess 2 answers it:\n",
        "rejected: approved: Input should be a valid boolean",
        "status after the rejected answer: paused\n",
        "status: completed, output: \"published 'Five reasons to try sourdough'\"\n",
        "second answer: StateConflictError",
    ),
    "granular_agent.py": (
        "granular.md",
        "Resumed:\n    issue_refund('o-17', 30.0) key <run>:0:1:1: refund already there",
        "completed: Refunded 30.00 EUR for order o-17.\n",
        "model turns asked: {0: 1, 1: 1, 2: 1}\n",
        "tool calls made:   {'lookup_order': 1, 'check_policy': 1, 'issue_refund': 2}\n",
        "refunds written:   1\n",
    ),
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
    covered = {"demo.py", "fastapi_app.py", "getting_started.py", "state_providers_demo.py"}
    covered |= {f"steps/{name}" for name in STEP_EXAMPLES}
    covered |= set(PAGE_EXAMPLES)
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


def page_showing(example: Path, docs: Path = STEP_DOCS) -> tuple[Path, str, str]:
    """The page of ``docs`` that includes ``example``: (page, code block, output block after it)."""
    code = example.read_text()
    first_line = code.splitlines()[0]
    found = []
    for page in sorted(docs.glob("*.md")):
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


@pytest.mark.parametrize("name", sorted(PAGE_EXAMPLES))
def test_page_shows_its_example_as_it_is(name: str) -> None:
    example = EXAMPLES / name
    page, code, _ = page_showing(example, DOCS)
    assert page.name == PAGE_EXAMPLES[name][0]
    assert code == example.read_text(), f"{page.name} shows an outdated copy of {example}"
    assert f"examples/{name}" in page.read_text()


def test_every_page_example_is_a_file() -> None:
    """A program on these pages that starts like an example file (a docstring line) is one."""
    firsts = {(EXAMPLES / name).read_text().splitlines()[0] for name in PAGE_EXAMPLES}
    for page in sorted({DOCS / page for page, *_ in PAGE_EXAMPLES.values()}):
        for language, text in fenced_blocks(page):
            if language == "python" and text.startswith('"""'):
                assert text.splitlines()[0] in firsts, f"{page.name}: a program with no file"


def run_page_example(name: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run examples/<name> in ``cwd`` on the embedded default store; it must succeed."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAGE_EXAMPLES))
def test_page_example_runs_and_prints_what_its_page_shows(name: str, tmp_path: Path) -> None:
    done = run_page_example(name, tmp_path)
    for line in PAGE_EXAMPLES[name][1:]:
        assert line in done.stdout
    _, _, shown = page_showing(EXAMPLES / name, DOCS)
    assert done.stdout == shown
    # The embedded default store in the working directory (and the example's own payments.db).
    assert {p.name for p in tmp_path.iterdir()} <= {
        "flujo_ops.db",
        "flujo_ops.db-wal",
        "flujo_ops.db-shm",
        "payments.db",
    }


@pytest.mark.slow
def test_human_in_the_loop_example_answers_once_from_another_process(tmp_path: Path) -> None:
    out = run_page_example("human_in_the_loop.py", tmp_path).stdout
    # draft ran once, before the pause; publish once, after the accepted answer.
    assert out.count("  draft: ") == 1
    assert out.count("  publish: ") == 1
    assert out.index("status after the rejected answer") < out.index("  publish: ")

    async def the_run() -> dict[str, Any]:
        backend = SQLiteBackend(tmp_path / "flujo_ops.db")
        try:
            (summary,) = await backend.list_runs()
            state = await backend.load_state(summary["run_id"])
        finally:
            await backend.aclose()
        assert state is not None
        return state

    state = asyncio.run(the_run())
    assert state["status"] == "completed"
    assert state["pipeline_name"] == "blog_post"
    assert state["metadata"] == {"author": "ana"}
    assert state["pipeline_context"]["title"] == "Five reasons to try sourdough"


@pytest.mark.slow
def test_agents_demo_counts_usage_across_the_resumed_attempts(tmp_path: Path) -> None:
    out = run_page_example("agents_demo.py", tmp_path).stdout
    first, second = out.split("\ntrip-2: ")
    assert first.startswith("trip-1: completed\n")
    totals = re.findall(r"  run total: (Usage\(.*\))\n", out)
    assert len(totals) == 2
    # trip-2 needed two attempts (stopped, then resumed) and used what trip-1 used in one
    assert totals[0] == totals[1]
    assert "requests=3," in totals[0]
    assert "cost_usd=0.0" in totals[0]  # priced: a cost shows
    assert "cost_usd=0.0)" not in totals[0]
    assert second.count("postcard requests: 0") == 2
    # the store lived in a temporary directory: nothing in the working directory
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_budgets_page_snippets_print_what_the_page_shows(tmp_path: Path) -> None:
    """docs/budgets.md's Python blocks, run in order as one program: every output the page
    shows (a comment line of its own in a block) is printed, in that order."""
    blocks = [text for language, text in fenced_blocks(DOCS / "budgets.md") if language == "python"]
    program = "\n".join(blocks)
    shown = re.findall(r"^# (.+)$", program, flags=re.MULTILINE)
    assert len(shown) >= 5
    done = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    positions = [printed.index(line) for line in shown]
    assert positions == sorted(positions)


@pytest.mark.slow
def test_granular_example_repeats_only_the_cut_short_tool_call(tmp_path: Path) -> None:
    first, resumed = run_page_example("granular_agent.py", tmp_path).stdout.split("Resumed:\n")
    # Before the crash: both model turns and all three tools ran.
    assert "  model turn 0\n" in first
    assert "  model turn 1\n" in first
    assert "refund written" in first
    # After it: only the unfinished call (same key, deduplicated) and the last model turn.
    assert "model turn 0" not in resumed
    assert "model turn 1" not in resumed
    assert "lookup_order(" not in resumed
    assert "check_policy(" not in resumed
    assert resumed.count("issue_refund(") == 1
    assert "refund already there: not paid twice" in resumed
    assert "  model turn 2\n" in resumed


@pytest.mark.slow
def test_state_providers_demo_runs_its_four_demos(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "state_providers_demo.py")],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for number in range(1, 5):
        assert out.count(f"Demo {number}: ") == 1
    # 1. hydrated before each step, saved after it; the store holds only the pointer.
    assert "  tides: 2 facts from encyclopedia, journal\n" in out
    assert "  graph 'research_graph' in the provider (4 facts):\n" in out
    assert "  provider calls: 4 loads, 4 saves" in out
    pointer = '{"provider_id": "kg", "key": "research_graph"}'
    assert f"  the store holds for 'knowledge': {pointer}\n" in out
    # 2. two providers in one step.
    assert "  volcanoes researched in 'es'\n" in out
    # 3. the factory's providers, then merged with the runner's own.
    assert "  providers from the factory: ['kg']\n" in out
    assert "  glaciers researched in 'fr'\n" in out
    assert "  providers merged: ['kg', 'prefs']\n" in out
    # 4. a failed run resumed by a new runner, hydrated again from the provider.
    assert "  first attempt: failed at step 'review'" in out
    assert "  the checkpoint holds only the pointer: True\n" in out
    assert "  resumed: completed: earthquakes: 3 facts from encyclopedia, journal, peer" in out
    assert "  history: research ok, review failed, review ok, summarize ok\n" in out
    assert "  loads while resuming: 2 " in out
    assert out.count(pointer) == 3
    # Only the embedded default store, in the working directory.
    assert {p.name for p in tmp_path.iterdir()} <= {
        "flujo_ops.db",
        "flujo_ops.db-wal",
        "flujo_ops.db-shm",
    }
