"""examples/fastapi_app.py driven through a real ASGI client, lifespan included.

``TestClient(app)`` used as a context manager runs the app's startup and shutdown, so these
tests see what a server would: the runner made at startup on the store FLUJO_STATE_URI names,
and closed (``await runner.aclose()``) at shutdown.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from flujo.state import SQLiteBackend

with warnings.catch_warnings():
    # Starlette nudges towards `httpx2`; the brief asks for fastapi.testclient over httpx.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "fastapi_app.py"


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A fresh copy of the example module (loaded from its file, no bytecode written)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    spec = importlib.util.spec_from_file_location("flujo_fastapi_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # as an import would (for pydantic)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """FLUJO_STATE_URI points at a SQLite file in tmp_path; nothing else is configured."""
    for name in list(os.environ):
        if name.upper().startswith("FLUJO_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "api.db"
    monkeypatch.setenv("FLUJO_STATE_URI", f"sqlite:///{db}")
    return db


@pytest.fixture
def api(example: ModuleType, store: Path) -> Iterator[TestClient]:
    with TestClient(example.app) as client:
        yield client


def post_run(api: TestClient, **body: Any) -> Any:
    return api.post("/runs", json={"name": "ada lovelace", **body})


def load(db: Path, run_id: str) -> dict[str, Any] | None:
    async def read() -> dict[str, Any] | None:
        async with SQLiteBackend(db) as backend:
            return await backend.load_state(run_id)

    return asyncio.run(read())


# -- the app ---------------------------------------------------------------------------------


def test_the_module_imports_cleanly_without_uvicorn_or_side_effects(tmp_path: Path) -> None:
    probe = (
        "import json, sys\n"
        "import examples.fastapi_app as m\n"
        "print(json.dumps({'uvicorn': 'uvicorn' in sys.modules,"
        " 'app': type(m.app).__name__, 'adapter': hasattr(m.app.state, 'adapter')}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("FLUJO_STATE_URI", None)
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # `uvicorn examples.fastapi_app:app` finds a FastAPI app; importing opened no store.
    assert json.loads(done.stdout) == {"uvicorn": False, "app": "FastAPI", "adapter": False}
    assert list(tmp_path.iterdir()) == []


def test_startup_builds_the_runner_on_the_configured_store(
    example: ModuleType, store: Path
) -> None:
    with TestClient(example.app) as api:
        adapter = api.app.state.adapter  # type: ignore[attr-defined]
        assert isinstance(adapter, example.FlujoAdapter)
        backend = adapter.runner.state_backend
        assert isinstance(backend, SQLiteBackend)
        assert backend.path == store
        assert adapter.tasks.backend is backend


def test_post_runs_a_pipeline_and_stores_it_with_metadata(api: TestClient, store: Path) -> None:
    response = post_run(api, user_id="u-7", metadata={"tenant": "acme"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "completed"
    assert body["output"] == "Hello, Ada Lovelace!"
    assert body["error"] is None
    run_id = body["run_id"]

    state = load(store, run_id)
    assert state is not None
    assert state["status"] == "completed"
    assert state["metadata"] == {"user_id": "u-7", "tenant": "acme"}
    assert state["pipeline_context"]["user_id"] == "u-7"
    assert state["pipeline_context"]["source"] == "api"
    assert state["pipeline_name"] == "greeting"


def test_get_a_run(api: TestClient) -> None:
    run_id = post_run(api, user_id="u-1", run_id="greet-1").json()["run_id"]
    assert run_id == "greet-1"
    response = api.get(f"/runs/{run_id}")
    assert response.status_code == 200
    detail = response.json()
    assert detail["run_id"] == "greet-1"
    assert detail["status"] == "completed"
    assert detail["metadata"] == {"user_id": "u-1"}
    assert detail["context"]["normalised"] == "Ada Lovelace"
    assert detail["step_names"] == ["normalise", "review", "greet"]
    assert [s["name"] for s in detail["step_history"]] == ["normalise", "review", "greet"]
    assert detail["step_history"][-1]["output"] == "Hello, Ada Lovelace!"
    assert detail["last_step_output"] == "Hello, Ada Lovelace!"


def test_get_an_unknown_run_is_404(api: TestClient) -> None:
    response = api.get("/runs/no-such-run")
    assert response.status_code == 404
    assert response.json()["detail"]["error"] == "RunNotFound"


def test_get_with_an_invalid_run_id_is_a_mapped_400(api: TestClient) -> None:
    response = api.get("/runs/..bad")
    assert response.status_code == 400
    assert response.json()["detail"]["error"] == "InvalidRunIdError"


def test_list_runs_by_status_and_metadata(api: TestClient) -> None:
    assert post_run(api, user_id="u-1", run_id="a", metadata={"tenant": "acme"}).status_code == 200
    assert post_run(api, user_id="u-2", run_id="b", metadata={"tenant": "acme"}).status_code == 200
    assert post_run(api, user_id="u-1", run_id="c", name="  ").status_code == 422
    assert post_run(api, user_id="u-1", run_id="d", review=True).status_code == 202

    def ids(**params: Any) -> list[str]:
        response = api.get("/runs", params=params)
        assert response.status_code == 200, response.text
        return [task["run_id"] for task in response.json()]

    assert ids() == ["d", "c", "b", "a"]
    assert ids(status="completed") == ["b", "a"]
    assert ids(status="failed") == ["c"]
    assert ids(status="paused") == ["d"]
    assert ids(meta="user_id:u-1") == ["d", "c", "a"]
    assert ids(meta=["user_id:u-1", "tenant:acme"]) == ["a"]
    assert ids(status="completed", meta="tenant:acme") == ["b", "a"]
    assert ids(meta="tenant:nobody") == []
    assert ids(limit=2) == ["d", "c"]
    assert ids(limit=2, offset=2) == ["b", "a"]

    [task] = api.get("/runs", params={"status": "failed"}).json()
    assert task["error"]["type"] == "ValueError"
    assert task["error"]["step"] == "normalise"


def test_a_hostile_metadata_filter_is_a_mapped_400(api: TestClient) -> None:
    post_run(api, run_id="a")
    response = api.get("/runs", params={"meta": "user_id') OR 1=1 --:x"})
    assert response.status_code == 400
    assert response.json()["detail"]["error"] == "InvalidMetadataError"
    assert api.get("/runs", params={"meta": "no-colon"}).status_code == 400


def test_a_step_error_is_a_mapped_http_error_not_a_500(api: TestClient, store: Path) -> None:
    response = post_run(api, name="   ", run_id="blank")
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail["run_id"] == "blank"
    assert detail["status"] == "failed"
    assert detail["error"] == {
        "type": "ValueError",
        "message": "a name is required",
        "step": "normalise",
    }
    state = load(store, "blank")
    assert state is not None
    assert state["status"] == "failed"


def test_a_flujo_error_from_the_runner_is_a_mapped_http_error(api: TestClient) -> None:
    response = post_run(api, metadata={"bad key!": "x"})
    assert response.status_code == 400
    assert response.json()["detail"]["error"] == "InvalidMetadataError"
    response = post_run(api, run_id="../../etc/passwd")
    assert response.status_code == 400
    assert response.json()["detail"]["error"] == "InvalidRunIdError"


def test_a_paused_run_is_accepted_and_stored(api: TestClient, store: Path) -> None:
    response = post_run(api, run_id="needs-review", review=True)
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "paused"
    assert body["output"] is None
    assert body["error"]["type"] == "PausedException"
    state = load(store, "needs-review")
    assert state is not None
    assert state["status"] == "paused"


def test_posting_a_run_id_again_returns_the_stored_result(api: TestClient, store: Path) -> None:
    first = post_run(api, run_id="once", user_id="u-1")
    again = post_run(api, run_id="once", user_id="u-2", name="someone else")
    assert again.status_code == 200
    assert again.json() == first.json()
    state = load(store, "once")
    assert state is not None
    assert len(state["step_history"]) == 3
    assert state["metadata"] == {"user_id": "u-1"}


def test_shutdown_closes_the_runners_backend(
    example: ModuleType, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutdowns: list[object] = []
    closes: list[object] = []
    original_shutdown = example.FlujoAdapter.shutdown
    original_aclose = example.Flujo.aclose

    async def spy_shutdown(self: Any) -> None:
        shutdowns.append(self)
        await original_shutdown(self)

    async def spy_aclose(self: Any) -> None:
        closes.append(self)
        await original_aclose(self)

    monkeypatch.setattr(example.FlujoAdapter, "shutdown", spy_shutdown)
    monkeypatch.setattr(example.Flujo, "aclose", spy_aclose)

    with TestClient(example.app) as api:
        assert post_run(api).status_code == 200
        adapter = api.app.state.adapter  # type: ignore[attr-defined]
        backend = adapter.runner.state_backend
        assert backend._conn is not None  # the SQLite connection is open while serving
        assert shutdowns == []
    assert shutdowns == [adapter]
    assert closes == [adapter.runner]
    assert backend._conn is None  # closed by runner.aclose() in the lifespan


def test_each_lifespan_gets_its_own_runner(example: ModuleType, store: Path) -> None:
    with TestClient(example.app) as api:
        first = api.app.state.adapter  # type: ignore[attr-defined]
        assert post_run(api, run_id="r1").status_code == 200
    with TestClient(example.app) as api:
        second = api.app.state.adapter  # type: ignore[attr-defined]
        assert second is not first
        # The store outlives the app: the run from the first lifespan is still there.
        assert api.get("/runs/r1").json()["status"] == "completed"
    assert first.runner.state_backend._conn is None
    assert second.runner.state_backend._conn is None
