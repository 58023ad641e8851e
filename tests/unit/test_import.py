"""Importing flujo is light: tenacity (and any database driver) loads only when needed."""

import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
import flujo
after_import = {name: name in sys.modules for name in ("tenacity", "asyncpg", "psycopg")}

from flujo import Flujo, Step, step

@step
async def plain(x: int) -> int:
    return x + 1

Flujo(plain, persist_state=False).run(1)
after_plain_run = "tenacity" in sys.modules

calls = {"n": 0}

async def flaky(x: int) -> int:
    calls["n"] += 1
    if calls["n"] == 1:
        raise RuntimeError("once")
    return x

result = Flujo(
    Step.from_callable(flaky, name="flaky", retries=1, backoff_s=0), persist_state=False
).run(1)
print(json.dumps({
    "after_import": after_import,
    "after_plain_run": after_plain_run,
    "after_retry": "tenacity" in sys.modules,
    "retry_status": result.status,
}))
"""


def _probe(tmp_path: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    return json.loads(out.stdout)


def test_import_flujo_does_not_load_tenacity_or_drivers(tmp_path: Path) -> None:
    data = _probe(tmp_path)
    assert data["after_import"] == {"tenacity": False, "asyncpg": False, "psycopg": False}
    assert data["after_plain_run"] is False
    # ... but tenacity loads when a step actually retries.
    assert data["after_retry"] is True
    assert data["retry_status"] == "completed"
    assert list(tmp_path.iterdir()) == []


def test_public_names_are_importable() -> None:
    import flujo

    for name in flujo.__all__:
        assert hasattr(flujo, name), name
    assert isinstance(flujo.__version__, str)
