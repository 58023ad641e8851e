"""flujo behind FastAPI, wired the way the production manual (section 7) prescribes.

- The runner lives in a ``FlujoAdapter`` made when the app starts; the lifespan calls
  ``await adapter.shutdown()`` (which runs ``await runner.aclose()``) when it stops, so no
  database connection or pool outlives the app.
- Runs are started with ``run_result_async`` (never the sync API inside a server).
- Errors follow the manual's pattern: flujo's signals are re-raised, ``FlujoError`` becomes an
  HTTP error with a JSON body; there is no bare ``except Exception``.
- The store is the configured one: ``FLUJO_STATE_URI`` (for example
  ``postgresql://user:pass@host:5432/db``), else ``flujo.toml``, else ``flujo_ops.db``.

Serve it with any ASGI server, for example ``uvicorn examples.fastapi_app:app`` from the
repository root (uvicorn is not a dependency of flujo). Endpoints:

- ``POST /runs`` ``{"name": "Ada", "user_id": "u-7", "metadata": {"tenant": "acme"}}``:
  run the greeting pipeline; 200 when it completed, 202 when it paused for a review
  (``"review": true``), 422 when a step failed (a blank name), 400 for bad input.
- ``GET /runs?status=failed&meta=user_id:u-7&limit=20``: find runs (``TaskClient.list_tasks``).
- ``GET /runs/{run_id}``: one run's context and step history (``TaskClient.get_task``), 404
  when there is no such run.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from flujo import Flujo, PipelineContext, TaskClient, step
from flujo.exceptions import (
    ContextValidationError,
    FlujoError,
    InvalidMetadataError,
    InvalidRunIdError,
    PausedException,
    PipelineAbortSignal,
    PipelineMismatchError,
    StateBackendError,
    StateConflictError,
)

logger = logging.getLogger("examples.fastapi_app")


# -- the pipeline ----------------------------------------------------------------------------


class GreetingContext(PipelineContext):
    """Seeded from the request for auditability (manual, section 9); checkpointed per step."""

    user_id: str = "anonymous"
    source: str = "api"
    needs_review: bool = False
    normalised: str | None = None


@step
async def normalise(name: str, *, context: GreetingContext) -> str:
    cleaned = " ".join(name.split()).title()
    if not cleaned:
        raise ValueError("a name is required")
    context.normalised = cleaned
    return cleaned


@step
async def review(name: str, *, context: GreetingContext) -> str:
    if context.needs_review:
        # A signal, not an error: the runner stores the run as "paused".
        raise PausedException(f"a human must approve the greeting for {name!r}")
    return name


@step
async def greet(name: str, *, context: GreetingContext) -> str:
    return f"Hello, {name}!"


greeting_pipeline = normalise >> review >> greet


# -- the adapter and the lifespan (manual, section 7) ---------------------------------------


class FlujoAdapter:
    """Owns the runner (and a TaskClient on the same store) for the life of the app."""

    def __init__(self) -> None:
        # No state_backend: the store comes from FLUJO_STATE_URI > flujo.toml > default.
        self.runner: Flujo[str, str, GreetingContext] = Flujo(
            greeting_pipeline,
            context_model=GreetingContext,
            pipeline_name="greeting",
            pipeline_version="1.0.0",
        )
        assert self.runner.state_backend is not None
        self.tasks = TaskClient(self.runner.state_backend)

    async def shutdown(self) -> None:
        await self.runner.aclose()  # Drains Postgres pool (closes SQLite)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Startup
    adapter = FlujoAdapter()
    app.state.adapter = adapter
    yield
    # Shutdown
    await adapter.shutdown()


app = FastAPI(title="flujo greeting service", lifespan=lifespan)


def get_adapter(request: Request) -> FlujoAdapter:
    adapter: FlujoAdapter = request.app.state.adapter
    return adapter


# -- errors ----------------------------------------------------------------------------------

_BAD_INPUT = (InvalidMetadataError, InvalidRunIdError, ContextValidationError)


def http_error(exc: FlujoError) -> HTTPException:
    """A FlujoError as an HTTP error with a JSON body (never a traceback)."""
    if isinstance(exc, _BAD_INPUT):
        status = 400
    elif isinstance(exc, (PipelineMismatchError, StateConflictError)):
        status = 409
    elif isinstance(exc, StateBackendError):
        status = 503
    else:
        status = 500
    return HTTPException(status, detail={"error": type(exc).__name__, "message": str(exc)})


# -- the API ---------------------------------------------------------------------------------


class RunRequest(BaseModel):
    name: str
    user_id: str = "anonymous"
    review: bool = False
    """Pause the run for a human review before the greeting."""
    run_id: str | None = None
    """Optional idempotency key: posting the same run_id again returns the stored result."""
    metadata: dict[str, str] = Field(default_factory=dict)
    """Stored with the run, for finding it later (``GET /runs?meta=key:value``)."""


class RunResponse(BaseModel):
    run_id: str
    status: str
    output: str | None = None
    error: dict[str, Any] | None = None


@app.post("/runs", response_model=RunResponse)
async def start_run(body: RunRequest, request: Request) -> Any:
    adapter = get_adapter(request)
    initial_ctx = {"user_id": body.user_id, "source": "api", "needs_review": body.review}
    try:
        result = await adapter.runner.run_result_async(
            body.name,
            run_id=body.run_id,
            initial_context_data=initial_ctx,
            metadata={"user_id": body.user_id, **body.metadata},
        )
    except (PausedException, PipelineAbortSignal):
        raise  # Allow signal to bubble up
    except FlujoError as exc:
        logger.error("Execution Error: %s", exc)
        raise http_error(exc) from exc

    error = None
    if result.error is not None:
        error = {**result.error.to_dict(), "step": result.failed_step}
    response = RunResponse(
        run_id=result.run_id, status=result.status, output=result.output, error=error
    )
    if result.status == "failed":
        # A step failed: the run is stored as failed; tell the caller why, as data.
        raise HTTPException(422, detail=response.model_dump())
    if result.status in ("paused", "cancelled"):
        return JSONResponse(status_code=202, content=response.model_dump())
    return response


@app.get("/runs")
async def list_runs(
    request: Request,
    status: str | None = None,
    meta: Annotated[list[str] | None, Query(description="key:value, repeatable")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[dict[str, Any]]:
    metadata_filter: dict[str, str] = {}
    for item in meta or []:
        key, sep, value = item.partition(":")
        if not sep:
            raise HTTPException(400, detail={"error": "BadFilter", "message": f"{item!r}"})
        metadata_filter[key] = value
    try:
        tasks = await get_adapter(request).tasks.list_tasks(
            status=status, metadata_filter=metadata_filter, limit=limit, offset=offset
        )
    except (PausedException, PipelineAbortSignal):
        raise
    except FlujoError as exc:
        logger.error("Listing Error: %s", exc)
        raise http_error(exc) from exc
    return [task.model_dump(mode="json") for task in tasks]


@app.get("/runs/{run_id}")
async def get_run(run_id: str, request: Request) -> dict[str, Any]:
    try:
        detail = await get_adapter(request).tasks.get_task(run_id)
    except (PausedException, PipelineAbortSignal):
        raise
    except FlujoError as exc:
        logger.error("Lookup Error: %s", exc)
        raise http_error(exc) from exc
    if detail is None:
        raise HTTPException(404, detail={"error": "RunNotFound", "message": run_id})
    return detail.model_dump(mode="json")


if __name__ == "__main__":
    print("Serve this app with an ASGI server, e.g.: uvicorn examples.fastapi_app:app")
