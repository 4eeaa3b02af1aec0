"""What the send action answers when its replay does not simply succeed: newer state, a homeserver
404, a homeserver rate limit. Each answer must mean to the caller what happened to the event."""

from __future__ import annotations

import math

import httpx
import pytest
from fastapi import FastAPI

from tests.integration.common import (
    ALICE,
    ROOM,
    UNSTABLE,
    V1,
    act,
    assert_error,
    get_event,
    rows,
    run_due,
    schedule_message,
    schedule_state,
)
from tests.support.fakes import FakeClock, FakeHomeserver


@pytest.mark.parametrize(
    ("prefix", "headers", "status", "errcode"),
    [(UNSTABLE, None, 404, "M_NOT_FOUND"), (V1, ALICE, 409, "M_UNKNOWN")],
    ids=["unstable", "v1"],
)
async def test_a_send_action_that_finds_newer_state_answers_as_for_a_cancelled_event(
    client: httpx.AsyncClient,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
    headers: dict[str, str] | None,
    status: int,
    errcode: str,
) -> None:
    """The event is finalised as cancelled: the unstable paths answer 404 as for any finalised
    event (MatrixRTC then sends its leave itself), v1 answers send-on-cancelled's 409."""
    delay_id = await schedule_state(client, 60_000, key="k")
    clock.advance(10)
    homeserver.state[(ROOM, "m.call.member", "k")] = {
        "sender": "@bob:test",
        "origin_server_ts": clock.now_ms(),
        "content": {},
    }
    r = await act(client, delay_id, "send", prefix=prefix, headers=headers)
    assert_error(r, status, errcode)
    item = await get_event(client, delay_id)
    assert (item["outcome"], item["error"]["errcode"]) == ("cancel", "M_CANCELLED_BY_STATE_UPDATE")
    # The answer is the one a repeat of the action gets now.
    again = await act(client, delay_id, "send", prefix=prefix, headers=headers)
    assert (again.status_code, again.json()["errcode"]) == (status, errcode)


@pytest.mark.parametrize(
    "refusal",
    [
        {"errcode": "M_NOT_FOUND", "error": "Unknown room"},
        {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"},
    ],
    ids=["not_found", "unrecognized"],
)
@pytest.mark.parametrize(("prefix", "headers"), [(UNSTABLE, None), (V1, ALICE)], ids=["A", "B"])
async def test_a_homeserver_404_is_not_relayed_as_the_delayed_event_being_gone(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
    headers: dict[str, str] | None,
    refusal: dict[str, str],
) -> None:
    """A 404 from the homeserver would read as "no such delayed event" (MatrixRTC schedules
    another leave) while the event stays scheduled and fires on its timer: it is answered as a
    gateway error naming the homeserver's refusal instead."""
    delay_id = await schedule_message(client, 60_000)
    homeserver.fail_next.append(httpx.Response(404, json=refusal))
    r = await act(client, delay_id, "send", prefix=prefix, headers=headers)
    body = assert_error(r, 502, "M_UNKNOWN")
    assert refusal["errcode"] in body["error"]
    assert refusal["error"] in body["error"]
    assert "outcome" not in await get_event(client, delay_id)
    clock.advance(60_000)
    assert await run_due(app) == 1
    assert len(homeserver.messages) == 1


@pytest.mark.parametrize(("prefix", "headers"), [(UNSTABLE, None), (V1, ALICE)], ids=["A", "B"])
async def test_a_homeserver_rate_limit_is_answered_as_a_rate_limit(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
    headers: dict[str, str] | None,
) -> None:
    """js-sdk backs off on 429 only: the caller gets 429 with the time of the retry that is
    scheduled for the event, as `Retry-After` and `retry_after_ms`."""
    delay_id = await schedule_message(client, 60_000)
    homeserver.fail_next.append(
        httpx.Response(
            429, json={"errcode": "M_LIMIT_EXCEEDED", "error": "slow", "retry_after_ms": 2000}
        )
    )
    r = await act(client, delay_id, "send", prefix=prefix, headers=headers)
    body = assert_error(r, 429, "M_LIMIT_EXCEEDED")
    [row] = await rows(app)
    retry_in = row["due_ts"] - clock.now_ms()
    assert retry_in > 0
    assert body["retry_after_ms"] == retry_in
    assert r.headers["Retry-After"] == str(math.ceil(retry_in / 1000))
    assert "outcome" not in await get_event(client, delay_id)
    # The retry is the event's own: sent once it is due, long before its original time.
    clock.advance(retry_in)
    assert await run_due(app) == 1
    assert len(homeserver.messages) == 1
    assert (await get_event(client, delay_id))["outcome"] == "send"


async def test_a_homeserver_rate_limit_without_a_time_still_says_when_the_retry_is(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_message(client, 60_000)
    homeserver.fail_next.append(httpx.Response(429, json={"errcode": "M_LIMIT_EXCEEDED"}))
    r = await act(client, delay_id, "send", prefix=V1, headers=ALICE)
    body = assert_error(r, 429, "M_LIMIT_EXCEEDED")
    [row] = await rows(app)
    assert body["retry_after_ms"] == row["due_ts"] - clock.now_ms() > 0
    assert int(r.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("settings_overrides", [{"retry_max_backoff_seconds": 0.0001}])
async def test_a_rate_limit_whose_retry_is_due_at_once_still_says_to_wait(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """The event's retry is due now (no backoff left): the answer still asks the caller to wait
    a moment, never `Retry-After: 0`, which clients read as "again at once"."""
    delay_id = await schedule_message(client, 60_000)
    homeserver.fail_next.append(
        httpx.Response(
            429, json={"errcode": "M_LIMIT_EXCEEDED", "error": "slow", "retry_after_ms": 2000}
        )
    )
    r = await act(client, delay_id, "send", prefix=V1, headers=ALICE)
    body = assert_error(r, 429, "M_LIMIT_EXCEEDED")
    [row] = await rows(app)
    assert row["due_ts"] == clock.now_ms()  # the retry is due at once
    assert body["retry_after_ms"] >= 1
    assert int(r.headers["Retry-After"]) >= 1
