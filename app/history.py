"""The bulk lookup of MSC4486: a user's delayed events, scheduled and finalised, by intended send
time (`delayed_since_ts + delay_ms`), filtered and paged.

A page token (`next_batch`, given back as `from`) holds the last position shown, signed with a key
derived from the first `SIDECAR_TOKEN_KEYS` key over that position, the user it was made for and
every filter and the direction of its query. A token of another user or another query, or one a
client made up, fails the check and is refused (400 `M_INVALID_PARAM`); rows are read for the
authenticated user only in any case.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import asdict, dataclass

from app import repository_history as history_repo
from app.auth import Requester
from app.errors import InvalidParam
from app.models import DelayedEvent, storable_text
from app.repository_history import HistoryFilter
from app.service import PAGE_BYTES, DelayedEventService

_TOKEN_VERSION = 1
_MAC_BYTES = 16
_MAX_POSITION = 2**63


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """What a client asked for, checked. `status` is one of `repository_history.STATUSES`."""

    status: str | None = None
    room_id: str | None = None
    event_type: str | None = None
    from_ts: int | None = None
    to_ts: int | None = None
    backwards: bool = False


@dataclass(frozen=True, slots=True)
class HistoryPage:
    events: list[DelayedEvent]
    next_batch: str | None


async def lookup(
    service: DelayedEventService,
    requester: Requester,
    query: HistoryQuery,
    *,
    from_token: str | None,
    limit: int,
) -> HistoryPage:
    """One page of the requester's events matching `query`, after the page `from_token` ended."""
    signer = PageTokens(service.settings.token_keys[0])
    after = signer.open(from_token, requester.user_id, query) if from_token is not None else None
    where = HistoryFilter(user_id=requester.user_id, **asdict(query))
    async with service.engine.begin() as conn:
        # Every authenticated request refreshes the token its device's events replay with.
        await service.refresh_token(conn, requester)
        page = await history_repo.list_history(
            # A finalised item shows its content twice, and the v1 answer shows every item
            # under two list names.
            conn,
            where,
            after=after,
            limit=limit,
            max_bytes=PAGE_BYTES // 4,
        )
    if not page.more or not page.events:
        return HistoryPage(page.events, None)
    last = page.events[-1]
    return HistoryPage(
        page.events, signer.make((last.send_ts, last.delay_id), requester.user_id, query)
    )


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

    def make(self, position: tuple[int, str], user_id: str, query: HistoryQuery) -> str:
        payload = json.dumps(list(position), separators=(",", ":")).encode()
        return _b64(payload) + "." + _b64(self._mac(payload, user_id, query))

    def open(self, token: str, user_id: str, query: HistoryQuery) -> tuple[int, str]:
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
