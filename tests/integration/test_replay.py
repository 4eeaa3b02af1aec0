"""Replaying delayed events to the homeserver: as whom, with which transaction id, how failures are
retried or finalised, in which order, and the newer-state rule."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from tests.integration.common import (
    ALICE,
    ALICE_2,
    ALICE_PHONE,
    BOB,
    ROOM,
    ROOM_PATH,
    UNSTABLE,
    V1,
    act,
    bearer,
    enc,
    get_event,
    rows,
    run_due,
    schedule_b,
    schedule_message,
    schedule_state,
    state_path,
)
from tests.support.fakes import FakeClock, FakeHomeserver

MEMBER = "m.call.member"


def unavailable(status: int = 503) -> httpx.Response:
    return httpx.Response(status, json={"errcode": "M_UNKNOWN", "error": "try later"})


# Credentials ----------------------------------------------------------------------------------


async def test_replay_as_scheduling_user_and_device(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    await schedule_message(client, 100, txn="a", headers=ALICE)
    await schedule_message(client, 100, txn="p", headers=ALICE_PHONE)
    await schedule_message(client, 100, txn="b", headers=BOB)
    clock.advance(100)
    assert await run_due(app) == 3
    assert sorted(bearer(r) for r in homeserver.replays()) == sorted(
        ["alice_token", "alice_phone", "bob_token"]
    )
    senders = sorted(m["sender"] for m in homeserver.messages.values())
    assert senders == ["@alice:test", "@alice:test", "@bob:test"]


@pytest.mark.parametrize(
    "refresh",
    ["schedule", "repeated-txn", "restart", "list", "get"],
)
async def test_newest_token_of_the_device_is_used(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    refresh: str,
) -> None:
    delay_id = await schedule_message(client, 1000, txn="a", headers=ALICE)
    if refresh == "schedule":
        await schedule_message(client, 5000, txn="b", headers=ALICE_2)
    elif refresh == "repeated-txn":
        assert await schedule_message(client, 1000, txn="a", headers=ALICE_2) == delay_id
    elif refresh == "restart":
        r = await act(client, delay_id, "restart", prefix=V1, headers=ALICE_2)
        assert r.status_code == 200, r.text
    elif refresh == "list":
        r = await client.get(f"{UNSTABLE}/delayed_events", headers=ALICE_2)
        assert r.status_code == 200, r.text
    else:
        r = await client.get(f"{V1}/delayed_events/{delay_id}", headers=ALICE_2)
        assert r.status_code == 200, r.text
    # Another device of the same user keeps its own token.
    await schedule_message(client, 1000, txn="c", headers=ALICE_PHONE)
    clock.advance(1000)
    assert await run_due(app) == 2
    tokens = sorted(bearer(r) for r in homeserver.replays())
    assert tokens == ["alice_phone", "alice_token_2"]


async def test_tokenless_action_does_not_change_the_token(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_message(client, 1000, headers=ALICE)
    assert (await act(client, delay_id, "restart")).status_code == 200
    clock.advance(1000)
    assert await run_due(app) == 1
    [replay] = homeserver.replays()
    assert bearer(replay) == "alice_token"


async def test_token_is_not_stored_in_clear(client: httpx.AsyncClient, app: FastAPI) -> None:
    await schedule_message(client, 1000)
    async with app.state.container.engine.connect() as conn:
        from sqlalchemy import text

        result = await conn.execute(text("SELECT token, digest FROM device_token"))
        [(token, digest)] = list(result)
    assert b"alice_token" not in bytes(token)
    assert b"alice_token" not in bytes(digest)


# Transaction ids ------------------------------------------------------------------------------


async def test_retried_message_uses_the_same_txn(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_message(client, 1000, content={"body": "once"})
    homeserver.fail_next.append(unavailable(502))
    clock.advance(1000)
    assert await run_due(app) == 1
    assert homeserver.messages == {}
    clock.advance(60_000)
    assert await run_due(app) == 1
    first, second = homeserver.replays()
    assert first.url.raw_path == second.url.raw_path
    assert first.url.raw_path.decode().startswith(
        f"/_matrix/client/v3/rooms/{ROOM_PATH}/send/m.room.message/"
    )
    assert delay_id in first.url.raw_path.decode()
    [message] = homeserver.messages.values()
    assert message["content"] == {"body": "once"}
    item = await get_event(client, delay_id)
    assert (item["outcome"], item["event_id"]) == ("send", message["event_id"])


async def test_txn_differs_between_events(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    # The client used the same txn id on two devices; the replays must not collapse.
    await schedule_message(client, 10, txn="same", headers=ALICE)
    await schedule_message(client, 10, txn="same", headers=ALICE_2)  # same device: same event
    await schedule_message(client, 10, txn="same", headers=ALICE_PHONE)
    clock.advance(10)
    assert await run_due(app) == 2
    paths = {r.url.raw_path for r in homeserver.replays()}
    assert len(paths) == 2
    assert len(homeserver.messages) == 2


async def test_replay_content_and_type_unchanged(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    content = {"body": "ünï ✓", "nested": {"list": [1, 2.5, None, True]}, "big": 2**60}
    r = await schedule_b(client, {"delay_ms": 0, "content": content}, kind="org.example.custom")
    assert r.status_code == 200, r.text
    assert await run_due(app) == 1
    [message] = homeserver.messages.values()
    assert message["content"] == content
    assert message["type"] == "org.example.custom"
    [replay] = homeserver.replays()
    assert replay.headers["content-type"] == "application/json"


# Failures -------------------------------------------------------------------------------------


def failure_status(failure: httpx.Response | Exception) -> int | None:
    return failure.status_code if isinstance(failure, httpx.Response) else None


@pytest.mark.parametrize(
    "failure",
    [
        unavailable(500),
        unavailable(502),
        unavailable(503),
        httpx.Response(504, content=b"gateway timeout"),
        httpx.Response(200, json={"no": "event id"}),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
    ],
    ids=["500", "502", "503", "504-not-json", "200-no-event-id", "connect", "timeout"],
)
async def test_transient_failures_are_retried(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    failure: httpx.Response | Exception,
) -> None:
    delay_id = await schedule_state(client, 1000, key="k", content={"v": 1})
    homeserver.fail_next += [failure, failure]
    clock.advance(1000)
    assert await run_due(app) == 1
    [row] = await rows(app)
    assert row["status"] == "scheduled"
    assert row["attempts"] == 1
    first_retry = row["due_ts"] - clock.now_ms()
    assert first_retry > 0
    listed = await client.get(f"{UNSTABLE}/delayed_events", headers=ALICE)
    # An answer that may have come after the homeserver took the event leaves it in doubt: being
    # sent, not listed as scheduled, until the retry settles it.
    in_doubt = isinstance(failure, httpx.ReadTimeout) or failure_status(failure) in (200, 504)
    assert [e["delay_id"] for e in listed.json()["delayed_events"]] == (
        [] if in_doubt else [delay_id]
    )
    # Not retried before its time.
    clock.advance(first_retry - 1)
    assert await run_due(app) == 0
    clock.advance(1)
    assert await run_due(app) == 1
    [row] = await rows(app)
    assert row["attempts"] == 2
    # Backing off: the second wait is longer than the first.
    assert row["due_ts"] - clock.now_ms() > first_retry
    clock.advance(row["due_ts"] - clock.now_ms())
    assert await run_due(app) == 1
    assert homeserver.state[(ROOM, MEMBER, "k")]["content"] == {"v": 1}
    assert (await get_event(client, delay_id))["outcome"] == "send"


async def test_rate_limited_replay_waits_as_told(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    await schedule_message(client, 1000)
    homeserver.fail_next.append(
        httpx.Response(
            429, json={"errcode": "M_LIMIT_EXCEEDED", "error": "slow", "retry_after_ms": 7000}
        )
    )
    clock.advance(1000)
    assert await run_due(app) == 1
    clock.advance(6999)
    assert await run_due(app) == 0
    assert homeserver.messages == {}
    clock.advance(1)
    assert await run_due(app) == 1
    assert len(homeserver.messages) == 1


@pytest.mark.parametrize("settings_overrides", [{"retry_window_seconds": 10}])
async def test_gives_up_after_the_retry_window(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_message(client, 1000)
    failure = httpx.Response(503, json={"errcode": "M_UNAVAILABLE", "error": "down"})
    homeserver.fail_next += [failure] * 100
    clock.advance(1000)
    first_failure = clock.now_ms()
    attempts = 0
    while (await rows(app))[0]["status"] == "scheduled":
        assert await run_due(app) == 1
        attempts += 1
        row = (await rows(app))[0]
        if row["due_ts"] is not None:
            # Never later than the end of the window.
            assert row["due_ts"] <= first_failure + 10_000
            clock.ms = row["due_ts"]
        assert attempts < 50
    assert attempts > 1
    assert clock.now_ms() == first_failure + 10_000
    item = await get_event(client, delay_id)
    assert (item["outcome"], item["reason"]) == ("cancel", "error")
    assert item["error"]["errcode"] == "M_UNAVAILABLE"
    assert homeserver.messages == {}
    assert await run_due(app) == 0


@pytest.mark.parametrize(
    ("status", "errcode"),
    [(403, "M_FORBIDDEN"), (400, "M_BAD_JSON"), (404, "M_NOT_FOUND"), (401, "M_UNKNOWN_TOKEN")],
)
async def test_refusals_are_final(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    status: int,
    errcode: str,
) -> None:
    delay_id = await schedule_state(client, 1000, key="k")
    homeserver.fail_next.append(
        httpx.Response(status, json={"errcode": errcode, "error": "refused"})
    )
    clock.advance(1000)
    assert await run_due(app) == 1
    item = await get_event(client, delay_id)
    assert (item["outcome"], item["reason"]) == ("cancel", "error")
    assert item["error"] == {"errcode": errcode, "error": "refused"}
    assert item["finalised"]["error"] == item["error"]
    clock.advance(3_600_000)
    assert await run_due(app) == 0
    assert len(homeserver.replays()) == 1
    assert homeserver.state == {}


async def test_refusal_without_matrix_body(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_message(client, 0)
    homeserver.fail_next.append(httpx.Response(403, content=b"<html>nope</html>"))
    assert await run_due(app) == 1
    item = await get_event(client, delay_id)
    assert item["outcome"] == "cancel"
    assert isinstance(item["error"]["errcode"], str)
    assert isinstance(item["error"]["error"], str)


# Order ----------------------------------------------------------------------------------------


async def test_overdue_events_replay_in_send_time_order(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    await schedule_state(client, 3000, key="k", content={"n": 3})
    await schedule_state(client, 1000, key="k", content={"n": 1})
    await schedule_message(client, 2000, txn="m", content={"n": 2})
    await schedule_state(client, 2500, key="k", content={"n": 2.5})
    clock.advance(60_000)
    assert await run_due(app) == 4
    order = [
        httpx.Request("PUT", "http://x", content=r.content).content for r in homeserver.replays()
    ]
    assert order == [b'{"n":1}', b'{"n":2}', b'{"n":2.5}', b'{"n":3}']
    # The latest send time wins the state.
    assert homeserver.state[(ROOM, MEMBER, "k")]["content"] == {"n": 3}


# Newer state ----------------------------------------------------------------------------------


def set_state(
    homeserver: FakeHomeserver, clock: FakeClock, sender: str, key: str = "k", ts: int = 0
) -> None:
    homeserver.state[(ROOM, MEMBER, key)] = {
        "event_id": "$manual",
        "room_id": ROOM,
        "type": MEMBER,
        "state_key": key,
        "sender": sender,
        "content": {"manual": True},
        "origin_server_ts": ts or clock.now_ms(),
    }


async def test_newer_state_by_another_user_cancels(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_state(client, 5000, key="k")
    clock.advance(1000)
    set_state(homeserver, clock, "@bob:test")
    clock.advance(4000)
    assert await run_due(app) == 1
    assert homeserver.replays() == []
    assert homeserver.state[(ROOM, MEMBER, "k")]["content"] == {"manual": True}
    item = await get_event(client, delay_id)
    assert (item["outcome"], item["reason"]) == ("cancel", "error")
    assert item["error"]["errcode"] == "M_CANCELLED_BY_STATE_UPDATE"


async def test_older_state_by_another_user_does_not_cancel(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    set_state(homeserver, clock, "@bob:test")
    clock.advance(1)
    delay_id = await schedule_state(client, 5000, key="k")
    clock.advance(5000)
    assert await run_due(app) == 1
    assert homeserver.state[(ROOM, MEMBER, "k")]["content"] == {"state": "k"}
    assert (await get_event(client, delay_id))["outcome"] == "send"


async def test_own_newer_state_does_not_cancel(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_state(client, 5000, key="k")
    clock.advance(1000)
    set_state(homeserver, clock, "@alice:test")
    clock.advance(4000)
    assert await run_due(app) == 1
    assert homeserver.state[(ROOM, MEMBER, "k")]["content"] == {"state": "k"}
    assert (await get_event(client, delay_id))["outcome"] == "send"


async def test_newer_state_for_another_key_does_not_cancel(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_state(client, 5000, key="k")
    clock.advance(1000)
    set_state(homeserver, clock, "@bob:test", key="other")
    clock.advance(4000)
    assert await run_due(app) == 1
    assert (await get_event(client, delay_id))["outcome"] == "send"


@pytest.mark.parametrize("settings_overrides", [{"cancel_on_newer_state": False}])
async def test_newer_state_rule_can_be_turned_off(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_state(client, 5000, key="k")
    clock.advance(1000)
    set_state(homeserver, clock, "@bob:test")
    r = await client.put(state_path("k"), json={"bob": 1}, headers=BOB)
    assert r.status_code == 200
    clock.advance(4000)
    assert await run_due(app) == 1
    assert homeserver.state[(ROOM, MEMBER, "k")]["content"] == {"state": "k"}
    assert (await get_event(client, delay_id))["outcome"] == "send"
    # No state lookups at all while the rule is off.
    assert not [r for r in homeserver.requests if r.method == "GET" and "/state/" in r.url.path]


async def test_newer_state_on_send_action_is_a_conflict(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_state(client, 5000, key="k")
    clock.advance(1000)
    set_state(homeserver, clock, "@bob:test")
    r = await act(client, delay_id, "send", prefix=V1, headers=ALICE)
    assert r.status_code == 409
    assert r.json()["errcode"] == "M_UNKNOWN"
    assert homeserver.replays() == []
    item = await get_event(client, delay_id)
    assert item["error"]["errcode"] == "M_CANCELLED_BY_STATE_UPDATE"


@pytest.mark.parametrize("key", ["k", "_@bob:test_BOBDEV/ü"])
async def test_passed_through_state_by_another_user_cancels(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    key: str,
) -> None:
    delay_id = await schedule_state(client, 5000, key=key)
    other_key = await schedule_state(client, 5000, key=key + "x")
    message = await schedule_message(client, 5000)
    bobs_own = await schedule_state(client, 5000, key=key, headers=BOB)
    clock.advance(1000)
    r = await client.put(state_path(enc(key)), json={"bob": True}, headers=BOB)
    assert r.status_code == 200
    item = await get_event(client, delay_id)
    assert (item["outcome"], item["reason"]) == ("cancel", "error")
    assert item["error"]["errcode"] == "M_CANCELLED_BY_STATE_UPDATE"
    assert item["finalised_ts"] == clock.now_ms()
    for untouched in (other_key, message):
        assert "outcome" not in await get_event(client, untouched)
    assert "outcome" not in await get_event(client, bobs_own, headers=BOB)
    clock.advance(4000)
    assert await run_due(app) == 3


async def test_passed_through_own_state_does_not_cancel(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_state(client, 5000, key="k")
    r = await client.put(state_path("k"), json={"alive": True}, headers=ALICE_PHONE)
    assert r.status_code == 200
    assert "outcome" not in await get_event(client, delay_id)
    clock.advance(5000)
    assert await run_due(app) == 1
    assert homeserver.state[(ROOM, MEMBER, "k")]["content"] == {"state": "k"}


async def test_refused_passed_through_state_does_not_cancel(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_state(client, 5000, key="k")
    homeserver.fail_next.append(httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "x"}))
    r = await client.put(state_path("k"), json={}, headers=BOB)
    assert r.status_code == 403
    assert "outcome" not in await get_event(client, delay_id)
