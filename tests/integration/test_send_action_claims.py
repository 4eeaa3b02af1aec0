"""The send action's claim is kept like a run's: renewed while it waits, and re-checked just
before its request. A send action that waited past its lease (behind a slow newer-state check,
or for a request slot) while another replica took the event over sends nothing: a state event
has no transaction id, so its second PUT would set it again, after the later state of its key."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from app.crypto import new_key
from tests.integration.common import ALICE, V1, act, schedule_state
from tests.support.apps import app_and_client
from tests.support.fakes import FakeClock, FakeHomeserver

KEY = "@alice:test_ALICEDEV"


def _state_puts(homeserver: FakeHomeserver) -> list[Any]:
    return [r.content for r in homeserver.replays() if "/state/" in r.url.path]


async def test_a_send_action_that_lost_its_claim_while_waiting_sends_nothing(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """Replica A takes the send action of the leave X1 and waits on its newer-state check past
    the lease; replica B replays X1 (the lapsed claim) and then X2, the later state of the same
    key. When A's check answers, A must not put X1 again: the key's state stays X2's."""
    in_gate = asyncio.Event()
    gate = asyncio.Event()

    async def held_check(request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and "/state/" in request.url.path and not gate.is_set():
            in_gate.set()
            await gate.wait()
        return homeserver.handle(request)

    async def direct(request: httpx.Request) -> httpx.Response:
        return homeserver.handle(request)

    settings: dict[str, Any] = {"token_keys": new_key(), "claim_lease_seconds": 30}
    async with (
        app_and_client(database_url, clock, httpx.MockTransport(held_check), **settings) as (
            a,
            client,
        ),
        app_and_client(database_url, clock, httpx.MockTransport(direct), **settings) as (b, _),
    ):
        first = await schedule_state(client, 10_000, key=KEY, content={"n": 1})
        await schedule_state(client, 20_000, key=KEY, content={"n": 2})
        action = asyncio.create_task(act(client, first, "send", prefix=V1, headers=ALICE))
        await in_gate.wait()
        clock.advance(31_000)  # A's claim of X1 has lapsed; X2 is due
        assert await b.state.container.replay.run_due() == 2
        assert _state_puts(homeserver) == [b'{"n":1}', b'{"n":2}']
        gate.set()
        r = await action
        assert r.status_code == 200, r.text  # v1: a send of an event that was sent succeeds
    assert _state_puts(homeserver) == [b'{"n":1}', b'{"n":2}']
    assert homeserver.state[("!room:test", "m.call.member", KEY)]["content"] == {"n": 2}


async def test_the_next_state_of_a_key_is_woken_for_when_a_send_action_finalises_the_earlier(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """X2, the later state of X1's key, falls due while X1's send action is under way, so the
    clock's tick claims nothing and wakes next at X1's lease end. Once the action has written
    X1's outcome, X2 is claimable: the clock is set to wake now, not at the next sweep."""
    in_gate = asyncio.Event()
    gate = asyncio.Event()

    async def held_put(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and not gate.is_set():
            in_gate.set()
            await gate.wait()
        return homeserver.handle(request)

    async with app_and_client(database_url, clock, httpx.MockTransport(held_put)) as (a, client):
        first = await schedule_state(client, 10_000, key=KEY, content={"n": 1})
        await schedule_state(client, 12_000, key=KEY, content={"n": 2})
        action = asyncio.create_task(act(client, first, "send", prefix=V1, headers=ALICE))
        await in_gate.wait()
        clock.advance(13_000)  # X2 is due, but waits for X1
        scheduler = a.state.container.scheduler
        await scheduler.tick()
        assert (scheduler.wake_at or 0) > clock.now_ms()
        gate.set()
        assert (await action).status_code == 200
        assert scheduler.wake_at is not None
        assert scheduler.wake_at <= clock.now_ms()
