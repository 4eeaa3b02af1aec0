"""A room waits only for the homeserver's answers: outcomes of sent events are written in the
background, many to a statement, and newer-state checks run a few events ahead of the sends. The
order, the claim rules and exactly-once hold all the same."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from app import repository_claims as claims_repo
from app import repository_due as due_repo
from app.models import DelayedEvent
from tests.integration.common import (
    ALICE,
    BOB,
    ROOM,
    get_event,
    rows,
    run_due,
    schedule_message,
    schedule_state,
)
from tests.support.apps import app_and_client
from tests.support.fakes import FakeClock, FakeHomeserver

MEMBER = "m.call.member"


def app_with(
    handler: Callable[[httpx.Request], Awaitable[httpx.Response]],
    database_url: str,
    clock: FakeClock,
    **settings: Any,
) -> AbstractAsyncContextManager[tuple[FastAPI, httpx.AsyncClient]]:
    """An app whose homeserver is `handler` (which hands on to the fake homeserver after doing
    what the test needs), and a client for it."""
    return app_and_client(database_url, clock, httpx.MockTransport(handler), **settings)


def last_segment(request: httpx.Request) -> str:
    return request.url.raw_path.decode().partition("?")[0].rsplit("/", 1)[-1]


def _kinds(homeserver: FakeHomeserver) -> list[tuple[str, str]]:
    """(method, last path segment) of every room request, in arrival order."""
    seen = []
    for r in homeserver.requests:
        path = r.url.raw_path.decode().partition("?")[0]
        if "/rooms/" in path:
            seen.append((r.method, path.rsplit("/", 1)[-1]))
    return seen


async def test_outcomes_of_a_room_are_written_together_and_in_order(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [await schedule_message(client, 1000 + n, txn=f"t{n}") for n in range(6)]
    writes: list[list[str]] = []
    write = claims_repo.finalise_sent_many

    async def recording(conn: Any, outcomes: list[claims_repo.SentOutcome]) -> set[str]:
        writes.append([o.event.delay_id for o in outcomes])
        return await write(conn, outcomes)

    monkeypatch.setattr(claims_repo, "finalise_sent_many", recording)
    clock.advance(2000)
    assert await run_due(app) == 6
    # Sent one after the other, in send-time order...
    sent = [last_segment(r) for r in homeserver.replays()]
    assert sent == [f"msc4140.{delay_id}" for delay_id in ids]
    # ...every outcome written exactly once, in fewer statements than events when the room
    # outran the writer (never more than one per event).
    written = [delay_id for batch in writes for delay_id in batch]
    assert sorted(written) == sorted(ids)
    assert 1 <= len(writes) <= 6
    for delay_id in ids:
        item = await get_event(client, delay_id)
        assert item["outcome"] == "send"
        assert item["event_id"].startswith("$event")
    # The device's token was needed by nothing once all were sent: it is gone.
    async with app.state.container.engine.connect() as conn:
        left = (await conn.execute(text("SELECT count(*) FROM device_token"))).scalar_one()
    assert left == 0


async def test_a_failed_outcome_write_replays_the_events_once_the_lease_lapses(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = [await schedule_message(client, 1000, txn=f"t{n}") for n in range(3)]
    write = claims_repo.finalise_sent_many
    failures = [ConnectionError("database went away")]

    async def flaky(conn: Any, outcomes: list[claims_repo.SentOutcome]) -> set[str]:
        if failures:
            raise failures.pop()
        return await write(conn, outcomes)

    monkeypatch.setattr(claims_repo, "finalise_sent_many", flaky)
    clock.advance(1000)
    await run_due(app)
    stuck = [r for r in await rows(app) if r["status"] == "scheduled"]
    assert stuck, "the failed write left its events claimed, not finalised"
    assert all(r["claim_id"] is not None for r in stuck)
    # Nothing is due until the claim's lease runs out; then they are replayed with the same
    # transaction ids, and the homeserver takes them as the same events.
    assert await run_due(app) == 0
    clock.advance(int(app.state.container.settings.claim_lease_seconds * 1000))
    assert await run_due(app) == len(stuck)
    assert len(homeserver.messages) == 3
    for delay_id in ids:
        assert (await get_event(client, delay_id))["outcome"] == "send"


async def test_an_outcome_under_a_lapsed_claim_is_not_written(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock
) -> None:
    delay_id = await schedule_message(client, 1000)
    clock.advance(1000)
    engine = app.state.container.engine
    async with engine.begin() as conn:
        (event,) = await due_repo.claim_due(conn, clock.now_ms(), 60_000, 10)
        # Another replica's claim took the row over.
        await conn.execute(
            text("UPDATE delayed_event SET claim_id = 'other' WHERE delay_id = :d"),
            {"d": delay_id},
        )
        done = await claims_repo.finalise_sent_many(
            conn, [claims_repo.SentOutcome(event, "$late", "delay", clock.now_ms())]
        )
    assert done == set()
    (row,) = await rows(app)
    assert (row["status"], row["event_id"], row["claim_id"]) == ("scheduled", None, "other")


async def test_a_token_still_needed_is_kept_when_outcomes_are_written(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock
) -> None:
    await schedule_message(client, 1000, txn="soon")
    await schedule_message(client, 60_000, txn="later")
    clock.advance(1000)
    assert await run_due(app) == 1
    async with app.state.container.engine.connect() as conn:
        left = (await conn.execute(text("SELECT count(*) FROM device_token"))).scalar_one()
    assert left == 1


async def test_newer_state_checks_run_ahead_of_the_sends(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    keys = [f"k{n}" for n in range(6)]
    ids = {key: await schedule_state(client, 1000 + n, key=key) for n, key in enumerate(keys)}
    clock.advance(500)
    # Another user sets k3 after it was scheduled: k3 is cancelled, the others are sent.
    homeserver.state[(ROOM, MEMBER, "k3")] = {
        "event_id": "$bob",
        "room_id": ROOM,
        "type": MEMBER,
        "state_key": "k3",
        "sender": "@bob:test",
        "content": {"bob": True},
        "origin_server_ts": clock.now_ms(),
    }
    clock.advance(1500)
    assert await run_due(app) == 6
    seen = _kinds(homeserver)
    puts = [key for method, key in seen if method == "PUT"]
    # Call memberships, a key each, go out side by side: in no particular order among them.
    assert sorted(puts) == ["k0", "k1", "k2", "k4", "k5"]
    # Each key is checked once, before its own send; the check of k1 does not wait for k0's send.
    gets = [key for method, key in seen if method == "GET"]
    assert sorted(gets) == keys
    for key in puts:
        assert seen.index(("GET", key)) < seen.index(("PUT", key))
    assert seen.index(("GET", "k1")) < seen.index(("PUT", "k0"))
    assert homeserver.state[(ROOM, MEMBER, "k3")]["content"] == {"bob": True}
    item = await get_event(client, ids["k3"])
    assert item["error"]["errcode"] == "M_CANCELLED_BY_STATE_UPDATE"
    for key in puts:
        assert (await get_event(client, ids[key]))["outcome"] == "send"


async def test_a_failing_state_check_fails_only_its_event_and_it_is_retried(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = await schedule_state(client, 1000, key="a")
    second = await schedule_state(client, 1001, key="b")
    replay_engine = app.state.container.replay_engine
    check = replay_engine.newer_state
    broken = {"a"}

    async def sometimes_broken(event: DelayedEvent, credential: Any, *rest: Any) -> Any:
        if event.state_key in broken:
            broken.discard(event.state_key)
            raise RuntimeError("unexpected")
        return await check(event, credential, *rest)

    monkeypatch.setattr(replay_engine, "newer_state", sometimes_broken)
    clock.advance(2000)
    await run_due(app)
    assert (await get_event(client, second))["outcome"] == "send"
    # The first stays claimed until its lease lapses, then goes out like any due event.
    clock.advance(int(app.state.container.settings.claim_lease_seconds * 1000))
    assert await run_due(app) == 1
    assert (await get_event(client, first))["outcome"] == "send"
    assert homeserver.state[(ROOM, MEMBER, "a")]["content"] == {"state": "a"}


async def test_messages_of_a_room_still_wait_for_each_answer(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """A room's next send starts only once the previous one is answered: never two at once."""
    in_flight = 0
    most = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        if request.method != "PUT":
            return homeserver.handle(request)
        in_flight += 1
        most = max(most, in_flight)
        for _ in range(5):  # let anything else that could run, run
            await asyncio.sleep(0)
        in_flight -= 1
        return homeserver.handle(request)

    async with app_with(slow, database_url, clock) as (app, c):
        for n in range(5):
            await schedule_message(c, 1000, txn=f"t{n}", headers=ALICE)
        clock.advance(1000)
        assert await run_due(app) == 5
    assert most == 1
    assert len(homeserver.messages) == 5


async def test_call_memberships_of_a_room_go_out_side_by_side_within_the_limit(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """MatrixRTC leaves of one room (state that authorises nothing, a key each) are sent
    together, at most `replay_concurrency` requests at once; a power-level change and a message
    between them still go alone, in their place."""
    in_flight: set[str] = set()
    overlaps: dict[str, set[str]] = {}
    most = 0
    three_at_once = asyncio.Event()
    first_group = {"a", "b", "c", "d"}

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal most
        if request.method != "PUT":
            return homeserver.handle(request)
        name = last_segment(request)
        in_flight.add(name)
        most = max(most, len(in_flight))
        if len(in_flight) == 3:
            three_at_once.set()
        if name in first_group:
            # The first group's sends are held until three are at the homeserver together (a
            # run that never sends them side by side fails `most == 3` below).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(three_at_once.wait(), timeout=10)
        for _ in range(10):
            await asyncio.sleep(0)
            for other in in_flight:
                overlaps.setdefault(other, set()).update(in_flight - {other})
        in_flight.discard(name)
        return homeserver.handle(request)

    plan = [
        ("a", MEMBER),
        ("b", MEMBER),
        ("c", MEMBER),
        ("d", MEMBER),
        ("pl", "m.room.power_levels"),
    ]
    plan += [("e", MEMBER), ("f", MEMBER)]
    async with app_with(slow, database_url, clock, replay_concurrency=3) as (app, c):
        for n, (key, kind) in enumerate(plan):
            await schedule_state(c, 1000 + n, key=key, kind=kind)
        await schedule_message(c, 1000 + len(plan), txn="msg")
        await schedule_state(c, 1001 + len(plan), key="g")
        clock.advance(2000)
        assert await run_due(app) == len(plan) + 2
    assert most == 3  # side by side, but never more than the limit
    assert any(len(overlaps.get(key, set()) & first_group) >= 2 for key in first_group)
    # The power-level change and the message each went alone...
    assert not overlaps.get("pl")
    assert not any(seen for name, seen in overlaps.items() if name.startswith("msc4140."))
    # ...and in their place: nothing before them came after, nothing after came before.
    puts = [
        r.url.raw_path.decode().partition("?")[0].rsplit("/", 1)[-1] for r in homeserver.replays()
    ]
    assert set(puts[:4]) == {"a", "b", "c", "d"}
    assert puts[4] == "pl"
    assert set(puts[5:7]) == {"e", "f"}
    assert puts[7].startswith("msc4140.")
    assert puts[8] == "g"


async def test_a_long_room_does_not_hold_up_an_event_that_falls_due_meanwhile(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """A run claims again when it is told something fell due, while it is still working through
    a busy room: the other room's event goes out before the busy room is done."""
    holder: list[FastAPI] = []
    answers: list[Any] = []
    other_sent = asyncio.Event()
    busy_sends = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal busy_sends
        if request.method == "PUT" and "other" in request.url.raw_path.decode():
            other_sent.set()
        elif request.method == "PUT":
            busy_sends += 1
            clock.advance(1000)  # each send in the busy room takes a second
            # The clock's wake-up for the other room's event: the run is going on, so it pokes.
            answers.append(await holder[0].state.container.replay.run_due())
            if busy_sends == 3:
                # The other room's event is due by now; it goes out while this send is slow.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(other_sent.wait(), timeout=5)
        return homeserver.handle(request)

    async with app_with(slow, database_url, clock) as (app, c):
        holder.append(app)
        for n in range(6):
            await schedule_message(c, 1000, txn=f"busy{n}")
        other = await schedule_message(c, 2500, txn="other", room="%21other%3Atest")
        clock.advance(1000)
        assert await run_due(app) == 7
        assert (await get_event(c, other))["outcome"] == "send"
    assert set(answers) == {None}
    sent = [last_segment(r) for r in homeserver.replays()]
    assert len(sent) == 7
    other_at = sent.index(f"msc4140.{other}")
    assert other_at < 6, f"the other room's event waited for the busy room: {other_at}"


async def test_a_state_event_waiting_for_its_key_sets_no_wake_up(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """While an earlier state event of the same key waits for a retry, the later one, though
    past its time, wants no wake-up: only the retry does (else the clock would spin)."""
    await schedule_state(client, 1000, key="k", content={"n": 1})
    await schedule_state(client, 2000, key="k", content={"n": 2})
    homeserver.fail_next.append(httpx.Response(503, json={"errcode": "M_UNKNOWN", "error": "x"}))
    clock.advance(3000)
    assert await run_due(app) == 1
    replay = app.state.container.replay
    (retry,) = [r for r in await rows(app) if r["attempts"] == 1]
    assert retry["due_ts"] > clock.now_ms()
    assert await replay.next_due() == retry["due_ts"]
    # Once the earlier one is sent, the later one is claimed in the same run.
    clock.advance(retry["due_ts"] - clock.now_ms())
    assert await run_due(app) == 2
    assert homeserver.state[(ROOM, MEMBER, "k")]["content"] == {"n": 2}
    assert await replay.next_due() is None


async def test_a_run_lets_go_of_a_device_token_once_its_events_are_handled(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """A run can go on as long as events keep falling due; it holds a device's sealed token only
    while events of that device are queued or being sent."""
    holder: list[FastAPI] = []
    held: list[set[tuple[str, str | None]]] = []
    alice = ("@alice:test", "ALICEDEV")

    async def watch(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT" and "other" in request.url.raw_path.decode():
            run = holder[0].state.container.replay.run
            assert run is not None
            held.append(run.devices())
            if len(held) == 8:
                # Give alice's outcome time to be written (real database I/O), then look again.
                for _ in range(500):
                    if alice not in run.devices():
                        break
                    await asyncio.sleep(0.01)
                held.append(run.devices())
        return homeserver.handle(request)

    async with app_with(watch, database_url, clock) as (app, c):
        holder.append(app)
        await schedule_message(c, 1000, txn="alice")
        for n in range(8):
            await schedule_message(c, 1000, txn=f"b{n}", headers=BOB, room="%21other%3Atest")
        clock.advance(1000)
        assert await run_due(app) == 9
    bob = ("@bob:test", "BOBDEV")
    assert all(bob in devices for devices in held)
    assert alice in held[0]  # claimed together
    assert alice not in held[-1]  # her one event was handled long before bob's last


async def test_a_run_goes_on_when_the_next_due_time_cannot_be_read(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While rooms are busy the run asks for the next due time to set its wake-up; if the
    database can't answer, the sweep finds the next event instead, and this run still ends."""
    for n in range(3):
        await schedule_message(client, 1000, txn=f"t{n}", room=f"%21r{n}%3Atest")
    replay = app.state.container.replay

    async def unreadable() -> int | None:
        raise ConnectionError("database went away")

    monkeypatch.setattr(replay, "next_due", unreadable)
    clock.advance(1000)
    assert await run_due(app) == 3
    assert len(homeserver.messages) == 3
    assert "looking up the next due event failed" in caplog.text
