"""Tenancy: with a token, a user finds only their own delayed events; without one, only the exact
delay_id finds an event, and delay_ids cannot be guessed."""

from __future__ import annotations

import base64
import re

import httpx
import pytest
from fastapi import FastAPI

from app.crypto import new_key
from app.delay_ids import DelayIds
from app.service import new_delay_id
from tests.integration.common import (
    ALICE,
    BOB,
    UNSTABLE,
    V1,
    act,
    run_due,
    schedule_b,
    schedule_message,
    schedule_state,
    stored,
)
from tests.support.fakes import FakeClock, FakeHomeserver

PREFIXES = [UNSTABLE, V1]
DELAY_ID = re.compile(r"[A-Za-z0-9_-]{22,}")


async def alices_events(client: httpx.AsyncClient, app: FastAPI, clock: FakeClock) -> list[str]:
    """A scheduled message, state event and generation-B event of alice's, and a finalised one."""
    finalised = await schedule_message(client, 0, txn="done")
    assert await run_due(app) == 1
    message = await schedule_message(client, 60_000, txn="m")
    state = await schedule_state(client, 60_000, key="_@alice:test_ALICEDEV")
    r = await schedule_b(client, {"delay_ms": 60_000, "content": {"b": 1}})
    assert r.status_code == 200, r.text
    return [message, state, r.json()["delay_id"], finalised]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("body_form", [False, True], ids=["split", "body"])
@pytest.mark.parametrize("action", ["send", "cancel", "restart"])
async def test_no_action_on_another_users_event(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
    body_form: bool,
    action: str,
) -> None:
    ids = await alices_events(client, app, clock)
    replays = len(homeserver.replays())
    before = await stored(app)
    for delay_id in ids:
        r = await act(client, delay_id, action, prefix=prefix, headers=BOB, body_form=body_form)
        assert r.status_code == 404, r.text
        assert r.json()["errcode"] == "M_NOT_FOUND"
    assert await stored(app) == before  # events, and every stored token, unchanged
    assert len(homeserver.replays()) == replays


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_no_sight_of_another_users_event(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, prefix: str
) -> None:
    ids = await alices_events(client, app, clock)
    bobs = await schedule_message(client, 60_000, txn="bob", headers=BOB)
    before = await stored(app)
    for delay_id in ids:
        r = await client.get(f"{prefix}/delayed_events/{delay_id}", headers=BOB)
        assert r.status_code == 404, r.text
        assert r.json()["errcode"] == "M_NOT_FOUND"
    query = "&".join(f"delay_id={d}" for d in ids)
    for url in (f"{prefix}/delayed_events", f"{prefix}/delayed_events?{query}"):
        r = await client.get(url, headers=BOB)
        assert r.status_code == 200
        seen = {item["delay_id"] for key in ("scheduled", "finalised") for item in r.json()[key]}
        assert seen.isdisjoint(ids)
        assert seen <= {bobs}
    r = await client.get(f"{prefix}/delayed_events", headers=ALICE)
    assert {item["delay_id"] for item in r.json()["scheduled"]} == set(ids[:3])
    assert await stored(app) == before


def near_misses(delay_id: str) -> list[str]:
    flipped = delay_id[:-1] + ("A" if delay_id[-1] != "A" else "B")
    return [
        delay_id[:-1],
        delay_id + "A",
        flipped,
        delay_id[1:],
        delay_id.swapcase(),
        delay_id[:5] + ("_" if delay_id[5] != "_" else "-") + delay_id[6:],
        delay_id[:10],
        delay_id[:-1] + "%25",  # a percent sign: no pattern matching
        delay_id[:-1] + ("%5F" if delay_id[-1] != "_" else "%2D"),  # no pattern matching
        " " + delay_id,
        delay_id + "%20",
    ]


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_tokenless_calls_need_the_exact_delay_id(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver, prefix: str
) -> None:
    delay_id = await schedule_message(client, 60_000)
    before = await stored(app)
    for wrong in near_misses(delay_id):
        assert wrong != delay_id
        for action in ("send", "cancel", "restart"):
            r = await client.post(f"{UNSTABLE}/delayed_events/{wrong}/{action}")
            assert r.status_code == 404, (wrong, r.text)
            r = await client.post(f"{UNSTABLE}/delayed_events/{wrong}", json={"action": action})
            assert r.status_code == 404, (wrong, r.text)
        r = await client.get(f"{prefix}/delayed_events/{wrong}", headers=ALICE)
        assert r.status_code == 404, (wrong, r.text)
    assert await stored(app) == before
    assert homeserver.replays() == []
    # The exact id does work, percent-encoded or not.
    encoded = "".join(f"%{ord(c):02X}" for c in delay_id)
    assert (await client.post(f"{UNSTABLE}/delayed_events/{encoded}/restart")).status_code == 200
    assert (await client.post(f"{UNSTABLE}/delayed_events/{delay_id}/cancel")).status_code == 200


def test_delay_ids_have_at_least_128_random_bits() -> None:
    issuer = DelayIds([base64.urlsafe_b64decode(new_key() + "=")])
    ids = [new_delay_id(issuer) for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for delay_id in ids:
        assert DELAY_ID.fullmatch(delay_id), delay_id
        assert len(delay_id) * 6 >= 128  # 64 symbols: 6 bits each
    # Every position varies over (nearly) the whole alphabet: nothing is fixed or sequential.
    for position in range(len(ids[0])):
        assert len({d[position] for d in ids}) > 50, position


async def test_delay_ids_from_the_api(client: httpx.AsyncClient) -> None:
    ids = {await schedule_message(client, 60_000, txn=f"t{i}") for i in range(20)}
    assert len(ids) == 20
    assert all(DELAY_ID.fullmatch(d) and len(d) * 6 >= 128 for d in ids)
