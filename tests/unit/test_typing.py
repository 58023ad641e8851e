"""Static typing: user code written against flujo type-checks under mypy --strict."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

GOOD = """
import asyncio
from typing import Any

from flujo import AppResources, Flujo, PipelineContext, PipelineResult, Step, StepResult, step


class MyContext(PipelineContext):
    count: int = 0


class MyResources(AppResources):
    client: Any = None


@step
async def to_len(x: str) -> int:
    return len(x)


@step
async def to_text(n: int) -> str:
    return str(n)


@step(name="shout", retries=1, timeout_s=5)
def shout(s: str, *, context: MyContext) -> str:
    context.count += 1
    return s.upper()


exclaim: Step[str, str] = Step.from_callable(lambda s: s + "!", name="exclaim")

runner: Flujo[str, str, MyContext] = Flujo(
    to_len >> to_text >> shout >> exclaim,
    context_model=MyContext,
    resources=MyResources(),
    persist_state=False,
)


async def main() -> None:
    result: PipelineResult[str, MyContext] = await runner.run_async("abc")
    out: str | None = result.output
    ctx = result.final_pipeline_context
    if ctx is not None:
        n: int = ctx.count
        print(n)
    async for item in runner.run_stream("abcd"):
        if isinstance(item, StepResult):
            print(item.name, item.attempts)
        else:
            print(item.status)
    print(out, result.success, result.step_history[0].latency_s)
    await runner.aclose()


asyncio.run(main())
"""

BAD = """
from flujo import step


@step
async def to_len(x: str) -> int:
    return len(x)


@step
async def shout(s: str) -> str:
    return s.upper()


pipeline = to_len >> shout
"""


def _mypy(tmp_path: Path, name: str, source: str) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )


def test_package_ships_a_py_typed_marker() -> None:
    spec = importlib.util.find_spec("flujo")
    assert spec is not None
    assert spec.origin is not None
    assert (Path(spec.origin).parent / "py.typed").is_file()


def test_typed_user_code_passes_mypy_strict(tmp_path: Path) -> None:
    proc = _mypy(tmp_path, "good.py", GOOD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The snippet also runs.
    run = subprocess.run(
        [sys.executable, str(tmp_path / "good.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert "3!" in run.stdout


def test_mismatched_composition_is_rejected_by_mypy(tmp_path: Path) -> None:
    proc = _mypy(tmp_path, "bad.py", BAD)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    # The only complaint is the composition of Step[str, int] >> Step[str, str].
    assert errors, proc.stdout
    assert all("bad.py:15" in line for line in errors), proc.stdout
    assert any("Unsupported operand types for >>" in line for line in errors), proc.stdout
