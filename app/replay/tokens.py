"""The sealed credential, in one place: a device's access token is sealed (encrypted, bound to
its user and device, with its digest) when a request of that device is seen, and opened again
only to replay one of the device's events. With an application service to act as users, no
token is kept and a replay acts through the service's token."""

from __future__ import annotations

import hmac
from collections import OrderedDict
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from app import repository_tokens as tokens_repo
from app.auth import Requester
from app.crypto import TokenCipher
from app.homeserver import Credential
from app.models import DelayedEvent
from app.settings import Settings

Device = tokens_repo.Device  # (user_id, device_id): whose token

# Devices whose sealed token is kept for reuse (RecentSeals).
SEALS_KEPT = 10_000


def token_context(user_id: str, device_id: str | None) -> str:
    """What a sealed token is bound to: opened for another device, it does not open."""
    return f"{user_id}\n{device_id or ''}"


@dataclass(frozen=True, slots=True)
class SealedToken:
    """A device's access token as stored: encrypted, and its digest."""

    user_id: str
    device_id: str | None
    # Neither in a log line or a traceback: the ciphertext opens with a key, the digest names
    # the token.
    token: bytes = field(repr=False)
    digest: bytes = field(repr=False)


class RecentSeals:
    """The sealed token last made for each device, reused while the device presents the same
    token: a call's heartbeat presents an unchanged token every few seconds, and sealing it anew
    each time was the costliest step of a restart's own work. The keyed digest tells whether a
    token is the same; only encrypted tokens are kept."""

    def __init__(self, cipher: TokenCipher, size: int = SEALS_KEPT) -> None:
        self._cipher = cipher
        self._size = size
        self._seals: OrderedDict[Device, SealedToken] = OrderedDict()

    def seal(self, user_id: str, device_id: str | None, token: str) -> SealedToken:
        """`token` of this device, sealed (the same bytes as last time if it is the same)."""
        digest = self._cipher.digest(token)
        key = (user_id, device_id)
        sealed = self._seals.get(key)
        if sealed is not None and hmac.compare_digest(sealed.digest, digest):
            self._seals.move_to_end(key)
            return sealed
        encrypted = self._cipher.encrypt(token, context=token_context(user_id, device_id))
        sealed = SealedToken(user_id, device_id, encrypted, digest)
        self._seals[key] = sealed
        self._seals.move_to_end(key)
        if len(self._seals) > self._size:
            self._seals.popitem(last=False)
        return sealed


class Credentials:
    """Seals the tokens of requests, and opens them to replay events."""

    def __init__(self, engine: AsyncEngine, cipher: TokenCipher, settings: Settings) -> None:
        self._engine = engine
        self._cipher = cipher
        self._seals = RecentSeals(cipher)
        self._appservice_token = settings.appservice_token

    def seal(self, requester: Requester) -> SealedToken:
        """The requester's token, sealed for its device (`RecentSeals`)."""
        return self._seals.seal(requester.user_id, requester.device_id, requester.token)

    def open(self, event: DelayedEvent, sealed: dict[Device, bytes]) -> Credential | None:
        """How to send as the event's user: the application service, else the device's token
        (from `sealed`, the stored tokens by device); None if there is no usable token."""
        if self._appservice_token is not None:
            as_token = self._appservice_token.get_secret_value()
            return Credential(as_token, event.user_id, event.device_id)
        blob = sealed.get((event.user_id, event.device_id))
        if blob is None:
            return None
        token = self._cipher.decrypt(blob, context=token_context(event.user_id, event.device_id))
        return Credential(token) if token is not None else None

    async def load(self, event: DelayedEvent) -> Credential | None:
        """`open`, with the device's token read from the table."""
        sealed: dict[Device, bytes] = {}
        if self._appservice_token is None:
            async with self._engine.connect() as conn:
                sealed = await tokens_repo.load_tokens(conn, {(event.user_id, event.device_id)})
        return self.open(event, sealed)
