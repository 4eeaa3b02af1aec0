"""A settings object printed (a debugger, an error report, a log line) shows no secret."""

from __future__ import annotations

import base64

from app.settings import Settings


def test_the_settings_repr_holds_no_secret() -> None:
    key = base64.b64encode(b"k" * 32).decode()
    settings = Settings(
        database_url="postgresql://sidecar:db-password-123@db:5432/sidecar",
        homeserver_url="http://homeserver:8008",
        token_keys=key,
        appservice_token="as-token-456",
        admin_token="admin-token-789-long-enough-for-the-check",
    )
    for shown in (repr(settings), str(settings)):
        for secret in ("db-password-123", key, "k" * 32, "as-token-456", "admin-token-789"):
            assert secret not in shown
    assert "homeserver:8008" in repr(settings)  # the rest is still shown
