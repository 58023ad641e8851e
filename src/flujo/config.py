"""Settings: environment over ``flujo.toml`` over defaults, read in this one module.

>>> settings = load_settings()            # doctest: +SKIP
>>> settings.state_uri                    # doctest: +SKIP
'sqlite:///flujo_ops.db'

Where each setting comes from, highest first:

1. the environment: ``FLUJO_STATE_URI``, ``FLUJO_POSTGRES_POOL_MIN``, ``FLUJO_POSTGRES_POOL_MAX``,
   ``FLUJO_APP``;
2. ``flujo.toml`` in the working directory (or the file named by ``FLUJO_CONFIG_PATH``):
   ``state_uri`` at the top level, the others in its ``[settings]`` table;
3. the defaults below.

An unknown key in ``flujo.toml`` is a warning (:class:`FlujoSettingsWarning`); a value of the
wrong type or range is a :class:`~flujo.exceptions.ConfigurationError` naming the key and where
it came from.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from flujo.config_file import (
    CONFIG_FILE,
    ENV_PREFIX,
    config_path,
    configured_table,
    configured_usage_limits,
    read_toml,
)
from flujo.exceptions import ConfigurationError

if TYPE_CHECKING:
    from flujo.state.backends.base import StateBackend

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_STATE_URI",
    "FlujoSettings",
    "FlujoSettingsWarning",
    "configured_backend",
    "configured_table",
    "configured_usage_limits",
    "load_settings",
    "setting_sources",
]

DEFAULT_STATE_URI = "sqlite:///flujo_ops.db"

# Tables of flujo.toml that belong to other parts of flujo (the production manual's sections);
# they are not settings of this object, and not unknown either.
_KNOWN_TABLES = frozenset({"settings", "aros", "lockfile", "budgets", "pricing", "governance"})
_TOP_LEVEL = frozenset({"state_uri"})


class FlujoSettingsWarning(UserWarning):
    """``flujo.toml`` holds something flujo does not know (probably a typo)."""


class FlujoSettings(BaseSettings):
    """flujo's settings. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    state_uri: str = DEFAULT_STATE_URI
    """Where runs are stored: ``sqlite:///relative.db``, ``sqlite:////absolute.db``,
    ``postgresql://user:pass@host:5432/db``, ``file:///directory`` or ``memory://``."""
    postgres_pool_min: int = Field(1, ge=0)
    """Connections the Postgres pool keeps open."""
    postgres_pool_max: int = Field(10, ge=1)
    """Most connections the Postgres pool opens."""
    app: str | None = None
    """``module:attribute`` naming a PipelineRegistry (or a pipeline), used by ``flujo resume``
    and ``flujo worker``."""
    background_mode: Literal["local", "queue"] = "local"
    """Where background steps' tasks run: on the launching runner's event loop, or queued for
    workers."""
    worker_lease_s: float = Field(30.0, gt=0, allow_inf_nan=False)
    """How long a worker's claim on a run lasts unless renewed; a dead worker's runs are taken
    over once it expires."""
    worker_heartbeat_s: float = Field(10.0, gt=0, allow_inf_nan=False)
    """How often a worker renews its leases (and notices cancellations)."""

    @field_validator("postgres_pool_min", "postgres_pool_max", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected an integer, not a boolean")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        data = read_toml(config_path())
        table = data.get("settings")
        return (
            init_settings,
            env_settings,
            _TomlTable(settings_cls, table if isinstance(table, dict) else {}, _IN_TABLE),
            _TomlTable(settings_cls, data, _TOP_LEVEL),
        )


class _TomlTable(PydanticBaseSettingsSource):
    """The settings found in one table of flujo.toml (only those that belong there)."""

    def __init__(
        self, settings_cls: type[BaseSettings], table: dict[str, Any], keys: frozenset[str]
    ) -> None:
        super().__init__(settings_cls)
        self._values = {key: value for key, value in table.items() if key in keys}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


_IN_TABLE = frozenset(FlujoSettings.model_fields) - _TOP_LEVEL


def _check_keys(path: Path, data: dict[str, Any]) -> None:
    fields = set(FlujoSettings.model_fields) - _TOP_LEVEL
    for key, value in data.items():
        if key in _TOP_LEVEL or (key in _KNOWN_TABLES and isinstance(value, dict)):
            continue
        hint = " (put it under [settings])" if key in fields else ""
        warnings.warn(f"{path}: unknown key {key!r}{hint}", FlujoSettingsWarning, stacklevel=3)
    table = data.get("settings", {})
    if not isinstance(table, dict):
        raise ConfigurationError(f"{path}: 'settings' must be a table ([settings])")
    if isinstance(table, dict):
        for key in table:
            if key not in fields:
                hint = " (it belongs at the top level)" if key in _TOP_LEVEL else ""
                warnings.warn(
                    f"{path}: unknown key {key!r} in [settings]{hint}",
                    FlujoSettingsWarning,
                    stacklevel=3,
                )


def setting_sources(data: dict[str, Any] | None = None) -> dict[str, str]:
    """For each setting, where its value comes from: the environment, the file, or the default."""
    path = config_path()
    data = read_toml(path) if data is None else data
    table = data.get("settings", {}) if isinstance(data.get("settings"), dict) else {}
    env = {key.upper() for key in os.environ}
    sources = {}
    for name in FlujoSettings.model_fields:
        variable = f"{ENV_PREFIX}{name.upper()}"
        if variable in env:
            sources[name] = f"environment ({variable})"
        elif name in _TOP_LEVEL and name in data:
            sources[name] = f"{path} ({name})"
        elif name not in _TOP_LEVEL and name in table:
            sources[name] = f"{path} ([settings] {name})"
        else:
            sources[name] = "default"
    return sources


def load_settings(**overrides: Any) -> FlujoSettings:
    """Read the settings (environment > ``flujo.toml`` > defaults); ``overrides`` win over all."""
    path = config_path()
    data = read_toml(path)
    _check_keys(path, data)
    try:
        settings = FlujoSettings(**overrides)
    except ValidationError as exc:
        sources = setting_sources(data)
        first = exc.errors(include_url=False)[0]
        key = str(first["loc"][0]) if first["loc"] else "settings"
        where = sources.get(key, "settings")
        raise ConfigurationError(f"setting {key!r} from {where}: {first['msg']}") from exc
    if settings.postgres_pool_min > settings.postgres_pool_max:
        sources = setting_sources(data)
        raise ConfigurationError(
            f"setting 'postgres_pool_min' ({settings.postgres_pool_min}, from "
            f"{sources['postgres_pool_min']}) is larger than 'postgres_pool_max' "
            f"({settings.postgres_pool_max}, from {sources['postgres_pool_max']})"
        )
    if settings.worker_heartbeat_s >= settings.worker_lease_s:
        sources = setting_sources(data)
        raise ConfigurationError(
            f"setting 'worker_heartbeat_s' ({settings.worker_heartbeat_s:g}, from "
            f"{sources['worker_heartbeat_s']}) must be shorter than 'worker_lease_s' "
            f"({settings.worker_lease_s:g}, from {sources['worker_lease_s']}): a lease would "
            "expire before it is renewed"
        )
    return settings


def configured_backend(settings: FlujoSettings | None = None) -> StateBackend:
    """The store the settings name (``FLUJO_STATE_URI`` > ``flujo.toml`` > SQLite default)."""
    from flujo.state.uri import backend_from_uri  # noqa: PLC0415

    settings = settings or load_settings()
    return backend_from_uri(
        settings.state_uri,
        postgres_pool_min=settings.postgres_pool_min,
        postgres_pool_max=settings.postgres_pool_max,
    )
