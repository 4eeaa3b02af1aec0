"""Managing delayed events: send, cancel and restart, in the split and body forms, on the unstable
prefix (token optional, finalised events not found) and on v1 (token required, 200/409)."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from tests.integration.common import (
    ALICE,
    BOB,
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
    stored,
)
from tests.support.fakes import FakeClock, FakeHomeserver

FORMS = [
    pytest.param(UNSTABLE, False, id="unstable-split"),
    pytest.param(UNSTABLE, True, id="unstable-body"),
    pytest.param(V1, False, id="v1-split"),
    pytest.param(V1, True, id="v1-body"),
]


@pytest.mark.parametrize(("prefix", "body_form"), FORMS)
async def test_restart_moves_send_time(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
    body_form: bool,
) -> None:
    start = clock.now_ms()
    delay_id = await schedule_message(client, 10_000)
    clock.advance(6000)
    r = await act(client, delay_id, "restart", prefix=prefix, headers=ALICE, body_form=body_form)
    assert r.status_code == 200, r.text
    assert r.json() == {}
    item = await get_event(client, delay_id)
    assert item["running_since"] == start + 6000
    assert item["delayed_since_ts"] == item["scheduled_at"] == start + 6000
    assert item["delay_ms"] == 10_000
    clock.advance(4000)  # the original send time
    assert await run_due(app) == 0
    assert homeserver.messages == {}
    clock.advance(5999)
    assert await run_due(app) == 0
    clock.advance(1)
    assert await run_due(app) == 1
    assert len(homeserver.messages) == 1


@pytest.mark.parametrize(("prefix", "body_form"), FORMS)
async def test_cancel_is_never_sent(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
    body_form: bool,
) -> None:
    delay_id = await schedule_state(client, 1000, key="k")
    r = await act(client, delay_id, "cancel", prefix=prefix, headers=ALICE, body_form=body_form)
    assert r.status_code == 200, r.text
    assert r.json() == {}
    clock.advance(10_000)
    assert await run_due(app) == 0
    assert homeserver.replays() == []
    assert homeserver.state == {}
    item = await get_event(client, delay_id)
    assert (item["outcome"], item["reason"]) == ("cancel", "action")
    assert "event_id" not in item
    assert item["finalised_ts"] == clock.now_ms() - 10_000


@pytest.mark.parametrize(("prefix", "body_form"), FORMS)
async def test_send_sends_at_once(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
    body_form: bool,
) -> None:
    delay_id = await schedule_state(client, 60_000, key="k", content={"leave": True})
    r = await act(client, delay_id, "send", prefix=prefix, headers=ALICE, body_form=body_form)
    assert r.status_code == 200, r.text
    assert r.json() == {}
    state = homeserver.state[(ROOM, "m.call.member", "k")]
    assert state["content"] == {"leave": True}
    assert state["sender"] == "@alice:test"
    item = await get_event(client, delay_id)
    assert (item["outcome"], item["reason"]) == ("send", "action")
    assert item["event_id"] == state["event_id"]
    clock.advance(60_000)
    assert await run_due(app) == 0
    assert len(homeserver.replays()) == 1


# Body form errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [UNSTABLE, V1])
@pytest.mark.parametrize(
    ("content", "errcode"),
    [
        (b"", "M_NOT_JSON"),
        (b"{not json", "M_NOT_JSON"),
        (b"{}", "M_MISSING_PARAM"),
        (b'{"other": "send"}', "M_MISSING_PARAM"),
        (b'{"action": "oops"}', "M_INVALID_PARAM"),
        (b'{"action": 1}', "M_INVALID_PARAM"),
        (b'{"action": ["send"]}', "M_INVALID_PARAM"),
        (b'{"action": null}', "M_INVALID_PARAM"),
    ],
)
async def test_body_form_errors(
    client: httpx.AsyncClient,
    app: FastAPI,
    homeserver: FakeHomeserver,
    prefix: str,
    content: bytes,
    errcode: str,
) -> None:
    delay_id = await schedule_message(client, 1000)
    before = await stored(app)
    r = await client.post(f"{prefix}/delayed_events/{delay_id}", content=content, headers=ALICE)
    assert_error(r, 400, errcode)
    assert await stored(app) == before
    assert homeserver.replays() == []


@pytest.mark.parametrize("prefix", [UNSTABLE, V1])
async def test_unknown_split_action(client: httpx.AsyncClient, app: FastAPI, prefix: str) -> None:
    delay_id = await schedule_message(client, 1000)
    before = await stored(app)
    r = await client.post(f"{prefix}/delayed_events/{delay_id}/foo", json={}, headers=ALICE)
    assert_error(r, 404, "M_UNRECOGNIZED")
    assert await stored(app) == before


@pytest.mark.parametrize(("prefix", "body_form"), FORMS)
@pytest.mark.parametrize("action", ["send", "cancel", "restart"])
async def test_unknown_id(
    client: httpx.AsyncClient, prefix: str, body_form: bool, action: str
) -> None:
    await schedule_message(client, 1000)
    r = await act(client, "nope", action, prefix=prefix, headers=ALICE, body_form=body_form)
    assert_error(r, 404, "M_NOT_FOUND")


# Tokens ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("body_form", [False, True])
async def test_tokenless_on_unstable(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    body_form: bool,
) -> None:
    delay_id = await schedule_message(client, 5000)
    clock.advance(4000)
    r = await act(client, delay_id, "restart", body_form=body_form)
    assert r.status_code == 200, r.text
    [row] = await rows(app)
    assert row["send_ts"] == clock.now_ms() + 5000
    whoami_calls = [r for r in homeserver.requests if r.url.path.endswith("/whoami")]
    assert len(whoami_calls) == 1  # only the scheduling request was authenticated
    r = await act(client, delay_id, "cancel", body_form=body_form)
    assert r.status_code == 200, r.text
    assert (await get_event(client, delay_id))["outcome"] == "cancel"


async def test_tokenless_split_with_empty_body(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_message(client, 5000)
    r = await client.post(f"{UNSTABLE}/delayed_events/{delay_id}/send")
    assert r.status_code == 200, r.text
    assert len(homeserver.messages) == 1


@pytest.mark.parametrize(("prefix", "body_form"), FORMS)
@pytest.mark.parametrize("action", ["send", "cancel", "restart"])
async def test_other_users_event_not_found(
    client: httpx.AsyncClient,
    app: FastAPI,
    homeserver: FakeHomeserver,
    prefix: str,
    body_form: bool,
    action: str,
) -> None:
    delay_id = await schedule_message(client, 1000)
    before = await rows(app)
    r = await act(client, delay_id, action, prefix=prefix, headers=BOB, body_form=body_form)
    assert_error(r, 404, "M_NOT_FOUND")
    assert await rows(app) == before
    assert homeserver.replays() == []


@pytest.mark.parametrize("body_form", [False, True])
@pytest.mark.parametrize("action", ["send", "cancel", "restart"])
async def test_v1_requires_token(
    client: httpx.AsyncClient, app: FastAPI, body_form: bool, action: str
) -> None:
    delay_id = await schedule_message(client, 1000)
    before = await rows(app)
    r = await act(client, delay_id, action, prefix=V1, body_form=body_form)
    assert_error(r, 401, "M_MISSING_TOKEN")
    assert await rows(app) == before


async def test_unknown_token_on_unstable_is_refused(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    delay_id = await schedule_message(client, 1000)
    before = await rows(app)
    r = await act(client, delay_id, "cancel", headers={"Authorization": "Bearer stale"})
    assert_error(r, 401, "M_UNKNOWN_TOKEN")
    assert await rows(app) == before


# Finalised events -----------------------------------------------------------------------------


async def _sent(client: httpx.AsyncClient, app: FastAPI) -> str:
    delay_id = await schedule_message(client, 0, txn="sent")
    assert await run_due(app) == 1
    return delay_id


async def _cancelled(client: httpx.AsyncClient, app: FastAPI) -> str:
    delay_id = await schedule_message(client, 1000, txn="cancelled")
    assert (await act(client, delay_id, "cancel", headers=ALICE)).status_code == 200
    return delay_id


async def _failed(client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver) -> str:
    delay_id = await schedule_message(client, 0, txn="failed")
    homeserver.fail_next.append(httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "no"}))
    assert await run_due(app) == 1
    assert (await get_event(client, delay_id))["reason"] == "error"
    return delay_id


@pytest.mark.parametrize("body_form", [False, True])
@pytest.mark.parametrize("action", ["send", "cancel", "restart"])
@pytest.mark.parametrize("headers", [ALICE, None], ids=["token", "tokenless"])
async def test_finalised_on_unstable_is_not_found(
    client: httpx.AsyncClient,
    app: FastAPI,
    homeserver: FakeHomeserver,
    body_form: bool,
    action: str,
    headers: dict[str, str] | None,
) -> None:
    for delay_id in (
        await _sent(client, app),
        await _cancelled(client, app),
        await _failed(client, app, homeserver),
    ):
        r = await act(client, delay_id, action, headers=headers, body_form=body_form)
        assert_error(r, 404, "M_NOT_FOUND")


@pytest.mark.parametrize("body_form", [False, True])
@pytest.mark.parametrize(
    ("final", "action", "status"),
    [
        ("sent", "send", 200),
        ("sent", "cancel", 409),
        ("sent", "restart", 409),
        ("cancelled", "cancel", 200),
        ("cancelled", "send", 409),
        ("cancelled", "restart", 409),
        ("failed", "cancel", 200),
        ("failed", "send", 409),
        ("failed", "restart", 409),
    ],
)
async def test_finalised_on_v1(
    client: httpx.AsyncClient,
    app: FastAPI,
    homeserver: FakeHomeserver,
    body_form: bool,
    final: str,
    action: str,
    status: int,
) -> None:
    if final == "sent":
        delay_id = await _sent(client, app)
    elif final == "cancelled":
        delay_id = await _cancelled(client, app)
    else:
        delay_id = await _failed(client, app, homeserver)
    before = await rows(app)
    replays = len(homeserver.replays())
    r = await act(client, delay_id, action, prefix=V1, headers=ALICE, body_form=body_form)
    if status == 200:
        assert r.status_code == 200, r.text
        assert r.json() == {}
    else:
        assert_error(r, 409, "M_UNKNOWN")
    assert await rows(app) == before
    assert len(homeserver.replays()) == replays


async def test_v1_finalised_of_other_user_is_not_found(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    delay_id = await _sent(client, app)
    r = await act(client, delay_id, "send", prefix=V1, headers=BOB)
    assert_error(r, 404, "M_NOT_FOUND")


# The send action when the homeserver says no ---------------------------------------------------


@pytest.mark.parametrize("prefix", [UNSTABLE, V1])
async def test_send_refused_keeps_event_scheduled(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
) -> None:
    delay_id = await schedule_message(client, 5000)
    homeserver.fail_next.append(
        httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "power levels"})
    )
    r = await act(client, delay_id, "send", prefix=prefix, headers=ALICE)
    assert r.status_code == 403
    assert r.json() == {"errcode": "M_FORBIDDEN", "error": "power levels"}
    listed = await client.get(f"{prefix}/delayed_events", headers=ALICE)
    assert [e["delay_id"] for e in listed.json()["delayed_events"]] == [delay_id]
    assert "outcome" not in await get_event(client, delay_id)
    clock.advance(4999)
    assert await run_due(app) == 0
    clock.advance(1)
    assert await run_due(app) == 1
    assert len(homeserver.messages) == 1
    item = await get_event(client, delay_id)
    assert (item["outcome"], item["reason"]) == ("send", "delay")


async def test_send_refused_can_be_repeated(
    client: httpx.AsyncClient, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_message(client, 5000)
    homeserver.fail_next.append(httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "x"}))
    assert (await act(client, delay_id, "send", headers=ALICE)).status_code == 403
    r = await act(client, delay_id, "send", headers=ALICE)
    assert r.status_code == 200, r.text
    assert len(homeserver.messages) == 1


@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(503, json={"errcode": "M_UNKNOWN", "error": "busy"}),
        httpx.ConnectError("refused"),
    ],
    ids=["503", "unreachable"],
)
async def test_send_transient_failure_retried_later(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    failure: httpx.Response | Exception,
) -> None:
    delay_id = await schedule_message(client, 600_000)
    homeserver.fail_next.append(failure)
    r = await act(client, delay_id, "send", headers=ALICE)
    assert r.status_code >= 500
    assert r.json()["errcode"] == "M_UNKNOWN"
    assert homeserver.messages == {}
    assert "outcome" not in await get_event(client, delay_id)
    clock.advance(60_000)  # well before the original send time
    assert await run_due(app) == 1
    assert len(homeserver.messages) == 1
    assert (await get_event(client, delay_id))["outcome"] == "send"


async def test_restart_after_transient_failure_starts_over(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_message(client, 1000)
    clock.advance(1000)
    homeserver.fail_next.append(httpx.Response(502, json={"errcode": "M_UNKNOWN", "error": "x"}))
    assert await run_due(app) == 1
    r = await act(client, delay_id, "restart", headers=ALICE)
    assert r.status_code == 200, r.text
    [row] = await rows(app)
    assert row["send_ts"] == clock.now_ms() + 1000
    assert row["due_ts"] == row["send_ts"]
    assert row["attempts"] == 0
    clock.advance(999)
    assert await run_due(app) == 0
    clock.advance(1)
    assert await run_due(app) == 1


async def test_heartbeat_path_answers_only_restart_posts(client: httpx.AsyncClient) -> None:
    delay_id = await schedule_message(client, 60_000)
    r = await client.post(f"{UNSTABLE}/delayed_events/{delay_id}/restart", headers=ALICE)
    assert r.status_code == 200
    assert r.json() == {}
    assert r.headers["content-type"] == "application/json"
    assert r.headers["access-control-allow-origin"] == "*"
    r = await client.post(f"{UNSTABLE}/delayed_events/{delay_id}/restart/more", headers=ALICE)
    assert r.status_code == 404
    assert r.json()["errcode"] == "M_UNRECOGNIZED"
    r = await client.get(f"{UNSTABLE}/delayed_events/{delay_id}/restart", headers=ALICE)
    assert r.json()["errcode"] == "M_UNRECOGNIZED"
    r = await client.post(f"{UNSTABLE}/delayed_events/%ZZ/restart", headers=ALICE)
    assert r.status_code == 400
    assert r.json()["errcode"] == "M_INVALID_PARAM"
