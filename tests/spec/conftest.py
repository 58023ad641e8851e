"""The spec's own tests run as written; these fixtures keep them out of the repository.

Section 7.1 of spec 001 builds runners without a state_backend, so they store runs in the
default ``flujo_ops.db`` in the working directory: every test here runs in its own temporary
directory, with no settings from the environment.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("FLUJO_STATE_URI", "FLUJO_CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)
