"""The bulk lookup of MSC4486 (`/unstable/org.matrix.msc4486/delayed_events` and
`/v1/delayed_events`): scheduled and finalised events together by send time, each filter alone
and combined, both directions, paging, the four statuses, isolation between users, and every
refusal."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.integration.common import (
    ALICE,
    ALICE_PHONE,
    BOB,
    DELAY,
    ROOM,
    UNSTABLE,
    V1,
    V3,
    act,
    assert_error,
    enc,
    get_event,
    run_due,
)
from tests.support.fakes import FakeClock, FakeHomeserver

MSC4486 = "/_matrix/client/unstable/org.matrix.msc4486"
PREFIXES = [MSC4486, V1]
ROOM2 = "!other:test"
MESSAGE = "m.room.message"
MEMBER = "m.call.member"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Paging a history page by page takes more lookups than a user's rate limit allows at once
    (the fake clock never refills it)."""
    return {"ratelimit_manage_per_second": 0}


@dataclass(frozen=True)
class Known:
    """What the test knows of one of Alice's events, independently of the lookup."""

    delay_id: str
    status: str
    room_id: str
    type: str
    send_ts: int


async def schedule(
    client: httpx.AsyncClient,
    delay: int,
    txn: str,
    *,
    room: str = ROOM,
    kind: str = MESSAGE,
    key: str | None = None,
    headers: dict[str, str] = ALICE,
) -> str:
    if key is None:
        path = f"{V3}/rooms/{enc(room)}/send/{kind}/{txn}"
    else:
        path = f"{V3}/rooms/{enc(room)}/state/{kind}/{enc(key)}"
    r = await client.put(f"{path}?{DELAY}={delay}", json={"n": txn}, headers=headers)
    assert r.status_code == 200, r.text
    delay_id: str = r.json()["delay_id"]
    return delay_id


async def lookup(
    client: httpx.AsyncClient,
    query: str = "",
    *,
    prefix: str = MSC4486,
    headers: dict[str, str] = ALICE,
) -> dict[str, Any]:
    r = await client.get(f"{prefix}/delayed_events{query}", headers=headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def page_through(
    client: httpx.AsyncClient,
    query: str,
    *,
    limit: int,
    prefix: str = MSC4486,
    headers: dict[str, str] = ALICE,
) -> list[dict[str, Any]]:
    """Every item of a query, page by page, checking each page's size."""
    items: list[dict[str, Any]] = []
    base = f"?limit={limit}" + (f"&{query}" if query else "")
    url = base
    for _ in range(200):
        body = await lookup(client, url, prefix=prefix, headers=headers)
        page = body["delayed_events"]
        items += page
        if "next_batch" not in body:
            assert len(page) <= limit
            return items
        assert len(page) == limit
        url = f"{base}&from={body['next_batch']}"
    raise AssertionError("paging did not end")


async def alice_history(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> list[Known]:
    """Alice's events in two rooms, of two types, in each status, with equal send times among
    them; Bob has events of the same rooms and times."""
    status: dict[str, str] = {}
    status[await schedule(client, 0, "sent_on_time")] = "sent"
    assert await run_due(app) == 1
    homeserver.fail_next.append(
        httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "power levels"})
    )
    status[await schedule(client, 0, "refused", room=ROOM2)] = "failed"
    assert await run_due(app) == 1
    clock.advance(1000)
    by_action = await schedule(client, 5000, "by_action", headers=ALICE_PHONE)
    assert (await act(client, by_action, "send", headers=ALICE)).status_code == 200
    status[by_action] = "sent"
    cancelled = await schedule(client, 3000, "cancelled", kind=MEMBER, key="k1")
    assert (await act(client, cancelled, "cancel", headers=ALICE)).status_code == 200
    status[cancelled] = "cancelled"
    newer = await schedule(client, 4000, "newer", room=ROOM2, kind=MEMBER, key="k2")
    await app.state.container.service.note_state_set(
        room_id=ROOM2, event_type=MEMBER, state_key="k2", sender="@bob:test"
    )
    status[newer] = "failed"
    for i, (delay, room, kind) in enumerate(
        [
            (2000, ROOM, MESSAGE),
            (2000, ROOM2, MESSAGE),
            (3000, ROOM, MESSAGE),  # the cancelled one's send time
            (7000, ROOM2, MEMBER),
            (9000, ROOM, MEMBER),
            (9000, ROOM, MESSAGE),
            (9000, ROOM2, MESSAGE),
        ]
    ):
        key = f"s{i}" if kind == MEMBER else None
        status[await schedule(client, delay, f"s{i}", room=room, kind=kind, key=key)] = "scheduled"
    clock.advance(500)
    for delay in (1500, 8500):  # the same send times as Alice's 2000 and 9000
        status[await schedule(client, delay, f"late{delay}")] = "scheduled"
    for i, delay in enumerate((0, 1500, 8500)):
        await schedule(client, delay, f"bob{i}", headers=BOB)
    known = []
    for delay_id, expected in status.items():
        item = await get_event(client, delay_id)
        send_ts = item["delayed_since_ts"] + item["delay_ms"]
        known.append(Known(delay_id, expected, item["room_id"], item["type"], send_ts))
    return known


def select(
    known: list[Known],
    *,
    status: str | None = None,
    room_id: str | None = None,
    type: str | None = None,
    from_ts: int | None = None,
    to_ts: int | None = None,
) -> set[str]:
    return {
        k.delay_id
        for k in known
        if (status is None or k.status == status)
        and (room_id is None or k.room_id == room_id)
        and (type is None or k.type == type)
        and (from_ts is None or k.send_ts >= from_ts)
        and (to_ts is None or k.send_ts < to_ts)
    }


def check_order(known: list[Known], items: list[dict[str, Any]], *, backwards: bool) -> None:
    """Every item at most once, in send-time order for the direction."""
    ids = [item["delay_id"] for item in items]
    assert len(ids) == len(set(ids)), "an item came twice"
    send_ts = {k.delay_id: k.send_ts for k in known}
    times = [send_ts[i] for i in ids]
    assert times == sorted(times, reverse=backwards)


# The whole history --------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_scheduled_and_finalised_by_send_time(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
) -> None:
    known = await alice_history(client, app, clock, homeserver)
    forward = (await lookup(client, prefix=prefix))["delayed_events"]
    assert {item["delay_id"] for item in forward} == select(known)
    assert {k.status for k in known} == {"scheduled", "sent", "cancelled", "failed"}
    check_order(known, forward, backwards=False)
    backward = (await lookup(client, "?dir=b", prefix=prefix))["delayed_events"]
    assert backward == forward[::-1]
    explicit = (await lookup(client, "?dir=f", prefix=prefix))["delayed_events"]
    assert explicit == forward
    # Items exactly as the single lookup's.
    for item in forward:
        assert item == await get_event(client, item["delay_id"])
        assert "finalised" in item or item["delay_id"] in select(known, status="scheduled")


async def test_each_status(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    known = await alice_history(client, app, clock, homeserver)
    by_name = {
        "sent_on_time": "sent",
        "by_action": "sent",
        "cancelled": "cancelled",
        "refused": "failed",  # refused by the homeserver
        "newer": "failed",  # cancelled by an error (newer state)
    }
    found: dict[str, set[str]] = {}
    for status in ("scheduled", "sent", "cancelled", "failed"):
        items = (await lookup(client, f"?status={status}"))["delayed_events"]
        found[status] = {item["delay_id"] for item in items}
        assert found[status] == select(known, status=status)
        assert found[status]
    contents = {(await get_event(client, k.delay_id))["content"]["n"]: k.delay_id for k in known}
    for name, status in by_name.items():
        assert contents[name] in found[status], name
    refused = await get_event(client, contents["refused"])
    assert refused["finalised"]["error"]["errcode"] == "M_FORBIDDEN"
    newer = await get_event(client, contents["newer"])
    assert newer["finalised"]["error"]["errcode"] == "M_CANCELLED_BY_STATE_UPDATE"
    assert "error" not in (await get_event(client, contents["cancelled"]))["finalised"]


# Filters and paging ---------------------------------------------------------------------------


def _queries(known: list[Known]) -> list[dict[str, Any]]:
    """Each filter alone, and combinations of them."""
    times = sorted({k.send_ts for k in known})
    middle = times[len(times) // 2]
    alone: list[dict[str, Any]] = [
        {},
        *({"status": s} for s in ("scheduled", "sent", "cancelled", "failed")),
        {"room_id": ROOM},
        {"room_id": ROOM2},
        {"room_id": "!nowhere:test"},
        {"type": MESSAGE},
        {"type": MEMBER},
        {"from_ts": middle},
        {"to_ts": middle},
        {"from_ts": times[1], "to_ts": times[-1]},
        {"from_ts": middle, "to_ts": middle},
    ]
    combined: list[dict[str, Any]] = [
        {"status": "scheduled", "room_id": ROOM},
        {"status": "scheduled", "type": MEMBER, "room_id": ROOM2},
        {"status": "failed", "room_id": ROOM2},
        {"status": "sent", "type": MESSAGE, "to_ts": middle},
        {"room_id": ROOM, "type": MESSAGE, "from_ts": times[1]},
        {"status": "scheduled", "from_ts": middle, "to_ts": times[-1] + 1, "room_id": ROOM},
    ]
    return alone + combined


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_filters_and_paging_in_both_directions(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
) -> None:
    known = await alice_history(client, app, clock, homeserver)
    for filters in _queries(known):
        query = "&".join(f"{k}={enc(str(v))}" for k, v in filters.items())
        expected = select(known, **filters)
        whole = (await lookup(client, "?" + query, prefix=prefix))["delayed_events"]
        assert {item["delay_id"] for item in whole} == expected, filters
        for direction, limit in itertools.product("fb", (1, 3)):
            paged = await page_through(
                client, f"{query}&dir={direction}", limit=limit, prefix=prefix
            )
            assert {item["delay_id"] for item in paged} == expected, (filters, direction)
            check_order(known, paged, backwards=direction == "b")
            ordered = whole if direction == "f" else whole[::-1]
            assert [i["delay_id"] for i in paged] == [i["delay_id"] for i in ordered]


async def test_window_bounds(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """from_ts is inclusive and to_ts exclusive, in both directions."""
    start = clock.now_ms()
    ids = [await schedule(client, delay, f"t{delay}") for delay in (1000, 2000, 3000)]
    for direction in "fb":
        query = f"?from_ts={start + 1000}&to_ts={start + 3000}&dir={direction}"
        items = (await lookup(client, query))["delayed_events"]
        expected = ids[:2] if direction == "f" else ids[1::-1]
        assert [i["delay_id"] for i in items] == expected
    assert (await lookup(client, f"?from_ts={start + 3001}"))["delayed_events"] == []
    assert (await lookup(client, f"?to_ts={start + 1000}"))["delayed_events"] == []
    # Leading zeros are still the same number.
    items = (await lookup(client, f"?from_ts=000{start + 3000}"))["delayed_events"]
    assert [i["delay_id"] for i in items] == ids[2:]


async def test_paging_default_limit(client: httpx.AsyncClient, app: FastAPI) -> None:
    """A page holds 100 unless limit says otherwise; limit may change between pages."""
    for i in range(5):
        await schedule(client, 0, f"now{i}")
    assert await run_due(app) == 5
    for i in range(100):
        await schedule(client, 1000 + i, f"s{i}")
    first = await lookup(client)
    assert len(first["delayed_events"]) == 100
    rest = await lookup(client, f"?from={first['next_batch']}&limit=1000")
    assert len(rest["delayed_events"]) == 5
    assert "next_batch" not in rest
    every = first["delayed_events"] + rest["delayed_events"]
    assert len({i["delay_id"] for i in every}) == 105
    assert sum("finalised" in i for i in every) == 5


# v1 keeps the earlier list's parameters ------------------------------------------------------


async def test_v1_answer_carries_both_generations_keys(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    known = await alice_history(client, app, clock, homeserver)
    body = await lookup(client, prefix=V1)
    items = body["delayed_events"]
    assert body["scheduled"] == [i for i in items if "finalised" not in i]
    assert body["finalised"] == [i for i in items if "finalised" in i]
    assert {i["delay_id"] for i in body["scheduled"]} == select(known, status="scheduled")
    sent = await lookup(client, "?status=sent", prefix=V1)
    assert "scheduled" not in sent
    assert sent["finalised"] == sent["delayed_events"]
    assert {i["delay_id"] for i in sent["finalised"]} == select(known, status="sent")
    # The unstable MSC4486 path answers MSC4486's keys only.
    assert set(await lookup(client)) == {"delayed_events"}


async def test_v1_still_takes_finalised_and_delay_id(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    known = await alice_history(client, app, clock, homeserver)
    finalised = await lookup(client, "?status=finalised", prefix=V1)
    assert finalised["delayed_events"] == []
    assert {i["delay_id"] for i in finalised["finalised"]} == (
        select(known) - select(known, status="scheduled")
    )
    one = next(iter(select(known, status="scheduled")))
    by_id = await lookup(client, f"?delay_id={one}", prefix=V1)
    assert [i["delay_id"] for i in by_id["delayed_events"]] == [one]


# Isolation and page tokens --------------------------------------------------------------------


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_users_see_only_their_own(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    prefix: str,
) -> None:
    known = await alice_history(client, app, clock, homeserver)
    bob = await page_through(client, "", limit=1, prefix=prefix, headers=BOB)
    assert len(bob) == 3
    assert not {i["delay_id"] for i in bob} & select(known)
    alice = await page_through(client, "", limit=4, prefix=prefix, headers=ALICE_PHONE)
    assert {i["delay_id"] for i in alice} == select(known)


async def test_page_token_bound_to_user_and_query(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    await alice_history(client, app, clock, homeserver)
    token = (await lookup(client, "?limit=2&status=scheduled&room_id=" + enc(ROOM)))["next_batch"]
    same = f"?status=scheduled&room_id={enc(ROOM)}&from={token}"
    # The same query on either path, another page size, another of Alice's devices: accepted.
    for prefix, headers in ((MSC4486, ALICE), (V1, ALICE), (MSC4486, ALICE_PHONE)):
        r = await client.get(f"{prefix}/delayed_events{same}&limit=5", headers=headers)
        assert r.status_code == 200, r.text
    refused = [
        (BOB, same),  # another user
        (ALICE, f"?status=scheduled&from={token}"),  # a filter left out
        (ALICE, f"?status=scheduled&room_id={enc(ROOM2)}&from={token}"),  # another room
        (ALICE, f"?status=sent&room_id={enc(ROOM)}&from={token}"),  # another status
        (ALICE, f"{same}&dir=b"),  # another direction
        (ALICE, f"{same}&from_ts=0"),  # a window added
        (ALICE, f"?status=scheduled&room_id={enc(ROOM)}&from={token[:-2]}AA"),  # forged
        (ALICE, f"?status=scheduled&room_id={enc(ROOM)}&from=x{token}"),
    ]
    for headers, query in refused:
        r = await client.get(f"{MSC4486}/delayed_events{query}", headers=headers)
        assert_error(r, 400, "M_INVALID_PARAM")
    # A token of the msc4140 list is not one of these, nor the other way round.
    old = (await lookup(client, "?limit=1", prefix=UNSTABLE))["next_batch"]
    assert_error(
        await client.get(f"{MSC4486}/delayed_events?from={old}", headers=ALICE),
        400,
        "M_INVALID_PARAM",
    )
    new = (await lookup(client, "?limit=1"))["next_batch"]
    assert_error(
        await client.get(f"{UNSTABLE}/delayed_events?from={new}", headers=ALICE),
        400,
        "M_INVALID_PARAM",
    )


# Refusals -------------------------------------------------------------------------------------

HUGE = "9" * 5000


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    "query",
    [
        f"?from_ts={HUGE}",
        f"?to_ts={HUGE}",
        f"?from_ts=0{HUGE}",
        "?from_ts=9223372036854775808",  # 2**63
        "?to_ts=-1",
        "?from_ts=-5&to_ts=10",
        "?from_ts=1.5",
        "?from_ts=1e3",
        "?from_ts=+3",
        "?from_ts=",
        "?to_ts=%EF%BC%91",  # a fullwidth digit
        "?from_ts=20&to_ts=10",  # a reversed window
        "?from_ts=1&from_ts=2",
        "?to_ts=1&to_ts=2",
        "?dir=x",
        "?dir=",
        "?dir=F",
        "?dir=f&dir=b",
        "?dir=f&dir=f",
        "?status=pending",
        "?status=",
        "?status=sent&status=failed",
        "?room_id=",
        f"?room_id={'x' * 256}",
        "?room_id=!a:b&room_id=!c:d",
        "?type=",
        "?type=a&type=b",
        "?from=garbage",
        "?from=a.b",
        "?from=.",
        f"?from={'A' * 5000}.AA",
        "?from=x&from=y",
        "?limit=0",
        "?limit=1001",
        f"?limit={HUGE}",
        "?limit=1&limit=2",
    ],
)
async def test_invalid_values(client: httpx.AsyncClient, prefix: str, query: str) -> None:
    await schedule(client, 1000, "t")
    r = await client.get(f"{prefix}/delayed_events{query}", headers=ALICE)
    assert_error(r, 400, "M_INVALID_PARAM")


@pytest.mark.parametrize(
    ("prefix", "query"),
    [
        (MSC4486, "?status=finalised"),  # only the v1 path knows the earlier list's status
        (MSC4486, "?delay_id=abc"),
        (V1, "?status=finalised&room_id=!a:b"),  # the earlier list cannot filter by room
        (V1, "?delay_id=abc&dir=b"),
        (V1, "?delay_id=abc&from_ts=1"),
        (V1, "?status=finalised&status=sent"),
        (V1, f"?delay_id=abc&limit={HUGE}"),  # the earlier list's own checks
        (V1, f"?status=finalised&limit={HUGE}"),
        (UNSTABLE, f"?limit={HUGE}"),
    ],
)
async def test_parameters_of_the_other_list(
    client: httpx.AsyncClient, prefix: str, query: str
) -> None:
    r = await client.get(f"{prefix}/delayed_events{query}", headers=ALICE)
    assert_error(r, 400, "M_INVALID_PARAM")


async def test_empty_window_is_an_empty_page(client: httpx.AsyncClient) -> None:
    await schedule(client, 1000, "t")
    body = await lookup(client, "?from_ts=5&to_ts=5")
    assert body == {"delayed_events": []}


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_token_required(client: httpx.AsyncClient, prefix: str) -> None:
    assert_error(await client.get(f"{prefix}/delayed_events"), 401, "M_MISSING_TOKEN")
    # Checked before the parameters.
    assert_error(await client.get(f"{prefix}/delayed_events?dir=x"), 401, "M_MISSING_TOKEN")
    r = await client.get(f"{prefix}/delayed_events", headers={"Authorization": "Bearer nobody"})
    assert_error(r, 401, "M_UNKNOWN_TOKEN")


async def test_versions_adds_msc4486(client: httpx.AsyncClient) -> None:
    r = await client.get("/_matrix/client/versions")
    assert r.status_code == 200
    assert r.json()["unstable_features"]["org.matrix.msc4486"] is True
    assert r.json()["unstable_features"]["org.matrix.msc4140"] is True
