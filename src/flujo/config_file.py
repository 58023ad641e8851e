"""``flujo.toml``: where it is and how it is read (light: no settings library needed).

:mod:`flujo.config` builds the settings from it; the other tables (``[budgets]``, ``[aros]``,
``[pricing]``) are read here by the parts of flujo they configure.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flujo.exceptions import ConfigurationError

if TYPE_CHECKING:
    from flujo.domain.usage import UsageLimits

__all__ = [
    "CONFIG_FILE",
    "ENV_PREFIX",
    "config_path",
    "configured_table",
    "configured_usage_limits",
    "read_toml",
]

CONFIG_FILE = "flujo.toml"
ENV_PREFIX = "FLUJO_"


def config_path() -> Path:
    """The ``flujo.toml`` in use (it may not exist, unless FLUJO_CONFIG_PATH names it)."""
    return Path(os.environ.get(f"{ENV_PREFIX}CONFIG_PATH") or CONFIG_FILE)


def read_toml(path: Path) -> dict[str, Any]:
    """The parsed file (empty when it does not exist and FLUJO_CONFIG_PATH does not name it)."""
    if not path.is_file():
        if os.environ.get(f"{ENV_PREFIX}CONFIG_PATH"):
            raise ConfigurationError(
                f"{path}: no such settings file (named by {ENV_PREFIX}CONFIG_PATH)"
            )
        return {}
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"{path}: cannot read settings: {exc}") from exc


def configured_table(name: str) -> dict[str, Any]:
    """A table of ``flujo.toml`` that another part of flujo reads (``[aros]``, ``[pricing]``,
    ``[budgets]``); empty when the file or the table is missing."""
    path = config_path()
    table = read_toml(path).get(name, {})
    if not isinstance(table, dict):
        raise ConfigurationError(f"{path}: {name!r} must be a table ([{name}])")
    return table


def configured_usage_limits(pipeline_name: str | None = None) -> UsageLimits | None:
    """The usage limits of ``flujo.toml``'s ``[budgets]`` table, or None when it sets none.

    The table's own keys are the default for every pipeline; a ``[budgets.pipelines.NAME]``
    table replaces them for the pipeline called NAME::

        [budgets]
        total_cost_usd_limit = 5.0
        request_limit = 200

        [budgets.pipelines.triage]
        total_cost_usd_limit = 0.25
    """
    from pydantic import ValidationError  # noqa: PLC0415

    from flujo.domain.usage import UsageLimits  # noqa: PLC0415 - needed only with [budgets]

    table = configured_table("budgets")
    if not table:
        return None
    chosen = {key: value for key, value in table.items() if key != "pipelines"}
    where = "[budgets]"
    pipelines = table.get("pipelines", {})
    if not isinstance(pipelines, dict):
        raise ConfigurationError(f"{config_path()}: [budgets] pipelines must be a table")
    if pipeline_name is not None and pipeline_name in pipelines:
        chosen = pipelines[pipeline_name]
        where = f"[budgets.pipelines.{pipeline_name}]"
        if not isinstance(chosen, dict):
            raise ConfigurationError(f"{config_path()}: {where} must be a table")
    if not chosen:
        return None
    try:
        return UsageLimits(**chosen)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        key = ".".join(str(part) for part in first["loc"]) or "budgets"
        raise ConfigurationError(f"{config_path()}: {where} {key}: {first['msg']}") from exc
