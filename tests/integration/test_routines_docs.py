"""docs/routines.md's Python blocks, run in order as one program: the outputs it shows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import flujo

DOC = Path(__file__).parents[2] / "docs" / "routines.md"
FLUJO_PATH = str(Path(flujo.__file__).resolve().parent.parent)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_routines_page_runs_and_prints_what_it_shows(tmp_path: Path) -> None:
    program = tmp_path / "page.py"
    program.write_text("\n".join(python_blocks(DOC.read_text())))
    out = subprocess.run(
        [sys.executable, str(program)],
        cwd=tmp_path,
        env={"PYTHONPATH": FLUJO_PATH, "PATH": ""},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "1: to",
        "2: be",
        "3: or",
        "4: not",
        "completed {'total': 4}",
        "1: to",
        "2: be",
        "completed 5 {'total': 2}",
    ]
    assert (tmp_path / "jobs.db").is_file()
