"""The homeserver, seen through its client-server API: who a token belongs to, replaying events as
their user, and passing requests through. Tokens travel only in Authorization headers and are
never logged."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urlencode

import httpx

from app import metrics
from app.errors import HomeserverError, HomeserverUnavailable
from app.models import storable_text

logger = logging.getLogger(__name__)

# Hop-by-hop and length headers are the proxy's own business, not the client's.
_DROP_HEADERS = {
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "content-encoding",
}


# The query parameters a replay takes over from the scheduling request, by decoded name. Nothing
# else a client put in the query is replayed: above all not `user_id`, `device_id` or `ts`, which
# with an application-service token choose who the event is sent as and when.
REPLAYED_PARAMS = frozenset({"org.matrix.msc4354.sticky_duration_ms"})


def replayable_query(pairs: list[tuple[str, str]]) -> str:
    """The (decoded name, decoded value) pairs of REPLAYED_PARAMS among `pairs`, encoded anew."""
    return urlencode([(k, v) for k, v in pairs if k in REPLAYED_PARAMS], quote_via=quote)


def _stored_pairs(query: str) -> list[tuple[str, str]]:
    """A stored query read as the homeserver would: `&` and `;` separate, names decoded."""
    pairs = []
    for part in re.split("[&;]", query):
        key, _, value = part.partition("=")
        pairs.append((unquote(key.replace("+", " ")), unquote(value.replace("+", " "))))
    return pairs


@dataclass(frozen=True, slots=True)
class Whoami:
    user_id: str
    device_id: str | None


@dataclass(frozen=True, slots=True)
class Credential:
    """How to act as a user: their own access token, or the application service's token with
    the user (and device) named in the query."""

    token: str = field(repr=False)  # never in a log line or a traceback
    as_user: str | None = None
    as_device: str | None = None

    def query(self) -> str:
        if self.as_user is None:
            return ""
        params = [("user_id", self.as_user)]
        if self.as_device is not None:
            # The stable name, and the unstable one that older homeservers read instead.
            params += [
                ("device_id", self.as_device),
                ("org.matrix.msc3202.device_id", self.as_device),
            ]
        return urlencode(params, quote_via=quote)

    def without_device(self) -> Credential:
        return Credential(self.token, self.as_user, None)


@dataclass(frozen=True, slots=True)
class Sent:
    event_id: str


@dataclass(frozen=True, slots=True)
class Transient:
    """Worth trying again: the homeserver was unreachable, failing, or asked us to slow down."""

    error: dict[str, Any]
    retry_after_ms: int | None = None
    # The request reached the homeserver but no answer came back (a read timeout, a dropped
    # connection, a gateway's timeout): the homeserver may have taken the event.
    in_doubt: bool = False
    # The homeserver's status, when it answered (429: it asked us to slow down).
    status: int | None = None


# Failures after the whole request was sent: the homeserver may have acted on it.
_IN_DOUBT = (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError)


@dataclass(frozen=True, slots=True)
class Refused:
    """A permanent answer: the homeserver will not take this event."""

    status: int
    error: dict[str, Any]


ReplayResult = Sent | Transient | Refused


def encode_segment(value: str) -> str:
    """Percent-encode one path segment; everything but unreserved characters is escaped, and so
    are the dots of a segment that is all dots: httpx (like any URL parser) resolves a `.` or `..`
    segment, so a state key "." would be sent as the empty key and ".." to another endpoint."""
    if value in (".", ".."):
        return "%2E" * len(value)
    return quote(value, safe="")


def no_constants(name: str) -> Any:
    """A `parse_constant` for json.loads: NaN and Infinity are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def json_object(response: httpx.Response) -> dict[str, Any] | None:
    """The answer's JSON object; None for anything else (not JSON, NaN, nested too deeply for
    the parser, not an object)."""
    try:
        body = json.loads(response.content, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


def _error_body(response: httpx.Response) -> dict[str, Any]:
    body = json_object(response)
    if body is not None and isinstance(body.get("errcode"), str):
        return body
    return {"errcode": "M_UNKNOWN", "error": f"homeserver answered HTTP {response.status_code}"}


def _count_error(errcode: str) -> None:
    metrics.HOMESERVER_ERRORS.labels(errcode=metrics.errcode_label(errcode)).inc()


class Homeserver:
    def __init__(self, base_url: str, client: httpx.AsyncClient) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = client

    async def _request(
        self,
        method: str,
        path: str,
        *,
        token: str | None,
        json_body: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        if json_body is not None:
            content = json.dumps(json_body, separators=(",", ":")).encode()
            all_headers["Content-Type"] = "application/json"
        return await self.client.request(
            method, self.base_url + path, content=content, headers=all_headers
        )

    async def whoami(self, token: str) -> Whoami:
        """Who owns `token`. The homeserver's 401 answers reach the client unchanged."""
        try:
            response = await self._request("GET", "/_matrix/client/v3/account/whoami", token=token)
        except httpx.HTTPError as exc:
            _count_error("unreachable")
            raise HomeserverUnavailable("the homeserver could not be reached") from exc
        body = json_object(response)
        if response.status_code == 200:
            user_id = body.get("user_id") if body is not None else None
            device_id = body.get("device_id") if body is not None else None
            if not isinstance(device_id, str):
                device_id = None
            if (
                not isinstance(user_id, str)
                or not storable_text(user_id)
                or (device_id is not None and not storable_text(device_id))
            ):
                _count_error("bad_response")
                raise HomeserverUnavailable("the homeserver gave an invalid whoami answer")
            return Whoami(user_id, device_id)
        error = _error_body(response)
        _count_error(error["errcode"])
        if response.status_code in (401, 403, 429):
            raise HomeserverError(response.status_code, error)
        raise HomeserverUnavailable("the homeserver could not check the access token")

    async def replay(
        self,
        *,
        credential: Credential,
        room_id: str,
        event_type: str,
        state_key: str | None,
        content: str,
        query: str,
        txn_id: str,
    ) -> ReplayResult:
        """Send one event as the token's owner. Messages carry `txn_id`, so a repeat lands once."""
        room = encode_segment(room_id)
        kind = encode_segment(event_type)
        if state_key is None:
            path = f"/_matrix/client/v3/rooms/{room}/send/{kind}/{encode_segment(txn_id)}"
        else:
            path = f"/_matrix/client/v3/rooms/{room}/state/{kind}/{encode_segment(state_key)}"
        # The credential's parameters first and the only ones of their names; of the stored query
        # only the allowlist, whatever a row written before it holds.
        path += _query(credential.query(), replayable_query(_stored_pairs(query)))
        try:
            response = await self._request(
                "PUT",
                path,
                token=credential.token,
                content=content.encode(),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            _count_error("unreachable")
            reason = type(exc).__name__
            return Transient(
                {"errcode": "M_UNKNOWN", "error": f"homeserver unreachable ({reason})"},
                in_doubt=isinstance(exc, _IN_DOUBT),
            )
        if response.status_code == 200:
            body = json_object(response)
            if body is not None and isinstance(body.get("event_id"), str):
                return Sent(body["event_id"])
            _count_error("bad_response")
            return Transient(
                {"errcode": "M_UNKNOWN", "error": "homeserver gave no event_id"}, in_doubt=True
            )
        error = _error_body(response)
        _count_error(error["errcode"])
        if response.status_code == 429:
            retry_after = error.get("retry_after_ms")
            return Transient(
                error, retry_after if isinstance(retry_after, int) else None, status=429
            )
        if response.status_code >= 500 or response.status_code == 408:
            return Transient(
                error, in_doubt=response.status_code == 504, status=response.status_code
            )
        return Refused(response.status_code, error)

    async def state_event(
        self, *, credential: Credential, room_id: str, event_type: str, state_key: str
    ) -> dict[str, Any] | None:
        """The current state event for a key, as a whole event; None if unset or unreadable."""
        path = (
            f"/_matrix/client/v3/rooms/{encode_segment(room_id)}/state/"
            f"{encode_segment(event_type)}/{encode_segment(state_key)}"
        ) + _query(credential.query(), "format=event")
        try:
            response = await self._request("GET", path, token=credential.token)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        return json_object(response)

    async def forward(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> httpx.Response:
        """Pass a client's request through unchanged (`target` is the raw path and query)."""
        # Whitespace around a value is not part of it, and httpx refuses to send it. Values are
        # sent as the bytes they arrived as (the ASGI server decoded them as Latin-1): as text,
        # httpx would refuse anything but ASCII, such as a device name in a User-Agent.
        kept = [
            (k.encode("latin-1"), v.strip(" \t").encode("latin-1"))
            for k, v in headers
            if k.lower() not in _DROP_HEADERS
        ]
        try:
            return await self.client.request(
                method, self.base_url + target, headers=kept, content=body
            )
        except httpx.HTTPError as exc:
            _count_error("unreachable")
            raise HomeserverUnavailable("the homeserver could not be reached") from exc


def _query(*parts: str) -> str:
    joined = "&".join(p for p in parts if p)
    return "?" + joined if joined else ""


def response_headers(
    response: httpx.Response, *, skip: tuple[str, ...] = ()
) -> list[tuple[str, str]]:
    """The headers of a homeserver answer worth handing on to the client, repeated ones kept.
    CORS headers are left out: the sidecar adds its own to every answer, and a doubled one fails
    in browsers."""
    return [
        (k, v)
        for k, v in response.headers.multi_items()
        if k.lower() not in _DROP_HEADERS
        and k.lower() not in skip
        and not k.lower().startswith("access-control-")
    ]
