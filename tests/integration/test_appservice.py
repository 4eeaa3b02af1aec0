"""Application-service mode: replays act as the user through the application service's token,
so they do not depend on the user's own token still being valid."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from tests.integration.common import enc, get_event, schedule_state, state_path
from tests.support.fakes import FakeClock, FakeHomeserver

AS_TOKEN = "as_token_secret"
ROOM = "%21room%3Atest"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"appservice_token": AS_TOKEN}


@pytest.fixture
def appservice_homeserver(homeserver: FakeHomeserver) -> FakeHomeserver:
    homeserver.appservice_token = AS_TOKEN
    return homeserver


async def _schedule_state(client: httpx.AsyncClient, delay: int) -> str:
    r = await client.put(
        f"/_matrix/client/v3/rooms/{ROOM}/state/m.call.member/_%40alice%3Atest_ALICEDEV"
        f"?org.matrix.msc4140.delay={delay}",
        json={},
        headers={"Authorization": "Bearer alice_token"},
    )
    assert r.status_code == 200, r.text
    delay_id: str = r.json()["delay_id"]
    return delay_id


async def test_replay_uses_the_application_service_as_the_user(
    app: FastAPI,
    client: httpx.AsyncClient,
    clock: FakeClock,
    appservice_homeserver: FakeHomeserver,
) -> None:
    await _schedule_state(client, 1000)
    # The user's own token dies before the event is due.
    del appservice_homeserver.tokens["alice_token"]
    clock.advance(1000)
    await app.state.container.replay.run_due()
    put = appservice_homeserver.replays()[-1]
    assert put.headers["authorization"] == f"Bearer {AS_TOKEN}"
    assert put.url.params["user_id"] == "@alice:test"
    assert put.url.params["device_id"] == "ALICEDEV"
    assert put.url.params["org.matrix.msc3202.device_id"] == "ALICEDEV"
    state = appservice_homeserver.state[("!room:test", "m.call.member", "_@alice:test_ALICEDEV")]
    assert state["sender"] == "@alice:test"


async def test_no_user_token_is_stored(
    app: FastAPI, client: httpx.AsyncClient, appservice_homeserver: FakeHomeserver
) -> None:
    await _schedule_state(client, 1000)
    async with app.state.container.engine.connect() as conn:
        count = (await conn.execute(text("SELECT count(*) FROM device_token"))).scalar_one()
    assert count == 0


async def test_a_logged_out_device_still_sends_as_the_user(
    app: FastAPI,
    client: httpx.AsyncClient,
    clock: FakeClock,
    appservice_homeserver: FakeHomeserver,
) -> None:
    delay_id = await _schedule_state(client, 1000)
    # Logging out removes the device as well as the token.
    for token in ("alice_token", "alice_token_2"):
        del appservice_homeserver.tokens[token]
    clock.advance(1000)
    await app.state.container.replay.run_due()
    puts = appservice_homeserver.replays()
    assert "device_id" in puts[-2].url.params
    assert "device_id" not in puts[-1].url.params
    assert ("!room:test", "m.call.member", "_@alice:test_ALICEDEV") in appservice_homeserver.state
    r = await client.get(
        f"/_matrix/client/v1/delayed_events/{delay_id}",
        headers={"Authorization": "Bearer bob_token"},
    )
    assert r.status_code == 404


FORGED_QUERIES = [
    "user_id=%40bob%3Atest",
    "user%5Fid=%40bob%3Atest",
    "%75ser_id=%40bob%3Atest",
    "ts=1000",
    "device_id=BOBDEV",
    "org%2Ematrix%2Emsc3202%2Edevice_id=BOBDEV",
]


@pytest.mark.parametrize("forged", FORGED_QUERIES)
async def test_a_user_cannot_name_who_or_when_the_replay_acts_as(
    app: FastAPI,
    client: httpx.AsyncClient,
    appservice_homeserver: FakeHomeserver,
    forged: str,
) -> None:
    gen_a = await client.put(
        f"/_matrix/client/v3/rooms/{ROOM}/state/m.room.power_levels/"
        f"?org.matrix.msc4140.delay=0&{forged}",
        json={"users": {"@alice:test": 100}},
        headers={"Authorization": "Bearer alice_token"},
    )
    gen_b = await client.put(
        f"/_matrix/client/v3/rooms/{ROOM}/delayed_event/m.room.power_levels/b1?{forged}",
        json={"delay_ms": 0, "state_key": "", "content": {"users": {"@alice:test": 100}}},
        headers={"Authorization": "Bearer alice_token"},
    )
    for answer in (gen_a, gen_b):
        assert answer.status_code == 400, answer.text
        assert answer.json()["errcode"] == "M_INVALID_PARAM"
    async with app.state.container.engine.connect() as conn:
        count = (await conn.execute(text("SELECT count(*) FROM delayed_event"))).scalar_one()
    assert count == 0
    assert appservice_homeserver.replays() == []


async def test_a_stored_query_cannot_name_who_the_replay_acts_as(
    app: FastAPI,
    client: httpx.AsyncClient,
    clock: FakeClock,
    appservice_homeserver: FakeHomeserver,
) -> None:
    """A row stored before the allowlist, with a forged user in its query, replays as its user."""
    delay_id = await _schedule_state(client, 1000)
    async with app.state.container.engine.begin() as conn:
        await conn.execute(
            text("UPDATE delayed_event SET query = :q WHERE delay_id = :d"),
            {"q": "user_id=%40bob%3Atest&ts=1000&device_id=BOBDEV", "d": delay_id},
        )
    clock.advance(1000)
    await app.state.container.replay.run_due()
    put = appservice_homeserver.replays()[-1]
    assert put.url.params.get_list("user_id") == ["@alice:test"]
    assert put.url.params.get_list("device_id") == ["ALICEDEV"]
    assert "ts" not in put.url.params
    state = appservice_homeserver.state[("!room:test", "m.call.member", "_@alice:test_ALICEDEV")]
    assert state["sender"] == "@alice:test"


# Newer state set through an application service -------------------------------------------------
#
# A bridge sets state as one of its users (`?user_id=`) with its own token, passed through the
# sidecar (a /state request without the delay parameter). The homeserver records the named user as
# the sender; whoami of the bridge's token names the bridge's own user.

BRIDGE = "@bridge:test"


def _whoami_of_the_bridge(homeserver: FakeHomeserver) -> None:
    """whoami of the application service's token without `user_id`: its own user."""

    def whoami(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") == f"Bearer {AS_TOKEN}" and (
            "user_id" not in request.url.params
        ):
            return httpx.Response(200, json={"user_id": BRIDGE})
        homeserver.whoami_override = None
        try:
            return homeserver.handle(request)
        finally:
            homeserver.whoami_override = whoami

    homeserver.whoami_override = whoami


async def _set_state_through(
    client: httpx.AsyncClient, key: str, query: str, token: str
) -> httpx.Response:
    r = await client.put(
        state_path(enc(key)) + query,  # no delay: passed through
        json={"set": "now"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200, r.text
    return r


async def test_state_set_as_the_user_through_a_bridge_does_not_cancel_their_own_delayed_state(
    client: httpx.AsyncClient, appservice_homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_state(client, 60_000, key="k")
    _whoami_of_the_bridge(appservice_homeserver)
    # The parameter's name percent-encoded, as the homeserver still reads it.
    await _set_state_through(client, "k", "?user%5Fid=%40alice%3Atest", AS_TOKEN)
    assert appservice_homeserver.state[("!room:test", "m.call.member", "k")]["sender"] == (
        "@alice:test"
    )
    assert "outcome" not in await get_event(client, delay_id)  # still scheduled


async def test_state_set_as_another_user_through_a_bridge_cancels_the_delayed_state(
    client: httpx.AsyncClient, appservice_homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_state(client, 60_000, key="k")
    _whoami_of_the_bridge(appservice_homeserver)
    await _set_state_through(client, "k", "?user_id=%40bob%3Atest", AS_TOKEN)
    item = await get_event(client, delay_id)
    assert item["outcome"] == "cancel", item
    assert item["error"]["errcode"] == "M_CANCELLED_BY_STATE_UPDATE", item


async def test_a_user_id_the_homeserver_ignores_does_not_cancel_the_senders_own_delayed_state(
    client: httpx.AsyncClient, appservice_homeserver: FakeHomeserver
) -> None:
    """With a user's own token the homeserver ignores `user_id`: the sender is the token's owner,
    whatever the query names."""
    delay_id = await schedule_state(client, 60_000, key="k")
    await _set_state_through(client, "k", "?user_id=%40bob%3Atest", "alice_token")
    assert appservice_homeserver.state[("!room:test", "m.call.member", "k")]["sender"] == (
        "@alice:test"
    )
    assert "outcome" not in await get_event(client, delay_id)
