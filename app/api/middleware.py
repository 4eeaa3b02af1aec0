"""ASGI middleware: route on the raw path, answer CORS like a homeserver, and turn anything that
escapes a route into a Matrix error without a stack trace."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, cast

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import send_error, send_json
from app.errors import DatabaseUnavailable, InvalidParam, MatrixError, TooLarge, Unrecognized

logger = logging.getLogger(__name__)

CORS_HEADERS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"GET, HEAD, POST, PUT, DELETE, OPTIONS"),
    (b"access-control-allow-headers", b"X-Requested-With, Content-Type, Authorization, Date"),
    (b"access-control-expose-headers", b"Synapse-Trace-Id, Server, ETag"),
]

_DATABASE_DOWN = (OperationalError, InterfaceError, PoolTimeout, ConnectionError, TimeoutError)
# SQLSTATEs of a server that is away or going: connection exceptions (class 08), and shutting
# down, crashed or still starting up (57P01-57P03). asyncpg raises the last while PostgreSQL
# stops or starts, and SQLAlchemy wraps it as a plain DBAPIError.
_UNAVAILABLE_SQLSTATES = ("08", "57P01", "57P02", "57P03")
# Transaction rollback (class 40): a deadlock broken or a serialization conflict. The request's
# transaction stored nothing, and the same request again goes through.
_ROLLED_BACK_SQLSTATES = ("40",)
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# A dot segment (`.` or `..`, also as `%2e`) between slashes that may be encoded as `%2F`: a proxy
# in front resolves those before routing while the homeserver reads the raw path, so the two may
# disagree about what the request is.
_DOT_SEGMENT = re.compile(rb"(?:/|%2f)(?:\.|%2e){1,2}(?=/|%2f|$)", re.IGNORECASE)
_SEND_OR_STATE = re.compile(rb"^/_matrix/client/.+/rooms/[^/]+/(?:send|state)(?:/|$)")
# The body types the homeserver (Twisted) merges into a POST's query parameters.
_FORM_BODY = re.compile(rb"x-www-form-urlencoded|multipart/", re.IGNORECASE)
# Set in the ASGI scope by the HTTP protocol when the raw request target held a `#`, which its
# parser drops from both raw_path and query_string (see RawTargetProtocol).
RAW_HASH_SEEN = "delayed_events.raw_hash"


def _database_down(exc: BaseException) -> bool:
    if isinstance(exc, _DATABASE_DOWN):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    return exc.connection_invalidated or _sqlstate_in(exc, _UNAVAILABLE_SQLSTATES)


def _sqlstate_in(exc: BaseException, classes: tuple[str, ...]) -> bool:
    """Whether the driver error behind a DBAPIError has a SQLSTATE starting with one of these."""
    cause: BaseException | None = exc.orig if isinstance(exc, DBAPIError) else None
    while cause is not None:
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(classes):
            return True
        cause = cause.__cause__
    return False


class RawPathMiddleware:
    """Match routes against the path as the client sent it, still percent-encoded, so that an
    encoded `/` inside a state key stays inside its segment; routes decode each segment once.
    Control characters, which no valid URL holds, are refused in the path and the query.

    Requests the homeserver could read differently from the sidecar are refused (fail closed), so
    that none is passed on or scheduled on a guess: a raw `#` in the request target (the homeserver
    reads past it, HTTP parsers here stop at it), a dot segment in the path (a proxy resolves it,
    also across `%2F`), and a form-encoded POST body on send/state (the homeserver merges its
    fields into the query parameters, so a delay could hide there)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope["path"].encode()
            path = raw.partition(b"?")[0]
            try:
                scope = dict(scope, path=path.decode("ascii"))
            except UnicodeDecodeError:
                await send_error(send, InvalidParam("Bad path"), CORS_HEADERS)
                return
            query = scope.get("query_string", b"")
            if _CONTROL.search(path) or _CONTROL.search(query):
                await send_error(send, InvalidParam("Control character in URL"), CORS_HEADERS)
                return
            refusal = _unjudgeable(scope, raw, path, query)
            if refusal is not None:
                await send_error(send, Unrecognized(refusal, status=400), CORS_HEADERS)
                return
        await self.app(scope, receive, send)


def _unjudgeable(scope: Scope, raw: bytes, path: bytes, query: bytes) -> str | None:
    """Why the request cannot be read for certain as the homeserver would, or None."""
    if scope.get(RAW_HASH_SEEN) or b"#" in raw or b"#" in query:
        return "Request targets must not contain a raw number sign (#)"
    if _DOT_SEGMENT.search(path):
        return "Request paths must not contain dot segments"
    if scope["method"] == "POST" and _SEND_OR_STATE.match(path):
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-type" and _FORM_BODY.search(value):
                return "Send and state requests must not have a form-encoded body"
    return None


def http_protocol() -> type[asyncio.Protocol] | str:
    """The HTTP implementation for uvicorn: httptools when installed, told to note a raw `#`
    (httptools drops everything from it on), else h11 (which keeps the `#` in raw_path or
    query_string, where RawPathMiddleware sees it)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "h11"

    class RawTargetProtocol(HttpToolsProtocol):
        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            if b"#" in url:
                cast(dict[str, Any], self.scope)[RAW_HASH_SEEN] = True

    return RawTargetProtocol


class MatrixEdgeMiddleware:
    """CORS on every answer, OPTIONS answered directly, and a last line of defence for errors."""

    def __init__(self, app: ASGIApp, max_path_bytes: int = 8192) -> None:
        self.app = app
        self.max_path_bytes = max_path_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":
            await send_json(send, 200, {}, CORS_HEADERS)
            return
        if (
            len(scope.get("raw_path") or b"") + len(scope.get("query_string", b""))
            > self.max_path_bytes
        ):
            await send_error(send, TooLarge("URI too long", status=414), CORS_HEADERS)
            return
        started = False

        async def send_with_cors(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = dict(message, headers=[*message.get("headers", []), *CORS_HEADERS])
            await send(message)

        try:
            await self.app(scope, receive, send_with_cors)
        except Exception as exc:
            if _database_down(exc):
                logger.warning("database unavailable: %s", type(exc).__name__)
                error: MatrixError = DatabaseUnavailable("Database unavailable")
            elif _sqlstate_in(exc, _ROLLED_BACK_SQLSTATES):
                logger.warning("database rolled a transaction back: %s", type(exc).__name__)
                error = DatabaseUnavailable("Database busy, try again")
            else:
                logger.exception(
                    "unhandled error on %s %s", scope["method"], redacted_path(scope["path"])
                )
                error = MatrixError("Internal server error")
            if not started:
                await send_error(send, error, CORS_HEADERS)


_DELAY_ID_IN_PATH = re.compile(r"(/delayed_events/[^/]{0,6})[^/]*")


def redacted_path(path: str) -> str:
    """The path with any delay_id cut short: a whole one lets its holder act on the event."""
    return _DELAY_ID_IN_PATH.sub(r"\1…", path)
