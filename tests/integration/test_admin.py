"""The operators' admin API (`/_sidecar/admin/v1/`) and its command line (`python -m app admin`),
on the real database: who may call it, each action, and that a cancel is the owner's cancel."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import text

from app.__main__ import main
from tests.integration.common import (
    ALICE,
    BOB,
    ROOM,
    assert_error,
    enc,
    rows,
    run_due,
    schedule_message,
    schedule_state,
    stored,
)
from tests.support.apps import app_and_client
from tests.support.fakes import FakeClock, FakeHomeserver

ADMIN_TOKEN = "an-admin-token-0123456789-abcdefghijklmnop"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BASE = "/_sidecar/admin/v1"
ROOM2 = "!other:test"
ALICE_ID = "@alice:test"
BOB_ID = "@bob:test"

pytestmark = pytest.mark.parametrize("settings_overrides", [{"admin_token": ADMIN_TOKEN}])

ROUTES = [
    ("GET", f"{BASE}/delayed_events"),
    ("GET", f"{BASE}/stats"),
    ("POST", f"{BASE}/delayed_events/abc/cancel"),
    ("POST", f"{BASE}/users/{enc(ALICE_ID)}/cancel"),
    ("POST", f"{BASE}/rooms/{enc(ROOM)}/cancel"),
    ("POST", f"{BASE}/users/{enc(ALICE_ID)}/purge"),
]


def cancelled_metric(generation: str) -> float:
    value = REGISTRY.get_sample_value(
        "sidecar_delayed_events_cancelled_total", {"generation": generation, "outcome": "admin"}
    )
    return value or 0.0


async def tokens(app: FastAPI) -> list[tuple[str, str]]:
    async with app.state.container.engine.connect() as conn:
        result = await conn.execute(text("SELECT user_id, device_id FROM device_token ORDER BY 1"))
        return [(row.user_id, row.device_id) for row in result]


async def admin_get(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    r = await client.get(BASE + path, headers=ADMIN)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def admin_post(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    r = await client.post(BASE + path, headers=ADMIN, json={})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# Who may call it --------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_off_while_the_token_is_unset(
    database_url: str,
    clean_db: None,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    settings_overrides: dict[str, Any],
    method: str,
    path: str,
) -> None:
    async with app_and_client(database_url, clock, homeserver.transport()) as (_, client):
        for headers in ({}, ADMIN, ALICE):
            r = await client.request(method, path, headers=headers)
            assert_error(r, 404, "M_UNRECOGNIZED")


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_refused_without_the_admin_token(
    client: httpx.AsyncClient,
    app: FastAPI,
    homeserver: FakeHomeserver,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
) -> None:
    await schedule_message(client, 1000)
    before = await stored(app)
    asked = len(homeserver.requests)
    caplog.set_level(logging.DEBUG)
    assert_error(await client.request(method, path), 401, "M_MISSING_TOKEN")
    assert_error(
        await client.request(method, path + f"?access_token={ADMIN_TOKEN}"), 401, "M_MISSING_TOKEN"
    )
    assert_error(
        await client.request(method, path, headers={"Authorization": "Basic eDp5"}),
        401,
        "M_MISSING_TOKEN",
    )
    wrong = {"Authorization": f"Bearer {ADMIN_TOKEN}x"}
    assert_error(await client.request(method, path, headers=wrong), 403, "M_FORBIDDEN")
    # A user's own Matrix token, valid at the homeserver: refused without asking it.
    assert_error(await client.request(method, path, headers=ALICE), 403, "M_FORBIDDEN")
    assert len(homeserver.requests) == asked
    assert await stored(app) == before
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("app"))
    assert ADMIN_TOKEN not in logged
    assert "alice_token" not in logged
    assert logged.count("not the admin token") == 2


# Listing -----------------------------------------------------------------------------------------


async def test_lists_by_user_room_and_status_with_counts(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    sent = await schedule_message(client, 0, txn="sent")
    assert await run_due(app) == 1
    clock.advance(1)
    cancelled = await schedule_message(client, 5000, txn="cancelled")
    assert (await admin_post(client, f"/delayed_events/{cancelled}/cancel")) == {"cancelled": 1}
    homeserver.fail_next.append(
        httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "power levels"})
    )
    failed = await schedule_message(client, 0, txn="failed", room=enc(ROOM2))
    assert await run_due(app) == 1
    waiting = await schedule_state(client, 8000, key="k", content={"secret": "words"})
    bobs = await schedule_message(client, 9000, txn="bob", headers=BOB, room=enc(ROOM2))

    alice = await admin_get(client, f"/delayed_events?user_id={enc(ALICE_ID)}")
    assert [e["delay_id"] for e in alice["delayed_events"]] == [sent, failed, cancelled, waiting]
    assert alice["counts"] == {
        "scheduled": 1,
        "sent": 1,
        "cancelled": 1,
        "failed": 1,
        "sending": 0,
        "total": 4,
    }
    assert "next_batch" not in alice
    by_id = {e["delay_id"]: e for e in alice["delayed_events"]}
    assert by_id[failed]["status"] == "failed"
    assert by_id[failed]["errcode"] == "M_FORBIDDEN"
    assert by_id[cancelled]["status"] == "cancelled"
    assert by_id[cancelled]["reason"] == "action"
    assert by_id[sent]["event_id"] is not None
    assert by_id[waiting]["state_key"] == "k"
    assert by_id[waiting]["room_id"] == ROOM
    assert "secret" not in json.dumps(alice)  # never the content

    room2 = await admin_get(client, f"/delayed_events?room_id={enc(ROOM2)}")
    assert [e["delay_id"] for e in room2["delayed_events"]] == [failed, bobs]
    assert room2["counts"]["total"] == 2
    scheduled = await admin_get(client, "/delayed_events?status=scheduled")
    assert [e["delay_id"] for e in scheduled["delayed_events"]] == [waiting, bobs]
    assert scheduled["counts"]["total"] == 5  # the counts are of every status
    both = await admin_get(
        client, f"/delayed_events?user_id={enc(BOB_ID)}&room_id={enc(ROOM2)}&status=scheduled"
    )
    assert [e["delay_id"] for e in both["delayed_events"]] == [bobs]


async def test_pages_follow_send_time_to_the_end(client: httpx.AsyncClient, app: FastAPI) -> None:
    made = [await schedule_message(client, 1000 + i // 2, txn=f"t{i}") for i in range(7)]
    seen: list[str] = []
    path = f"/delayed_events?user_id={enc(ALICE_ID)}&limit=3"
    for _ in range(5):
        page = await admin_get(client, path)
        assert len(page["delayed_events"]) <= 3
        assert page["counts"]["scheduled"] == 7
        seen += [e["delay_id"] for e in page["delayed_events"]]
        if "next_batch" not in page:
            break
        path = f"/delayed_events?user_id={enc(ALICE_ID)}&limit=3&from={page['next_batch']}"
    expected = sorted(made, key=lambda d: (made.index(d) // 2, d))
    assert seen == expected


@pytest.mark.parametrize(
    "query",
    [
        "status=finalised",
        "status=scheduled&status=sent",
        "user_id=alice",
        "room_id=nope",
        "limit=0",
        "limit=x",
        "from=!!!",
        "from=eyJhIjoiZG9uZSJ9",
        "delay_id=x",
        "user_id=%ZZ",
    ],
)
async def test_bad_list_queries_are_refused(client: httpx.AsyncClient, query: str) -> None:
    r = await client.get(f"{BASE}/delayed_events?{query}", headers=ADMIN)
    assert_error(r, 400, "M_INVALID_PARAM")


# Cancelling --------------------------------------------------------------------------------------


async def test_cancel_one_is_the_owners_cancel(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_message(client, 1000)
    assert await tokens(app) == [(ALICE_ID, "ALICEDEV")]
    before = cancelled_metric("A")
    assert await admin_post(client, f"/delayed_events/{delay_id}/cancel") == {"cancelled": 1}
    assert cancelled_metric("A") == before + 1
    [row] = await rows(app)
    assert (row["status"], row["reason"], row["due_ts"]) == ("cancelled", "action", None)
    assert row["finalised_ts"] == clock.now_ms()
    assert await tokens(app) == []  # nothing scheduled needs it any more
    clock.advance(10_000)
    assert await run_due(app) == 0
    assert homeserver.replays() == []
    again = await client.post(f"{BASE}/delayed_events/{delay_id}/cancel", headers=ADMIN)
    assert_error(again, 409, "M_UNKNOWN")
    unknown = await client.post(f"{BASE}/delayed_events/unknown/cancel", headers=ADMIN)
    assert_error(unknown, 404, "M_NOT_FOUND")


async def test_cancel_a_users_events(
    client: httpx.AsyncClient, app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    alices = [await schedule_message(client, 1000, txn=f"a{i}") for i in range(3)]
    alices.append(await schedule_message(client, 1000, txn="r2", room=enc(ROOM2)))
    bobs = await schedule_message(client, 1000, txn="b", headers=BOB)
    caplog.set_level(logging.INFO, logger="app.admin")
    answer = await admin_post(client, f"/users/{enc(ALICE_ID)}/cancel")
    assert answer == {"cancelled": 4, "sending": 0}
    status = {row["delay_id"]: (row["status"], row["reason"]) for row in await rows(app)}
    assert all(status[d] == ("cancelled", "action") for d in alices)
    assert status[bobs] == ("scheduled", None)
    assert await tokens(app) == [(BOB_ID, "BOBDEV")]
    assert f"cancelled 4 delayed events of user {ALICE_ID}" in caplog.text
    assert ADMIN_TOKEN not in caplog.text
    # Nothing left: a repeat cancels nothing, and is no error.
    assert await admin_post(client, f"/users/{enc(ALICE_ID)}/cancel") == {
        "cancelled": 0,
        "sending": 0,
    }


async def test_cancel_a_rooms_events_in_batches(
    client: httpx.AsyncClient, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.admin.CANCEL_BATCH", 2)
    in_room = [await schedule_message(client, 1000, txn=f"a{i}") for i in range(3)]
    in_room.append(await schedule_message(client, 1000, txn="b", headers=BOB))
    elsewhere = await schedule_message(client, 1000, txn="c", room=enc(ROOM2))
    answer = await admin_post(client, f"/rooms/{enc(ROOM)}/cancel")
    assert answer == {"cancelled": 4, "sending": 0}
    status = {row["delay_id"]: row["status"] for row in await rows(app)}
    assert all(status[d] == "cancelled" for d in in_room)
    assert status[elsewhere] == "scheduled"
    assert await tokens(app) == [(ALICE_ID, "ALICEDEV")]  # still needed by `elsewhere`


async def test_an_event_being_sent_is_not_cancelled(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    sending = await schedule_message(client, 1000, txn="s")
    other = await schedule_message(client, 1000, txn="o")
    async with app.state.container.engine.begin() as conn:
        await conn.execute(
            text("UPDATE delayed_event SET claim_id = 'held' WHERE delay_id = :d"), {"d": sending}
        )
    listed = await admin_get(client, "/delayed_events?status=sending")
    assert [e["delay_id"] for e in listed["delayed_events"]] == [sending]
    r = await client.post(f"{BASE}/delayed_events/{sending}/cancel", headers=ADMIN)
    assert_error(r, 409, "M_UNKNOWN")
    assert await admin_post(client, f"/users/{enc(ALICE_ID)}/cancel") == {
        "cancelled": 1,
        "sending": 1,
    }
    status = {row["delay_id"]: row["status"] for row in await rows(app)}
    assert status == {sending: "scheduled", other: "cancelled"}
    assert await tokens(app) == [(ALICE_ID, "ALICEDEV")]  # the event being sent needs it


# Purging -----------------------------------------------------------------------------------------


async def test_purge_deletes_a_users_finalised_history_only(
    client: httpx.AsyncClient, app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    await schedule_message(client, 0, txn="sent")
    assert await run_due(app) == 1
    cancelled = await schedule_message(client, 1000, txn="c")
    await admin_post(client, f"/delayed_events/{cancelled}/cancel")
    waiting = await schedule_message(client, 1000, txn="w")
    bob_done = await schedule_message(client, 1000, txn="b", headers=BOB)
    await admin_post(client, f"/delayed_events/{bob_done}/cancel")
    caplog.set_level(logging.INFO, logger="app.admin")
    assert await admin_post(client, f"/users/{enc(ALICE_ID)}/purge") == {
        "purged": 2,
        "scheduled": 1,
    }
    assert {row["delay_id"] for row in await rows(app)} == {waiting, bob_done}
    assert f"purged 2 finalised delayed events of user {ALICE_ID}" in caplog.text
    # Erasure: cancel, then purge; nothing of the user is left, tokens included.
    await admin_post(client, f"/users/{enc(ALICE_ID)}/cancel")
    assert await admin_post(client, f"/users/{enc(ALICE_ID)}/purge") == {
        "purged": 1,
        "scheduled": 0,
    }
    assert {row["user_id"] for row in await rows(app)} == {BOB_ID}
    assert await tokens(app) == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", f"{BASE}/users/alice/purge"),
        ("POST", f"{BASE}/users/%ZZ/cancel"),
        ("POST", f"{BASE}/users/{'@' + 'x' * 300 + ':test'}/cancel"),
        ("POST", f"{BASE}/rooms/{enc('#alias:test')}/cancel"),
        ("GET", f"{BASE}/stats?overdue_ms=-1"),
        ("GET", f"{BASE}/stats?overdue_ms=1e3"),
        ("GET", f"{BASE}/stats?overdue_ms={'9' * 30}"),
    ],
)
async def test_bad_input_is_refused(client: httpx.AsyncClient, method: str, path: str) -> None:
    r = await client.request(method, path, headers=ADMIN)
    assert_error(r, 400, "M_INVALID_PARAM")


# Stats -------------------------------------------------------------------------------------------


async def test_stats_show_the_backlog_and_recent_failures(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    for errcode in ("M_FORBIDDEN", "M_FORBIDDEN", "M_TOO_LARGE"):
        homeserver.fail_next.append(httpx.Response(400, json={"errcode": errcode, "error": "x"}))
        await schedule_message(client, 0, txn=errcode + str(clock.now_ms()))
        assert await run_due(app) == 1
        clock.advance(1)
    start = clock.now_ms()
    await schedule_message(client, 1000, txn="late")
    await schedule_message(client, 100_000, txn="soon")
    await schedule_message(client, 500_000, txn="later")
    clock.advance(101_000)  # none sent: the scheduler is stopped
    stats = await admin_get(client, "/stats")
    assert stats == {
        "scheduled": 3,
        "sending": 0,
        "due_now": 2,
        "overdue": 1,
        "overdue_after_ms": 60_000,
        "oldest_overdue_ms": clock.now_ms() - (start + 1000),
        "failures_last_hour": {"M_FORBIDDEN": 2, "M_TOO_LARGE": 1},
    }
    tight = await admin_get(client, "/stats?overdue_ms=0")
    assert tight["overdue"] == 2
    clock.advance(3_600_000)
    later = await admin_get(client, "/stats")
    assert later["failures_last_hour"] == {}
    assert later["overdue"] == 3


# The command line --------------------------------------------------------------------------------


async def cli(*args: str) -> int:
    """`python -m app admin ...` in this process (in a thread: it runs its own event loop)."""
    return await asyncio.to_thread(main, ["admin", *args])


async def test_the_command_line_does_the_same(
    client: httpx.AsyncClient,
    app: FastAPI,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("SIDECAR_HOMESERVER_URL", "SIDECAR_TOKEN_KEYS", "SIDECAR_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SIDECAR_DATABASE_URL", database_url)
    one = await schedule_message(client, 1000, txn="one")
    two = await schedule_message(client, 1000, txn="two", room=enc(ROOM2))
    bobs = await schedule_message(client, 1000, txn="bob", headers=BOB)
    capsys.readouterr()

    def output() -> Any:
        return json.loads(capsys.readouterr().out)

    assert await cli("list", "--user", ALICE_ID, "--limit", "1") == 0
    page = output()
    assert [e["delay_id"] for e in page["delayed_events"]] == [min(one, two)]
    assert page["counts"]["scheduled"] == 2
    assert await cli("list", "--user", ALICE_ID, "--from", page["next_batch"]) == 0
    assert [e["delay_id"] for e in output()["delayed_events"]] == [max(one, two)]
    assert await cli("stats") == 0
    assert output()["scheduled"] == 3
    assert await cli("cancel", f"--delay-id={one}") == 0
    assert output() == {"cancelled": 1}
    assert await cli("cancel", "--room", ROOM2) == 0
    assert output() == {"cancelled": 1, "sending": 0}
    assert await cli("purge", "--user", ALICE_ID) == 0
    assert output() == {"purged": 2, "scheduled": 0}
    assert await cli("cancel", "--user", BOB_ID) == 0
    assert output() == {"cancelled": 1, "sending": 0}
    assert {(row["delay_id"], row["status"]) for row in await rows(app)} == {(bobs, "cancelled")}
    assert await tokens(app) == []


async def test_the_command_line_refuses_in_matrix_shape(
    database_url: str,
    clean_db: None,
    settings_overrides: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SIDECAR_DATABASE_URL", database_url)
    assert await cli("cancel", "--delay-id", "unknown") == 1
    assert json.loads(capsys.readouterr().err)["errcode"] == "M_NOT_FOUND"
    assert await cli("purge", "--user", "alice") == 1
    assert json.loads(capsys.readouterr().err)["errcode"] == "M_INVALID_PARAM"
    assert await cli("list", "--from", "!!!") == 1
    assert json.loads(capsys.readouterr().err)["errcode"] == "M_INVALID_PARAM"
    monkeypatch.delenv("SIDECAR_DATABASE_URL")
    assert await cli("stats") == 2
    assert "SIDECAR_DATABASE_URL: is required" in capsys.readouterr().err
