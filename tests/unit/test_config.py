"""Settings: FLUJO_* environment > flujo.toml > defaults, and the store Flujo() picks from them.

Every test runs in an empty temporary working directory with no FLUJO_* variable set.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from flujo import Flujo, step
from flujo.config import (
    DEFAULT_STATE_URI,
    FlujoSettings,
    FlujoSettingsWarning,
    load_settings,
    setting_sources,
)
from flujo.exceptions import ConfigurationError
from flujo.state import FileBackend, InMemoryBackend, SQLiteBackend

# The example of the production manual, section 1.2, verbatim.
MANUAL_TOML = """\
# Persistent backend (top-level, not under [settings])
state_uri = "postgresql://user:pass@host:5432/db"

[settings]
# Connection Pooling (critical for FastAPI/Celery + Postgres)
postgres_pool_min = 5
postgres_pool_max = 20

[aros]
# Stage 2: Uses json-repair to fix markdown fences/trailing commas automatically
coercion_tolerant_level = 2
structured_output_default = "openai_json"

[lockfile]
# Ensure prompt/config consistency between dev and prod
enabled = true
"""


@pytest.fixture(autouse=True)
def clean_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No FLUJO_* variable, and an empty working directory."""
    import os

    for name in list(os.environ):
        if name.upper().startswith("FLUJO_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_toml(text: str, path: Path | None = None) -> Path:
    path = path or Path.cwd() / "flujo.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_quietly() -> FlujoSettings:
    """load_settings() that fails the test on any FlujoSettingsWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FlujoSettingsWarning)
        return load_settings()


@step
async def echo(x: int) -> int:
    return x


# -- precedence ------------------------------------------------------------------------------


def test_defaults_without_a_file_or_environment() -> None:
    settings = load_quietly()
    assert settings.state_uri == DEFAULT_STATE_URI == "sqlite:///flujo_ops.db"
    assert (settings.postgres_pool_min, settings.postgres_pool_max) == (1, 10)
    assert settings.app is None
    assert set(setting_sources().values()) == {"default"}


def test_the_manuals_flujo_toml_is_read_without_warnings() -> None:
    write_toml(MANUAL_TOML + "\n[budgets]\ntotal_cost_usd_limit = 1.0\n")
    settings = load_quietly()
    assert settings.state_uri == "postgresql://user:pass@host:5432/db"
    assert (settings.postgres_pool_min, settings.postgres_pool_max) == (5, 20)
    sources = setting_sources()
    assert sources["state_uri"] == "flujo.toml (state_uri)"
    assert sources["postgres_pool_min"] == "flujo.toml ([settings] postgres_pool_min)"
    assert sources["postgres_pool_max"] == "flujo.toml ([settings] postgres_pool_max)"
    assert sources["app"] == "default"


def test_environment_wins_over_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml(MANUAL_TOML)
    monkeypatch.setenv("FLUJO_STATE_URI", "memory://")
    monkeypatch.setenv("FLUJO_POSTGRES_POOL_MAX", "30")
    monkeypatch.setenv("FLUJO_APP", "service.pipelines:registry")
    settings = load_quietly()
    assert settings.state_uri == "memory://"
    assert settings.postgres_pool_min == 5  # from the file
    assert settings.postgres_pool_max == 30
    assert settings.app == "service.pipelines:registry"
    assert setting_sources() == {
        "state_uri": "environment (FLUJO_STATE_URI)",
        "postgres_pool_min": "flujo.toml ([settings] postgres_pool_min)",
        "postgres_pool_max": "environment (FLUJO_POSTGRES_POOL_MAX)",
        "app": "environment (FLUJO_APP)",
        "background_mode": "default",
        "worker_lease_s": "default",
        "worker_heartbeat_s": "default",
    }


def test_environment_wins_over_the_default_without_a_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLUJO_STATE_URI", "file:///var/flujo")
    monkeypatch.setenv("FLUJO_POSTGRES_POOL_MIN", "0")
    settings = load_quietly()
    assert settings.state_uri == "file:///var/flujo"
    assert settings.postgres_pool_min == 0
    sources = setting_sources()
    assert sources["state_uri"] == "environment (FLUJO_STATE_URI)"
    assert sources["postgres_pool_min"] == "environment (FLUJO_POSTGRES_POOL_MIN)"
    assert sources["postgres_pool_max"] == "default"


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        pytest.param('state_uri = "memory://"\n', {}, "memory://", id="state_uri-alone"),
        pytest.param(
            'state_uri = "memory://"\n', {"FLUJO_STATE_URI": "file://d"}, "file://d", id="env-wins"
        ),
        pytest.param(
            'state_uri = "memory://"\n[aros]\nx = 1\n', {}, "memory://", id="with-other-tables"
        ),
        pytest.param("", {}, DEFAULT_STATE_URI, id="empty-file"),
    ],
)
def test_a_file_without_a_settings_table_is_valid(
    monkeypatch: pytest.MonkeyPatch, text: str, env: dict[str, str], expected: str
) -> None:
    # [settings] is optional: most files hold only the top-level state_uri.
    write_toml(text)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert load_quietly().state_uri == expected


def test_flujo_config_path_names_another_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_toml('state_uri = "memory://ignored"\n[settings]\npostgres_pool_max = 3\n')
    elsewhere = tmp_path / "conf" / "prod.toml"
    elsewhere.parent.mkdir()
    write_toml('state_uri = "file:///srv/runs"\n[settings]\npostgres_pool_max = 40\n', elsewhere)
    monkeypatch.setenv("FLUJO_CONFIG_PATH", str(elsewhere))
    settings = load_quietly()
    assert settings.state_uri == "file:///srv/runs"
    assert settings.postgres_pool_max == 40
    assert setting_sources()["state_uri"] == f"{elsewhere} (state_uri)"


def test_flujo_config_path_error_messages_name_that_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    elsewhere = write_toml("[settings]\npostgres_pool_max = 0\n", tmp_path / "other.toml")
    monkeypatch.setenv("FLUJO_CONFIG_PATH", str(elsewhere))
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert str(elsewhere) in str(info.value)
    assert "postgres_pool_max" in str(info.value)


# -- unknown keys ----------------------------------------------------------------------------


def test_an_unknown_top_level_key_warns() -> None:
    write_toml('state_uri = "memory://"\nstate_url = "typo"\n[settings]\n')
    with pytest.warns(FlujoSettingsWarning, match=r"flujo\.toml: unknown key 'state_url'"):
        settings = load_settings()
    assert settings.state_uri == "memory://"


def test_a_settings_key_at_the_top_level_warns_with_a_hint() -> None:
    write_toml("postgres_pool_max = 20\n[settings]\n")
    with pytest.warns(
        FlujoSettingsWarning, match=r"'postgres_pool_max' \(put it under \[settings\]\)"
    ):
        settings = load_settings()
    assert settings.postgres_pool_max == 10  # not applied from the wrong place


def test_an_unknown_key_in_settings_warns() -> None:
    write_toml("[settings]\npostgres_pool_size = 20\n")
    with pytest.warns(
        FlujoSettingsWarning, match=r"unknown key 'postgres_pool_size' in \[settings\]"
    ):
        load_settings()


def test_state_uri_inside_settings_warns_with_a_hint_and_is_not_used() -> None:
    write_toml('[settings]\nstate_uri = "memory://"\n')
    with pytest.warns(
        FlujoSettingsWarning, match=r"'state_uri' in \[settings\] \(it belongs at the top level\)"
    ):
        settings = load_settings()
    assert settings.state_uri == DEFAULT_STATE_URI


def test_the_other_manual_tables_do_not_warn() -> None:
    write_toml(
        "[settings]\n"
        "[aros]\ncoercion_tolerant_level = 2\n"
        "[lockfile]\nenabled = true\n"
        "[budgets]\ntotal_cost_usd_limit = 1.0\n"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_settings()
    assert [w for w in caught if issubclass(w.category, FlujoSettingsWarning)] == []


def test_a_settings_key_that_is_not_a_table_is_a_configuration_error() -> None:
    # `settings = 3` where a table belongs: a bad value, reported like the others.
    write_toml("settings = 3\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FlujoSettingsWarning)
        with pytest.raises(ConfigurationError, match=r"flujo\.toml"):
            load_settings()


# -- bad values ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param('[settings]\npostgres_pool_min = "five"\n', "postgres_pool_min", id="str"),
        pytest.param("[settings]\npostgres_pool_min = 1.5\n", "postgres_pool_min", id="float"),
        pytest.param("[settings]\npostgres_pool_min = -1\n", "postgres_pool_min", id="negative"),
        pytest.param("[settings]\npostgres_pool_max = 0\n", "postgres_pool_max", id="zero-max"),
        pytest.param("[settings]\npostgres_pool_max = [5]\n", "postgres_pool_max", id="list"),
        pytest.param("state_uri = 5\n[settings]\n", "state_uri", id="uri-not-a-string"),
        pytest.param("[settings]\napp = 3\n", "app", id="app-not-a-string"),
    ],
)
def test_a_bad_value_in_the_file_names_the_key_and_the_file(text: str, key: str) -> None:
    write_toml(text)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert key in message
    assert "flujo.toml" in message


def test_a_boolean_is_not_a_pool_size() -> None:
    write_toml("[settings]\npostgres_pool_max = true\n")
    with pytest.raises(ConfigurationError, match="postgres_pool_max"):
        load_settings()


def test_pool_min_above_max_in_the_file_names_the_keys_and_the_file() -> None:
    write_toml("[settings]\npostgres_pool_min = 5\npostgres_pool_max = 2\n")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert "postgres_pool_min" in message
    assert "postgres_pool_max" in message
    assert "flujo.toml" in message


def test_pool_min_above_max_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLUJO_POSTGRES_POOL_MIN", "50")
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert "postgres_pool_min" in message
    assert "FLUJO_POSTGRES_POOL_MIN" in message


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FLUJO_POSTGRES_POOL_MIN", "several"),
        ("FLUJO_POSTGRES_POOL_MIN", "-3"),
        ("FLUJO_POSTGRES_POOL_MAX", "0"),
        ("FLUJO_POSTGRES_POOL_MAX", "2.5"),
    ],
)
def test_a_bad_value_in_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    message = str(info.value)
    assert variable in message
    assert variable.removeprefix("FLUJO_").lower() in message


def test_invalid_toml_is_a_configuration_error_naming_the_file() -> None:
    write_toml('state_uri = "memory://\n[settings\n')
    with pytest.raises(ConfigurationError, match=r"flujo\.toml"):
        load_settings()


def test_a_bad_value_is_reported_even_when_the_file_is_otherwise_fine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The environment overrides a good file value with a bad one: the variable is named.
    write_toml("[settings]\npostgres_pool_max = 20\n")
    monkeypatch.setenv("FLUJO_POSTGRES_POOL_MAX", "lots")
    with pytest.raises(ConfigurationError, match="FLUJO_POSTGRES_POOL_MAX"):
        load_settings()


# -- the store Flujo() uses ------------------------------------------------------------------


def test_flujo_without_a_backend_uses_the_default_sqlite_file(tmp_path: Path) -> None:
    runner = Flujo(echo)
    assert isinstance(runner.state_backend, SQLiteBackend)
    assert runner.state_backend.path == tmp_path / "flujo_ops.db"


def test_flujo_uses_memory_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUJO_STATE_URI", "memory://")
    runner = Flujo(echo)
    assert isinstance(runner.state_backend, InMemoryBackend)
    assert runner.run(3).output == 3
    assert list(Path.cwd().iterdir()) == []


async def test_flujo_stores_runs_where_the_environment_says(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    db = tmp_path / "elsewhere" / "runs.db"
    db.parent.mkdir()
    monkeypatch.setenv("FLUJO_STATE_URI", f"sqlite:///{db}")  # sqlite:////abs/path
    async with Flujo(echo) as runner:
        assert isinstance(runner.state_backend, SQLiteBackend)
        assert runner.state_backend.path == db
        await runner.run_async(7, run_id="r1")
    async with SQLiteBackend(db) as reader:
        state = await reader.load_state("r1")
    assert state is not None
    assert state["last_step_output"] == 7
    assert not (tmp_path / "flujo_ops.db").exists()


async def test_flujo_uses_a_file_store_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLUJO_STATE_URI", f"file://{tmp_path / 'runs'}")
    async with Flujo(echo) as runner:
        assert isinstance(runner.state_backend, FileBackend)
        assert runner.state_backend.directory == tmp_path / "runs"
        await runner.run_async(1, run_id="r1")
    assert (tmp_path / "runs" / "r1.json").is_file()


def test_flujo_uses_the_state_uri_of_flujo_toml(tmp_path: Path) -> None:
    write_toml('state_uri = "sqlite:///from_file.db"\n[settings]\npostgres_pool_max = 4\n')
    runner = Flujo(echo)
    assert isinstance(runner.state_backend, SQLiteBackend)
    assert runner.state_backend.path == tmp_path / "from_file.db"


def test_flujo_uses_a_flujo_toml_holding_only_state_uri(tmp_path: Path) -> None:
    write_toml('state_uri = "sqlite:///from_file.db"\n')
    runner = Flujo(echo)
    assert isinstance(runner.state_backend, SQLiteBackend)
    assert runner.state_backend.path == tmp_path / "from_file.db"


def test_the_environment_beats_flujo_toml_for_flujo(monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml('state_uri = "sqlite:///from_file.db"\n[settings]\n')
    monkeypatch.setenv("FLUJO_STATE_URI", "memory://")
    assert isinstance(Flujo(echo).state_backend, InMemoryBackend)


def test_persist_state_false_ignores_the_configured_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Not even a broken store setting matters when nothing is stored.
    monkeypatch.setenv("FLUJO_STATE_URI", "nonsense")
    write_toml('state_uri = "also nonsense"\n')
    runner = Flujo(echo, persist_state=False)
    assert runner.state_backend is None
    assert runner.run(5).output == 5


def test_an_unreadable_flujo_toml_fails_even_without_a_store() -> None:
    # The file also holds [budgets], which every runner reads: a broken file is reported.
    write_toml("this is not toml")
    with pytest.raises(ConfigurationError, match="cannot read settings"):
        Flujo(echo, persist_state=False)


def test_a_bad_configured_uri_fails_when_flujo_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUJO_STATE_URI", "mysql://user:hunter2@db/flujo")
    with pytest.raises(ConfigurationError) as info:
        Flujo(echo)
    assert "mysql" in str(info.value)
    assert "hunter2" not in str(info.value)


def test_a_passed_backend_wins_over_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUJO_STATE_URI", "not a uri")
    backend = InMemoryBackend()
    assert Flujo(echo, state_backend=backend).state_backend is backend


def test_pool_settings_reach_a_configured_postgres_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flujo.state.backends.postgres import PostgresBackend

    write_toml(MANUAL_TOML)
    runner = Flujo(echo)  # builds the backend; nothing connects until a run
    backend = runner.state_backend
    assert isinstance(backend, PostgresBackend)
    assert (backend.pool_min, backend.pool_max) == (5, 20)
    assert backend.dsn == "postgresql://user:pass@host:5432/db"
