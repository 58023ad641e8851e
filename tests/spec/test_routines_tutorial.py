"""The routines tutorial (spec 004): its six programs print its Expected Output.

The programs are in ``routines_tutorial/`` exactly as the tutorial writes them, with only their
import lines changed to ``flujo.routines`` and the fixes the issue names (marked ``FIX``: step 3
imports ``Flow``; step 6 counts in its logic instead of ``__init__`` and deserializes the
JobState it uses). Each runs as ``python stepN.py`` would (``run_name="__main__"``) in this
test's own working directory (``conftest.py``), its stdout captured.

The tutorial is one session: step 2 reads the ``flow.json`` step 1 wrote and needs step 1's
``SimpleProcessor`` class to be defined, so its test runs step 1 first.

Placeholders of the Expected Output (``<job-id-1>``) match a job id; the same placeholder
must match the same id each time it appears.

Order: the only output printed from a pool thread is step 5's ``Processed: ...`` lines; they
come before the line the main thread prints next because ``Runtime.exec`` waits (``wait=True``,
the default) until the job has settled, and a job settles only after its last activation's
logic has returned.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

PROGRAMS = Path(__file__).with_name("routines_tutorial")

EXPECTED = {
    1: """
Flow serialized to flow.json
Flow ID: serializable_flow
Routines: ['processor']
""",
    2: """
Restored flow ID: serializable_flow
Routines: ['processor']
Execution status: completed
""",
    3: """
Restored threshold: 10
Restored enabled: True
""",
    4: """
JobState saved. Status: completed
Job ID: <unique-job-id>
""",
    5: """
Processed: first_input (attempt #1)
First execution. Job ID: <job-id-1>
Loaded JobState. Status: completed
Original Job ID: <job-id-1>
Processed: first_input (attempt #2)
Resumed execution. Status: completed
""",
    6: """
Workflow structure saved to workflow_structure.json
Execution state saved. Job ID: <job-id>
Restored flow: distributed_workflow
Restored Job ID: <job-id>, Status: completed
Execution count: 1
""",
}

_PLACEHOLDER = re.compile(r"<([a-z0-9-]+)>")
_JOB_ID = r"[A-Za-z0-9_][A-Za-z0-9._-]*"


def expected_pattern(text: str) -> re.Pattern[str]:
    """The Expected Output as a regex: placeholders match job ids, equal ones the same id."""
    seen: set[str] = set()
    parts = []
    position = 0
    for found in _PLACEHOLDER.finditer(text):
        parts.append(re.escape(text[position : found.start()]))
        group = found.group(1).replace("-", "_")
        if group in seen:
            parts.append(f"(?P={group})")
        else:
            seen.add(group)
            parts.append(f"(?P<{group}>{_JOB_ID})")
        position = found.end()
    parts.append(re.escape(text[position:]))
    return re.compile("".join(parts))


def run_step(n: int, capsys: pytest.CaptureFixture[str]) -> str:
    runpy.run_path(str(PROGRAMS / f"step{n}.py"), run_name="__main__")
    return capsys.readouterr().out


def check(n: int, out: str) -> re.Match[str]:
    expected = EXPECTED[n].lstrip("\n")
    match = expected_pattern(expected).fullmatch(out)
    assert match is not None, f"step {n} printed:\n{out}\nexpected:\n{expected}"
    return match


def test_step1_flow_serialization(capsys: pytest.CaptureFixture[str]) -> None:
    check(1, run_step(1, capsys))
    assert Path("flow.json").is_file()


def test_step2_deserializing_flows(capsys: pytest.CaptureFixture[str]) -> None:
    run_step(1, capsys)
    check(2, run_step(2, capsys))


def test_step3_serialization_requirements(capsys: pytest.CaptureFixture[str]) -> None:
    check(3, run_step(3, capsys))


def test_step4_saving_job_state(capsys: pytest.CaptureFixture[str]) -> None:
    match = check(4, run_step(4, capsys))
    saved = Path("workflow_state.json").read_text()
    assert match.group("unique_job_id") in saved


def test_step5_resuming_from_saved_state(capsys: pytest.CaptureFixture[str]) -> None:
    check(5, run_step(5, capsys))


def test_step6_cross_host_recovery(capsys: pytest.CaptureFixture[str]) -> None:
    match = check(6, run_step(6, capsys))
    assert match.group("job_id") in Path("execution_state.json").read_text()


def test_programs_differ_from_the_tutorial_only_where_documented() -> None:
    """Every line of the test copies is the tutorial's, but for imports and FIX lines."""
    spec = Path(__file__).parents[3] / "shared" / "spec" / "004_e4d22e79c7044601.txt"
    if not spec.is_file():
        pytest.skip(f"the spec is not at {spec}")
    tutorial = {line.strip() for line in spec.read_text().splitlines()}
    for n in range(1, 7):
        lines = (PROGRAMS / f"step{n}.py").read_text().splitlines()
        fixes = 0
        for line in lines[3:]:  # after the header comment
            text = line.strip()
            if not text or text in tutorial or text.startswith("from flujo.routines import"):
                continue
            fixes += 1
            assert "FIX" in line or n == 6, f"step {n}: {line!r} is not in the tutorial"
        assert fixes <= {3: 1, 6: 4}.get(n, 0), f"step {n} has {fixes} changed lines"
