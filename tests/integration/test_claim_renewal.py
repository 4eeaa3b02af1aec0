"""A replica working through a long batch keeps its claim: the lease is renewed as it goes, so no
other replica takes over events of a room it is still sending."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app import repository as repo
from app.main import create_app
from app.replayer import _ClaimKeeper
from tests.conftest import make_settings
from tests.integration.common import schedule_message
from tests.support.fakes import FakeClock, FakeHomeserver

LEASE_MS = 60_000


@pytest.fixture
async def slow_app(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> AsyncIterator[tuple[FastAPI, list[int]]]:
    """An app whose homeserver takes 40 s per event, during which another replica tries to
    claim due events; `stolen` counts what it got."""
    stolen: list[int] = []
    holder: list[FastAPI] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            clock.advance(40_000)
            engine = holder[0].state.container.engine
            async with engine.begin() as conn:
                stolen.append(len(await repo.claim_due(conn, clock.now_ms(), LEASE_MS, 100)))
        return homeserver.handle(request)

    app = create_app(
        make_settings(database_url, claim_lease_seconds=LEASE_MS / 1000),
        clock=clock,
        transport=httpx.MockTransport(handler),
        start_scheduler=False,
    )
    holder.append(app)
    yield app, stolen
    await app.state.container.homeserver.client.aclose()
    await app.state.container.engine.dispose()


async def test_lease_is_renewed_while_a_batch_is_sent(
    slow_app: tuple[FastAPI, list[int]], clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    app, stolen = slow_app
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar.test") as client:
        for n in range(4):
            await schedule_message(client, 1000, txn=f"t{n}")
    clock.advance(1000)
    assert await app.state.container.service.replayer.run_due() == 4
    assert stolen == [0, 0, 0, 0]
    assert len(homeserver.messages) == 4


async def test_events_claimed_while_a_renewal_is_on_its_way_stay_held(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(2):
        await schedule_message(client, 1000, txn=f"first{n}")
    await schedule_message(client, 30_000, txn="later")
    replayer = app.state.container.service.replayer
    engine = app.state.container.engine
    clock.advance(1000)
    async with engine.begin() as conn:
        first = await repo.claim_due(conn, clock.now_ms(), 60_000, 10)
    keeper = _ClaimKeeper(replayer)
    keeper.add(first, clock.now_ms())
    clock.advance(29_000)  # past a third of the lease: the next check renews
    async with engine.begin() as conn:
        later = await repo.claim_due(conn, clock.now_ms(), 60_000, 10)
    assert len(later) == 1
    renew = repo.renew_claims

    async def claim_meanwhile(conn: Any, held: list[tuple[str, str]], due_ts: int) -> set[str]:
        keeper.add(later, clock.now_ms())  # another claim of the run lands during the renewal
        return await renew(conn, held, due_ts)

    monkeypatch.setattr(repo, "renew_claims", claim_meanwhile)
    assert await keeper.still_ours(first[0])
    assert await keeper.still_ours(later[0])
    assert await keeper.still_ours(first[1])
