"""The ``flujo`` command: every command through typer's CliRunner, plus the installed script.

Each test works in its own tmp_path (the working directory) with FLUJO_STATE_URI pointing at a
SQLite file there; pipeline modules are written into tmp_path under unique names. The Postgres
tests use the shared ``postgres_dsn``/``postgres_schema`` fixtures (skip without a server, fail
under CI=true).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from typer.testing import CliRunner, Result

import flujo
from flujo import cli
from flujo.exceptions import (
    ConfigurationError,
    ContextValidationError,
    CorruptStateError,
    InvalidMetadataError,
    InvalidRunIdError,
    PayloadTooLargeError,
    PipelineMismatchError,
    PipelineNotFoundError,
    RunNotFoundError,
    SchemaVersionError,
    SerializationError,
    StateBackendError,
    StateConflictError,
)

FLOWS = """
from pathlib import Path

from flujo import Flujo, PausedException, PipelineContext, PipelineRegistry, step


def _log(name: str) -> None:  # which steps ran, across processes and resumes
    with Path("calls.log").open("a") as handle:
        handle.write(name + "\\n")


@step
async def double(x: int) -> int:
    _log("double")
    return x * 2


@step
async def flaky(x: int) -> int:
    _log("flaky")
    if not Path("marker").exists():
        raise RuntimeError("marker missing")
    return x + 1


@step
async def shout(x: int) -> str:
    _log("shout")
    return f"{x}!"


@step
async def unstorable(x: int) -> float:
    return float("nan")


@step
async def wait_for_human(x: int) -> int:
    raise PausedException("waiting for a human")


@step
async def meddle(x: int, *, context: PipelineContext) -> int:
    # Another process advances this run while the step runs (as a second `flujo resume` would).
    from flujo.config import configured_backend

    other = configured_backend()
    state = await other.load_state(context.run_id)
    state["version"] += 1
    await other.save_state(context.run_id, state)
    await other.aclose()
    return x


pipeline = double >> flaky >> shout
conflicted = double >> meddle >> shout
single = double
bad_output = double >> unstorable
paused = double >> wait_for_human
registry = PipelineRegistry()
registry.register(pipeline, "flaky-flow", "1.0.0")
registry_runner = Flujo(registry=registry, pipeline_name="flaky-flow")
runner = Flujo(pipeline, pipeline_name="wrapped")
not_a_pipeline = 42
"""

# -- helpers -------------------------------------------------------------------------------------


@pytest.fixture
def workdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """tmp_path as the working directory, its own SQLite store, no stray settings."""
    monkeypatch.chdir(tmp_path)
    for variable in (
        "FLUJO_APP",
        "FLUJO_CONFIG_PATH",
        "FLUJO_POSTGRES_POOL_MIN",
        "FLUJO_POSTGRES_POOL_MAX",
        "COLUMNS",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("FLUJO_STATE_URI", f"sqlite:///{tmp_path / 'runs.db'}")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the cwd on sys.path
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("cli_flows_"):
            del sys.modules[name]


def write_module(directory: Path, source: str = FLOWS) -> str:
    """Write ``source`` as a module with a unique name (imports are cached per process)."""
    name = f"cli_flows_{uuid.uuid4().hex[:10]}"
    (directory / f"{name}.py").write_text(source)
    return name


def invoke(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli.app, list(args), input=input)


def assert_ok(result: Result) -> None:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)


def assert_error(result: Result, code: int, *fragments: str) -> str:
    """The command failed with ``code`` and exactly one ``error:`` line, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run_id_of(result: Result) -> str:
    for line in result.stdout.splitlines():
        if line.startswith("Run "):
            return line.split()[1]
    raise AssertionError(f"no run id in {result.stdout!r}")


def output_of(result: Result) -> Any:
    return json.loads(result.stdout.split("Output:\n", 1)[1])


def calls(directory: Path) -> list[str]:
    path = directory / "calls.log"
    return path.read_text().split() if path.exists() else []


def list_json(*args: str) -> list[dict[str, Any]]:
    result = invoke("runs", "list", "--json", *args)
    assert_ok(result)
    data = json.loads(result.stdout)
    assert isinstance(data, list)
    return data


# -- the command itself ----------------------------------------------------------------------------


def test_version(workdir: Path) -> None:
    result = invoke("--version")
    assert_ok(result)
    assert result.stdout == f"flujo {flujo.__version__}\n"


def test_no_command_shows_help_and_one_error_line(workdir: Path) -> None:
    result = invoke()
    assert_error(result, cli.EXIT_USAGE, "missing command")
    assert "Usage" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["bogus"],
        ["runs", "list", "--limit", "0"],
        ["runs", "list", "--no-such-option"],
        ["runs", "show"],
        ["runs", "prune"],
        ["run"],
    ],
)
def test_usage_errors_are_one_line_with_exit_2(workdir: Path, args: list[str]) -> None:
    assert_error(invoke(*args), cli.EXIT_USAGE, "--help")


# -- flujo migrate ---------------------------------------------------------------------------------


def test_migrate_sqlite_creates_then_reports_nothing_to_do(workdir: Path) -> None:
    first = invoke("migrate")
    assert_ok(first)
    assert "Applied migrations 1, 2 to sqlite:///" in first.stdout
    assert "schema at version 2" in first.stdout
    assert (workdir / "runs.db").exists()
    again = invoke("migrate")
    assert_ok(again)
    assert "Already at schema version 2" in again.stdout
    assert "nothing to do" in again.stdout


def test_migrate_sqlite_file_without_flujo_tables(workdir: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(workdir / "runs.db")
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    result = invoke("migrate")
    assert_ok(result)
    assert "Applied migrations 1, 2 to sqlite:///" in result.stdout
    assert "schema at version 2." in result.stdout


def test_migrate_memory_store_has_nothing_to_migrate(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUJO_STATE_URI", "memory://")
    result = invoke("migrate")
    assert_ok(result)
    assert "no schema to migrate" in result.stdout


def test_migrate_unreachable_postgres_is_a_store_error_without_the_password(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUJO_STATE_URI", "postgresql://flujo:hunter22@127.0.0.1:1/nowhere")
    result = invoke("migrate")
    line = assert_error(result, cli.EXIT_STORE, "cannot connect")
    assert "hunter22" not in result.stdout + result.stderr
    assert "***" in line


def test_passwords_in_the_query_string_are_hidden_too(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUJO_STATE_URI", "postgresql://flujo@127.0.0.1:1/db?password=qpass123")
    shown = invoke("config", "show", "--json")
    assert_ok(shown)
    value = json.loads(shown.stdout)["settings"]["state_uri"]["value"]
    assert value == "postgresql://flujo@127.0.0.1:1/db?password=***"
    failed = invoke("runs", "list")
    assert_error(failed, cli.EXIT_STORE)
    assert "qpass123" not in failed.stdout + failed.stderr


def _postgres_uri(dsn: str, schema: str, password: str = "s3cret-pw") -> str:
    """``dsn`` with a password (ignored under trust auth) and ``search_path=schema``."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if parts.password is None and "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user}:{password}@{host}"
    query = f"{parts.query}&search_path={schema}" if parts.query else f"search_path={schema}"
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _create_schema(dsn: str, schema: str) -> None:
    import asyncpg

    async def create() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        finally:
            await conn.close()

    asyncio.run(create())


def test_migrate_postgres_then_run_and_list(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, postgres_dsn: str, postgres_schema: str
) -> None:
    _create_schema(postgres_dsn, postgres_schema)
    uri = _postgres_uri(postgres_dsn, postgres_schema)
    password = urlsplit(uri).password
    assert password
    monkeypatch.setenv("FLUJO_STATE_URI", uri)

    unmigrated = invoke("runs", "list")
    assert_error(unmigrated, cli.EXIT_STORE, "flujo migrate")

    first = invoke("migrate")
    assert_ok(first)
    assert first.stdout.startswith("Applied migrations 1, 2 to postgresql://")
    assert ":***@" in first.stdout
    assert "schema at version 2." in first.stdout
    again = invoke("migrate")
    assert_ok(again)
    assert "Already at schema version 2" in again.stdout
    assert "nothing to do" in again.stdout
    assert password not in first.stdout + again.stdout

    module = write_module(workdir)
    (workdir / "marker").touch()
    result = invoke("run", f"{module}:pipeline", "--input", "3", "--meta", "n=3")
    assert_ok(result)
    assert output_of(result) == "7!"
    runs = list_json("--meta", "n=3")
    assert [run["run_id"] for run in runs] == [run_id_of(result)]
    assert list_json("--meta", 'n="3"') == []
    assert not (workdir / "runs.db").exists()


# -- flujo run -------------------------------------------------------------------------------------


def test_run_completes_and_prints_steps_status_and_output(workdir: Path) -> None:
    module = write_module(workdir)
    (workdir / "marker").touch()
    result = invoke("run", f"{module}:pipeline", "--input", "3")
    assert_ok(result)
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    for position, name in enumerate(["double", "flaky", "shout"], start=1):
        assert any(f"{position}/3" in line and "ok" in line and name in line for line in lines)
    assert "completed" in result.stdout
    assert output_of(result) == "7!"
    assert calls(workdir) == ["double", "flaky", "shout"]
    [stored] = list_json()
    assert stored["run_id"] == run_id_of(result)
    assert stored["pipeline_name"] == f"{module}:pipeline"
    assert stored["status"] == "completed"


def test_run_a_single_step_and_a_flujo_instance(workdir: Path) -> None:
    module = write_module(workdir)
    single = invoke("run", f"{module}:single", "-i", "21")
    assert_ok(single)
    assert output_of(single) == 42
    (workdir / "marker").touch()
    wrapped = invoke("run", f"{module}:runner", "-i", "1")
    assert_ok(wrapped)
    assert output_of(wrapped) == "3!"
    names = {run["pipeline_name"] for run in list_json()}
    assert names == {f"{module}:single", "wrapped"}


def test_run_with_run_id_and_metadata(workdir: Path) -> None:
    module = write_module(workdir)
    (workdir / "marker").touch()
    result = invoke(
        "run",
        f"{module}:pipeline",
        "--input",
        "1",
        "--run-id",
        "order-42",
        "--meta",
        "user=alice",
        "--meta",
        "n=3",
        "--meta",
        "flag=true",
        "--meta",
        'quoted="3"',
    )
    assert_ok(result)
    assert run_id_of(result) == "order-42"
    shown = invoke("runs", "show", "order-42", "--json")
    assert_ok(shown)
    detail = json.loads(shown.stdout)
    assert detail["metadata"] == {"user": "alice", "n": 3, "flag": True, "quoted": "3"}


def test_run_failure_exits_1_then_resume_continues_from_the_checkpoint(workdir: Path) -> None:
    module = write_module(workdir)
    failed = invoke("run", f"{module}:pipeline", "--input", "3")
    line = assert_error(failed, cli.EXIT_RUN_FAILED, "failed at step 'flaky'", "marker missing")
    run_id = run_id_of(failed)
    assert run_id in line
    assert f"flujo resume {run_id} --app {module}:pipeline" in failed.stdout
    assert any("failed" in out and "flaky" in out for out in failed.stdout.splitlines())
    assert calls(workdir) == ["double", "flaky"]

    (workdir / "marker").touch()
    resumed = invoke("resume", run_id, "--app", f"{module}:pipeline")
    assert_ok(resumed)
    assert f"Resuming run {run_id} (failed)" in resumed.stdout
    assert "at step 2 of 3" in resumed.stdout
    assert output_of(resumed) == "7!"
    assert calls(workdir) == ["double", "flaky", "flaky", "shout"]  # double did not run again

    again = invoke("resume", run_id, "--app", f"{module}:pipeline")
    assert_ok(again)
    assert "is completed; nothing to resume" in again.stdout
    assert output_of(again) == "7!"
    assert calls(workdir) == ["double", "flaky", "flaky", "shout"]


def test_resume_with_a_registry_uses_the_task_client(workdir: Path) -> None:
    module = write_module(workdir)
    failed = invoke("run", f"{module}:registry_runner", "--input", "4")
    assert_error(failed, cli.EXIT_RUN_FAILED, "flaky")
    run_id = run_id_of(failed)
    [stored] = list_json()
    assert (stored["pipeline_name"], stored["pipeline_version"]) == ("flaky-flow", "1.0.0")

    (workdir / "marker").touch()
    resumed = invoke("resume", run_id, "--app", f"{module}:registry")
    assert_ok(resumed)
    assert output_of(resumed) == "9!"
    assert any("shout" in line and "3/3" in line for line in resumed.stdout.splitlines())
    assert calls(workdir) == ["double", "flaky", "flaky", "shout"]


def test_resume_with_a_flujo_instance(workdir: Path) -> None:
    module = write_module(workdir)
    failed = invoke("run", f"{module}:runner", "--input", "0")
    assert_error(failed, cli.EXIT_RUN_FAILED)
    (workdir / "marker").touch()
    resumed = invoke("resume", run_id_of(failed), "--app", f"{module}:runner")
    assert_ok(resumed)
    assert output_of(resumed) == "1!"


def test_resume_takes_the_app_from_the_environment_or_flujo_toml(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = write_module(workdir)
    first = run_id_of(invoke("run", f"{module}:pipeline", "--input", "1"))
    second = run_id_of(invoke("run", f"{module}:pipeline", "--input", "2"))
    (workdir / "marker").touch()

    monkeypatch.setenv("FLUJO_APP", f"{module}:pipeline")
    from_env = invoke("resume", first)
    assert_ok(from_env)
    assert output_of(from_env) == "3!"

    monkeypatch.delenv("FLUJO_APP")
    (workdir / "flujo.toml").write_text(f'[settings]\napp = "{module}:pipeline"\n')
    from_file = invoke("resume", second)
    assert_ok(from_file)
    assert output_of(from_file) == "5!"


def test_debug_shows_flujos_log_for_that_invocation_only(workdir: Path) -> None:
    import logging

    module = write_module(workdir)
    (workdir / "marker").touch()
    logger = logging.getLogger("flujo")
    handlers, level = list(logger.handlers), logger.level
    result = invoke("--debug", "run", f"{module}:single", "-i", "1")
    assert_ok(result)
    assert "debug: flujo.runner: run " in result.stderr
    assert (logger.handlers, logger.level) == (handlers, level)
    quiet = invoke("run", f"{module}:single", "-i", "1")
    assert_ok(quiet)
    assert quiet.stderr == ""


def test_run_paused_exits_0(workdir: Path) -> None:
    module = write_module(workdir)
    result = invoke("run", f"{module}:paused", "--input", "1")
    assert_ok(result)
    assert "paused" in result.stdout
    assert "waiting for a human" in result.stdout
    [stored] = list_json("--status", "paused")
    assert stored["run_id"] == run_id_of(result)


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["run", "{m}:pipeline", "--input", "{bad json"], cli.EXIT_USAGE, "not valid JSON"),
        (["run", "no_colon_here"], cli.EXIT_USAGE, "MODULE:ATTR"),
        (["run", "cli_no_such_module_zz:pipeline"], cli.EXIT_NOT_FOUND, "not found"),
        (["run", "{m}:no_such_attr"], cli.EXIT_NOT_FOUND, "no attribute 'no_such_attr'"),
        (["run", "{m}:not_a_pipeline"], cli.EXIT_CONFIG, "of type int"),
        (["run", "{m}:registry"], cli.EXIT_CONFIG, "of type PipelineRegistry"),
        (["run", "{m}:pipeline", "--run-id", "../etc"], cli.EXIT_USAGE, "invalid run id"),
        (["run", "{m}:pipeline", "--meta", ".hidden=1"], cli.EXIT_USAGE, "metadata key"),
        (["run", "{m}:pipeline", "--meta", "novalue"], cli.EXIT_USAGE, "KEY=VALUE"),
        (["run", "{m}:bad_output", "--input", "1"], cli.EXIT_SERIALIZATION, "NaN"),
    ],
)
def test_run_errors(workdir: Path, args: list[str], code: int, fragment: str) -> None:
    module = write_module(workdir)
    result = invoke(*(arg.replace("{m}", module) for arg in args))
    assert_error(result, code, fragment)


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["resume", "no-such-run", "--app", "{m}:pipeline"], cli.EXIT_NOT_FOUND, "no-such-run"),
        (["resume", "no-such-run", "--app", "{m}:registry"], cli.EXIT_NOT_FOUND, "no-such-run"),
        (["resume", "bad/id", "--app", "{m}:pipeline"], cli.EXIT_USAGE, "invalid run id"),
        (["resume", "some-run"], cli.EXIT_USAGE, "--app"),
        (["resume", "some-run", "--app", "cli_no_such_module_zz:x"], cli.EXIT_NOT_FOUND, ""),
        (["resume", "some-run", "--app", "{m}:not_a_pipeline"], cli.EXIT_CONFIG, "of type int"),
    ],
)
def test_resume_errors(workdir: Path, args: list[str], code: int, fragment: str) -> None:
    module = write_module(workdir)
    invoke("migrate")
    result = invoke(*(arg.replace("{m}", module) for arg in args))
    assert_error(result, code, fragment)


@pytest.mark.parametrize("other", ["single", "registry", "registry_runner"])
def test_resume_on_another_pipeline_is_a_mismatch(workdir: Path, other: str) -> None:
    module = write_module(workdir)
    run_id = run_id_of(invoke("run", f"{module}:pipeline", "--input", "1"))
    result = invoke("resume", run_id, "--app", f"{module}:{other}")
    assert_error(result, cli.EXIT_CONFIG, run_id)
    assert calls(workdir) == ["double", "flaky"]  # nothing ran


def test_another_writer_advancing_the_run_is_a_state_conflict(workdir: Path) -> None:
    module = write_module(workdir)
    result = invoke("run", f"{module}:conflicted", "--input", "1", "--run-id", "contested")
    assert_error(result, cli.EXIT_CONFLICT, "contested")


def test_import_error_is_unexpected_and_debug_shows_the_traceback(workdir: Path) -> None:
    module = write_module(workdir, "raise ValueError('broken module')\n")
    plain = invoke("run", f"{module}:pipeline")
    assert_error(plain, cli.EXIT_INTERNAL, "broken module", "--debug")
    debug = invoke("--debug", "run", f"{module}:pipeline")
    assert debug.exit_code == cli.EXIT_INTERNAL
    assert "Traceback" in debug.stderr
    assert "ValueError: broken module" in debug.stderr
    assert debug.stderr.splitlines()[-1].startswith("error: ")


# -- flujo runs ... --------------------------------------------------------------------------------


@pytest.fixture
def three_runs(workdir: Path) -> tuple[str, dict[str, str]]:
    """A failed run (n=3, user=alice), a completed one (n="3", flag=true), a single step."""
    module = write_module(workdir)
    failed = invoke("run", f"{module}:pipeline", "-i", "1", "--meta", "n=3", "--meta", "user=alice")
    (workdir / "marker").touch()
    done = invoke("run", f"{module}:pipeline", "-i", "1", "--meta", 'n="3"', "--meta", "flag=true")
    single = invoke("run", f"{module}:single", "-i", "1")
    ids = {"failed": run_id_of(failed), "completed": run_id_of(done), "single": run_id_of(single)}
    return module, ids


def test_runs_list_json_and_filters(three_runs: tuple[str, dict[str, str]]) -> None:
    module, ids = three_runs
    everything = list_json()
    assert [run["run_id"] for run in everything] == [ids["single"], ids["completed"], ids["failed"]]
    assert {"run_id", "pipeline_name", "status", "metadata", "created_at"} <= set(everything[0])

    def found(*args: str) -> list[str]:
        return [run["run_id"] for run in list_json(*args)]

    assert found("--status", "failed") == [ids["failed"]]
    assert found("--pipeline", f"{module}:single") == [ids["single"]]
    assert found("--meta", "n=3") == [ids["failed"]]
    assert found("--meta", 'n="3"') == [ids["completed"]]
    assert found("--meta", "flag=true") == [ids["completed"]]
    assert found("--meta", "flag=True") == []  # not JSON true: the string "True"
    assert found("--meta", "user=alice", "--meta", "n=3") == [ids["failed"]]
    assert found("--since", "1h") == [ids["single"], ids["completed"], ids["failed"]]
    assert found("--since", "2999-01-01") == []
    assert found("--since", "2000-01-01T00:00:00+00:00") == found()
    assert found("--limit", "1", "--offset", "1") == [ids["completed"]]


def test_runs_list_table(
    three_runs: tuple[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ids = three_runs
    monkeypatch.setenv("COLUMNS", "200")
    result = invoke("runs", "list")
    assert_ok(result)
    header = result.stdout.splitlines()[0]
    for column in ("run id", "pipeline", "status", "done", "created", "metadata"):
        assert column in header
    for run_id in ids.values():
        assert run_id in result.stdout
    assert '{"n":3,"user":"alice"}' in result.stdout
    monkeypatch.setenv("COLUMNS", "80")
    narrow = invoke("runs", "list")
    assert_ok(narrow)
    for run_id in ids.values():
        assert run_id in narrow.stdout  # run ids are never cut


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--status", "exploded"], "invalid status"),
        (["--meta", "bad key=1"], "invalid metadata key"),
        (["--meta", "novalue"], "KEY=VALUE"),
        (["--since", "yesterday"], "--since"),
    ],
)
def test_runs_list_bad_filters(workdir: Path, args: list[str], fragment: str) -> None:
    assert_error(invoke("runs", "list", *args), cli.EXIT_USAGE, fragment)


def test_runs_list_on_a_missing_sqlite_store_does_not_create_it(workdir: Path) -> None:
    result = invoke("runs", "list")
    assert_ok(result)
    assert result.stdout == "No runs.\n"
    assert list_json() == []
    assert not (workdir / "runs.db").exists()
    assert_error(invoke("runs", "show", "nope"), cli.EXIT_NOT_FOUND, "'nope'")
    assert not (workdir / "runs.db").exists()


def test_runs_show(three_runs: tuple[str, dict[str, str]]) -> None:
    _, ids = three_runs
    result = invoke("runs", "show", ids["failed"])
    assert_ok(result)
    out = result.stdout
    for expected in (ids["failed"], "failed", "1/3 steps done", '"user":"alice"', "steps:"):
        assert expected in out
    assert "RuntimeError: marker missing (step 'flaky')" in out
    assert "double" in out
    assert "flaky" in out
    context = json.loads(out.split("context:\n", 1)[1])
    assert context["run_id"] == ids["failed"]

    as_json = invoke("runs", "show", ids["completed"], "--json")
    assert_ok(as_json)
    detail = json.loads(as_json.stdout)
    assert detail["status"] == "completed"
    assert detail["step_names"] == ["double", "flaky", "shout"]
    assert [record["name"] for record in detail["step_history"]] == ["double", "flaky", "shout"]
    assert detail["last_step_output"] == "3!"
    assert detail["context"]["run_id"] == ids["completed"]


def test_runs_show_errors(three_runs: tuple[str, dict[str, str]]) -> None:
    assert_error(invoke("runs", "show", "no-such-run"), cli.EXIT_NOT_FOUND, "no-such-run")
    assert_error(invoke("runs", "show", ".hidden"), cli.EXIT_USAGE, "invalid run id")


def test_runs_delete(three_runs: tuple[str, dict[str, str]]) -> None:
    _, ids = three_runs
    result = invoke("runs", "delete", ids["failed"])
    assert_ok(result)
    assert f"Deleted run {ids['failed']}." in result.stdout
    assert ids["failed"] not in [run["run_id"] for run in list_json()]
    assert_error(invoke("runs", "delete", ids["failed"]), cli.EXIT_NOT_FOUND, ids["failed"])
    assert_error(invoke("runs", "delete", "a b"), cli.EXIT_USAGE, "invalid run id")


def test_runs_prune(three_runs: tuple[str, dict[str, str]]) -> None:
    _, ids = three_runs
    nothing = invoke("runs", "prune", "--older-than", "7d", "--yes")
    assert_ok(nothing)
    assert "Deleted 0 runs" in nothing.stdout
    failed_only = invoke("runs", "prune", "--older-than", "0s", "--status", "failed", "--yes")
    assert_ok(failed_only)
    assert "Deleted 1 run " in failed_only.stdout
    assert {run["run_id"] for run in list_json()} == {ids["completed"], ids["single"]}

    declined = invoke("runs", "prune", "--older-than", "0s", input="n\n")
    assert_error(declined, cli.EXIT_RUN_FAILED, "nothing deleted")
    assert len(list_json()) == 2
    no_answer = invoke("runs", "prune", "--older-than", "0s")
    assert_error(no_answer, cli.EXIT_RUN_FAILED, "--yes")
    confirmed = invoke("runs", "prune", "--older-than", "0s", input="y\n")
    assert_ok(confirmed)
    assert "Deleted 2 runs" in confirmed.stdout
    assert list_json() == []


@pytest.mark.parametrize(
    "args",
    [
        ["--older-than", "7 days"],
        ["--older-than", "7"],
        ["--older-than", "-1d"],
        ["--older-than", "1d", "--status", "nope"],
    ],
)
def test_runs_prune_bad_arguments(workdir: Path, args: list[str]) -> None:
    assert_error(invoke("runs", "prune", "--yes", *args), cli.EXIT_USAGE)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("1d12h", 129600)],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert cli.parse_duration(text).total_seconds() == seconds


def test_parse_since() -> None:
    from datetime import UTC, datetime, timedelta

    assert cli.parse_since("2026-05-01T12:00:00") == datetime(2026, 5, 1, 12).astimezone()
    assert cli.parse_since("2026-05-01T12:00:00+00:00") == datetime(2026, 5, 1, 12, tzinfo=UTC)
    before = datetime.now(UTC)
    since = cli.parse_since("2h")
    after = datetime.now(UTC)
    assert before - timedelta(hours=2) <= since <= after - timedelta(hours=2)


# -- flujo config show -----------------------------------------------------------------------------


def test_config_show_reports_sources_and_redacts_passwords(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLUJO_STATE_URI")
    defaults = invoke("config", "show", "--json")
    assert_ok(defaults)
    data = json.loads(defaults.stdout)
    assert data["config_file_exists"] is False
    assert data["settings"]["state_uri"] == {"value": "sqlite:///flujo_ops.db", "source": "default"}
    assert data["settings"]["app"] == {"value": None, "source": "default"}

    (workdir / "flujo.toml").write_text(
        'state_uri = "postgresql://ops:filepass1@db.example/flujo"\n'
        '[settings]\npostgres_pool_max = 20\napp = "my_app:registry"\n'
    )
    monkeypatch.setenv("FLUJO_POSTGRES_POOL_MIN", "5")
    from_file = invoke("config", "show", "--json")
    assert_ok(from_file)
    settings = json.loads(from_file.stdout)["settings"]
    assert settings["state_uri"]["value"] == "postgresql://ops:***@db.example/flujo"
    assert settings["state_uri"]["source"] == "flujo.toml (state_uri)"
    assert settings["postgres_pool_max"] == {
        "value": 20,
        "source": "flujo.toml ([settings] postgres_pool_max)",
    }
    assert settings["postgres_pool_min"] == {
        "value": 5,
        "source": "environment (FLUJO_POSTGRES_POOL_MIN)",
    }
    assert settings["app"]["value"] == "my_app:registry"
    assert "filepass1" not in from_file.stdout

    monkeypatch.setenv("FLUJO_STATE_URI", "postgresql://ops:envpass22@db.example/flujo")
    table = invoke("config", "show")
    assert_ok(table)
    assert "envpass22" not in table.stdout + table.stderr
    assert "postgresql://ops:***@db.example/flujo" in table.stdout
    assert "environment (FLUJO_STATE_URI)" in table.stdout
    assert "flujo.toml ([settings] postgres_pool_max)" in table.stdout
    assert "config file: flujo.toml" in table.stdout


def test_config_show_bad_value_is_a_configuration_error(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUJO_POSTGRES_POOL_MAX", "many")
    assert_error(invoke("config", "show"), cli.EXIT_CONFIG, "postgres_pool_max")
    assert_error(invoke("runs", "list"), cli.EXIT_CONFIG, "FLUJO_POSTGRES_POOL_MAX")


def test_config_show_unknown_key_is_a_one_line_warning(workdir: Path) -> None:
    (workdir / "flujo.toml").write_text("[settings]\npool_size = 3\n")
    result = invoke("config", "show")
    assert_ok(result)
    [warning] = result.stderr.splitlines()
    assert warning.startswith("warning: ")
    assert "pool_size" in warning


def test_bad_state_uri_is_a_configuration_error(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUJO_STATE_URI", "redis://localhost")
    assert_error(invoke("runs", "list"), cli.EXIT_CONFIG, "not supported")


# -- exit codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRunIdError("invalid run id 'x'", run_id="x"), cli.EXIT_USAGE),
        (InvalidMetadataError("invalid metadata key 'x'", key="x"), cli.EXIT_USAGE),
        (RunNotFoundError("no run 'x'", run_id="x"), cli.EXIT_NOT_FOUND),
        (PipelineNotFoundError("no pipeline 'p'", name="p", version=None), cli.EXIT_NOT_FOUND),
        (
            StateConflictError(
                "run 'x' moved on", run_id="x", expected_version=1, actual_version=2
            ),
            cli.EXIT_CONFLICT,
        ),
        (PipelineMismatchError("run 'x' mismatch", run_id="x"), cli.EXIT_CONFIG),
        (ContextValidationError("bad context", field="f", errors=[]), cli.EXIT_CONFIG),
        (ConfigurationError("bad setting"), cli.EXIT_CONFIG),
        (SchemaVersionError("schema too old", found=0, expected=1), cli.EXIT_STORE),
        (CorruptStateError("garbage\nacross lines", run_id="x"), cli.EXIT_STORE),
        (StateBackendError("disk full"), cli.EXIT_STORE),
        (SerializationError("cannot store", path="output"), cli.EXIT_SERIALIZATION),
        (PayloadTooLargeError("too big", path="output", size=2, limit=1), cli.EXIT_SERIALIZATION),
        (RuntimeError("surprise"), cli.EXIT_INTERNAL),
    ],
)
def test_every_error_class_has_its_exit_code_and_one_line(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, code: int
) -> None:
    async def fail(self: object, run_id: str) -> None:
        raise error

    monkeypatch.setenv("FLUJO_STATE_URI", "memory://")
    monkeypatch.setattr(flujo.TaskClient, "get_task", fail)
    assert cli.exit_code_for(error) == code
    line = assert_error(invoke("runs", "show", "some-run"), code)
    assert str(error).split("\n", 1)[0] in line
    debug = invoke("--debug", "runs", "show", "some-run")
    assert debug.exit_code == code
    assert "Traceback" in debug.stderr


# -- the installed script --------------------------------------------------------------------------


def _script() -> list[str]:
    script = Path(sys.executable).with_name("flujo")
    return [str(script)] if script.exists() else [sys.executable, "-m", "flujo.cli"]


def test_installed_script(tmp_path: Path) -> None:
    module = write_module(tmp_path)
    (tmp_path / "marker").touch()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("FLUJO_") and key != "COLUMNS"
    }
    env["FLUJO_STATE_URI"] = f"sqlite:///{tmp_path / 'runs.db'}"

    def flujo_script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_script(), *args],
            check=False,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=60,
        )

    version = flujo_script("--version")
    assert (version.returncode, version.stdout) == (0, f"flujo {flujo.__version__}\n")
    ran = flujo_script("run", f"{module}:pipeline", "--input", "3", "--meta", "n=3")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout.split("Output:\n", 1)[1]) == "7!"
    listed = flujo_script("runs", "list", "--json", "--meta", "n=3")
    assert listed.returncode == 0, listed.stderr
    assert [run["status"] for run in json.loads(listed.stdout)] == ["completed"]
    missing = flujo_script("runs", "show", "no-such-run")
    assert missing.returncode == cli.EXIT_NOT_FOUND
    assert missing.stderr.startswith("error: ")
    assert len(missing.stderr.splitlines()) == 1
    assert not (tmp_path / "flujo_ops.db").exists()


def test_import_flujo_does_not_load_the_cli(tmp_path: Path) -> None:
    probe = "import flujo, sys; print(sorted(m for m in ('typer', 'rich') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "[]"


def test_runs_show_usage(workdir: Path) -> None:
    from flujo import Flujo, Step, Usage
    from flujo.domain.usage import report_usage
    from flujo.state import SQLiteBackend

    class Agent:
        async def run(self, data: str) -> str:
            report_usage(Usage(requests=2, input_tokens=1200, output_tokens=300, cost_usd=0.0125))
            return data

    backend = SQLiteBackend(workdir / "runs.db")
    Flujo(Step("ask", agent=Agent()), state_backend=backend).run("q", run_id="with-usage")
    result = invoke("runs", "show", "with-usage")
    assert_ok(result)
    assert "2 requests, 1,200 input + 300 output tokens, $0.0125" in result.stdout
    detail = json.loads(invoke("runs", "show", "with-usage", "--json").stdout)
    assert detail["usage"] == {
        "requests": 2,
        "input_tokens": 1200,
        "output_tokens": 300,
        "cost_usd": 0.0125,
    }
    assert detail["step_history"][0]["usage"]["requests"] == 2
    [listed] = list_json()
    assert listed["usage"]["cost_usd"] == 0.0125


def test_runs_list_says_why_a_queued_run_waits(workdir: Path) -> None:
    from flujo import PipelineRegistry, step
    from flujo.client import TaskClient
    from flujo.state import SQLiteBackend

    @step
    async def one(x: int) -> int:
        return x

    registry = PipelineRegistry()
    registry.register(one, "report", "2.0.0")
    backend = SQLiteBackend(workdir / "runs.db")

    async def setup() -> tuple[str, str]:
        client = TaskClient(backend, registry)
        nobody = await client.enqueue("report", 1, queue="lonely")
        other = await client.enqueue("report", 2, queue="default")
        await backend.register_worker(
            "w1",
            {"queues": ["default"], "pipelines": ["report@1.0.0"], "lease_s": 60},
        )
        await backend.aclose()
        return nobody, other

    nobody, other = asyncio.run(setup())
    listed = {run["run_id"]: run for run in list_json()}
    assert listed[nobody]["waiting"] == "no live worker on queue 'lonely'"
    assert listed[other]["waiting"] == "no worker on queue 'default' has report@2.0.0"
    assert listed[other]["status"] == "queued"
    table = invoke("runs", "list")
    assert_ok(table)
    assert "has report@2.0.0" in " ".join(table.stdout.split())
