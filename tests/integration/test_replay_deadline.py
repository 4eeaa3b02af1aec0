"""A replay's request has a deadline of its own. httpx's timeout bounds each wait for bytes, not
the whole answer: a homeserver (or anything on the way) that answers a byte at a time keeps a
request open for ever, and with the claim renewed while it is held, the event would be neither
sent, finalised nor taken over by another replica, and its request slot lost. Here the fake
transport simply never answers (it enforces no timeout at all), which is the same to the
replay."""

from __future__ import annotations

import asyncio

import httpx

from tests.integration.common import rows, schedule_message, schedule_state
from tests.support.apps import app_and_client
from tests.support.fakes import FakeClock, FakeHomeserver

# Only a guard against the test itself hanging: the replay ends after its 0.05 s deadline.
HANG_GUARD_SECONDS = 60


async def test_a_replay_whose_answer_never_ends_is_retried_in_doubt(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    never = asyncio.Event()

    async def hangs(request: httpx.Request) -> httpx.Response:
        if "/rooms/" in request.url.path:
            await never.wait()
        return homeserver.handle(request)

    async with app_and_client(
        database_url, clock, httpx.MockTransport(hangs), homeserver_timeout_seconds=0.05
    ) as (app, client):
        await schedule_message(client, 1000)
        await schedule_state(client, 1000, key="k")
        clock.advance(1000)
        replay = app.state.container.replay
        handled = await asyncio.wait_for(replay.run_due(), HANG_GUARD_SECONDS)
        assert handled == 2
        stored = await rows(app)
    assert [row["status"] for row in stored] == ["scheduled", "scheduled"]
    assert [row["attempts"] for row in stored] == [1, 1]
    assert all(row["claim_id"].startswith("doubt-") for row in stored), stored
