"""Requests and checks shared by the integration tests of the HTTP API."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
from fastapi import FastAPI
from sqlalchemy import text

ALICE = {"Authorization": "Bearer alice_token"}
ALICE_2 = {"Authorization": "Bearer alice_token_2"}
ALICE_PHONE = {"Authorization": "Bearer alice_phone"}
BOB = {"Authorization": "Bearer bob_token"}

ROOM = "!room:test"
ROOM_PATH = quote(ROOM, safe="")
DELAY = "org.matrix.msc4140.delay"
UNSTABLE = "/_matrix/client/unstable/org.matrix.msc4140"
V1 = "/_matrix/client/v1"
V3 = "/_matrix/client/v3"


def enc(value: str) -> str:
    return quote(value, safe="")


def send_path(
    txn: str = "t1", *, version: str = "v3", room: str = ROOM_PATH, kind: str = "m.room.message"
) -> str:
    return f"/_matrix/client/{version}/rooms/{room}/send/{kind}/{txn}"


def state_path(
    key: str | None = "", *, version: str = "v3", room: str = ROOM_PATH, kind: str = "m.call.member"
) -> str:
    base = f"/_matrix/client/{version}/rooms/{room}/state/{kind}"
    return base if key is None else f"{base}/{key}"


async def schedule_message(
    client: httpx.AsyncClient,
    delay: int = 1000,
    *,
    txn: str = "t1",
    headers: dict[str, str] | None = None,
    content: dict[str, Any] | None = None,
    room: str = ROOM_PATH,
) -> str:
    r = await client.put(
        send_path(txn, room=room) + f"?{DELAY}={delay}",
        json=content if content is not None else {"body": txn},
        headers=headers if headers is not None else ALICE,
    )
    assert r.status_code == 200, r.text
    delay_id: str = r.json()["delay_id"]
    return delay_id


async def schedule_state(
    client: httpx.AsyncClient,
    delay: int = 1000,
    *,
    key: str = "",
    headers: dict[str, str] | None = None,
    content: dict[str, Any] | None = None,
    kind: str = "m.call.member",
) -> str:
    r = await client.put(
        state_path(enc(key), kind=kind) + f"?{DELAY}={delay}",
        json=content if content is not None else {"state": key},
        headers=headers if headers is not None else ALICE,
    )
    assert r.status_code == 200, r.text
    delay_id: str = r.json()["delay_id"]
    return delay_id


async def schedule_b(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    *,
    txn: str = "b1",
    prefix: str = V3,
    headers: dict[str, str] | None = None,
    kind: str = "m.call.member",
) -> httpx.Response:
    return await client.put(
        f"{prefix}/rooms/{ROOM_PATH}/delayed_event/{kind}/{txn}",
        json=body,
        headers=headers if headers is not None else ALICE,
    )


async def act(
    client: httpx.AsyncClient,
    delay_id: str,
    action: str,
    *,
    prefix: str = UNSTABLE,
    headers: dict[str, str] | None = None,
    body_form: bool = False,
) -> httpx.Response:
    if body_form:
        return await client.post(
            f"{prefix}/delayed_events/{delay_id}", json={"action": action}, headers=headers
        )
    return await client.post(
        f"{prefix}/delayed_events/{delay_id}/{action}", json={}, headers=headers
    )


async def get_event(
    client: httpx.AsyncClient, delay_id: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    r = await client.get(f"{V1}/delayed_events/{delay_id}", headers=headers or ALICE)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def run_due(app: FastAPI) -> int:
    handled = await app.state.container.replay.run_due()
    assert handled is not None, "no run was going on"
    return handled


async def rows(app: FastAPI) -> list[dict[str, Any]]:
    """Every stored delayed event, in send-time order."""
    async with app.state.container.engine.connect() as conn:
        result = await conn.execute(text("SELECT * FROM delayed_event ORDER BY send_ts, delay_id"))
        return [dict(row._mapping) for row in result]


async def stored(app: FastAPI) -> list[tuple[Any, ...]]:
    """A snapshot of everything stored, to compare before and after a refused request."""
    async with app.state.container.engine.connect() as conn:
        events = await conn.execute(text("SELECT * FROM delayed_event ORDER BY delay_id"))
        tokens = await conn.execute(
            text("SELECT user_id, device_id, digest FROM device_token ORDER BY 1, 2")
        )
        return [tuple(r) for r in events] + [tuple(r) for r in tokens]


def assert_error(r: httpx.Response, status: int, errcode: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["errcode"] == errcode, body
    assert isinstance(body["error"], str)
    return body


def bearer(request: httpx.Request) -> str:
    return request.headers.get("authorization", "").removeprefix("Bearer ")
