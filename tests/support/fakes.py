"""Test doubles: a clock that moves only when told, and a homeserver behind httpx.MockTransport."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpx


class FakeClock:
    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.ms = start_ms

    def now_ms(self) -> int:
        return self.ms

    def monotonic_ms(self) -> int:
        return self.ms

    def advance(self, ms: int) -> None:
        self.ms += ms


@dataclass
class FakeUser:
    user_id: str
    device_id: str | None


@dataclass
class FakeHomeserver:
    """Knows a few tokens, records every request, and stores state and messages like a room would.

    `fail_next` holds responses (or exceptions) to give, in order, to the next replay requests.
    """

    clock: FakeClock
    tokens: dict[str, FakeUser] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    state: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    messages: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    fail_next: list[httpx.Response | Exception] = field(default_factory=list)
    whoami_override: Callable[[httpx.Request], httpx.Response] | None = None
    versions_body: Any = field(
        default_factory=lambda: {"versions": ["v1.11"], "unstable_features": {"x.y": True}}
    )
    appservice_token: str | None = None
    # Answers the test chooses, by path, ahead of everything else.
    answers: dict[str, Callable[[httpx.Request], httpx.Response]] = field(default_factory=dict)
    _next_event: int = 0

    def add_user(self, token: str, user_id: str, device_id: str | None = "DEVICE") -> None:
        self.tokens[token] = FakeUser(user_id, device_id)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def replays(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "PUT"]

    def _user(self, request: httpx.Request) -> FakeUser | None:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.appservice_token is not None and token == self.appservice_token:
            user_id = request.url.params.get("user_id")
            device_id = request.url.params.get("device_id")
            if user_id is None:
                return None
            known = {(u.user_id, u.device_id) for u in self.tokens.values()}
            if device_id is not None and (user_id, device_id) not in known:
                raise _UnknownDevice()
            return FakeUser(user_id, device_id)
        return self.tokens.get(token)

    def handle(self, request: httpx.Request) -> httpx.Response:
        scripted = self.answers.get(request.url.path)
        if scripted is not None:
            self.requests.append(request)
            return scripted(request)
        try:
            return self._handle(request)
        except _UnknownDevice:
            return _error(400, "ORG.MATRIX.MSC4326.M_UNKNOWN_DEVICE", "Unknown device")

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        raw_path = request.url.raw_path.decode().partition("?")[0]
        parts = raw_path.split("/")
        if raw_path == "/_matrix/client/v3/account/whoami":
            if self.whoami_override is not None:
                return self.whoami_override(request)
            user = self._user(request)
            if "authorization" not in request.headers:
                return _error(401, "M_MISSING_TOKEN", "Missing access token")
            if user is None:
                return _error(401, "M_UNKNOWN_TOKEN", "Unknown access token", soft_logout=False)
            return httpx.Response(200, json={"user_id": user.user_id, "device_id": user.device_id})
        if raw_path == "/_matrix/client/versions":
            return httpx.Response(200, json=self.versions_body)
        if raw_path == "/_matrix/client/v3/capabilities":
            if self._user(request) is None:
                return _error(401, "M_MISSING_TOKEN", "Missing access token")
            return httpx.Response(200, json={"capabilities": {"m.change_password": {"enabled": 1}}})
        if request.method == "PUT" and self.fail_next:
            failure = self.fail_next.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure
        user = self._user(request)
        if len(parts) >= 8 and parts[4] == "rooms":
            room, kind = unquote(parts[5]), parts[6]
            if user is None:
                return _error(401, "M_UNKNOWN_TOKEN", "Unknown access token")
            if kind == "state" and request.method == "GET":
                key = (room, unquote(parts[7]), unquote(parts[8]) if len(parts) > 8 else "")
                if key not in self.state:
                    return _error(404, "M_NOT_FOUND", "Event not found")
                return httpx.Response(200, json=self.state[key])
            if kind == "state" and request.method == "PUT":
                key = (room, unquote(parts[7]), unquote(parts[8]) if len(parts) > 8 else "")
                content = _json_body(request)
                if content is None:
                    return _error(400, "M_NOT_JSON", "Content not JSON.")
                event = self._event(user, room, key[1], content, key[2])
                self.state[key] = event
                return httpx.Response(200, json={"event_id": event["event_id"]})
            if kind == "send" and request.method == "PUT":
                txn = (user.device_id or "", raw_path, "")
                content = _json_body(request)
                if content is None:
                    return _error(400, "M_NOT_JSON", "Content not JSON.")
                if txn not in self.messages:
                    self.messages[txn] = self._event(user, room, unquote(parts[7]), content)
                return httpx.Response(200, json={"event_id": self.messages[txn]["event_id"]})
        return _error(404, "M_UNRECOGNIZED", "Unrecognized request")

    def _event(
        self,
        user: FakeUser,
        room: str,
        event_type: str,
        content: Any,
        state_key: str | None = None,
    ) -> dict[str, Any]:
        self._next_event += 1
        event = {
            "event_id": f"$event{self._next_event}",
            "room_id": room,
            "type": event_type,
            "sender": user.user_id,
            "content": content,
            "origin_server_ts": self.clock.now_ms(),
        }
        if state_key is not None:
            event["state_key"] = state_key
        return event


class _UnknownDevice(Exception):
    pass


def _error(status: int, errcode: str, message: str, **extra: Any) -> httpx.Response:
    return httpx.Response(status, json={"errcode": errcode, "error": message, **extra})


def _json_body(request: httpx.Request) -> Any:
    """The body as JSON, or None where a homeserver refuses it (not JSON, or nested deeper than
    its parser goes)."""
    try:
        return json.loads(request.content)
    except (ValueError, RecursionError):
        return None
