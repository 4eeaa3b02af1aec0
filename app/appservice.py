"""The application-service registration that lets the sidecar send as any local user.

The homeserver loads the file (Synapse: `app_service_config_files`); the sidecar is given the
`as_token` as `SIDECAR_APPSERVICE_TOKEN`. The registration has no URL: the homeserver never pushes
to the sidecar, it only accepts requests made with the token. Its user namespace is every local
user, non-exclusive, so no user is taken away from anyone.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

REGISTRATION_ID = "msc4140-delayed-events"
SENDER_LOCALPART = "_msc4140_delayed_events"


def registration_yaml(server_name: str, *, as_token: str, hs_token: str) -> str:
    """The registration as YAML (every value a JSON string, which YAML reads as is)."""
    user_regex = "@.*:" + re.escape(server_name)

    def q(value: str) -> str:
        return json.dumps(value)

    return "\n".join(
        [
            f"id: {q(REGISTRATION_ID)}",
            "url: null",
            f"as_token: {q(as_token)}",
            f"hs_token: {q(hs_token)}",
            f"sender_localpart: {q(SENDER_LOCALPART)}",
            "rate_limited: true",
            "namespaces:",
            "  users:",
            "    - exclusive: false",
            f"      regex: {q(user_regex)}",
            "  rooms: []",
            "  aliases: []",
            "",
        ]
    )


def write_registration(path: Path, server_name: str) -> str:
    """Write a registration with fresh tokens, readable by its owner only; returns the as_token."""
    as_token = secrets.token_urlsafe(32)
    text = registration_yaml(server_name, as_token=as_token, hs_token=secrets.token_urlsafe(32))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return as_token
