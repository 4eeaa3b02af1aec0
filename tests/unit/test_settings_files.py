"""Secret settings read from files (`SIDECAR_<NAME>_FILE`), as Docker and Kubernetes secrets
provide them, and the database-only settings `migrate` reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.crypto import new_key
from app.settings import (
    SECRET_SETTINGS,
    Settings,
    SettingsError,
    load_database_settings,
    load_settings,
)

DATABASE = "postgresql://u:p@db:5432/sidecar"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"SIDECAR_{name.upper()}", raising=False)
        monkeypatch.delenv(f"SIDECAR_{name.upper()}_FILE", raising=False)
    monkeypatch.setenv("SIDECAR_DATABASE_URL", DATABASE)
    monkeypatch.setenv("SIDECAR_HOMESERVER_URL", "http://synapse:8008")
    monkeypatch.setenv("SIDECAR_TOKEN_KEYS", new_key())
    return monkeypatch


def secret_file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_the_secret_settings() -> None:
    assert set(SECRET_SETTINGS) == {"database_url", "token_keys", "appservice_token", "admin_token"}
    assert set(SECRET_SETTINGS) <= set(Settings.model_fields)


def test_each_secret_is_read_from_its_file_without_the_trailing_newline(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key_one, key_two = new_key(), new_key()
    env.delenv("SIDECAR_DATABASE_URL")
    env.delenv("SIDECAR_TOKEN_KEYS")
    env.setenv("SIDECAR_DATABASE_URL_FILE", secret_file(tmp_path, "db", DATABASE + "\n"))
    env.setenv("SIDECAR_TOKEN_KEYS_FILE", secret_file(tmp_path, "keys", f"{key_one},{key_two}\n"))
    env.setenv("SIDECAR_APPSERVICE_TOKEN_FILE", secret_file(tmp_path, "as", "as-token\r\n"))
    settings = load_settings()
    assert settings.database_url == "postgresql+asyncpg://u:p@db:5432/sidecar"
    assert len(settings.token_keys) == 2
    assert settings.appservice_token is not None
    assert settings.appservice_token.get_secret_value() == "as-token"


def test_a_file_without_a_newline_is_taken_as_it_is(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env.delenv("SIDECAR_DATABASE_URL")
    env.setenv("SIDECAR_DATABASE_URL_FILE", secret_file(tmp_path, "db", DATABASE))
    assert load_settings().database_url.endswith("@db:5432/sidecar")


@pytest.mark.parametrize("name", ["database_url", "token_keys", "appservice_token"])
def test_both_the_variable_and_its_file_is_an_error(
    env: pytest.MonkeyPatch, tmp_path: Path, name: str
) -> None:
    var = f"SIDECAR_{name.upper()}"
    env.setenv(var, "x")
    env.setenv(var + "_FILE", secret_file(tmp_path, name, "x\n"))
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert f"{var} and {var}_FILE are both set" in str(raised.value)


def test_an_unreadable_file_is_named_without_its_contents(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env.delenv("SIDECAR_TOKEN_KEYS")
    env.setenv("SIDECAR_TOKEN_KEYS_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert f"SIDECAR_TOKEN_KEYS_FILE: cannot read {tmp_path / 'missing'}" in str(raised.value)


def test_a_bad_value_in_a_file_is_named_by_its_setting(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQ"
    env.delenv("SIDECAR_TOKEN_KEYS")
    env.setenv("SIDECAR_TOKEN_KEYS_FILE", secret_file(tmp_path, "keys", secret + "\n"))
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "SIDECAR_TOKEN_KEYS: each key must decode to 32 bytes" in str(raised.value)
    assert secret not in str(raised.value)


def test_only_secrets_have_files(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("SIDECAR_LOG_LEVEL_FILE", secret_file(tmp_path, "level", "DEBUG\n"))
    assert load_settings().log_level == "INFO"


def test_the_database_settings_need_the_database_url_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"SIDECAR_{name.upper()}", raising=False)
        monkeypatch.delenv(f"SIDECAR_{name.upper()}_FILE", raising=False)
    with pytest.raises(SettingsError) as raised:
        load_database_settings()
    assert str(raised.value) == "invalid settings:\n  SIDECAR_DATABASE_URL: is required"
    monkeypatch.setenv("SIDECAR_DATABASE_URL_FILE", secret_file(tmp_path, "db", DATABASE + "\n"))
    assert load_database_settings().database_url == "postgresql+asyncpg://u:p@db:5432/sidecar"


def test_the_admin_token_is_off_unless_set_and_may_come_from_a_file(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert load_settings().admin_token is None
    token = new_key()
    env.setenv("SIDECAR_ADMIN_TOKEN_FILE", secret_file(tmp_path, "admin", token + "\n"))
    admin_token = load_settings().admin_token
    assert admin_token is not None
    assert admin_token.get_secret_value() == token
    assert token not in repr(load_settings())


@pytest.mark.parametrize("weak", ["short-but-given", "x" * 31, "with a space" * 4, "é" * 40])
def test_a_weak_admin_token_is_refused_without_being_quoted(
    env: pytest.MonkeyPatch, weak: str
) -> None:
    env.setenv("SIDECAR_ADMIN_TOKEN", weak)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "SIDECAR_ADMIN_TOKEN: must be at least 32 printable ASCII" in str(raised.value)
    assert weak not in str(raised.value)
