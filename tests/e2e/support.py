"""A byte-exact HTTP client and Matrix helpers for the end-to-end tests.

Requests go out with `http.client`, which sends the path and query exactly as written: no
normalisation of dot segments, no re-encoding. That is what the routing tests need to be sure
what nginx saw.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

T = TypeVar("T")

DELAY = "org.matrix.msc4140.delay"
UNSTABLE = "/_matrix/client/unstable/org.matrix.msc4140"
V1 = "/_matrix/client/v1"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = ""

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.body[:500]!r}"


def call(
    base_url: str,
    method: str,
    raw_path: str,
    body: Any = None,
    token: str | None = None,
    raw_body: bytes | None = None,
) -> Response:
    """One request; `raw_path` (with its query) goes on the wire unchanged."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    headers = {}
    data = raw_body
    if data is None and body is not None:
        data = json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, raw_path, body=data, headers=headers)
        answer = connection.getresponse()
        return Response(answer.status, answer.read(), answer.getheader("Content-Type") or "")
    finally:
        connection.close()


def enc(segment: str) -> str:
    """Percent-encode one path segment (`!`, `@`, `:` and `/` included)."""
    return quote(segment, safe="")


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def poll(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Call `probe` until it returns something other than None; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def now_ms() -> int:
    return int(time.time() * 1000)


class Room:
    """A room and the account that created it, seen from both sides of nginx."""

    def __init__(self, client_url: str, homeserver_url: str, token: str, room_id: str) -> None:
        self.client_url = client_url
        self.homeserver_url = homeserver_url
        self.token = token
        self.room_id = room_id

    @property
    def path(self) -> str:
        return f"rooms/{enc(self.room_id)}"

    def timeline(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest events, asked of the homeserver directly."""
        answer = call(
            self.homeserver_url,
            "GET",
            f"/_matrix/client/v3/{self.path}/messages?dir=b&limit={limit}",
            token=self.token,
        )
        assert answer.status == 200, answer
        chunk: list[dict[str, Any]] = answer.json()["chunk"]
        return chunk

    def find_event(self, event_type: str) -> dict[str, Any] | None:
        found = [e for e in self.timeline() if e["type"] == event_type]
        assert len(found) <= 1, f"{event_type} was sent {len(found)} times: {found}"
        return found[0] if found else None

    def state(self, event_type: str, state_key: str) -> dict[str, Any] | None:
        """The state event's full form from the homeserver, or None when there is none."""
        for event in self.all_state():
            if event["type"] == event_type and event.get("state_key") == state_key:
                return event
        return None

    def all_state(self) -> list[dict[str, Any]]:
        answer = call(
            self.homeserver_url, "GET", f"/_matrix/client/v3/{self.path}/state", token=self.token
        )
        assert answer.status == 200, answer
        events: list[dict[str, Any]] = answer.json()
        return events


_REQUEST_LINE = re.compile(r'Processed request: .* "(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[\d.]+"')
_DELAY_IN_QUERY = re.compile(
    r"\?(?:.*[&;])?org(?:\.|%2e)matrix(?:\.|%2e)msc4140(?:\.|%2e)(?:delay|parent_delay_id)", re.I
)


class SynapseLog:
    """The homeserver's access log: every request Synapse processed, with its raw URI."""

    def __init__(self, path: Path, homeserver_url: str) -> None:
        self.path = path
        self.homeserver_url = homeserver_url

    def mark(self) -> int:
        """A position in the log; `since=` it limits the checks below to later requests."""
        return self.path.stat().st_size

    def requests(self, since: int = 0) -> list[tuple[str, str]]:
        with open(self.path, "rb") as log:
            log.seek(since)
            lines = log.read().decode(errors="replace").splitlines()
        return [(m["method"], m["uri"]) for m in map(_REQUEST_LINE.search, lines) if m]

    def settle(self, since: int = 0) -> list[tuple[str, str]]:
        """All requests so far: a marker request is sent, and the log read once it shows up.

        Anything the homeserver answered before the marker was sent is logged by then.
        """
        marker = unique("settle")
        answer = call(self.homeserver_url, "GET", f"/_matrix/client/versions?marker={marker}")
        assert answer.status == 200, answer

        def logged() -> list[tuple[str, str]] | None:
            seen = self.requests(since)
            return seen if any(marker in uri for _, uri in seen) else None

        return poll(logged, 10.0, "the homeserver to log a marker request")

    def carrying_delay(self, since: int = 0) -> list[tuple[str, str]]:
        """Requests that reached the homeserver with a delay parameter (there must be none)."""
        return [(m, uri) for m, uri in self.settle(since) if _DELAY_IN_QUERY.search(uri)]

    def mentioning(self, text: str) -> list[tuple[str, str]]:
        return [(m, uri) for m, uri in self.settle() if text in uri]


def raw_call(
    base_url: str,
    method: str,
    target: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> Response:
    """One request written byte for byte onto a socket: the request target goes out exactly as
    given (a raw `#`, dot segments, anything), with no client library in between."""
    parts = urlsplit(base_url)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.hostname}:{parts.port}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    request = "\r\n".join(lines).encode("latin-1") + body
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), 30) as sock:
        sock.sendall(request)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return Response(answer.status, answer.read(), answer.getheader("Content-Type") or "")
