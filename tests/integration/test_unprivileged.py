"""The permission tests, run for real when the suite runs as root.

As root, chmod cannot deny anything, so the read-only tests in tests/backends skip themselves.
Here they run again in a child pytest whose process has lost CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH (the capabilities that let root ignore file permissions).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PERMISSION_TESTS = [
    "tests/backends/test_file_backend.py::test_a_read_only_directory_fails_cleanly",
    "tests/backends/test_file_backend.py::test_an_unreadable_file_fails_cleanly",
    "tests/backends/test_sqlite_backend.py::test_a_read_only_database_fails_cleanly",
    "tests/backends/test_sqlite_backend.py::"
    "test_a_read_only_directory_without_a_database_fails_cleanly",
]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="not root: the permission tests ran unprivileged")
def test_permission_tests_pass_without_root_privileges(tmp_path: Path) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        if os.environ.get("CI"):
            pytest.fail("setpriv (util-linux) is needed to run the permission tests as root")
        pytest.skip("setpriv (util-linux) is not installed")
    drop = "-dac_override,-dac_read_search"
    done = subprocess.run(
        [
            setpriv,
            f"--inh-caps={drop}",
            f"--bounding-set={drop}",
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'basetemp'}",
            *PERMISSION_TESTS,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(PERMISSION_TESTS)} passed" in done.stdout, done.stdout
