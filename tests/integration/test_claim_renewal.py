"""A replica working through a long batch keeps its claim: the lease is renewed as it goes, so no
other replica takes over events of a room it is still sending, nor one waiting for a request
slot; and it holds no more claimed events than its bound."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from app import repository_claims as claims_repo
from app import repository_due as due_repo
from app.crypto import new_key
from app.main import create_app
from tests.conftest import make_settings
from tests.integration.common import ALICE, enc, schedule_message, state_path
from tests.support.apps import app_and_client
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
                stolen.append(len(await due_repo.claim_due(conn, clock.now_ms(), LEASE_MS, 100)))
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
    await app.state.container.service.restarts.close()
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
    assert await app.state.container.replay.run_due() == 4
    assert stolen == [0, 0, 0, 0]
    assert len(homeserver.messages) == 4


async def test_events_claimed_while_a_renewal_is_on_its_way_stay_held(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(2):
        await schedule_message(client, 1000, txn=f"first{n}")
    # In another room: the first claim holds its room until its events are done.
    await schedule_message(client, 30_000, txn="later", room=enc("!other:test"))
    replay = app.state.container.replay
    engine = app.state.container.engine
    clock.advance(1000)
    async with engine.begin() as conn:
        first = await due_repo.claim_due(conn, clock.now_ms(), 60_000, 10)
    keeper = replay.new_keeper()
    keeper.add(first, clock.now_ms())
    clock.advance(29_000)  # past a third of the lease: the next check renews
    async with engine.begin() as conn:
        later = await due_repo.claim_due(conn, clock.now_ms(), 60_000, 10)
    assert len(later) == 1
    renew = claims_repo.renew_claims

    async def claim_meanwhile(
        conn: Any, held: list[tuple[str, str]], due_ts: int
    ) -> set[tuple[str, str]]:
        keeper.add(later, clock.now_ms())  # another claim of the run lands during the renewal
        return await renew(conn, held, due_ts)

    monkeypatch.setattr(claims_repo, "renew_claims", claim_meanwhile)
    assert await keeper.still_ours(first[0])
    assert await keeper.still_ours(later[0])
    assert await keeper.still_ours(first[1])


def _last_segment(request: httpx.Request) -> str:
    return request.url.raw_path.decode().partition("?")[0].rsplit("/", 1)[-1]


async def test_events_waiting_for_a_request_slot_keep_their_claims(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """One request at a time, each taking 2 s of a 3 s lease: five call-membership leaves in five
    rooms, all due at once, wait their turn for the one slot. Another replica looks for due
    events after every request of the first; it finds none, and each leave is sent once."""
    other: list[FastAPI] = []
    other_found: list[int | None] = []

    async def first(request: httpx.Request) -> httpx.Response:
        if "/rooms/" not in request.url.path:
            return homeserver.handle(request)
        clock.advance(2000)
        answer = homeserver.handle(request)
        other_found.append(await other[0].state.container.replay.run_due())
        return answer

    async def second(request: httpx.Request) -> httpx.Response:
        if "/rooms/" in request.url.path:
            clock.advance(2000)
        return homeserver.handle(request)

    settings: dict[str, Any] = {
        "replay_concurrency": 1,
        "claim_lease_seconds": 3,
        "token_keys": new_key(),  # the replicas share the key of the tokens at rest
    }
    async with (
        app_and_client(database_url, clock, httpx.MockTransport(first), **settings) as (a, c),
        app_and_client(database_url, clock, httpx.MockTransport(second), **settings) as (b, _),
    ):
        other.append(b)
        for n in range(5):
            r = await c.put(
                state_path(enc(f"@alice:test_DEV{n}"), room=enc(f"!r{n}:test"))
                + "?org.matrix.msc4140.delay=1000",
                json={},
                headers=ALICE,
            )
            assert r.status_code == 200, r.text
        clock.advance(1000)
        assert await a.state.container.replay.run_due() == 5
    puts = Counter(unquote(_last_segment(r)) for r in homeserver.replays())
    assert puts == {f"@alice:test_DEV{n}": 1 for n in range(5)}, puts
    assert set(other_found) == {0}, other_found


async def test_a_replica_holds_no_more_claimed_events_than_its_bound(
    database_url: str,
    clean_db: None,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """1,000 events due at once in 1,000 rooms, their outcome writes held back until as many
    events have been sent as the bound allows: at no time does the replica hold more claims
    than the bound (the rest stays free for other replicas); then all are sent, once."""
    bound = 100
    writes_open = asyncio.Event()
    held_at_sends: list[int] = []
    holder: list[FastAPI] = []

    async def claimed_now() -> int:
        async with holder[0].state.container.engine.connect() as conn:
            found = await conn.execute(
                text(
                    "SELECT count(*) FROM delayed_event "
                    "WHERE status = 'scheduled' AND claim_id IS NOT NULL"
                )
            )
            return int(found.scalar_one())

    async def gated(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            held_at_sends.append(await claimed_now())
            if len(held_at_sends) >= bound:
                writes_open.set()
        return homeserver.handle(request)

    write = claims_repo.finalise_sent_many

    async def held_back(conn: Any, outcomes: list[claims_repo.SentOutcome]) -> set[str]:
        await writes_open.wait()
        return await write(conn, outcomes)

    monkeypatch.setattr(claims_repo, "finalise_sent_many", held_back)
    async with app_and_client(
        database_url, clock, httpx.MockTransport(gated), replay_max_claimed=bound
    ) as (app, c):
        holder.append(app)
        await schedule_message(c, 1000, txn="t0")
        async with app.state.container.engine.begin() as conn:
            await conn.execute(
                text(
                    """
                    INSERT INTO delayed_event (delay_id, user_id, device_id, generation, room_id,
                        event_type, content, query, delay_ms, created_ts, send_ts, due_ts,
                        attempts, status)
                    SELECT e.delay_id || '-' || g, e.user_id, e.device_id, e.generation,
                        '!room' || g || chr(58) || 'test', e.event_type, e.content, e.query,
                        e.delay_ms, e.created_ts, e.send_ts, e.due_ts, 0, e.status
                    FROM delayed_event AS e, generate_series(1, 999) AS g
                    """
                )
            )
        clock.advance(1000)
        assert await app.state.container.replay.run_due() == 1000
    assert max(held_at_sends) <= bound, max(held_at_sends)
    paths = Counter(r.url.raw_path for r in homeserver.replays())
    assert len(paths) == 1000
    assert set(paths.values()) == {1}


async def test_a_claim_taken_again_stays_renewed_when_the_first_is_let_go(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock
) -> None:
    """The same event claimed twice by one run (its first claim lapsed meanwhile) is two claims:
    letting go of the first does not let go of the second, which is renewed as before."""
    await schedule_message(client, 1000)
    replay = app.state.container.replay
    engine = app.state.container.engine
    lease = replay.lease_ms
    clock.advance(1000)
    async with engine.begin() as conn:
        (first,) = await due_repo.claim_due(conn, clock.now_ms(), lease, 10)
    keeper = replay.new_keeper()
    keeper.add([first], clock.now_ms())
    clock.advance(lease + 1)  # the first claim lapses; the run claims the event again
    async with engine.begin() as conn:
        (again,) = await due_repo.claim_due(conn, clock.now_ms(), lease, 10)
    assert (again.delay_id, again.claim_id != first.claim_id) == (first.delay_id, True)
    keeper.add([again], clock.now_ms())
    keeper.done(first)  # the first copy is handled (its send found the claim gone)
    clock.advance(lease // 3)
    assert await keeper.still_ours(again)
    async with engine.connect() as conn:
        due_ts = (await conn.execute(text("SELECT due_ts FROM delayed_event"))).scalar_one()
    assert due_ts == clock.now_ms() + lease
    await keeper.close()
