"""The ``flujo`` command: migrate the store, find and manage runs, run and resume pipelines.

>>> from typer.testing import CliRunner              # doctest: +SKIP
>>> CliRunner().invoke(app, ["runs", "list"])        # doctest: +SKIP

Every error is one line on stderr (``error: ...``) and a documented exit code (``--debug`` adds
the traceback):

==  =====================================================================================
0   success (a paused run included)
1   the run failed or was cancelled (or a confirmation was declined)
2   usage error: bad arguments, bad JSON, an invalid run id or metadata key
3   not found: run id, module, attribute, pipeline
4   state conflict: another process advanced the run
5   configuration error: settings, the object named is unusable, pipeline mismatch
6   store error: cannot connect, schema version, corrupt state
7   serialization error: a value cannot be stored
70  any other, unexpected error
==  =====================================================================================

This module is the only one that imports typer and rich; ``import flujo`` does not load it.
Only modules the user names (on the command line, in ``FLUJO_APP`` or ``flujo.toml``) are
imported; names read from the store never are.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import math
import os
import re
import sys
import traceback
import warnings
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, TextIO, get_args
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson
import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

import flujo
from flujo.application.runner import Flujo
from flujo.client import TaskClient, TaskDetail, TaskSummary
from flujo.domain.models import PipelineResult, RunStatus, StepResult
from flujo.domain.pipeline import Pipeline, PipelineRegistry
from flujo.domain.step import Step
from flujo.exceptions import (
    ConfigurationError,
    ContextValidationError,
    CorruptStateError,
    HumanInputError,
    InvalidMetadataError,
    InvalidRunIdError,
    PipelineMismatchError,
    PipelineNotFoundError,
    RunNotFoundError,
    SchemaVersionError,
    SerializationError,
    StateBackendError,
    StateConflictError,
)
from flujo.state.backends.base import (
    MetadataValue,
    StateBackend,
    validate_metadata_key,
    validate_run_id,
)
from flujo.state.serialization import flujo_default_serializer
from flujo.state.uri import redact_uri

if TYPE_CHECKING:
    from flujo.config import FlujoSettings

__all__ = [
    "EXIT_CONFIG",
    "EXIT_CONFLICT",
    "EXIT_INTERNAL",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_RUN_FAILED",
    "EXIT_SERIALIZATION",
    "EXIT_STORE",
    "EXIT_USAGE",
    "CliError",
    "app",
    "exit_code_for",
    "main",
]

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_CONFIG = 5
EXIT_STORE = 6
EXIT_SERIALIZATION = 7
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

#: flujo's errors and their exit codes; the first matching class wins (subclasses first).
_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidRunIdError, EXIT_USAGE),
    (InvalidMetadataError, EXIT_USAGE),
    (HumanInputError, EXIT_USAGE),
    (RunNotFoundError, EXIT_NOT_FOUND),
    (PipelineNotFoundError, EXIT_NOT_FOUND),
    (StateConflictError, EXIT_CONFLICT),
    (PipelineMismatchError, EXIT_CONFIG),
    (ContextValidationError, EXIT_CONFIG),
    (ConfigurationError, EXIT_CONFIG),
    (SchemaVersionError, EXIT_STORE),
    (CorruptStateError, EXIT_STORE),
    (StateBackendError, EXIT_STORE),
    (SerializationError, EXIT_SERIALIZATION),
)

_STATUSES: tuple[str, ...] = get_args(RunStatus)
_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PREVIEW_CHARS = 60
_SECRET_PARAM = re.compile(r"(?i)password|passwd|pwd|sslpassword")
_PIPE_WIDTH = 1000
_WIDE = 150  # a terminal this wide shows every column of `flujo runs list`
_ROOMY = 110  # ... this wide, the metadata too


class CliError(Exception):
    """An error the command reports as one line, with its exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def exit_code_for(exc: BaseException) -> int:
    """The exit code an exception ends the command with."""
    if isinstance(exc, CliError):
        return exc.code
    for cls, code in _EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_INTERNAL


class _State:
    """What one invocation of the command knows: --debug, settings, secrets not to print."""

    def __init__(self) -> None:
        self.debug = False
        self.settings: FlujoSettings | None = None
        self.secrets: set[str] = set()
        self._log_handler: logging.Handler | None = None
        self._log_level = logging.NOTSET

    def start_debug(self) -> None:
        """--debug: tracebacks, and flujo's debug log on stderr."""
        self.debug = True
        if self._log_handler is None:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("debug: %(name)s: %(message)s"))
            logger = logging.getLogger("flujo")
            self._log_handler, self._log_level = handler, logger.level
            logger.addHandler(handler)
            logger.setLevel(logging.DEBUG)

    def close(self) -> None:
        if self._log_handler is not None:
            logger = logging.getLogger("flujo")
            logger.removeHandler(self._log_handler)
            logger.setLevel(self._log_level)
            self._log_handler = None

    def remember_uri(self, uri: str) -> None:
        try:
            parts = urlsplit(uri)
        except ValueError:
            return
        found = [parts.password or ""]
        found += [v for k, v in parse_qsl(parts.query) if _SECRET_PARAM.fullmatch(k)]
        for secret in found:
            if len(secret) >= 3:
                self.secrets.update({secret, unquote(secret)})

    def scrub(self, message: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            message = message.replace(secret, "***")
        return message


_STATE = _State()


# -- the command group: one-line errors and exit codes ---------------------------------------------


class _FlujoGroup(TyperGroup):
    """Runs the command and turns every error into one line on stderr and an exit code."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        global _STATE  # noqa: PLW0603 - one invocation's state, fresh each time
        _STATE = _State()
        from flujo.config import FlujoSettingsWarning  # noqa: PLC0415

        code = EXIT_OK
        with warnings.catch_warnings():
            warnings.simplefilter("always", FlujoSettingsWarning)
            warnings.showwarning = _show_warning
            try:
                returned = super().main(
                    args,
                    prog_name or "flujo",
                    complete_var,
                    standalone_mode=False,
                    windows_expand_args=windows_expand_args,
                    **extra,
                )
                if isinstance(returned, int) and not isinstance(returned, bool):
                    code = returned
                    if code == EXIT_INTERRUPTED:
                        _error_line("interrupted")
            except typer.Abort:
                _error_line("aborted")
                code = EXIT_RUN_FAILED
            except Exception as exc:
                code = _report(exc)
            finally:
                _STATE.close()
        sys.exit(code)


def _report(exc: Exception) -> int:
    """Print ``exc`` as one line (and its traceback with --debug); return the exit code."""
    exit_code = getattr(exc, "exit_code", None)
    if hasattr(exc, "format_message") and isinstance(exit_code, int):  # a click usage error
        return _usage_error(exc, exit_code)
    code = exit_code_for(exc)
    if _STATE.debug:
        shown = exc.__cause__ if isinstance(exc, CliError) and exc.__cause__ else exc
        if not isinstance(shown, CliError):
            sys.stderr.write(
                _STATE.scrub("".join(traceback.format_exception(shown))),
            )
    if isinstance(exc, CliError):
        message = exc.message
    elif code == EXIT_INTERNAL:
        message = f"unexpected {type(exc).__name__}: {exc}"
    else:
        message = str(exc) or type(exc).__name__
    if code == EXIT_INTERNAL and not _STATE.debug:
        message += " (run with --debug for the traceback)"
    _error_line(message)
    return code


def _usage_error(exc: Any, exit_code: int) -> int:
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        help_text = str(exc.format_message())  # rich help printed itself already
        if help_text.strip():
            sys.stdout.write(help_text + "\n")
        _error_line(f"missing command (see `{ctx.command_path} --help`)")
        return exit_code
    message = str(exc.format_message())
    if ctx is not None and exit_code == EXIT_USAGE:
        message = f"{message.rstrip('.')} (see `{ctx.command_path} --help`)"
    _error_line(message)
    return exit_code


def _error_line(message: str) -> None:
    line = " ".join(_STATE.scrub(message).split())
    sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    text = " ".join(_STATE.scrub(str(message)).split())
    sys.stderr.write(f"warning: {text}\n")


# -- the application -------------------------------------------------------------------------------

app = typer.Typer(
    name="flujo",
    cls=_FlujoGroup,
    help="flujo: durable workflows. Manage the state store, runs and pipelines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
runs_app = typer.Typer(help="List, inspect, delete and prune stored runs.", no_args_is_help=True)
config_app = typer.Typer(help="Show flujo's settings.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(config_app, name="config")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"flujo {flujo.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks and flujo's debug log.")
    ] = False,
) -> None:
    """flujo: durable workflows. Manage the state store, runs and pipelines."""
    if debug:
        _STATE.start_debug()


# -- shared helpers --------------------------------------------------------------------------------


def _console() -> Console:
    """Where normal output goes: stdout; not wrapped at 80 columns when it is not a terminal."""
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=_PIPE_WIDTH)
    return console


def _settings() -> FlujoSettings:
    if _STATE.settings is None:
        from flujo.config import load_settings  # noqa: PLC0415 - pydantic-settings on demand

        settings = load_settings()
        _STATE.remember_uri(settings.state_uri)
        _STATE.settings = settings
    return _STATE.settings


def _backend() -> StateBackend:
    from flujo.config import configured_backend  # noqa: PLC0415

    return configured_backend(_settings())


def _store_name() -> str:
    return redact_uri(_settings().state_uri)


def _sqlite_missing(backend: StateBackend) -> bool:
    """True for a SQLite store whose file does not exist (reading must not create it)."""
    from flujo.state.backends.sqlite import SQLiteBackend  # noqa: PLC0415

    return isinstance(backend, SQLiteBackend) and not backend.path.exists()


def _check_status(status: str | None) -> str | None:
    if status is not None and status not in _STATUSES:
        raise CliError(f"invalid status {status!r}: choose from {', '.join(_STATUSES)}", EXIT_USAGE)
    return status


def _meta_value(text: str) -> MetadataValue:
    """A --meta value: a JSON scalar when it parses as one (3, true, null, "3"), else the text."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except ValueError:
        return text
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return text


def _parse_meta(items: Sequence[str] | None) -> dict[str, MetadataValue]:
    """``--meta KEY=VALUE`` options as a dict (keys checked, values as :func:`_meta_value`)."""
    parsed: dict[str, MetadataValue] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep:
            raise CliError(f"--meta {item!r} is not KEY=VALUE", EXIT_USAGE)
        validate_metadata_key(key)
        if key in parsed:
            raise CliError(f"--meta key {key!r} is given more than once", EXIT_USAGE)
        parsed[key] = _meta_value(text)
    return parsed


def parse_duration(text: str) -> timedelta:
    """``30s``, ``15m``, ``12h``, ``7d``, ``2w`` (or a sum such as ``1d12h``) as a timedelta."""
    compact = text.strip().lower()
    if not compact or _DURATION.sub("", compact).strip():
        raise CliError(
            f"invalid duration {text!r}: use a number and a unit, e.g. 30s, 15m, 12h, 7d or 2w",
            EXIT_USAGE,
        )
    seconds = sum(int(n) * _UNITS[unit] for n, unit in _DURATION.findall(compact))
    try:
        return timedelta(seconds=seconds)
    except OverflowError as exc:
        raise CliError(f"duration {text!r} is too long", EXIT_USAGE) from exc


def parse_since(text: str) -> datetime:
    """``--since``: an ISO date/time (local time unless it has an offset) or an age (``2h``)."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        try:
            return datetime.now(UTC) - parse_duration(text)
        except (CliError, OverflowError) as exc:
            raise CliError(
                f"invalid --since {text!r}: use an ISO date/time (2026-05-01, "
                "2026-05-01T12:00:00+02:00) or an age (30m, 12h, 7d)",
                EXIT_USAGE,
            ) from exc
    return when if when.tzinfo else when.astimezone()  # naive: local time, as everywhere


def _refuse_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _json_input(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise CliError(f"--input is not valid JSON: {exc}", EXIT_USAGE) from exc


def _to_json(value: Any, *, indent: bool = True) -> str:
    """``value`` as JSON text (pydantic models, dataclasses etc. as flujo stores them)."""
    option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
    try:
        return orjson.dumps(value, default=flujo_default_serializer, option=option).decode()
    except TypeError:
        return json.dumps(repr(value))


def _preview(value: Any, limit: int = _PREVIEW_CHARS) -> str:
    text = _to_json(value, indent=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(value: datetime, *, short: bool = False) -> str:
    return value.astimezone(UTC).strftime("%y-%m-%d %H:%M" if short else "%Y-%m-%d %H:%M:%S")


_STATUS_STYLES = {
    "completed": "green",
    "failed": "red",
    "cancelled": "yellow",
    "paused": "cyan",
    "running": "blue",
}


def _status_text(status: str) -> Text:
    return Text(status, style=_STATUS_STYLES.get(status, ""))


def _load_object(spec: str, *, what: str) -> object:
    """Import ``MODULE`` of ``MODULE:ATTR`` (the working directory first on sys.path)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr or module_name.startswith("."):
        raise CliError(
            f"{what} {spec!r} is not MODULE:ATTR (for example my_app.pipelines:pipeline)",
            EXIT_USAGE,
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            hint = ""
            if "/" in module_name or module_name.endswith(".py"):
                hint = "; name a module (my_app.pipelines), not a file path"
            raise CliError(
                f"module {module_name!r} not found (looked in {cwd} and on sys.path){hint}",
                EXIT_NOT_FOUND,
            ) from exc
        raise CliError(
            f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}",
            EXIT_INTERNAL,
        ) from exc
    except Exception as exc:
        raise CliError(
            f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}",
            exit_code_for(exc),
        ) from exc
    obj: object = module
    for part in attr.split("."):
        if not part or not hasattr(obj, part):
            raise CliError(f"module {module_name!r} has no attribute {attr!r}", EXIT_NOT_FOUND)
        obj = getattr(obj, part)
    return obj


def _wrong_type(spec: str, obj: object, wanted: str) -> CliError:
    kind = type(obj).__name__
    return CliError(f"{spec!r} is an object of type {kind}, not {wanted}", EXIT_CONFIG)


def _total_steps(runner: Flujo[Any, Any, Any]) -> int | None:
    pipeline = runner.pipeline
    if pipeline is None and runner.registry is not None:
        pipeline = runner.registry.get(runner.pipeline_name, runner.pipeline_version)
    return None if pipeline is None else len(pipeline.steps)


# -- live progress ---------------------------------------------------------------------------------


def _step_line(result: StepResult, total: int | None) -> Text:
    if result.path is not None:  # a sub-step of a composite step: show where it ran
        position = "  " + ".".join(str(part) for part in result.path)
    else:
        position = f"{result.index + 1}/{total}" if total else f"{result.index + 1}"
    line = Text(f"{position:>7} ")
    if result.success:
        line.append("ok    ", style="green")
    else:
        line.append("failed", style="bold red")
    line.append(f" {result.name}")
    line.append(f"  {result.latency_s * 1000:.1f} ms", style="dim")
    if result.attempts > 1:
        line.append(f"  ({result.attempts} attempts)", style="dim")
    if not result.success and result.error is not None:
        line.append(f"  {result.error}", style="red")
    return line


async def _drive(
    stream: AsyncIterator[StepResult | PipelineResult[Any, Any]],
    console: Console,
    *,
    total: int | None,
    start: int,
) -> PipelineResult[Any, Any]:
    """Consume ``run_stream``, printing each finished step (with a live bar on a terminal)."""
    final: PipelineResult[Any, Any] | None = None
    progress: Progress | None = None
    display: AbstractContextManager[Any] = nullcontext()
    if console.is_terminal:
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
        )
        display = progress
    with display:
        task = None
        if progress is not None:
            task = progress.add_task("running", total=total, completed=start)
        async for item in stream:
            if isinstance(item, StepResult):
                console.print(_step_line(item, total))
                if progress is not None and task is not None:
                    progress.update(
                        task,
                        advance=1 if item.success and item.path is None else 0,
                        description=f"after {item.name}",
                    )
            else:
                final = item
    if final is None:  # pragma: no cover - run_stream always ends with the result
        raise CliError("the run ended without a result", EXIT_INTERNAL)
    return final


def _finish(result: PipelineResult[Any, Any], console: Console, *, app_spec: str | None) -> None:
    """Print the final status, run id and output; raise for a failed or cancelled run."""
    run_id = result.run_id
    console.print(Text.assemble("Run ", (run_id, "bold"), " ", _status_text(result.status), "."))
    if result.status == "completed":
        console.print("Output:")
        typer.echo(_to_json(result.output))
        return
    where = f" at step {result.failed_step!r}" if result.failed_step else ""
    reason = f": {result.error}" if result.error is not None else ""
    if result.status == "paused":
        console.print(Text(f"Paused{where}{reason}"))
        return
    if result.status == "failed" and app_spec:
        console.print(Text(f"Resume it with: flujo resume {run_id} --app {app_spec}"))
    verb = "failed" if result.status == "failed" else "was cancelled"
    raise CliError(f"run {run_id!r} {verb}{where}{reason}", EXIT_RUN_FAILED)


# -- flujo migrate ---------------------------------------------------------------------------------


@app.command("migrate")
def migrate_command() -> None:
    """Create or upgrade the store's schema (idempotent; Postgres needs it after upgrades)."""
    backend = _backend()
    store = _store_name()

    async def work() -> str:
        try:
            applied = await backend.migrate()
            version = await backend.schema_version()
        finally:
            await backend.aclose()
        if version is None:
            return f"{store}: this store has no schema to migrate; nothing to do."
        return _migrated(store, applied, version)

    _console().print(Text(asyncio.run(work())))


def _migrated(store: str, applied: list[int], version: int) -> str:
    if not applied:
        return f"Already at schema version {version} in {store}; nothing to do."
    numbers = ", ".join(str(n) for n in applied)
    noun = "migration" if len(applied) == 1 else "migrations"
    return f"Applied {noun} {numbers} to {store}; schema at version {version}."


# -- flujo runs ... --------------------------------------------------------------------------------

_STATUS_HELP = f"Only runs with this status: {', '.join(_STATUSES)}."
_JSON_OPTION = typer.Option("--json", help="Print JSON instead of a table.")
_META_HELP = (
    "KEY=VALUE; repeatable. VALUE is matched as a JSON scalar when it is one (3, true, null, "
    '"3"), else as a string.'
)


@runs_app.command("list")
def runs_list_command(
    status: Annotated[str | None, typer.Option("--status", help=_STATUS_HELP)] = None,
    pipeline: Annotated[
        str | None, typer.Option("--pipeline", help="Only runs of this pipeline name.")
    ] = None,
    meta: Annotated[
        list[str] | None, typer.Option("--meta", metavar="KEY=VALUE", help=_META_HELP)
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since", help="Only runs created since an ISO date/time, or within an age (12h)."
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many runs.")] = 50,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many runs.")] = 0,
    as_json: Annotated[bool, _JSON_OPTION] = False,
) -> None:
    """List stored runs, newest first."""
    status = _check_status(status)
    metadata_filter = _parse_meta(meta)
    created_since = None if since is None else parse_since(since)
    backend = _backend()

    async def work() -> tuple[list[TaskSummary], dict[str, str]]:
        try:
            if _sqlite_missing(backend):
                return [], {}
            client = TaskClient(backend)
            found = await client.list_tasks(
                status=status,
                metadata_filter=metadata_filter or None,
                pipeline_name=pipeline,
                limit=limit,
                offset=offset,
                since=created_since,
            )
            return found, await _waiting(client, found)
        finally:
            await backend.aclose()

    tasks, waiting = asyncio.run(work())
    if as_json:
        listed = []
        for task in tasks:
            item = task.model_dump(mode="json")
            if task.run_id in waiting:
                item["waiting"] = waiting[task.run_id]
            listed.append(item)
        typer.echo(_to_json(listed))
        return
    console = _console()
    if not tasks:
        console.print("No runs.")
        return
    wide = console.width >= _WIDE
    roomy = console.width >= _ROOMY
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("run id", no_wrap=True, min_width=min(32, max(len(t.run_id) for t in tasks)))
    table.add_column("pipeline", overflow="fold", min_width=10)
    if wide:
        table.add_column("version", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("done", justify="right", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    if wide:
        table.add_column("updated (UTC)", no_wrap=True)
    if roomy:
        table.add_column("metadata", overflow="fold")
    for task in tasks:
        row: list[Text | str] = [task.run_id, Text(task.pipeline_name)]
        if wide:
            row.append(Text(task.pipeline_version))
        created = _when(task.created_at) if roomy else _when(task.created_at, short=True)
        shown = _status_text(task.status)
        if task.run_id in waiting:
            shown.append(f" ({waiting[task.run_id]})", style="yellow")
        row += [shown, str(task.current_step_index), created]
        if wide:
            row.append(_when(task.updated_at))
        if roomy:
            row.append(Text(_to_json(task.metadata, indent=False) if task.metadata else ""))
        table.add_row(*row)
    console.print(table)


async def _waiting(client: TaskClient, tasks: list[TaskSummary]) -> dict[str, str]:
    """For queued runs no live worker can take: why (no worker on the queue, or none with the
    run's pipeline version)."""
    queued = [task for task in tasks if task.status == "queued" and task.queue]
    if not queued or not client.backend.supports_queues:
        return {}
    current = await client.backend.store_time()
    live = []
    for worker in await client.list_workers():
        info = worker.get("info") or {}
        lease = float(info.get("lease_s") or 30.0)
        if worker["heartbeat_at"].timestamp() >= current - lease:
            live.append(info)
    notes = {}
    for task in queued:
        on_queue = [info for info in live if task.queue in (info.get("queues") or [])]
        wanted = f"{task.pipeline_name}@{task.pipeline_version}"
        if not on_queue:
            notes[task.run_id] = f"no live worker on queue {task.queue!r}"
        elif not any(wanted in (info.get("pipelines") or []) for info in on_queue):
            notes[task.run_id] = f"no worker on queue {task.queue!r} has {wanted}"
    return notes


@runs_app.command("show")
def runs_show_command(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run's id.")],
    as_json: Annotated[bool, _JSON_OPTION] = False,
) -> None:
    """Show one run: status, timestamps, metadata, error, its steps and its context."""
    validate_run_id(run_id)
    backend = _backend()

    async def work() -> TaskDetail | None:
        try:
            if _sqlite_missing(backend):
                return None
            return await TaskClient(backend).get_task(run_id)
        finally:
            await backend.aclose()

    detail = asyncio.run(work())
    if detail is None:
        raise RunNotFoundError(f"no run {run_id!r} in {_store_name()}", run_id=run_id)
    if as_json:
        typer.echo(_to_json(detail.model_dump(mode="json")))
        return
    console = _console()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    total = len(detail.step_names)
    grid.add_row("run id", Text(detail.run_id))
    grid.add_row("status", _status_text(detail.status))
    grid.add_row("pipeline", Text(f"{detail.pipeline_name} (version {detail.pipeline_version})"))
    grid.add_row("progress", f"{detail.current_step_index}/{total} steps done")
    grid.add_row("created", _when(detail.created_at) + " UTC")
    grid.add_row("updated", _when(detail.updated_at) + " UTC")
    grid.add_row("metadata", Text(_to_json(detail.metadata, indent=False)))
    if detail.usage:
        used = detail.usage
        grid.add_row(
            "usage",
            f"{used.requests} requests, {used.input_tokens:,} input + {used.output_tokens:,} "
            f"output tokens, ${used.cost_usd:.4f}",
        )
    if detail.error:
        error = detail.error
        step = f" (step {error.get('step')!r})" if error.get("step") else ""
        grid.add_row("error", Text(f"{error.get('type')}: {error.get('message')}{step}"))
    console.print(grid)
    if detail.step_history:
        console.print("steps:")
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("#", justify="right")
        table.add_column("step", overflow="fold")
        table.add_column("ok")
        table.add_column("attempts", justify="right")
        table.add_column("latency ms", justify="right")
        table.add_column("output / error", overflow="fold")
        for record in detail.step_history:
            outcome = _preview(record.output) if record.success else str(record.error or "")
            table.add_row(
                str(record.index),
                Text(record.name),
                Text("yes", style="green") if record.success else Text("no", style="red"),
                str(record.attempts),
                f"{record.latency_s * 1000:.1f}",
                Text(outcome),
            )
        console.print(table)
    else:
        console.print("No steps recorded.")
    console.print("context:")
    typer.echo(_to_json(detail.context))


@runs_app.command("delete")
def runs_delete_command(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run's id.")],
) -> None:
    """Delete one run."""
    validate_run_id(run_id)
    backend = _backend()

    async def work() -> bool:
        try:
            if _sqlite_missing(backend):
                return False
            return await TaskClient(backend).delete_task(run_id)
        finally:
            await backend.aclose()

    if not asyncio.run(work()):
        raise RunNotFoundError(f"no run {run_id!r} in {_store_name()}", run_id=run_id)
    _console().print(Text(f"Deleted run {run_id}."))


@runs_app.command("prune")
def runs_prune_command(
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than",
            metavar="DURATION",
            help="Delete runs not updated for this long: 30s, 15m, 12h, 7d, 2w.",
        ),
    ],
    status: Annotated[
        str | None, typer.Option("--status", help="Only runs with this status.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete runs not updated for a while (optionally only those of one status)."""
    age = parse_duration(older_than)
    status = _check_status(status)
    try:
        cutoff = datetime.now(UTC) - age
    except OverflowError as exc:
        raise CliError(f"duration {older_than!r} is too long", EXIT_USAGE) from exc
    which = f"{status} runs" if status else "runs"
    if not yes:
        question = f"Delete {which} in {_store_name()} not updated since {_when(cutoff)} UTC?"
        try:
            confirmed = typer.confirm(question, default=False)
        except typer.Abort:
            confirmed = False
        if not confirmed:
            raise CliError(
                "not confirmed; nothing deleted (pass --yes to skip the question)",
                EXIT_RUN_FAILED,
            )
    backend = _backend()

    async def work() -> int:
        try:
            if _sqlite_missing(backend):
                return 0
            return await TaskClient(backend).prune(cutoff, status=status)
        finally:
            await backend.aclose()

    deleted = asyncio.run(work())
    noun = "run" if deleted == 1 else "runs"
    since = f"not updated since {_when(cutoff)} UTC"
    _console().print(Text(f"Deleted {deleted} {noun} {since}{_status_note(status)}"))


def _status_note(status: str | None) -> str:
    return f" (status {status})." if status else "."


# -- flujo run / flujo resume ----------------------------------------------------------------------


@app.command("run")
def run_command(
    target: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:ATTR", help="A Pipeline, Step or Flujo runner, e.g. app.flows:pipeline."
        ),
    ],
    input_json: Annotated[
        str, typer.Option("--input", "-i", metavar="JSON", help="The run's input, as JSON.")
    ] = "null",
    run_id: Annotated[
        str | None,
        typer.Option(
            "--run-id", help="Use this run id (an existing run is resumed or returned instead)."
        ),
    ] = None,
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", metavar="KEY=VALUE", help="Metadata stored with the run."),
    ] = None,
) -> None:
    """Run a pipeline on the configured store, showing each step as it finishes."""
    data = _json_input(input_json)
    if run_id is not None:
        validate_run_id(run_id)
    metadata = _parse_meta(meta)
    obj = _load_object(target, what="target")
    if isinstance(obj, Flujo):
        runner: Flujo[Any, Any, Any] = obj
    elif isinstance(obj, (Pipeline, Step)):
        runner = Flujo(obj, pipeline_name=target, state_backend=_backend())
    else:
        raise _wrong_type(target, obj, "a Pipeline, a Step or a Flujo runner")
    total = _total_steps(runner)
    console = _console()

    async def work() -> PipelineResult[Any, Any]:
        try:
            stream = runner.run_stream(data, run_id=run_id, metadata=metadata or None)
            return await _drive(stream, console, total=total, start=0)
        finally:
            await runner.aclose()

    _finish(asyncio.run(work()), console, app_spec=target)


@app.command("resume")
def resume_command(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run to continue.")],
    app_spec: Annotated[
        str | None,
        typer.Option(
            "--app",
            metavar="MODULE:ATTR",
            help="A PipelineRegistry, Pipeline, Step or Flujo runner (default: the app setting).",
        ),
    ] = None,
    answer_json: Annotated[
        str | None,
        typer.Option(
            "--input",
            metavar="JSON",
            help="The answer to a paused run's question (JSON), validated by the paused step.",
        ),
    ] = None,
) -> None:
    """Continue a failed or interrupted run, or answer a paused one (--input)."""
    validate_run_id(run_id)
    answer = _UNANSWERED if answer_json is None else _json_input(answer_json)
    spec = app_spec or _settings().app
    if not spec:
        raise CliError(
            "no app to resume with: pass --app MODULE:ATTR, or set FLUJO_APP (or app in the "
            "settings table of flujo.toml)",
            EXIT_USAGE,
        )
    obj = _load_object(spec, what="app")
    console = _console()
    if isinstance(obj, PipelineRegistry):
        result = _resume_with_registry(obj, run_id, console, answer)
    else:
        if isinstance(obj, Flujo):
            runner: Flujo[Any, Any, Any] = obj
            if runner.state_backend is None:
                raise CliError(
                    f"{spec!r} is a Flujo runner without a state backend (persist_state=False); "
                    "it cannot resume stored runs",
                    EXIT_CONFIG,
                )
        elif isinstance(obj, (Pipeline, Step)):
            runner = Flujo(obj, pipeline_name=spec, state_backend=_backend())
        else:
            raise _wrong_type(spec, obj, "a PipelineRegistry, a Pipeline, a Step or a Flujo runner")
        result = _resume_with_runner(runner, run_id, console, answer)
    _finish(result, console, app_spec=spec)


_UNANSWERED: Any = object()


def _announce(state: Mapping[str, Any], console: Console, *, answered: bool = False) -> bool:
    """Say where the stored run stands; False when there is nothing to resume."""
    status = state["status"]
    done, total = state["current_step_index"], len(state.get("step_names") or [])
    if status == "paused":
        question = (state.get("error") or {}).get("message", "")
        if not answered:
            console.print(
                Text(
                    f"Run {state['run_id']} is paused, waiting for: {question}\n"
                    "Answer it with --input JSON."
                )
            )
            return False
        console.print(Text(f"Answering run {state['run_id']}, paused on: {question}"))
        return True
    if status in ("completed", "cancelled"):
        console.print(Text(f"Run {state['run_id']} is {status}; nothing to resume."))
        return False
    console.print(
        Text(
            f"Resuming run {state['run_id']} ({status}) of pipeline {state['pipeline_name']!r} "
            f"version {state['pipeline_version']!r} at step {done + 1} of {total}."
        )
    )
    return True


def _resume_with_runner(
    runner: Flujo[Any, Any, Any], run_id: str, console: Console, answer: Any = _UNANSWERED
) -> PipelineResult[Any, Any]:
    backend = runner.state_backend
    assert backend is not None

    async def work() -> PipelineResult[Any, Any]:
        try:
            state = None if _sqlite_missing(backend) else await backend.load_state(run_id)
            if state is None:
                raise RunNotFoundError(f"no run {run_id!r} in the store", run_id=run_id)
            answered = answer is not _UNANSWERED
            _announce(state, console, answered=answered)
            if answered:  # resume_async refuses (conflict) a run that is not paused
                seen = len(state.get("step_history") or [])
                result = await runner.resume_async(run_id, answer)
                total = len(state.get("step_names") or []) or None
                for record in result.step_history[seen:]:
                    console.print(_step_line(record, total))
                return result
            stream = runner.run_stream(None, run_id=run_id)
            total = len(state.get("step_names") or []) or _total_steps(runner)
            return await _drive(stream, console, total=total, start=state["current_step_index"])
        finally:
            await runner.aclose()

    return asyncio.run(work())


def _resume_with_registry(
    registry: PipelineRegistry, run_id: str, console: Console, answer: Any = _UNANSWERED
) -> PipelineResult[Any, Any]:
    backend = _backend()

    async def work() -> PipelineResult[Any, Any]:
        async with TaskClient(backend, registry) as client:
            state = None if _sqlite_missing(backend) else await backend.load_state(run_id)
            if state is None:
                raise RunNotFoundError(f"no run {run_id!r} in {_store_name()}", run_id=run_id)
            seen = len(state.get("step_history") or [])
            answered = answer is not _UNANSWERED
            will_run = _announce(state, console, answered=answered)
            if state["status"] == "paused" and not answered:  # show it; answer nothing
                name, version = state["pipeline_name"], state["pipeline_version"]
                runner: Flujo[Any, Any, Any] = Flujo(
                    registry=registry,
                    pipeline_name=name,
                    pipeline_version=version,
                    context_model=registry.get_context_model(name, version),
                    state_backend=backend,
                )
                return await runner.run_async(None, run_id=run_id)
            status: AbstractContextManager[Any] = (
                console.status("resuming...") if will_run and console.is_terminal else nullcontext()
            )
            with status:
                result = await client.resume_task(run_id, None if not answered else answer)
            total = len(state.get("step_names") or []) or None
            for record in result.step_history[seen:]:
                console.print(_step_line(record, total))
            return result

    return asyncio.run(work())


# -- flujo worker ----------------------------------------------------------------------------------


@app.command("worker")
def worker_command(
    queue: Annotated[
        list[str] | None,
        typer.Option("--queue", "-q", help="A queue to take runs from (repeat for more)."),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Runs at once in this process.")
    ] = 8,
    app_spec: Annotated[
        str | None,
        typer.Option(
            "--app",
            metavar="MODULE:REGISTRY",
            help="The PipelineRegistry whose pipelines this worker runs (default: app setting).",
        ),
    ] = None,
    lease: Annotated[
        float | None,
        typer.Option("--lease", min=0.1, help="Lease seconds (default: worker_lease_s)."),
    ] = None,
    heartbeat: Annotated[
        float | None,
        typer.Option("--heartbeat", min=0.05, help="Renewal seconds (worker_heartbeat_s)."),
    ] = None,
    grace: Annotated[
        float,
        typer.Option("--grace", min=0, help="Seconds running runs get to finish on SIGTERM."),
    ] = 30.0,
) -> None:
    """Run queued runs and background tasks from the store until SIGTERM (or Ctrl-C)."""
    from flujo.worker import Worker  # noqa: PLC0415

    spec = app_spec or _settings().app
    if not spec:
        raise CliError(
            "no pipelines to run: pass --app MODULE:REGISTRY, or set FLUJO_APP (or app in the "
            "settings table of flujo.toml)",
            EXIT_USAGE,
        )
    registry = _load_object(spec, what="app")
    if not isinstance(registry, PipelineRegistry):
        raise _wrong_type(spec, registry, "a PipelineRegistry")
    backend = _backend()
    worker = Worker(
        registry,
        state_backend=backend,
        queues=queue or ["default"],
        concurrency=concurrency,
        lease_s=lease,
        heartbeat_s=heartbeat,
        grace_s=grace,
    )
    console = Console(stderr=True, highlight=False)
    console.print(
        Text(
            f"worker {worker.worker_id}: queues {', '.join(worker.queues)}; "
            f"{len(worker.pipelines)} pipeline version(s); store {_store_name()}"
        )
    )

    async def work() -> None:
        try:
            await worker.run(install_signal_handlers=True)
        finally:
            await backend.aclose()

    asyncio.run(work())
    console.print(Text(f"worker {worker.worker_id} stopped after {worker.completed} run(s)"))


@runs_app.command("cancel")
def runs_cancel_command(
    run_id: Annotated[str, typer.Argument(metavar="RUN_ID", help="The run to cancel.")],
) -> None:
    """Cancel a run: a queued one never starts; a running one stops at its next step."""
    validate_run_id(run_id)
    backend = _backend()

    async def work() -> str:
        try:
            return await TaskClient(backend).cancel(run_id)
        finally:
            await backend.aclose()

    status = asyncio.run(work())
    message = {
        "cancelled": f"Run {run_id} is cancelled.",
        "running": f"Run {run_id} will stop at its next step boundary.",
    }.get(status, f"Run {run_id} is already {status}; nothing to cancel.")
    _console().print(Text(message))


# -- flujo config show -----------------------------------------------------------------------------


@config_app.command("show")
def config_show_command(as_json: Annotated[bool, _JSON_OPTION] = False) -> None:
    """Show each setting, its value (passwords hidden) and where it comes from."""
    from flujo.config import setting_sources  # noqa: PLC0415
    from flujo.config_file import config_path  # noqa: PLC0415

    settings = _settings()
    sources = setting_sources()
    path = config_path()
    values: dict[str, Any] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, str) and name.endswith("_uri"):
            value = redact_uri(value)
        values[name] = value
    if as_json:
        payload = {
            "config_file": str(path),
            "config_file_exists": path.is_file(),
            "settings": {
                name: {"value": value, "source": sources.get(name, "default")}
                for name, value in values.items()
            },
        }
        typer.echo(_to_json(payload))
        return
    console = _console()
    state = "" if path.is_file() else " (not found)"
    console.print(Text(f"config file: {path}{state}"))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("setting", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_column("source", overflow="fold")
    for name, value in values.items():
        shown = Text("(not set)", style="dim") if value is None else Text(str(value))
        table.add_row(name, shown, Text(sources.get(name, "default")))
    console.print(table)


def main(argv: Sequence[str] | None = None) -> None:
    """The ``flujo`` console script."""
    command: Callable[..., Any] = typer.main.get_command(app)
    command(args=argv, prog_name="flujo")


if __name__ == "__main__":  # pragma: no cover
    main()
