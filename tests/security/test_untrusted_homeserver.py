"""The homeserver's answers are untrusted input too: garbled, hostile or missing answers to
whoami, versions, capabilities and replays end in a clean Matrix error (502 for the request
paths), never a crash, and a replay is never left failing forever."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI

from tests.integration.common import ALICE, DELAY, assert_error, run_due, send_path, stored
from tests.security.support import status_of, token_devices
from tests.support.fakes import FakeClock, FakeHomeserver

Answer = Callable[[httpx.Request], httpx.Response]
VERSIONS = "/_matrix/client/versions"
CAPABILITIES = "/_matrix/client/v3/capabilities"
WHOAMI = "/_matrix/client/v3/account/whoami"


def closes(request: httpx.Request) -> httpx.Response:
    raise httpx.RemoteProtocolError("Server disconnected without sending a response.")


def fixed(status: int, content: bytes) -> Answer:
    return lambda request: httpx.Response(status, content=content)


GARBLED = {
    "not-json": fixed(200, b"<html>hello</html>"),
    "array": fixed(200, b'["v1.11"]'),
    "number": fixed(200, b"42"),
    "null": fixed(200, b"null"),
    "nan": fixed(200, b'{"versions": NaN, "capabilities": NaN}'),
    "deep": fixed(200, b"[" * 100_000 + b"]" * 100_000),
    "huge-garbage": fixed(200, b"x" * 5_000_000),
    "bad-utf8": fixed(200, b'{"a": "\xff\xfe"}'),
    "closes": closes,
}


@pytest.mark.parametrize("path", [VERSIONS, CAPABILITIES])
@pytest.mark.parametrize("answer", GARBLED.values(), ids=GARBLED.keys())
async def test_garbled_discovery_is_a_502(
    client: httpx.AsyncClient, homeserver: FakeHomeserver, path: str, answer: Answer
) -> None:
    homeserver.answers[path] = answer
    r = await client.get(path, headers=ALICE)
    body = assert_error(r, 502, "M_UNKNOWN")
    assert set(body) == {"errcode", "error"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (VERSIONS, b'{"versions": 5, "unstable_features": 7}'),
        (CAPABILITIES, b'{"capabilities": ["m.change_password"]}'),
        (CAPABILITIES, b'{"capabilities": null, "other": {"deep": [1, 2]}}'),
    ],
)
async def test_wrong_types_in_discovery_are_repaired(
    client: httpx.AsyncClient, homeserver: FakeHomeserver, path: str, body: bytes
) -> None:
    homeserver.answers[path] = fixed(200, body)
    r = await client.get(path, headers=ALICE)
    assert r.status_code == 200, r.text
    if path == VERSIONS:
        assert r.json()["unstable_features"] == {
            "org.matrix.msc4140": True,
            "org.matrix.msc4486": True,
        }
    else:
        assert set(r.json()["capabilities"]) == {
            "m.delayed_events",
            "org.matrix.msc4140.delayed_events",
        }


WHOAMI_GARBLED = {
    **GARBLED,
    "user-id-number": fixed(200, b'{"user_id": 5}'),
    "user-id-nul": fixed(200, b'{"user_id": "@a\\u0000:test", "device_id": "D"}'),
    "user-id-surrogate": fixed(200, b'{"user_id": "@a\\ud800:test"}'),
    "device-id-nul": fixed(200, b'{"user_id": "@a:test", "device_id": "D\\u0000"}'),
    "server-error": fixed(500, b"oops"),
    "teapot": fixed(418, b'{"errcode": 5}'),
}


@pytest.mark.parametrize("answer", WHOAMI_GARBLED.values(), ids=WHOAMI_GARBLED.keys())
async def test_garbled_whoami_is_a_502_and_stores_nothing(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver, answer: Answer
) -> None:
    homeserver.answers[WHOAMI] = answer
    r = await client.put(send_path() + f"?{DELAY}=1000", json={}, headers=ALICE)
    assert_error(r, 502, "M_UNKNOWN")
    r = await client.get("/_matrix/client/v1/delayed_events", headers=ALICE)
    assert_error(r, 502, "M_UNKNOWN")
    assert await stored(app) == []


async def test_device_id_of_a_wrong_type_is_no_device(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    homeserver.answers[WHOAMI] = fixed(200, b'{"user_id": "@alice:test", "device_id": 7}')
    r = await client.put(send_path() + f"?{DELAY}=1000", json={}, headers=ALICE)
    assert r.status_code == 200, r.text
    assert await token_devices(app) == {("@alice:test", "")}


async def test_pass_through_to_a_homeserver_that_closes(
    client: httpx.AsyncClient, homeserver: FakeHomeserver
) -> None:
    homeserver.answers["/_matrix/client/v3/rooms/!room:test/send/m.room.message/t1"] = closes
    r = await client.put(send_path(), json={"body": "now"}, headers=ALICE)
    assert_error(r, 502, "M_UNKNOWN")


REPLAY_GARBLED = {
    "not-json": httpx.Response(200, content=b"<html>"),
    "no-event-id": httpx.Response(200, json={"event_id": 5}),
    "deep": httpx.Response(200, content=b"[" * 100_000),
    "error-not-json": httpx.Response(400, content=b"x" * 100_000),
    "error-deep": httpx.Response(400, content=b'{"errcode":' + b"[" * 100_000),
    "closes": httpx.RemoteProtocolError("Server disconnected without sending a response."),
}


@pytest.mark.parametrize("answer", REPLAY_GARBLED.values(), ids=REPLAY_GARBLED.keys())
async def test_garbled_replay_answer_is_recorded(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    answer: httpx.Response | Exception,
) -> None:
    """A replay ends as sent or failed (or waits for a retry), with a Matrix error recorded; it
    never escapes as an exception that would leave the event to be claimed again forever."""
    r = await client.put(send_path() + f"?{DELAY}=1000", json={}, headers=ALICE)
    delay_id = r.json()["delay_id"]
    homeserver.fail_next.append(answer)
    clock.advance(1000)
    assert await run_due(app) == 1
    async with app.state.container.engine.connect() as conn:
        from sqlalchemy import text

        row = (
            await conn.execute(
                text("SELECT status, attempts, error FROM delayed_event WHERE delay_id = :d"),
                {"d": delay_id},
            )
        ).one()
    # Either finalised with a Matrix error, or released for a retry (attempts counted): not left
    # claimed until its lease runs out, as an unexpected exception would.
    assert row.status == "failed" or row.attempts == 1, row
    if row.status == "failed":
        assert (await status_of(app, delay_id))[1] is not None
