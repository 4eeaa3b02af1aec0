"""Accounts on the local homeserver: registration through the shared secret, and login.

Synapse's admin registration API (`/_synapse/admin/v1/register`) takes a one-time nonce and an
HMAC-SHA1, keyed with `registration_shared_secret`, over `nonce NUL user NUL password NUL admin`.
Standard library only, so any Python can use it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Account:
    """A logged-in device."""

    user_id: str
    access_token: str
    device_id: str


class MatrixError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def _call(method: str, url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer: dict[str, Any] = json.loads(response.read() or b"{}")
            return answer
    except urllib.error.HTTPError as exc:
        raise MatrixError(exc.code, exc.read().decode(errors="replace")) from None


def register(
    homeserver_url: str,
    shared_secret: str,
    username: str,
    password: str,
    admin: bool = False,
) -> Account:
    """Create `username` with the shared secret; the answer logs a first device in."""
    endpoint = homeserver_url.rstrip("/") + "/_synapse/admin/v1/register"
    nonce = str(_call("GET", endpoint)["nonce"])
    message = b"\x00".join(
        [nonce.encode(), username.encode(), password.encode(), b"admin" if admin else b"notadmin"]
    )
    mac = hmac.new(shared_secret.encode(), message, hashlib.sha1).hexdigest()
    answer = _call(
        "POST",
        endpoint,
        {
            "nonce": nonce,
            "username": username,
            "password": password,
            "admin": admin,
            "mac": mac,
        },
    )
    return Account(answer["user_id"], answer["access_token"], answer["device_id"])


def login(
    homeserver_url: str, username: str, password: str, device_id: str | None = None
) -> Account:
    """Log in with a password; a new device unless `device_id` is given."""
    body: dict[str, Any] = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": username},
        "password": password,
    }
    if device_id:
        body["device_id"] = device_id
    answer = _call("POST", homeserver_url.rstrip("/") + "/_matrix/client/v3/login", body)
    return Account(answer["user_id"], answer["access_token"], answer["device_id"])
