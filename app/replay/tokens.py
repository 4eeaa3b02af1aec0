"""The sealed credential, in one place: a device's access token is sealed (encrypted, bound to
its user and device, with its digest) when a request of that device is seen, and opened again
only to replay one of the device's events. With an application service to act as users, no
token is kept and a replay acts through the service's token."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine

from app import repository_tokens as tokens_repo
from app.auth import Requester
from app.crypto import TokenCipher
from app.homeserver import Credential
from app.models import DelayedEvent
from app.settings import Settings

Device = tokens_repo.Device  # (user_id, device_id): whose token


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


class Credentials:
    """Seals the tokens of requests, and opens them to replay events."""

    def __init__(self, engine: AsyncEngine, cipher: TokenCipher, settings: Settings) -> None:
        self._engine = engine
        self._cipher = cipher
        self._appservice_token = settings.appservice_token

    def seal(self, requester: Requester) -> SealedToken:
        """The requester's token, sealed for its device."""
        context = token_context(requester.user_id, requester.device_id)
        return SealedToken(
            requester.user_id,
            requester.device_id,
            self._cipher.encrypt(requester.token, context=context),
            self._cipher.digest(requester.token),
        )

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
