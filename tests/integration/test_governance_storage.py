"""Issue 6: ``FLUJO_GOVERNANCE_PII_SCRUB`` proven on the raw stored bytes.

A pipeline puts an e-mail address, a phone number, a Luhn-valid card number, two API keys and
a secret-named JSON value into everything a run persists: the initial input, the run's
metadata, context fields, step outputs (one through a ``CacheStep`` with a store cache) and a
failing step's error message. Then every column of every table of the store is read back as
bytes (SQLite with the ``sqlite3`` module, Postgres with ``asyncpg`` as ``row::text``), and
none of the secrets may be there while the ``[REDACTED_*]`` tokens are. Without the variable the
same run stores the values as they are (the control), so the check cannot pass vacuously.

Also: strong mode (IPv4, IBAN), resuming a failed scrubbed run (the context then holds the
scrubbed values, as docs/governance.md says), and the scrubbing of flujo's log records.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from flujo import (
    CacheStep,
    Flujo,
    HumanInTheLoopStep,
    Pipeline,
    PipelineContext,
    Step,
    governance,
)
from flujo.domain.events import HookEvent, PostStep
from flujo.governance import (
    ENV_PHONE_REGION,
    ENV_PII_SCRUB,
    ENV_PII_STRONG,
    ENV_TOOL_ALLOWLIST,
    REDACTED_CARD,
    REDACTED_EMAIL,
    REDACTED_IBAN,
    REDACTED_IP,
    REDACTED_PHONE,
    REDACTED_SECRET,
)
from flujo.state.backends.base import StateBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.backends.sqlite import SQLiteBackend
from flujo.state.cache import CacheBackend, PostgresCache, SQLiteCache
from flujo.state.serialization import active_scrubber

# Made-up values of the right shapes (none of them is real).
EMAIL = "ana.lopez@example.com"
PHONE = "+1 415 555 2671"
CARD = "4111 1111 1111 1111"
OPENAI_KEY = "sk-" + "proj-Xy7Qa2Lm9Vb4Nc8Rt1Zs6Wd3Ke5Hj0"
AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"
PASSWORD = "hunter2"
SECRETS = (EMAIL, PHONE, CARD, OPENAI_KEY, AWS_KEY, PASSWORD)
TOKENS = (REDACTED_EMAIL, REDACTED_PHONE, REDACTED_CARD, REDACTED_SECRET)

IPV4 = "203.0.113.42"
IBAN = "GB82 WEST 1234 5698 7654 32"

RUN_ID = "gov-run-1"
INITIAL_INPUT = {
    "customer": EMAIL,
    "phone": PHONE,
    "card": CARD,
    "keys": [OPENAI_KEY, AWS_KEY],
    "password": PASSWORD,
}
METADATA = {"owner": EMAIL, "ticket": f"call {PHONE} about card {CARD}", "api": OPENAI_KEY}
FAILURE = (
    f"could not notify {EMAIL} at {PHONE}: card {CARD} declined, "
    f"keys {OPENAI_KEY} {AWS_KEY}, password={PASSWORD}"
)


class Customer(PipelineContext):
    contact: str = ""
    profile: dict[str, Any] = {}
    notes: list[str] = []


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _governance_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No governance variable unless the test sets one; the log record factory (which
    scrubbing wraps once per process) is put back afterwards."""
    for name in (ENV_PII_SCRUB, ENV_PII_STRONG, ENV_TOOL_ALLOWLIST, ENV_PHONE_REGION):
        monkeypatch.delenv(name, raising=False)
    original = logging.getLogRecordFactory()
    monkeypatch.setattr(governance, "_log_scrubbing_installed", False)
    try:
        yield
    finally:
        logging.setLogRecordFactory(original)


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------


def customer_pipeline(cache: CacheBackend, fail: list[bool]) -> Pipeline[Any, Any]:
    """collect (context + output) >> enrich (cached in the store) >> notify (fails while
    ``fail[0]``, with every secret in its message)."""

    async def collect(data: dict[str, Any], context: Customer) -> dict[str, Any]:
        context.contact = f"{data['customer']} / {data['phone']}"
        context.profile = {"card": data["card"], "password": data["password"], "api": AWS_KEY}
        context.notes = [f"key {OPENAI_KEY}", f"card {CARD}"]
        return {
            "email": EMAIL,
            "phone": PHONE,
            "card": CARD,
            "keys": [OPENAI_KEY, AWS_KEY],
            "password": PASSWORD,
        }

    async def enrich(data: dict[str, Any]) -> dict[str, Any]:
        return {"summary": f"{data['email']} pays with {data['card']}", "password": PASSWORD}

    async def notify(data: dict[str, Any], context: Customer) -> dict[str, Any]:
        if fail[0]:
            raise RuntimeError(FAILURE)
        return {"sent_to": context.contact, "profile": context.profile, "previous": data}

    enriched = CacheStep(Step.from_callable(enrich, name="enrich"), cache)
    return (
        Step.from_callable(collect, name="collect")
        >> enriched
        >> Step.from_callable(notify, name="notify")
    )


async def run_twice(backend: StateBackend, cache: CacheBackend) -> tuple[Any, Any]:
    """The run fails at ``notify``; a new runner resumes it (``notify`` succeeds then)."""
    fail = [True]
    pipeline = customer_pipeline(cache, fail)
    runner = Flujo(pipeline, context_model=Customer, state_backend=backend, pipeline_name="gov")
    first = await runner.run_async(INITIAL_INPUT, run_id=RUN_ID, metadata=METADATA)
    fail[0] = False
    again = Flujo(pipeline, context_model=Customer, state_backend=backend, pipeline_name="gov")
    resumed = await again.run_async(INITIAL_INPUT, run_id=RUN_ID)
    return first, resumed


def sqlite_bytes(path: Path) -> dict[str, bytes]:
    """Every column of every row of every table of the SQLite file, as bytes, by table."""
    conn = sqlite3.connect(path)
    conn.text_factory = bytes
    try:
        tables = [
            name.decode() if isinstance(name, bytes) else name
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        found: dict[str, bytes] = {}
        for table in tables:
            chunks: list[bytes] = []
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                for value in row:
                    chunks.append(value if isinstance(value, bytes) else repr(value).encode())
            found[table] = b"\x00".join(chunks)
        return found
    finally:
        conn.close()


def sqlite_files(path: Path) -> bytes:
    """The database file and its WAL as they are on disk (no secret was ever written)."""
    return b"".join(p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name))


async def postgres_bytes(dsn: str, schema: str) -> dict[str, bytes]:
    """Every row of every table in ``schema`` as ``row::text``, by table, plus the raw bytes
    of every ``bytea`` column (which ``::text`` shows in hex)."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = [
            row["table_name"]
            for row in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                schema,
            )
        ]
        found: dict[str, bytes] = {}
        for table in tables:
            rows = await conn.fetch(f'SELECT t::text AS row FROM "{schema}"."{table}" t')
            chunks = [row["row"].encode() for row in rows]
            for row in await conn.fetch(f'SELECT * FROM "{schema}"."{table}"'):
                chunks.extend(value for value in row.values() if isinstance(value, bytes))
            found[table] = b"\x00".join(chunks)
        return found
    finally:
        await conn.close()


def assert_scrubbed(stored: dict[str, bytes], *, runs: str, cache: str) -> None:
    everything = b"\x00".join(stored.values())
    for secret in SECRETS:
        leaks = [table for table, data in stored.items() if secret.encode() in data]
        assert not leaks, f"{secret!r} is stored in {leaks}"
    for token in TOKENS:
        assert token.encode() in everything, f"{token} not stored"
    # the tokens are where the values were: the run's row (input, metadata, error, output) ...
    assert REDACTED_EMAIL.encode() in stored[runs]
    # ... and the cached value
    assert REDACTED_CARD.encode() in stored[cache]
    assert REDACTED_SECRET.encode() in stored[cache]


def assert_resumed_on_scrubbed_values(first: Any, resumed: Any) -> None:
    assert first.status == "failed"
    assert first.failed_step == "notify"
    # The failed run's result in this process still has the values (only storage is scrubbed).
    assert EMAIL in first.error.message
    assert resumed.status == "completed"
    # The resumed run restored its context from the store: the scrubbed values.
    context = resumed.final_pipeline_context
    assert context.contact == f"{REDACTED_EMAIL} / {REDACTED_PHONE}"
    assert context.profile == {
        "card": REDACTED_CARD,
        "password": REDACTED_SECRET,
        "api": REDACTED_SECRET,
    }
    assert context.notes == [f"key {REDACTED_SECRET}", f"card {REDACTED_CARD}"]
    assert resumed.output["sent_to"] == f"{REDACTED_EMAIL} / {REDACTED_PHONE}"
    # notify got the stored (scrubbed) output of enrich as its input
    assert resumed.output["previous"] == {
        "summary": f"{REDACTED_EMAIL} pays with {REDACTED_CARD}",
        "password": REDACTED_SECRET,
    }


# --------------------------------------------------------------------------------------------
# SQLite
# --------------------------------------------------------------------------------------------


async def test_sqlite_stores_no_secret_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PII_SCRUB, "1")
    path = tmp_path / "runs.db"
    async with SQLiteBackend(path) as backend:
        first, resumed = await run_twice(backend, SQLiteCache(backend))
        state = await backend.load_state(RUN_ID)
    assert_resumed_on_scrubbed_values(first, resumed)
    stored = sqlite_bytes(path)
    assert {"runs", "run_context", "run_steps", "flujo_cache"} <= set(stored)
    assert_scrubbed(stored, runs="runs", cache="flujo_cache")
    assert REDACTED_EMAIL.encode() in stored["run_metadata"]  # the index filters match on
    raw = sqlite_files(path)
    assert REDACTED_EMAIL.encode() in raw
    for secret in SECRETS:
        assert secret.encode() not in raw
    # What the store gives back (load_state) is the scrubbed data too.
    assert state is not None
    assert state["initial_input"] == {
        "customer": REDACTED_EMAIL,
        "phone": REDACTED_PHONE,
        "card": REDACTED_CARD,
        "keys": [REDACTED_SECRET, REDACTED_SECRET],
        "password": REDACTED_SECRET,
    }
    assert state["metadata"] == {
        "owner": REDACTED_EMAIL,
        "ticket": f"call {REDACTED_PHONE} about card {REDACTED_CARD}",
        "api": REDACTED_SECRET,
    }
    failed = [r for r in state["step_history"] if not r["success"]]
    assert [r["name"] for r in failed] == ["notify"]
    assert failed[0]["error"]["type"] == "RuntimeError"
    assert failed[0]["error"]["message"] == (
        f"could not notify {REDACTED_EMAIL} at {REDACTED_PHONE}: card {REDACTED_CARD} "
        f"declined, keys {REDACTED_SECRET} {REDACTED_SECRET}, password={REDACTED_SECRET}"
    )


async def test_sqlite_without_the_variable_stores_the_values_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SQLiteBackend(path) as backend:
        first, resumed = await run_twice(backend, SQLiteCache(backend))
    assert first.status == "failed"
    assert resumed.status == "completed"
    assert resumed.final_pipeline_context.contact == f"{EMAIL} / {PHONE}"
    stored = sqlite_bytes(path)
    everything = b"\x00".join(stored.values())
    for secret in SECRETS:
        assert secret.encode() in stored["runs"] or secret.encode() in stored["run_steps"]
        assert secret.encode() in everything
    assert EMAIL.encode() in stored["flujo_cache"]
    assert PASSWORD.encode() in stored["flujo_cache"]
    for token in TOKENS:
        assert token.encode() not in everything


async def test_a_cache_hit_returns_the_scrubbed_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scrubbing is lossy for the cache too: a later hit gets what was stored."""
    monkeypatch.setenv(ENV_PII_SCRUB, "1")
    calls: list[str] = []

    async def lookup(data: str) -> dict[str, str]:
        calls.append(data)
        return {"owner": EMAIL, "card": CARD}

    async with SQLiteBackend(tmp_path / "runs.db") as backend:
        cached = CacheStep(Step.from_callable(lookup, name="lookup"), SQLiteCache(backend))
        runner = Flujo(cached, state_backend=backend)
        miss = await runner.run_async("order-7")
        hit = await runner.run_async("order-7")
    assert calls == ["order-7"]
    assert miss.output == {"owner": EMAIL, "card": CARD}
    assert hit.step_history[0].cache_hit is True
    assert hit.output == {"owner": REDACTED_EMAIL, "card": REDACTED_CARD}


async def test_a_paused_question_and_its_answer_are_scrubbed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PII_SCRUB, "1")

    async def confirm(answer: str) -> str:
        return f"confirmed: {answer}"

    pipeline = HumanInTheLoopStep(
        "ask", message_for_user=lambda data, ctx: f"Is {data} still right?"
    ) >> Step.from_callable(confirm, name="confirm")
    path = tmp_path / "runs.db"
    async with SQLiteBackend(path) as backend:
        runner = Flujo(pipeline, state_backend=backend)
        paused = await runner.run_async(EMAIL, run_id="hitl-1")
        assert paused.status == "paused"
        stored_paused = sqlite_bytes(path)
        done = await Flujo(pipeline, state_backend=backend).resume_async(
            "hitl-1", f"yes, call {PHONE}"
        )
    assert done.status == "completed"
    # The answer is committed, then the run continues from the store: the next step sees the
    # scrubbed answer (docs/governance.md, "Scrubbing is lossy").
    assert done.output == f"confirmed: yes, call {REDACTED_PHONE}"
    for stored in (stored_paused, sqlite_bytes(path)):
        everything = b"\x00".join(stored.values())
        assert EMAIL.encode() not in everything
        assert PHONE.encode() not in everything
    assert f"Is {REDACTED_EMAIL} still right?".encode() in stored_paused["runs"]
    assert f"yes, call {REDACTED_PHONE}".encode() in b"\x00".join(sqlite_bytes(path).values())


# --------------------------------------------------------------------------------------------
# Postgres
# --------------------------------------------------------------------------------------------


async def migrated(dsn: str, schema: str) -> PostgresBackend:
    backend = PostgresBackend(dsn, schema=schema, pool_min=0)
    await backend.migrate()
    return backend


async def test_postgres_stores_no_secret_anywhere(
    postgres_dsn: str, postgres_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_PII_SCRUB, "1")
    backend = await migrated(postgres_dsn, postgres_schema)
    async with backend:
        first, resumed = await run_twice(backend, PostgresCache(backend))
        state = await backend.load_state(RUN_ID)
    assert_resumed_on_scrubbed_values(first, resumed)
    stored = await postgres_bytes(postgres_dsn, postgres_schema)
    assert {"flujo_runs", "flujo_run_context", "flujo_run_steps", "flujo_cache"} <= set(stored)
    assert_scrubbed(stored, runs="flujo_runs", cache="flujo_cache")
    assert state is not None
    assert state["metadata"]["owner"] == REDACTED_EMAIL


async def test_postgres_without_the_variable_stores_the_values_as_they_are(
    postgres_dsn: str, postgres_schema: str
) -> None:
    backend = await migrated(postgres_dsn, postgres_schema)
    async with backend:
        await run_twice(backend, PostgresCache(backend))
    stored = await postgres_bytes(postgres_dsn, postgres_schema)
    everything = b"\x00".join(stored.values())
    for secret in SECRETS:
        assert secret.encode() in everything
    assert EMAIL.encode() in stored["flujo_cache"]
    for token in TOKENS:
        assert token.encode() not in everything


# --------------------------------------------------------------------------------------------
# strong mode
# --------------------------------------------------------------------------------------------


async def run_network_step(path: Path) -> dict[str, bytes]:
    async def wire(data: str, context: Customer) -> dict[str, str]:
        context.contact = f"from {IPV4}"
        return {"client_ip": IPV4, "pay_to": IBAN, "note": f"{data} via {IPV4}"}

    async with SQLiteBackend(path) as backend:
        runner = Flujo(
            Step.from_callable(wire, name="wire"), context_model=Customer, state_backend=backend
        )
        result = await runner.run_async(f"refund to {IBAN}", metadata={"ip": IPV4})
    assert result.status == "completed"
    return sqlite_bytes(path)


@pytest.mark.parametrize("variable", [ENV_PII_STRONG, "both"])
async def test_strong_mode_scrubs_ip_addresses_and_ibans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(ENV_PII_STRONG, "1")
    if variable == "both":
        monkeypatch.setenv(ENV_PII_SCRUB, "1")
    stored = await run_network_step(tmp_path / "runs.db")
    everything = b"\x00".join(stored.values())
    assert IPV4.encode() not in everything
    assert IBAN.encode() not in everything
    assert IBAN.replace(" ", "").encode() not in everything
    assert REDACTED_IP.encode() in stored["runs"]
    assert REDACTED_IBAN.encode() in stored["runs"]
    assert REDACTED_IP.encode() in stored["run_context"]


@pytest.mark.parametrize("scrub", ["0", "1"])
async def test_without_strong_mode_ip_addresses_and_ibans_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scrub: str
) -> None:
    monkeypatch.setenv(ENV_PII_SCRUB, scrub)
    stored = await run_network_step(tmp_path / "runs.db")
    everything = b"\x00".join(stored.values())
    assert IPV4.encode() in stored["runs"]
    assert IPV4.encode() in stored["run_context"]
    assert IBAN.encode() in stored["runs"]
    assert REDACTED_IP.encode() not in everything
    assert REDACTED_IBAN.encode() not in everything


# --------------------------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------------------------


def failing_hook(message: str) -> Callable[[HookEvent], None]:
    def hook(event: HookEvent) -> None:
        if isinstance(event, PostStep):
            raise ValueError(message)

    return hook


async def test_flujo_log_records_are_scrubbed_and_application_records_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ENV_PII_SCRUB, "1")

    async def ok(data: str) -> str:
        return data

    async with SQLiteBackend(tmp_path / "runs.db") as backend:
        # A hook that fails is logged by the runner (logger flujo.hooks) with its traceback.
        runner = Flujo(
            Step.from_callable(ok, name="ok"),
            state_backend=backend,
            hooks=[failing_hook(f"no mailbox for {EMAIL}, card {CARD}")],
        )
        with caplog.at_level(logging.INFO):
            result = await runner.run_async("x")
            logging.getLogger("flujo.runner").warning("user %s called %s", EMAIL, PHONE)
            logging.getLogger("myapp").warning("user %s called %s", EMAIL, PHONE)
    assert result.status == "completed"
    by_logger = {record.name: record for record in caplog.records}
    hook_record = by_logger["flujo.hooks"]
    assert hook_record.exc_text is not None
    assert f"ValueError: no mailbox for {REDACTED_EMAIL}, card {REDACTED_CARD}" in (
        hook_record.exc_text
    )
    assert by_logger["flujo.runner"].getMessage() == (
        f"user {REDACTED_EMAIL} called {REDACTED_PHONE}"
    )
    assert by_logger["myapp"].getMessage() == f"user {EMAIL} called {PHONE}"
    flujo_text = "\n".join(
        caplog.handler.format(r) for r in caplog.records if r.name.startswith("flujo")
    )
    assert EMAIL not in flujo_text
    assert CARD not in flujo_text
    assert PHONE not in flujo_text


async def test_without_the_variable_flujo_log_records_are_kept(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ENV_PII_SCRUB, "1")
    assert active_scrubber() is not None  # installs the record factory, as a run does
    monkeypatch.setenv(ENV_PII_SCRUB, "0")  # read per record: off now
    with caplog.at_level(logging.INFO):
        logging.getLogger("flujo.runner").warning("user %s", EMAIL)
    (record,) = caplog.records
    assert record.getMessage() == f"user {EMAIL}"
