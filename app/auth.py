"""Who is asking: the access token of a request, checked with the homeserver's whoami and cached
briefly under a hash of the token (the token itself is not kept in memory longer than a request)."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from starlette.requests import Request

from app.clock import Clock
from app.errors import HomeserverError, LimitExceeded, MatrixError, MissingToken
from app.homeserver import Homeserver, Whoami
from app.tasks import retrieve_exception


@dataclass(frozen=True, slots=True)
class Requester:
    user_id: str
    device_id: str | None
    token: str = field(repr=False)  # never in a log line or a traceback


# An access token as every homeserver issues them: printable ASCII, no spaces.
_TOKEN = re.compile(r"[\x21-\x7e]+")


def access_token(request: Request) -> str | None:
    """The request's access token: from the one `Authorization: Bearer …` header, else from the
    one `access_token` query parameter (deprecated), never both — judged as the homeserver
    judges it, before anything is sent to it. A malformed one is refused here with the
    homeserver's usual 401: passed on, it could not even be put in a request's header."""
    headers = request.headers.getlist("authorization")
    queried = _query_tokens(request)
    if len(headers) > 1:
        raise MissingToken("Too many Authorization headers")
    if headers and queried:
        raise MissingToken("Mixing Authorization headers and access_token query parameters")
    if headers:
        # Whitespace around a header value is not part of it.
        scheme, _, token = headers[0].strip(" \t").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise MissingToken("Invalid Authorization header")
        return _checked(token)
    if len(queried) > 1:
        raise MissingToken("More than one access_token query parameter")
    if queried:
        if not queried[0]:
            raise MissingToken("Empty access token")
        return _checked(queried[0])
    return None


def _query_tokens(request: Request) -> list[str]:
    """The values of every `access_token` query parameter, read as the homeserver reads the
    query (`&` and `;` separate, names and values percent-decoded)."""
    raw = request.scope.get("query_string", b"").decode("latin-1")
    tokens = []
    for part in re.split("[&;]", raw):
        key, _, value = part.partition("=")
        if unquote(key.replace("+", " ")) != "access_token":
            continue
        try:
            tokens.append(unquote(value.replace("+", " "), errors="strict"))
        except UnicodeDecodeError:
            raise _unknown() from None
    return tokens


def _checked(token: str) -> str:
    """Access tokens are printable ASCII without spaces; anything else is unknown to every
    homeserver (and could not be put in the header of the whoami request)."""
    if not _TOKEN.fullmatch(token):
        raise _unknown()
    return token


# How long a caller turned away with whoami calls at their limit is asked to wait.
_RETRY_AFTER_MS = 1000


def _unknown() -> MatrixError:
    return MatrixError("Unknown access token", status=401, errcode="M_UNKNOWN_TOKEN")


class Authenticator:
    """Checks tokens with the homeserver's whoami, caching each answer for `ttl_seconds` (on the
    clock's monotonic time).

    Concurrent requests with the same uncached (or just expired) token share one whoami call: a
    client sending many requests with one token (a call's heartbeat) would otherwise send the
    homeserver one whoami per request in flight each time the cached answer runs out, and every
    one of them would wait for that pile of calls.

    Nothing a caller sends can tie up the homeserver client with whoami calls: at most
    `max_lookups` calls for tokens never seen valid are under way at once, and a request needing
    one more is answered at once with 429 `M_LIMIT_EXCEEDED`. Tokens seen valid are exempt: their
    cached answer is still used, and once it runs out their lookup is made whatever the others
    (up to `max_known` such tokens, the least recently used forgotten first). So made-up tokens
    cannot get a real user refused, and a token logged out on the homeserver still stops working
    at most `ttl_seconds` after its last lookup: an expired answer is never served, and a lookup
    refused with 401 forgets that the token was ever valid. A token the homeserver refused is
    remembered as refused for `refusal_ttl_seconds`, so repeating a bad token costs the
    homeserver nothing more. Every cache is keyed by a SHA-256 of the token and bounded in size,
    the oldest entry going first."""

    def __init__(
        self,
        homeserver: Homeserver,
        ttl_seconds: float,
        clock: Clock,
        max_entries: int = 20_000,
        *,
        max_lookups: int = 20,
        refusal_ttl_seconds: float = 5.0,
        max_refused: int = 10_000,
        max_known: int = 100_000,
    ):
        self._homeserver = homeserver
        self._ttl_ms = ttl_seconds * 1000
        self._clock = clock
        self._max = max_entries
        self._cache: OrderedDict[bytes, tuple[float, Whoami]] = OrderedDict()
        # The whoami call under way for a token (by its hash), shared by whoever asks meanwhile.
        self._pending: dict[bytes, asyncio.Task[Whoami]] = {}
        self._max_lookups = max_lookups
        self._refusal_ttl_ms = refusal_ttl_seconds * 1000
        self._max_refused = max_refused
        # Refusals by token hash: until when, the status and the homeserver's error body.
        self._refused: OrderedDict[bytes, tuple[float, int, dict[str, Any]]] = OrderedDict()
        # Hashes of the tokens the homeserver last answered as valid: their lookups are exempt
        # from `max_lookups`. Only 32-byte hashes, so 100,000 of them take about 17 MB.
        self._max_known = max_known
        self._known: OrderedDict[bytes, None] = OrderedDict()
        # Hashes of the pending lookups that count against `max_lookups`.
        self._capped: set[bytes] = set()

    async def authenticate(self, token: str) -> Requester:
        """The requester owning `token`; the homeserver's refusal is raised unchanged."""
        key = hashlib.sha256(token.encode()).digest()
        now = self._clock.monotonic_ms()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key)
            whoami = cached[1]
        else:
            lookup = self._pending.get(key)
            if lookup is None:
                self._raise_if_refused(key, now)
                known = key in self._known
                if not known and len(self._capped) >= self._max_lookups:
                    raise LimitExceeded(
                        "Too many requests with unknown access tokens; try again shortly",
                        extra={"retry_after_ms": _RETRY_AFTER_MS},
                        headers={"Retry-After": str(_RETRY_AFTER_MS // 1000)},
                    )
                if not known:
                    self._capped.add(key)
                lookup = asyncio.create_task(self._lookup(key, token))
                # Retrieved here too, so that a failure nobody waits for any more is not
                # reported as never retrieved.
                lookup.add_done_callback(retrieve_exception)
                self._pending[key] = lookup
            # One caller going away (a client disconnecting) does not cancel the others' call.
            whoami = await asyncio.shield(lookup)
        return Requester(whoami.user_id, whoami.device_id, token)

    def _raise_if_refused(self, key: bytes, now: float) -> None:
        refused = self._refused.get(key)
        if refused is None:
            return
        until, status, body = refused
        if until <= now:
            del self._refused[key]
            return
        raise HomeserverError(status, dict(body))

    async def _lookup(self, key: bytes, token: str) -> Whoami:
        now = self._clock.monotonic_ms()
        try:
            whoami = await self._homeserver.whoami(token)
            self._known[key] = None
            self._known.move_to_end(key)
            while len(self._known) > self._max_known:
                self._known.popitem(last=False)
            if self._ttl_ms > 0:
                self._cache[key] = (now + self._ttl_ms, whoami)
                self._cache.move_to_end(key)
                while len(self._cache) > self._max:
                    self._cache.popitem(last=False)
            return whoami
        except HomeserverError as exc:
            # The token is not the homeserver's (401); a 403 or 429 is no verdict on the token.
            if exc.status == 401:
                self._known.pop(key, None)
            if exc.status == 401 and self._refusal_ttl_ms > 0:
                self._refused[key] = (now + self._refusal_ttl_ms, exc.status, exc.body())
                self._refused.move_to_end(key)
                while len(self._refused) > self._max_refused:
                    self._refused.popitem(last=False)
            raise
        finally:
            self._pending.pop(key, None)
            self._capped.discard(key)

    async def optional(self, request: Request) -> Requester | None:
        token = access_token(request)
        return await self.authenticate(token) if token is not None else None

    async def required(self, request: Request) -> Requester:
        token = access_token(request)
        if token is None:
            raise MissingToken("Missing access token")
        return await self.authenticate(token)
