"""Numbers from clients: integers longer than Python's int() takes from text (4,300 digits) are
over the maximum delay (either generation) or out of range (`limit=`), never a 500; and a delay is
plain decimal digits, nothing else that int() would take."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from tests.integration.common import (
    ALICE,
    DELAY,
    V1,
    assert_error,
    schedule_b,
    send_path,
    state_path,
    stored,
)
from tests.support.fakes import FakeHomeserver

LONG = "9" * 5000


@pytest.mark.parametrize("digits", [LONG, "0" * 2000 + "1" + "0" * 4400, "1" + "0" * 30])
async def test_a_long_gen_a_delay_is_over_the_maximum(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver, digits: str
) -> None:
    for path in (send_path("t1"), state_path("k")):
        r = await client.put(f"{path}?{DELAY}={digits}", json={"body": "x"}, headers=ALICE)
        body = assert_error(r, 400, "M_UNKNOWN")
        assert body["org.matrix.msc4140.errcode"] == "M_MAX_DELAY_EXCEEDED"
        assert body["org.matrix.msc4140.max_delay"] == app.state.container.settings.max_delay_ms
        assert len(r.content) < 1000
    assert await stored(app) == []
    assert homeserver.replays() == []


async def test_a_long_gen_a_delay_is_refused_before_authentication(
    client: httpx.AsyncClient, homeserver: FakeHomeserver
) -> None:
    """Without a token it is the missing token that is answered, as for any other delay."""
    r = await client.put(f"{send_path('t1')}?{DELAY}={LONG}", json={"body": "x"})
    assert_error(r, 401, "M_MISSING_TOKEN")


@pytest.mark.parametrize("key", ["delay_ms", "delay"])
async def test_a_long_gen_b_delay_is_forbidden(
    client: httpx.AsyncClient, app: FastAPI, key: str
) -> None:
    raw = b'{"%s": %s, "content": {"body": "x"}}' % (key.encode(), LONG.encode())
    r = await client.put(
        f"{V1.replace('v1', 'v3')}/rooms/%21room%3Atest/delayed_event/m.room.message/b1",
        content=raw,
        headers={**ALICE, "Content-Type": "application/json"},
    )
    assert_error(r, 403, "M_FORBIDDEN")
    assert await stored(app) == []


async def test_a_long_negative_gen_b_delay_is_invalid(client: httpx.AsyncClient) -> None:
    raw = b'{"delay_ms": -%s, "content": {}}' % LONG.encode()
    r = await client.put(
        "/_matrix/client/v3/rooms/%21room%3Atest/delayed_event/m.room.message/b1",
        content=raw,
        headers={**ALICE, "Content-Type": "application/json"},
    )
    assert_error(r, 400, "M_INVALID_PARAM")


async def test_a_long_number_in_content_is_not_json(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    r = await schedule_b(client, {"delay_ms": 1000, "content": {}})
    assert r.status_code == 200
    before = await stored(app)
    for path, raw in (
        (
            "/_matrix/client/v3/rooms/%21room%3Atest/delayed_event/m.room.message/b2",
            b'{"delay_ms": 1000, "content": {"n": %s}}' % LONG.encode(),
        ),
        (f"{send_path('t9')}?{DELAY}=1000", b'{"n": %s}' % LONG.encode()),
    ):
        r = await client.put(
            path, content=raw, headers={**ALICE, "Content-Type": "application/json"}
        )
        assert_error(r, 400, "M_NOT_JSON")
    assert await stored(app) == before


@pytest.mark.parametrize("prefix", ["/_matrix/client/unstable/org.matrix.msc4140", V1])
@pytest.mark.parametrize("limit", [LONG, "1001", "0" * 5000 + "1001"])
async def test_a_long_limit_is_out_of_range(
    client: httpx.AsyncClient, prefix: str, limit: str
) -> None:
    r = await client.get(f"{prefix}/delayed_events?limit={limit}", headers=ALICE)
    assert_error(r, 400, "M_INVALID_PARAM")


async def test_a_limit_with_leading_zeros_is_read(client: httpx.AsyncClient) -> None:
    r = await client.get(f"{V1}/delayed_events?limit={'0' * 5000}7", headers=ALICE)
    assert r.status_code == 200, r.text


async def test_a_long_content_length_is_too_large(client: httpx.AsyncClient) -> None:
    r = await client.put(
        f"{send_path('t1')}?{DELAY}=1000",
        content=b"{}",
        headers={**ALICE, "Content-Length": LONG, "Content-Type": "application/json"},
    )
    assert_error(r, 413, "M_TOO_LARGE")


@pytest.mark.parametrize(
    "delay",
    ["%2B600000", "+600000", "600000%20", "600000+", "%20600000", "-0", "600_000", "%D9%A3"],
)
async def test_a_delay_is_plain_digits_only(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver, delay: str
) -> None:
    """Refused although the homeserver's own parser (int()) would take it, and never passed on."""
    r = await client.put(f"{send_path('t1')}?{DELAY}={delay}", json={"body": "x"}, headers=ALICE)
    assert_error(r, 400, "M_INVALID_PARAM")
    assert await stored(app) == []
    assert homeserver.requests == []
