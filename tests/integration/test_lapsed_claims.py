"""A replica that dies after the homeserver took an event, before writing the outcome, leaves a
claim whose lease runs out. What happened to the event is then unknown until another replay asks
the homeserver (which answers a repeated transaction with the first event): until then it counts
as being sent, so a restart or cancel must not be told it took effect."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from app import repository as repo
from tests.integration.common import ALICE, UNSTABLE, V1, act, get_event, run_due, schedule_message
from tests.support.fakes import FakeClock, FakeHomeserver


async def _claim_and_die(app: FastAPI, clock: FakeClock) -> None:
    """What a replica does before it is killed mid-replay: claim, send, and record nothing."""
    container = app.state.container
    lease_ms = int(container.settings.claim_lease_seconds * 1000)
    async with container.engine.begin() as conn:
        claimed = await repo.claim_due(conn, clock.now_ms(), lease_ms, 10)
    assert len(claimed) == 1
    clock.advance(lease_ms + 1)


@pytest.mark.parametrize(
    ("prefix", "action", "status"),
    [
        (UNSTABLE, "restart", 404),
        (UNSTABLE, "cancel", 404),
        (V1, "restart", 409),
        (V1, "cancel", 409),
    ],
)
async def test_an_action_after_a_lapsed_claim_does_not_take_effect(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
    action: str,
    status: int,
) -> None:
    delay_id = await schedule_message(client, 1000)
    clock.advance(1000)
    await _claim_and_die(app, clock)
    r = await act(client, delay_id, action, prefix=prefix, headers=ALICE)
    assert r.status_code == status, r.text
    # The next replay settles it: sent, once.
    assert await run_due(app) == 1
    assert len(homeserver.messages) == 1
    item = await get_event(client, delay_id)
    assert item["outcome"] == "send"
