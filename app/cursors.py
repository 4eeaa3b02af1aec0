"""Lookup cursors: where a page of a list ends, as the token a client gives back (`from`).

The msc4140 lists' and the admin list's cursor is plain (url-safe base64 of a small JSON object);
rows are read for the authenticated user (or an operator) only, so a made-up one shows nothing
more. The bulk lookup of MSC4486's token (`next_batch`) holds the last position shown, signed with
a key derived from the first `SIDECAR_TOKEN_KEYS` key over that position, the user it was made for
and every filter and the direction of its query: a token of another user or another query, or one
a client made up, fails the check and is refused (400 `M_INVALID_PARAM`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import asdict
from typing import Any

from app.errors import InvalidParam
from app.lookups import HistoryQuery, Position
from app.models import storable_text

_TOKEN_VERSION = 1
_MAC_BYTES = 16
_MAX_POSITION = 2**63


def encode_cursor(cursor: dict[str, Any]) -> str:
    raw = json.dumps(cursor, separators=(",", ":")).encode()
    return _b64(raw)


def decode_cursor(token: str) -> dict[str, Any]:
    """The cursor a token holds: each value a position or `done`; 400 M_INVALID_PARAM if not."""
    try:
        cursor = json.loads(_unb64(token))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidParam("Invalid 'from' token") from None
    if not isinstance(cursor, dict) or not all(
        v == "done" or as_position(v) is not None for v in cursor.values()
    ):
        raise InvalidParam("Invalid 'from' token")
    return cursor


def as_position(value: Any) -> Position | None:
    """A cursor's value as a position, if it is one."""
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], int)
        and -_MAX_POSITION <= value[0] < _MAX_POSITION
        and isinstance(value[1], str)
        and storable_text(value[1])
    ):
        return value[0], value[1]
    return None


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class PageTokens:
    """`next_batch` tokens bound to a user and a query."""

    def __init__(self, key: bytes) -> None:
        self._key = hashlib.sha256(b"msc4486-page-token" + key).digest()

    def _mac(self, payload: bytes, user_id: str, query: HistoryQuery) -> bytes:
        bound = json.dumps(
            [_TOKEN_VERSION, user_id, asdict(query)], separators=(",", ":"), sort_keys=True
        ).encode()
        message = len(bound).to_bytes(8, "big") + bound + payload
        return hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES]

    def make(self, position: Position, user_id: str, query: HistoryQuery) -> str:
        payload = json.dumps(list(position), separators=(",", ":")).encode()
        return _b64(payload) + "." + _b64(self._mac(payload, user_id, query))

    def open(self, token: str, user_id: str, query: HistoryQuery) -> Position:
        """The position a token holds, if it was made for this user and this query."""
        invalid = InvalidParam("Invalid 'from' token (it must be the next_batch of this query)")
        body, dot, mac = token.partition(".")
        if not dot or len(token) > 1024:
            raise invalid
        try:
            payload, given = _unb64(body), _unb64(mac)
        except (binascii.Error, ValueError):
            raise invalid from None
        if not hmac.compare_digest(given, self._mac(payload, user_id, query)):
            raise invalid
        try:
            position = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise invalid from None
        if (
            isinstance(position, list)
            and len(position) == 2
            and type(position[0]) is int
            and -_MAX_POSITION <= position[0] < _MAX_POSITION
            and isinstance(position[1], str)
            and storable_text(position[1])
        ):
            return position[0], position[1]
        raise invalid
