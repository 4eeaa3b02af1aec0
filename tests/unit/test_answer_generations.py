"""A refusal that escapes its route (or the heartbeat's path) is answered in the shape of the
request's generation, whatever the path looks like, and never as a 500."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request

from app.api import actions
from app.api.answers import generation_of, record_generation, unanswered
from app.api.heartbeat import HeartbeatMiddleware
from app.domain import Action, AlreadyFinalised, DomainError, Generation

ROOM = "%21r%3At"


@pytest.mark.parametrize(
    ("path", "generation"),
    [
        # Generation B: the dedicated schedule endpoint under both of its prefixes.
        (f"/_matrix/client/v3/rooms/{ROOM}/delayed_event/m.call.member/t1", Generation.B),
        (
            f"/_matrix/client/unstable/org.matrix.msc4140/rooms/{ROOM}/delayed_event/m.x/t1",
            Generation.B,
        ),
        # Generation B: v1 management and lookups, and the MSC4486 bulk lookup.
        ("/_matrix/client/v1/delayed_events/x/send", Generation.B),
        ("/_matrix/client/v1/delayed_events", Generation.B),
        ("/_matrix/client/unstable/org.matrix.msc4486/delayed_events", Generation.B),
        # Generation A: the query-parameter sends and the unstable management paths.
        (f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1", Generation.A),
        (f"/_matrix/client/r0/rooms/{ROOM}/state/m.call.member/k", Generation.A),
        (f"/_matrix/client/api/v1/rooms/{ROOM}/state/m.call.member", Generation.A),
        ("/_matrix/client/unstable/org.matrix.msc4140/delayed_events/x/send", Generation.A),
        ("/_matrix/client/unstable/org.matrix.msc4140/delayed_events", Generation.A),
        # A state key or event type that only spells a B path once decoded stays A.
        (f"/_matrix/client/v3/rooms/{ROOM}/state/delayed_event/%2Fdelayed_event%2F", Generation.A),
        (f"/_matrix/client/v3/rooms/{ROOM}/state/m.x/%2F_matrix%2Fclient%2Fv1%2F", Generation.A),
    ],
)
def test_the_generation_of_every_route_shape(path: str, generation: Generation) -> None:
    assert generation_of(path) is generation


async def _answer(app: Any, path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
        # With a token: the call goes on to the action (a tokenless one may be refused first).
        return await client.post(path, json={}, headers={"Authorization": "Bearer t"})


async def test_the_generation_a_route_recorded_wins_over_its_path() -> None:
    app = FastAPI()
    app.add_exception_handler(DomainError, unanswered)

    @app.post("/{rest:path}")
    async def refuse(request: Request, rest: str) -> None:
        record_generation(request.scope, Generation.B)
        raise AlreadyFinalised("cancelled")

    response = await _answer(app, "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/x")
    assert response.status_code == 409
    assert response.json()["errcode"] == "M_UNKNOWN"


@pytest.mark.parametrize(
    ("prefix", "status", "errcode"),
    [
        ("/_matrix/client/unstable/org.matrix.msc4140", 404, "M_NOT_FOUND"),
        ("/_matrix/client/v1", 409, "M_UNKNOWN"),
    ],
)
async def test_a_refusal_escaping_on_the_heartbeat_path_is_a_matrix_error(
    monkeypatch: pytest.MonkeyPatch, prefix: str, status: int, errcode: str
) -> None:
    """The heartbeat answers ahead of the framework, so its exception handlers: a domain error
    reaching it is answered there, for the path's generation."""

    async def refuse(
        request: Request, raw_delay_id: str, action: Action, generation: Generation
    ) -> None:
        raise AlreadyFinalised("cancelled")

    async def routed(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        raise AssertionError("the heartbeat's path reached the routes")

    monkeypatch.setattr(actions, "act", refuse)
    response = await _answer(HeartbeatMiddleware(routed), f"{prefix}/delayed_events/x/restart")
    assert response.status_code == status
    body = json.loads(response.content)
    assert body["errcode"] == errcode
    assert isinstance(body["error"], str)
