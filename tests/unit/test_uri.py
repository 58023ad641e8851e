"""backend_from_uri: one state URI -> one backend, drivers loaded lazily, secrets never shown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flujo.exceptions import ConfigurationError, StateBackendError
from flujo.state import FileBackend, InMemoryBackend, SQLiteBackend
from flujo.state.backends.postgres import PostgresBackend
from flujo.state.uri import backend_from_uri, redact_uri

SECRET = "s3cr3t-Pa55"


@pytest.fixture(autouse=True)
def in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- each scheme -----------------------------------------------------------------------------


def test_memory() -> None:
    backend = backend_from_uri("memory://")
    assert isinstance(backend, InMemoryBackend)
    assert backend_from_uri("memory://") is not backend  # a fresh store each time


def test_file_with_an_absolute_directory(tmp_path: Path) -> None:
    backend = backend_from_uri(f"file://{tmp_path / 'abs'}")  # file:///tmp/.../abs
    assert isinstance(backend, FileBackend)
    assert backend.directory == tmp_path / "abs"


def test_file_with_a_relative_directory(tmp_path: Path) -> None:
    backend = backend_from_uri("file://runs/here")
    assert isinstance(backend, FileBackend)
    assert backend.directory == tmp_path / "runs" / "here"


def test_sqlite_relative_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = backend_from_uri("sqlite:///rel.db")
    assert isinstance(backend, SQLiteBackend)
    assert backend.path == tmp_path / "rel.db"
    assert backend.synchronous == "NORMAL"
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    assert backend_from_uri("sqlite:///data/rel.db").path == sub / "data" / "rel.db"


def test_sqlite_absolute_path(tmp_path: Path) -> None:
    target = tmp_path / "nested" / "abs.db"
    backend = backend_from_uri(f"sqlite:///{target}")  # four slashes: sqlite:////tmp/...
    assert isinstance(backend, SQLiteBackend)
    assert backend.path == target


@pytest.mark.parametrize("value", ["FULL", "full", "Full"])
def test_sqlite_synchronous_option(value: str) -> None:
    backend = backend_from_uri(f"sqlite:///x.db?synchronous={value}")
    assert isinstance(backend, SQLiteBackend)
    assert backend.synchronous == "FULL"


def test_sqlite_busy_timeout_option() -> None:
    backend = backend_from_uri("sqlite:///x.db?busy_timeout_s=2.5&synchronous=EXTRA")
    assert isinstance(backend, SQLiteBackend)
    assert backend.busy_timeout_s == 2.5
    assert backend.synchronous == "EXTRA"


async def test_a_sqlite_uri_store_is_created_on_first_use_where_it_says(tmp_path: Path) -> None:
    backend = backend_from_uri("sqlite:///store.db")
    assert not (tmp_path / "store.db").exists()  # nothing opens before use
    async with backend:
        assert await backend.list_runs() == []
    assert (tmp_path / "store.db").is_file()


def test_scheme_is_case_insensitive(tmp_path: Path) -> None:
    assert isinstance(backend_from_uri("MEMORY://"), InMemoryBackend)
    assert backend_from_uri("SQLite:///x.db").path == tmp_path / "x.db"


def test_backend_options_are_passed_through() -> None:
    backend = backend_from_uri("sqlite:///x.db", max_payload_bytes=1234)
    assert backend.serializer.max_bytes == 1234
    assert backend_from_uri("memory://", max_payload_bytes=99).serializer.max_bytes == 99


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_postgres_with_pool_sizes(scheme: str) -> None:
    # Port 1 on localhost: nobody listens. Building the backend must not try to connect.
    dsn = f"{scheme}://flujo:{SECRET}@127.0.0.1:1/flujo"
    backend = backend_from_uri(dsn, postgres_pool_min=3, postgres_pool_max=17)
    assert isinstance(backend, PostgresBackend)
    assert backend.dsn == dsn
    assert (backend.pool_min, backend.pool_max) == (3, 17)
    assert backend._pool is None
    assert SECRET not in repr(backend)


def test_postgres_default_pool_sizes() -> None:
    backend = backend_from_uri("postgresql://localhost/db")
    assert isinstance(backend, PostgresBackend)
    assert (backend.pool_min, backend.pool_max) == (1, 10)


def test_postgres_bad_pool_sizes_are_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        backend_from_uri("postgresql://localhost/db", postgres_pool_min=5, postgres_pool_max=2)


# -- bad URIs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param("flujo_ops.db", id="no-scheme"),
        pytest.param("", id="empty"),
        pytest.param("/var/lib/flujo.db", id="a-plain-path"),
        pytest.param("mysql://localhost/db", id="unknown-scheme"),
        pytest.param("redis://localhost:6379/0", id="another-unknown-scheme"),
        pytest.param("sqlite://", id="sqlite-without-path"),
        pytest.param("sqlite:///", id="sqlite-empty-path"),
        pytest.param("sqlite://rel.db", id="sqlite-two-slashes"),
        pytest.param("sqlite:///x.db?cache=shared", id="sqlite-unknown-option"),
        pytest.param("sqlite:///x.db?synchronous=sometimes", id="sqlite-bad-synchronous"),
        pytest.param("sqlite:///x.db?busy_timeout_s=soon", id="sqlite-bad-timeout"),
        pytest.param("file://", id="file-without-directory"),
    ],
)
def test_bad_uris_are_configuration_errors(uri: str) -> None:
    with pytest.raises(ConfigurationError):
        backend_from_uri(uri)


@pytest.mark.parametrize("uri", [None, 42, b"memory://"])
def test_a_uri_that_is_not_a_string_is_a_configuration_error(uri: object) -> None:
    with pytest.raises(ConfigurationError):
        backend_from_uri(uri)  # type: ignore[arg-type]


def test_unknown_scheme_message_names_the_scheme_and_the_choices() -> None:
    with pytest.raises(ConfigurationError) as info:
        backend_from_uri("mysql://localhost/db")
    message = str(info.value)
    assert "mysql" in message
    assert "sqlite" in message
    assert "postgresql" in message


def test_unknown_sqlite_option_is_named() -> None:
    with pytest.raises(ConfigurationError, match="cache"):
        backend_from_uri("sqlite:///x.db?cache=shared")


# -- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "redacted"),
    [
        (f"postgresql://user:{SECRET}@db:5432/app", "postgresql://user:***@db:5432/app"),
        (
            f"postgres://user:{SECRET}@db/app?sslmode=require",
            "postgres://user:***@db/app?sslmode=require",
        ),
        ("postgresql://user:@db/app", "postgresql://user:***@db/app"),
        (f"postgresql://{SECRET}:{SECRET}@db/app", f"postgresql://{SECRET}:***@db/app"),
        ("postgresql://user:p%40ss%3Aw@db/app", "postgresql://user:***@db/app"),
        (f"postgresql://user:{SECRET}@[::1]:5432/app", "postgresql://user:***@[::1]:5432/app"),
        ("postgresql://user@db/app", "postgresql://user@db/app"),
        ("sqlite:///flujo_ops.db", "sqlite:///flujo_ops.db"),
        ("memory://", "memory://"),
    ],
)
def test_redact_uri(uri: str, redacted: str) -> None:
    assert redact_uri(uri) == redacted


def test_redact_uri_of_an_unparsable_uri_shows_nothing_of_it() -> None:
    shown = redact_uri(f"postgresql://user:{SECRET}@[::1/app")
    assert SECRET not in shown


def test_redact_uri_hides_a_password_given_as_a_query_parameter() -> None:
    # libpq and asyncpg both accept ?password=...
    assert SECRET not in redact_uri(f"postgresql://user@db/app?password={SECRET}")


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param(f"mysql://user:{SECRET}@db/app", id="unknown-scheme"),
        pytest.param(f"postgresql:/user:{SECRET}@db/app", id="missing-slash"),
        pytest.param(f"postgresql//user:{SECRET}@db/app", id="missing-colon"),
        pytest.param(f"sqlite://user:{SECRET}@/x.db", id="sqlite-with-credentials"),
    ],
)
def test_errors_about_a_uri_never_show_its_password(uri: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        backend_from_uri(uri)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "dsn",
    [
        pytest.param(f"postgresql://flujo:{SECRET}@127.0.0.1:1/flujo", id="userinfo"),
        pytest.param(f"postgresql://flujo@127.0.0.1:1/flujo?password={SECRET}", id="query"),
    ],
)
async def test_a_connection_error_never_shows_the_password(dsn: str) -> None:
    backend = backend_from_uri(dsn)
    try:
        with pytest.raises(StateBackendError) as info:
            await backend.list_runs()
    finally:
        await backend.aclose()
    assert "127.0.0.1" in str(info.value)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(backend)


# -- importing stays light -------------------------------------------------------------------

PROBE = """
import json, sys
import flujo
heavy = ("asyncpg", "pydantic_settings", "typer", "rich")
after_import = sorted(name for name in heavy if name in sys.modules)
from flujo import Flujo, step
@step
async def one(x: int) -> int:
    return x
Flujo(one, persist_state=False).run(1)
after_unpersisted_run = sorted(name for name in heavy if name in sys.modules)
from flujo.state.uri import backend_from_uri
backend_from_uri("postgresql://user:pw@127.0.0.1:1/db")
after_postgres_uri = "asyncpg" in sys.modules
print(json.dumps({
    "after_import": after_import,
    "after_unpersisted_run": after_unpersisted_run,
    "after_postgres_uri": after_postgres_uri,
}))
"""


def test_import_flujo_does_not_import_drivers_settings_or_the_cli(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["after_import"] == []
    assert data["after_unpersisted_run"] == []
    assert data["after_postgres_uri"] is False
    assert list(tmp_path.iterdir()) == []
