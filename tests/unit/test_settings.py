"""Settings: defaults that work on one machine, every source honoured, bad values named at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_bridge.settings import SPECS, Settings, SettingsError, load_settings


def test_defaults_need_nothing_installed() -> None:
    settings = load_settings(environ={})
    assert settings.effective_database_url.startswith("sqlite:///")
    assert settings.effective_database_url.endswith("instance/fhir-bridge.db")
    assert settings.public_url == "http://127.0.0.1:8080"
    assert settings.vendor_token_lifetime <= 300
    assert settings.keys_path == Path("instance") / "keys"


def test_every_setting_is_a_field() -> None:
    fields = set(Settings.__dataclass_fields__) - {"extra"}
    assert fields == {spec.name.lower() for spec in SPECS}


def test_environment_wins_over_toml_and_overrides_win_over_environment(tmp_path: Path) -> None:
    toml = tmp_path / "bridge.toml"
    toml.write_text('[fhir_bridge]\nport = 9001\nlog_level = "DEBUG"\nmax_batch_records = 10\n')
    env = {"FHIR_BRIDGE_CONFIG": str(toml), "FHIR_BRIDGE_PORT": "9002"}
    settings = load_settings({"MAX_BATCH_RECORDS": 20}, environ=env)
    assert settings.port == 9002
    assert settings.log_level == "DEBUG"
    assert settings.max_batch_records == 20


def test_postgres_url_uses_psycopg3() -> None:
    settings = load_settings({"DATABASE_URL": "postgresql://u:p@db/fhir"}, environ={})
    assert settings.database_url == "postgresql+psycopg://u:p@db/fhir"


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("FHIR_BRIDGE_PORT", "eighty", "FHIR_BRIDGE_PORT"),
        ("FHIR_BRIDGE_VENDOR_TOKEN_LIFETIME", "3600", "between 30 and 300"),
        ("FHIR_BRIDGE_PUBLIC_URL", "ftp://x", "absolute http(s) URL"),
        ("FHIR_BRIDGE_SIGNING_ALG", "RS256", "RS384, ES384"),
        ("FHIR_BRIDGE_WORKER_EMBEDDED", "maybe", "true or false"),
        ("FHIR_BRIDGE_DATABASE_URL", "mysql://x", "sqlite:/// or postgresql://"),
        ("FHIR_BRIDGE_NO_SUCH_THING", "1", "unknown setting"),
    ],
)
def test_bad_value_names_the_setting(name: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(environ={name: value})
    assert name in str(info.value)
    assert fragment in str(info.value)


def test_all_problems_reported_at_once_and_secrets_not_echoed() -> None:
    env = {
        "FHIR_BRIDGE_PORT": "0",
        "FHIR_BRIDGE_LOG_LEVEL": "LOUD",
        "FHIR_BRIDGE_DATABASE_URL": "mysql://root:hunter2@x",
    }
    with pytest.raises(SettingsError) as info:
        load_settings(environ=env)
    assert len(info.value.problems) == 3
    assert "hunter2" not in str(info.value)


def test_toml_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("port = \n")
    with pytest.raises(SettingsError, match=r"bad\.toml"):
        load_settings(environ={"FHIR_BRIDGE_CONFIG": str(bad)})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    with pytest.raises(SettingsError, match="COLOUR"):
        load_settings(config_file=unknown, environ={})


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    undocumented = [spec.name for spec in SPECS if f"`FHIR_BRIDGE_{spec.name}`" not in readme]
    assert undocumented == []
