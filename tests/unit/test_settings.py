from __future__ import annotations

import pytest

from app.crypto import new_key
from app.settings import SettingsError, load_settings

REQUIRED = {
    "SIDECAR_DATABASE_URL": "postgresql://u:p@db:5432/sidecar",
    "SIDECAR_HOMESERVER_URL": "http://synapse:8008/",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SIDECAR_TOKEN_KEYS", new_key())
    return monkeypatch


def test_defaults_and_normalisation(env: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert settings.database_url == "postgresql+asyncpg://u:p@db:5432/sidecar"
    assert settings.homeserver_url == "http://synapse:8008"
    assert settings.max_delay_ms == 86_400_000
    assert settings.max_scheduled_per_user == 100
    assert settings.max_body_bytes == 65_536
    assert settings.cancel_on_newer_state is True
    assert len(settings.token_keys) == 1
    assert len(settings.token_keys[0]) == 32


def test_two_keys_for_rotation(env: pytest.MonkeyPatch) -> None:
    env.setenv("SIDECAR_TOKEN_KEYS", f"{new_key()}, {new_key()}")
    assert len(load_settings().token_keys) == 2


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "SIDECAR_DATABASE_URL",
            "mysql://x",
            "SIDECAR_DATABASE_URL: must start with postgresql://",
        ),
        ("SIDECAR_HOMESERVER_URL", "synapse:8008", "SIDECAR_HOMESERVER_URL: must start with http"),
        ("SIDECAR_TOKEN_KEYS", "c2hvcnQ", "SIDECAR_TOKEN_KEYS: each key must decode to 32 bytes"),
        ("SIDECAR_TOKEN_KEYS", "", "SIDECAR_TOKEN_KEYS: must be one or more"),
        ("SIDECAR_TOKEN_KEYS", "not*base64!", "SIDECAR_TOKEN_KEYS: each key must be base64"),
        ("SIDECAR_MAX_DELAY_MS", "0", "SIDECAR_MAX_DELAY_MS: Input should be greater than"),
        ("SIDECAR_MAX_DELAY_MS", "soon", "SIDECAR_MAX_DELAY_MS: Input should be a valid integer"),
        ("SIDECAR_LISTEN_PORT", "70000", "SIDECAR_LISTEN_PORT: Input should be less than"),
        ("SIDECAR_CANCEL_ON_NEWER_STATE", "perhaps", "SIDECAR_CANCEL_ON_NEWER_STATE: Input"),
        ("SIDECAR_LOG_LEVEL", "LOUD", "SIDECAR_LOG_LEVEL: must be one of"),
    ],
)
def test_each_wrong_value_is_named(
    env: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    env.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert message in str(raised.value)


def test_missing_required_settings_are_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*REQUIRED, "SIDECAR_TOKEN_KEYS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    for name in (*REQUIRED, "SIDECAR_TOKEN_KEYS"):
        assert f"{name}: is required" in str(raised.value)


def test_errors_never_echo_the_key(env: pytest.MonkeyPatch) -> None:
    secret = "c2VjcmV0LXNlY3JldC1zZWNyZXQ"
    env.setenv("SIDECAR_TOKEN_KEYS", secret)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert secret not in str(raised.value)
