"""Scheduling: generation A (delay query parameter on /send and /state) and generation B (the
delayed_event endpoint), their validation, limits, authentication and pass-through."""

from __future__ import annotations

import math
import re
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.integration.common import (
    ALICE,
    ALICE_2,
    ALICE_PHONE,
    BOB,
    DELAY,
    ROOM,
    ROOM_PATH,
    UNSTABLE,
    V3,
    assert_error,
    bearer,
    enc,
    get_event,
    rows,
    run_due,
    schedule_b,
    schedule_message,
    schedule_state,
    send_path,
    state_path,
    stored,
)
from tests.support.fakes import FakeClock, FakeHomeserver

URL_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{22,}$")


def assert_delay_id(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["delay_id"]
    delay_id: str = body["delay_id"]
    assert URL_SAFE_ID.match(delay_id), delay_id
    return delay_id


# Generation A: the forms ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v3", "r0"])
async def test_message_put_with_txn(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver, version: str
) -> None:
    r = await client.put(
        send_path("txn1", version=version) + f"?{DELAY}=1500",
        json={"msgtype": "m.text", "body": "later"},
        headers=ALICE,
    )
    delay_id = assert_delay_id(r)
    [row] = await rows(app)
    assert row["delay_id"] == delay_id
    assert (row["room_id"], row["event_type"], row["state_key"]) == (ROOM, "m.room.message", None)
    assert row["user_id"] == "@alice:test"
    assert row["device_id"] == "ALICEDEV"
    assert row["delay_ms"] == 1500
    # Only the token check reached the homeserver; nothing was sent yet.
    assert homeserver.replays() == []


async def test_message_post_without_txn(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver, clock: FakeClock
) -> None:
    path = f"{V3}/rooms/{ROOM_PATH}/send/m.room.message?{DELAY}=10"
    first = assert_delay_id(await client.post(path, json={"body": "a"}, headers=ALICE))
    second = assert_delay_id(await client.post(path, json={"body": "a"}, headers=ALICE))
    # Without a transaction id every request is a new event.
    assert first != second
    assert len(await rows(app)) == 2
    clock.advance(10)
    assert await run_due(app) == 2
    assert len(homeserver.messages) == 2


@pytest.mark.parametrize("version", ["v3", "r0"])
@pytest.mark.parametrize(
    ("key_path", "expected_key"),
    [(None, ""), ("", ""), ("member1", "member1")],
    ids=["no-key", "trailing-slash", "key"],
)
async def test_state_forms(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    version: str,
    key_path: str | None,
    expected_key: str,
) -> None:
    r = await client.put(
        state_path(key_path, version=version, kind="m.room.topic") + f"?{DELAY}=2000",
        json={"topic": "later"},
        headers=ALICE,
    )
    delay_id = assert_delay_id(r)
    [row] = await rows(app)
    assert row["state_key"] == expected_key
    clock.advance(2000)
    assert await run_due(app) == 1
    assert homeserver.state[(ROOM, "m.room.topic", expected_key)]["content"] == {"topic": "later"}
    [replay] = homeserver.replays()
    assert replay.url.raw_path.decode() == (
        f"/_matrix/client/v3/rooms/{ROOM_PATH}/state/m.room.topic/{enc(expected_key)}"
    )
    assert (await get_event(client, delay_id))["state_key"] == expected_key


# Generation B ---------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [V3, UNSTABLE])
@pytest.mark.parametrize("delay_field", ["delay_ms", "delay"])
async def test_gen_b_message(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
    delay_field: str,
) -> None:
    r = await schedule_b(
        client,
        {delay_field: 3000, "content": {"body": "b"}},
        prefix=prefix,
        kind="m.room.message",
    )
    delay_id = assert_delay_id(r)
    [row] = await rows(app)
    assert row["delay_ms"] == 3000
    assert row["state_key"] is None
    assert row["generation"] == "B"
    clock.advance(2999)
    assert await run_due(app) == 0
    clock.advance(1)
    assert await run_due(app) == 1
    [message] = homeserver.messages.values()
    assert message["content"] == {"body": "b"}
    assert message["type"] == "m.room.message"
    assert "state_key" not in await get_event(client, delay_id)


@pytest.mark.parametrize("prefix", [V3, UNSTABLE])
async def test_gen_b_state(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
) -> None:
    key = "_@alice:test_ALICEDEV_m.call"
    r = await schedule_b(
        client, {"delay_ms": 500, "state_key": key, "content": {"x": 1}}, prefix=prefix
    )
    delay_id = assert_delay_id(r)
    clock.advance(500)
    assert await run_due(app) == 1
    assert homeserver.state[(ROOM, "m.call.member", key)]["content"] == {"x": 1}
    assert (await get_event(client, delay_id))["state_key"] == key


async def test_gen_b_empty_state_key_is_state(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    assert_delay_id(await schedule_b(client, {"delay_ms": 0, "state_key": "", "content": {}}))
    assert await run_due(app) == 1
    assert (ROOM, "m.call.member", "") in homeserver.state
    assert homeserver.messages == {}


@pytest.mark.parametrize(
    ("body", "errcode"),
    [
        ({"content": {}}, "M_MISSING_PARAM"),
        ({"delay_ms": -1, "content": {}}, "M_INVALID_PARAM"),
        ({"delay_ms": 1.5, "content": {}}, "M_INVALID_PARAM"),
        ({"delay_ms": "1000", "content": {}}, "M_INVALID_PARAM"),
        ({"delay_ms": True, "content": {}}, "M_INVALID_PARAM"),
        ({"delay_ms": 1000}, "M_MISSING_PARAM"),
        ({"delay_ms": 1000, "content": [1]}, "M_INVALID_PARAM"),
        ({"delay_ms": 1000, "content": {}, "state_key": 5}, "M_INVALID_PARAM"),
    ],
)
async def test_gen_b_validation(
    client: httpx.AsyncClient,
    app: FastAPI,
    homeserver: FakeHomeserver,
    body: dict[str, Any],
    errcode: str,
) -> None:
    assert_error(await schedule_b(client, body), 400, errcode)
    assert await stored(app) == []
    assert homeserver.replays() == []


async def test_gen_b_body_not_json(client: httpx.AsyncClient, app: FastAPI) -> None:
    path = f"{V3}/rooms/{ROOM_PATH}/delayed_event/m.call.member/b1"
    assert_error(await client.put(path, content=b"{nope", headers=ALICE), 400, "M_NOT_JSON")
    assert_error(await client.put(path, content=b"[1]", headers=ALICE), 400, "M_BAD_JSON")
    assert await stored(app) == []


async def test_gen_b_missing_token(client: httpx.AsyncClient, app: FastAPI) -> None:
    r = await schedule_b(client, {"delay_ms": 1, "content": {}}, headers={})
    assert_error(r, 401, "M_MISSING_TOKEN")
    assert await stored(app) == []


async def test_gen_b_txn_retry_across_prefixes(client: httpx.AsyncClient, app: FastAPI) -> None:
    body = {"delay_ms": 1000, "content": {}}
    first = assert_delay_id(await schedule_b(client, body, txn="same", prefix=V3))
    again = assert_delay_id(await schedule_b(client, body, txn="same", prefix=UNSTABLE))
    assert again == first
    other = assert_delay_id(await schedule_b(client, body, txn="same", headers=ALICE_PHONE))
    assert other != first
    assert len(await rows(app)) == 2


# The delay_id and transactions ----------------------------------------------------------------


async def test_delay_ids_are_unique_and_url_safe(client: httpx.AsyncClient) -> None:
    ids = {await schedule_message(client, txn=f"t{i}") for i in range(20)}
    assert len(ids) == 20
    for delay_id in ids:
        assert URL_SAFE_ID.match(delay_id)


async def test_txn_retry_same_device_returns_same_delay_id(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    first = await schedule_message(client, txn="retry")
    before = await rows(app)
    # The same device, with a refreshed token and another API version: the same transaction.
    r = await client.put(
        send_path("retry", version="r0") + f"?{DELAY}=1000", json={"body": "x"}, headers=ALICE_2
    )
    assert assert_delay_id(r) == first
    assert await rows(app) == before


async def test_txn_from_other_device_is_new(client: httpx.AsyncClient, app: FastAPI) -> None:
    first = await schedule_message(client, txn="t")
    second = await schedule_message(client, txn="t", headers=ALICE_PHONE)
    third = await schedule_message(client, txn="t", headers=BOB)
    assert len({first, second, third}) == 3
    assert len(await rows(app)) == 3


@pytest.mark.parametrize("settings_overrides", [{"max_scheduled_per_user": 1}])
async def test_txn_retry_at_the_cap_is_not_limited(client: httpx.AsyncClient, app: FastAPI) -> None:
    first = await schedule_message(client, txn="t")
    assert await schedule_message(client, txn="t") == first
    r = await client.put(send_path("u") + f"?{DELAY}=1000", json={}, headers=ALICE)
    assert_error(r, 429, "M_LIMIT_EXCEEDED")


# Path encoding -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "_@alice:test_ALICEDEV_m.call",
        "a/b/c",
        "ünï©ødé ✓",
        "50%+done",
        "@bob:test/ALICEDEV/é",
    ],
)
async def test_state_key_survives_byte_for_byte(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    key: str,
) -> None:
    delay_id = await schedule_state(client, 100, key=key)
    assert (await get_event(client, delay_id))["state_key"] == key
    clock.advance(100)
    assert await run_due(app) == 1
    [replay] = homeserver.replays()
    assert replay.url.raw_path.decode() == (
        f"/_matrix/client/v3/rooms/{ROOM_PATH}/state/m.call.member/{enc(key)}"
    )
    assert homeserver.state[(ROOM, "m.call.member", key)]["content"] == {"state": key}


async def test_unencoded_at_and_colon_in_path(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    key = "_@alice:test_ALICEDEV+1"
    r = await client.put(
        f"{V3}/rooms/!room:test/state/m.call.member/{key}?{DELAY}=0", json={}, headers=ALICE
    )
    assert_delay_id(r)
    [row] = await rows(app)
    assert (row["room_id"], row["state_key"]) == (ROOM, key)
    assert await run_due(app) == 1
    assert (ROOM, "m.call.member", key) in homeserver.state


async def test_event_type_and_room_encoded_once(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    room = "!r%/x:test"
    kind = "org.example.ty pe"
    r = await client.put(
        f"{V3}/rooms/{enc(room)}/send/{enc(kind)}/t?{DELAY}=0", json={"a": 1}, headers=ALICE
    )
    assert_delay_id(r)
    assert await run_due(app) == 1
    [replay] = homeserver.replays()
    path = replay.url.raw_path.decode()
    assert path.startswith(f"/_matrix/client/v3/rooms/{enc(room)}/send/{enc(kind)}/")
    [message] = homeserver.messages.values()
    assert (message["room_id"], message["type"]) == (room, kind)


# Query parameters -----------------------------------------------------------------------------


async def test_other_query_params_replayed_consumed_ones_not(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    query = (
        f"{DELAY}=0&org.matrix.msc4354.sticky_duration_ms=3600000"
        "&org.matrix.msc4140.parent_delay_id=parent&access_token=alice_token"
    )
    r = await client.put(send_path("q") + "?" + query, json={"body": "sticky"})
    assert_delay_id(r)
    assert await run_due(app) == 1
    [replay] = homeserver.replays()
    assert replay.url.query.decode() == "org.matrix.msc4354.sticky_duration_ms=3600000"
    # The token travels only in the header.
    assert bearer(replay) == "alice_token"
    assert "access_token" not in str(replay.url)


async def test_percent_encoded_delay_parameter_name(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    r = await client.put(
        send_path("enc") + "?org%2Ematrix%2Emsc4140%2Edelay=5000", json={}, headers=ALICE
    )
    assert_delay_id(r)
    [row] = await rows(app)
    assert row["delay_ms"] == 5000
    assert homeserver.replays() == []


# Validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        f"{DELAY}=-1",
        f"{DELAY}=1.5",
        f"{DELAY}=abc",
        f"{DELAY}=",
        f"{DELAY}=1e3",
        f"{DELAY}=%201",
        f"{DELAY}=1&{DELAY}=2",
    ],
)
async def test_invalid_delay(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver, query: str
) -> None:
    r = await client.put(send_path() + "?" + query, json={}, headers=ALICE)
    assert_error(r, 400, "M_INVALID_PARAM")
    assert await stored(app) == []
    assert homeserver.replays() == []


@pytest.mark.parametrize(
    ("content", "errcode"),
    [
        (b"not json", "M_NOT_JSON"),
        (b"", "M_NOT_JSON"),
        (b"[1,2]", "M_BAD_JSON"),
        (b'"s"', "M_BAD_JSON"),
    ],
)
async def test_body_not_an_object(
    client: httpx.AsyncClient, app: FastAPI, content: bytes, errcode: str
) -> None:
    r = await client.put(send_path() + f"?{DELAY}=10", content=content, headers=ALICE)
    assert_error(r, 400, errcode)
    assert await stored(app) == []


async def test_body_too_large(client: httpx.AsyncClient, app: FastAPI) -> None:
    big = b'{"body":"' + b"x" * 65_536 + b'"}'
    r = await client.put(send_path() + f"?{DELAY}=10", content=big, headers=ALICE)
    assert_error(r, 413, "M_TOO_LARGE")
    r = await client.put(
        f"{V3}/rooms/{ROOM_PATH}/delayed_event/m.room.message/t", content=big, headers=ALICE
    )
    assert_error(r, 413, "M_TOO_LARGE")
    assert await stored(app) == []


async def test_body_at_the_limit_is_accepted(client: httpx.AsyncClient, app: FastAPI) -> None:
    prefix, suffix = b'{"body":"', b'"}'
    body = prefix + b"x" * (65_536 - len(prefix) - len(suffix)) + suffix
    assert len(body) == 65_536
    r = await client.put(send_path() + f"?{DELAY}=10", content=body, headers=ALICE)
    assert_delay_id(r)


async def test_delay_zero_fires_at_once(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_message(client, 0, content={"body": "now"})
    assert await run_due(app) == 1
    [message] = homeserver.messages.values()
    assert message["content"] == {"body": "now"}
    item = await get_event(client, delay_id)
    assert (item["outcome"], item["reason"]) == ("send", "delay")


@pytest.mark.parametrize("delay", [86_400_001, 10**30])
async def test_gen_a_delay_over_max(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver, delay: int
) -> None:
    r = await client.put(send_path() + f"?{DELAY}={delay}", json={}, headers=ALICE)
    body = assert_error(r, 400, "M_UNKNOWN")
    assert body["org.matrix.msc4140.errcode"] == "M_MAX_DELAY_EXCEEDED"
    assert body["org.matrix.msc4140.max_delay"] == 86_400_000
    assert body["max_delay"] == 86_400_000
    assert await stored(app) == []
    assert homeserver.replays() == []


async def test_gen_a_delay_at_max_is_accepted(client: httpx.AsyncClient, app: FastAPI) -> None:
    await schedule_message(client, 86_400_000)
    [row] = await rows(app)
    assert row["delay_ms"] == 86_400_000


@pytest.mark.parametrize("settings_overrides", [{"max_delay_ms": 5000}])
async def test_gen_a_max_delay_setting(client: httpx.AsyncClient) -> None:
    await schedule_message(client, 5000, txn="ok")
    r = await client.put(send_path("no") + f"?{DELAY}=5001", json={}, headers=ALICE)
    body = assert_error(r, 400, "M_UNKNOWN")
    assert body["org.matrix.msc4140.max_delay"] == 5000
    assert body["max_delay"] == 5000


async def test_the_delay_is_checked_once_a_request(
    client: httpx.AsyncClient, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = app.state.container.service
    checked: list[Any] = []
    check = service.check_delay

    def counted(*args: Any) -> Any:
        checked.append(args)
        return check(*args)

    monkeypatch.setattr(service, "check_delay", counted)
    await schedule_message(client, 1000)
    assert len(checked) == 1
    r = await schedule_b(client, {"delay_ms": 1000, "content": {}})
    assert r.status_code == 200
    assert len(checked) == 2


@pytest.mark.parametrize("delay", [86_400_001, 10**30])
async def test_gen_b_delay_over_max(client: httpx.AsyncClient, app: FastAPI, delay: int) -> None:
    r = await schedule_b(client, {"delay_ms": delay, "content": {}})
    assert_error(r, 403, "M_FORBIDDEN")
    assert await stored(app) == []


# The per-user cap -----------------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"max_scheduled_per_user": 2}])
async def test_per_user_cap(client: httpx.AsyncClient, app: FastAPI, clock: FakeClock) -> None:
    await schedule_message(client, 4000, txn="a")
    clock.advance(1000)
    await schedule_message(client, 2500, txn="b")  # fires at +3500, the user's next event
    before = await stored(app)
    clock.advance(200)
    r = await client.put(send_path("c") + f"?{DELAY}=10", json={}, headers=ALICE)
    body = assert_error(r, 429, "M_LIMIT_EXCEEDED")
    assert body["retry_after_ms"] == 2300
    assert r.headers["Retry-After"] == str(math.ceil(2300 / 1000))
    assert await stored(app) == before
    # Generation B counts against the same cap.
    r = await schedule_b(client, {"delay_ms": 10, "content": {}})
    assert_error(r, 429, "M_LIMIT_EXCEEDED")
    # Other users have their own cap.
    await schedule_message(client, 10, txn="c", headers=BOB)


@pytest.mark.parametrize("settings_overrides", [{"max_scheduled_per_user": 1}])
async def test_per_user_cap_overdue_has_no_retry_after(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock
) -> None:
    await schedule_message(client, 1000, txn="a")
    clock.advance(1000)
    r = await client.put(send_path("b") + f"?{DELAY}=10", json={}, headers=ALICE)
    body = assert_error(r, 429, "M_LIMIT_EXCEEDED")
    assert "retry_after_ms" not in body
    assert "retry-after" not in r.headers
    # Once it has been sent, there is room again.
    assert await run_due(app) == 1
    await schedule_message(client, 10, txn="b")


@pytest.mark.parametrize("settings_overrides", [{"max_scheduled_per_user": 1}])
async def test_per_user_cap_rounds_retry_after_up(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    await schedule_message(client, 1001, txn="a")
    r = await client.put(send_path("b") + f"?{DELAY}=10", json={}, headers=ALICE)
    body = assert_error(r, 429, "M_LIMIT_EXCEEDED")
    assert body["retry_after_ms"] == 1001
    assert r.headers["Retry-After"] == "2"


# Authentication -------------------------------------------------------------------------------


async def test_missing_token(client: httpx.AsyncClient, app: FastAPI) -> None:
    r = await client.put(send_path() + f"?{DELAY}=10", json={})
    assert_error(r, 401, "M_MISSING_TOKEN")
    assert await stored(app) == []


async def test_unknown_token_passes_homeserver_answer(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    r = await client.put(
        send_path() + f"?{DELAY}=10", json={}, headers={"Authorization": "Bearer nobody"}
    )
    assert r.status_code == 401
    assert r.json() == {
        "errcode": "M_UNKNOWN_TOKEN",
        "error": "Unknown access token",
        "soft_logout": False,
    }
    assert await stored(app) == []


async def test_homeserver_unreachable_on_whoami(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    homeserver.whoami_override = unreachable
    r = await client.put(send_path() + f"?{DELAY}=10", json={}, headers=ALICE)
    assert_error(r, 502, "M_UNKNOWN")
    assert await stored(app) == []


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, content=b"<html>"),
        httpx.Response(200, json={"device_id": "X"}),
        httpx.Response(200, json=["@alice:test"]),
        httpx.Response(500, content=b"oops"),
    ],
    ids=["not-json", "no-user-id", "not-object", "server-error"],
)
async def test_garbled_whoami(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver, answer: httpx.Response
) -> None:
    homeserver.whoami_override = lambda request: answer
    r = await client.put(send_path() + f"?{DELAY}=10", json={}, headers=ALICE)
    assert_error(r, 502, "M_UNKNOWN")
    assert await stored(app) == []


# Pass-through and failing closed --------------------------------------------------------------


async def test_send_without_delay_passes_through(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    r = await client.put(send_path("plain") + "?foo=bar%2Fbaz", json={"body": "now"}, headers=ALICE)
    assert r.status_code == 200
    [message] = homeserver.messages.values()
    assert r.json() == {"event_id": message["event_id"]}
    [forwarded] = homeserver.replays()
    assert forwarded.url.raw_path.decode() == send_path("plain") + "?foo=bar%2Fbaz"
    assert bearer(forwarded) == "alice_token"
    assert await stored(app) == []


async def test_state_without_delay_passes_through(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    r = await client.put(state_path("k%2Fk"), json={"v": 1}, headers=ALICE)
    assert r.status_code == 200
    assert homeserver.state[(ROOM, "m.call.member", "k/k")]["content"] == {"v": 1}
    assert await stored(app) == []


async def test_pass_through_keeps_homeserver_errors(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    homeserver.fail_next.append(
        httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "power levels"})
    )
    r = await client.put(send_path("x"), json={}, headers=ALICE)
    assert r.status_code == 403
    assert r.json() == {"errcode": "M_FORBIDDEN", "error": "power levels"}
    # Without a token, the homeserver decides.
    r = await client.put(send_path("y"), json={})
    assert r.status_code == 401
    assert r.json()["errcode"] == "M_UNKNOWN_TOKEN"
    assert await stored(app) == []


async def test_pass_through_homeserver_unreachable(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    homeserver.fail_next.append(httpx.ConnectError("refused"))
    r = await client.put(send_path("x"), json={}, headers=ALICE)
    assert_error(r, 502, "M_UNKNOWN")
    assert await stored(app) == []


async def test_parent_without_delay_is_refused(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    r = await client.put(
        send_path() + "?org.matrix.msc4140.parent_delay_id=abc", json={}, headers=ALICE
    )
    assert_error(r, 400, "M_MISSING_PARAM")
    r = await client.put(
        state_path("k") + "?org.matrix.msc4140.parent_delay_id=abc", json={}, headers=ALICE
    )
    assert_error(r, 400, "M_MISSING_PARAM")
    assert homeserver.requests == []
    assert await stored(app) == []


@pytest.mark.parametrize("room", ["room%3Atest", "%21", "%ZZroom"])
async def test_invalid_room_id(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver, room: str
) -> None:
    r = await client.put(send_path(room=room) + f"?{DELAY}=10", json={}, headers=ALICE)
    assert_error(r, 400, "M_INVALID_PARAM")
    assert await stored(app) == []
    assert homeserver.replays() == []


async def test_state_key_too_long(client: httpx.AsyncClient, app: FastAPI) -> None:
    r = await client.put(state_path("k" * 256) + f"?{DELAY}=10", json={}, headers=ALICE)
    assert_error(r, 400, "M_INVALID_PARAM")
    assert await stored(app) == []


async def test_txn_retry_with_other_encoding_is_the_same_transaction(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    first = await schedule_message(client, txn="enc", room=ROOM_PATH)
    again = await schedule_message(client, txn="enc", room="!room:test")
    assert again == first
    assert len(await rows(app)) == 1


async def test_missing_token_is_401_even_when_the_delay_is_too_long(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    r = await client.put(send_path("long") + f"?{DELAY}=999999999999", json={})
    assert r.status_code == 401
    assert r.json()["errcode"] == "M_MISSING_TOKEN"
    assert await rows(app) == []
