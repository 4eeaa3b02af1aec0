"""Who is asking: the access token of a request, checked with the homeserver's whoami and cached
briefly under a hash of the token (the token itself is not kept in memory longer than a request)."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

from starlette.requests import Request

from app.errors import MatrixError, MissingToken
from app.homeserver import Homeserver, Whoami


@dataclass(frozen=True, slots=True)
class Requester:
    user_id: str
    device_id: str | None
    token: str


def access_token(request: Request) -> str | None:
    """The token from `Authorization: Bearer …`, else from the deprecated `access_token` query."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise MissingToken("Invalid Authorization header")
        return _checked(token.strip())
    tokens = request.query_params.getlist("access_token")
    if len(tokens) > 1:
        raise MissingToken("More than one access_token query parameter")
    return _checked(tokens[0]) if tokens and tokens[0] else None


def _checked(token: str) -> str:
    """Access tokens are printable ASCII; anything else is unknown to every homeserver (and
    could not be put in the header of the whoami request)."""
    if not (token.isascii() and token.isprintable()):
        raise MatrixError("Unknown access token", status=401, errcode="M_UNKNOWN_TOKEN")
    return token


class Authenticator:
    def __init__(self, homeserver: Homeserver, ttl_seconds: float, max_entries: int = 20_000):
        self._homeserver = homeserver
        self._ttl = ttl_seconds
        self._max = max_entries
        self._cache: OrderedDict[bytes, tuple[float, Whoami]] = OrderedDict()

    async def authenticate(self, token: str) -> Requester:
        """The requester owning `token`; the homeserver's refusal is raised unchanged."""
        key = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key)
            whoami = cached[1]
        else:
            whoami = await self._homeserver.whoami(token)
            if self._ttl > 0:
                self._cache[key] = (now + self._ttl, whoami)
                self._cache.move_to_end(key)
                while len(self._cache) > self._max:
                    self._cache.popitem(last=False)
        return Requester(whoami.user_id, whoami.device_id, token)

    async def optional(self, request: Request) -> Requester | None:
        token = access_token(request)
        return await self.authenticate(token) if token is not None else None

    async def required(self, request: Request) -> Requester:
        token = access_token(request)
        if token is None:
            raise MissingToken("Missing access token")
        return await self.authenticate(token)
