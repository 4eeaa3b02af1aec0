"""Access tokens at rest: never readable from a dump of the database, kept only while a scheduled
event needs them, and still usable (or cleanly refused) across a key rotation."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess

import httpx
import pytest
from devstack.postgres import find_bindir
from fastapi import FastAPI

from app.crypto import new_key
from tests.integration.common import (
    ALICE,
    ALICE_PHONE,
    BOB,
    ROOM,
    act,
    bearer,
    enc,
    run_due,
    schedule_b,
    schedule_message,
    schedule_state,
    state_path,
)
from tests.security.support import (
    encodings,
    found_in,
    marker,
    running,
    secret_token,
    status_of,
    token_devices,
)
from tests.support.fakes import FakeClock, FakeHomeserver

ALICE_DEV = ("@alice:test", "ALICEDEV")
ALICE_PHONE_DEV = ("@alice:test", "PHONE")
BOB_DEV = ("@bob:test", "BOBDEV")


def pg_dump(database_url: str) -> str:
    """A plain-format dump of the whole database, as an operator's backup would hold it."""
    binary = find_bindir() / "pg_dump"
    if not binary.exists():
        pytest.skip(f"no pg_dump next to pg_ctl ({binary})")
    url = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    done = subprocess.run(
        [str(binary), "--format=plain", "--no-owner", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# A database dump ---------------------------------------------------------------------------------


async def test_dump_holds_no_token(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver, database_url: str
) -> None:
    tokens = {name: secret_token(name) for name in ("alice", "alice2", "bob", "carol")}
    homeserver.add_user(tokens["alice"], "@alice:test", "LAPTOP")
    homeserver.add_user(tokens["alice2"], "@alice:test", "LAPTOP")  # a newer token, same device
    homeserver.add_user(tokens["bob"], "@bob:test", "BOBDEV")
    homeserver.add_user(tokens["carol"], "@carol:test", None)
    content = marker("content")

    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[name]}"}

    laptop = await schedule_message(
        client, 60_000, txn="a", headers=auth("alice"), content={"body": content}
    )
    await schedule_state(client, 60_000, key="k", headers=auth("bob"))
    r = await schedule_b(
        client, {"delay_ms": 60_000, "content": {"b": content}}, headers=auth("carol")
    )
    assert r.status_code == 200, r.text
    # The newer token of the same device replaces the stored one (and it, too, stays unreadable).
    assert (await act(client, laptop, "restart", headers=auth("alice2"))).status_code == 200
    # A query-parameter token is kept just the same.
    r = await client.put(
        f"/_matrix/client/v3/rooms/{enc(ROOM)}/send/m.room.message/q"
        f"?org.matrix.msc4140.delay=60000&access_token={tokens['bob']}",
        json={"q": 1},
    )
    assert r.status_code == 200, r.text

    dump = await asyncio.to_thread(pg_dump, database_url)
    assert laptop in dump  # the dump does hold the rows
    assert content in dump
    assert "COPY public.device_token" in dump
    assert len(await token_devices(app)) == 3
    for token in tokens.values():
        assert found_in(dump, encodings(token)) == [], token
    assert "syt_" not in dump


# Tokens are kept only while needed -------------------------------------------------------------


async def test_token_removed_after_last_event_sent_by_action(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    first = await schedule_message(client, 10_000, txn="1")
    second = await schedule_message(client, 10_000, txn="2")
    assert await token_devices(app) == {ALICE_DEV}
    assert (await act(client, first, "send", headers=ALICE)).status_code == 200
    assert await token_devices(app) == {ALICE_DEV}  # the second still needs it
    assert (await act(client, second, "send")).status_code == 200
    assert await token_devices(app) == set()


async def test_token_removed_after_last_event_cancelled(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    delay_id = await schedule_message(client, 10_000)
    r = await act(client, delay_id, "cancel", headers=ALICE, prefix="/_matrix/client/v1")
    assert r.status_code == 200
    assert await token_devices(app) == set()


async def test_token_removed_after_last_event_replayed(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock
) -> None:
    await schedule_message(client, 1000, txn="1")
    await schedule_message(client, 2000, txn="2")
    clock.advance(1000)
    assert await run_due(app) == 1
    assert await token_devices(app) == {ALICE_DEV}
    clock.advance(1000)
    assert await run_due(app) == 1
    assert await token_devices(app) == set()


async def test_token_removed_after_last_event_refused(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_message(client, 1000)
    homeserver.fail_next.append(httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "no"}))
    clock.advance(1000)
    assert await run_due(app) == 1
    assert (await status_of(app, delay_id))[0] == "failed"
    assert await token_devices(app) == set()


async def test_token_kept_while_a_refused_send_leaves_the_event_scheduled(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_message(client, 10_000)
    homeserver.fail_next.append(httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "no"}))
    assert (await act(client, delay_id, "send", headers=ALICE)).status_code == 403
    assert await token_devices(app) == {ALICE_DEV}


async def test_tokens_are_per_device(client: httpx.AsyncClient, app: FastAPI) -> None:
    laptop = await schedule_message(client, 10_000, txn="l", headers=ALICE)
    await schedule_message(client, 10_000, txn="p", headers=ALICE_PHONE)
    await schedule_message(client, 10_000, txn="b", headers=BOB)
    assert await token_devices(app) == {ALICE_DEV, ALICE_PHONE_DEV, BOB_DEV}
    assert (await act(client, laptop, "cancel", headers=ALICE_PHONE)).status_code == 200
    assert await token_devices(app) == {ALICE_PHONE_DEV, BOB_DEV}


async def test_token_removed_when_newer_state_cancels_on_replay(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    await schedule_state(client, 5000, key="k")
    clock.advance(1000)
    homeserver.state[(ROOM, "m.call.member", "k")] = {
        "event_id": "$bob",
        "sender": "@bob:test",
        "origin_server_ts": clock.now_ms(),
        "content": {},
    }
    clock.advance(4000)
    assert await run_due(app) == 1
    assert homeserver.replays() == []
    assert await token_devices(app) == set()


async def test_token_removed_when_passed_through_state_cancels(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock
) -> None:
    delay_id = await schedule_state(client, 5000, key="k")
    await schedule_state(client, 5000, key="k", headers=BOB)  # bob's own is left alone
    clock.advance(1000)
    r = await client.put(state_path(enc("k")), json={"bob": True}, headers=BOB)
    assert r.status_code == 200, r.text
    status, error = await status_of(app, delay_id)
    assert status == "cancelled"
    assert error is not None
    assert json.loads(error)["errcode"] == "M_CANCELLED_BY_STATE_UPDATE"
    assert await token_devices(app) == {BOB_DEV}


# Key rotation ----------------------------------------------------------------------------------


async def test_key_rotation(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    key_a, key_b = new_key(), new_key()
    async with running(database_url, clock, homeserver, token_keys=key_a) as (_, client):
        kept = await schedule_message(client, 1000, txn="kept", headers=ALICE)
        refreshed = await schedule_message(client, 5000, txn="refreshed", headers=ALICE_PHONE)
        lost = await schedule_message(client, 5000, txn="lost", headers=BOB)

    # The new key first, the old one second: every stored token still opens.
    async with running(database_url, clock, homeserver, token_keys=f"{key_b},{key_a}") as (
        app,
        client,
    ):
        clock.advance(1000)
        assert await run_due(app) == 1
        [replay] = homeserver.replays()
        assert bearer(replay) == "alice_token"
        assert (await status_of(app, kept))[0] == "sent"
        # An authenticated request from a device re-encrypts its token under the new key.
        assert (await act(client, refreshed, "restart", headers=ALICE_PHONE)).status_code == 200

    # The old key removed: the re-encrypted token still opens; the other is finalised with an
    # error instead of being sent or crashing the replay.
    async with running(database_url, clock, homeserver, token_keys=key_b) as (app, client):
        clock.advance(5000)
        assert await run_due(app) == 2
        assert [bearer(r) for r in homeserver.replays()] == ["alice_token", "alice_phone"]
        assert (await status_of(app, refreshed))[0] == "sent"
        status, error = await status_of(app, lost)
        assert status == "failed"
        assert error is not None
        assert json.loads(error)["errcode"] == "M_UNKNOWN_TOKEN"
        assert await token_devices(app) == set()
        r = await client.get(f"/_matrix/client/v1/delayed_events/{lost}", headers=BOB)
        assert r.status_code == 200
        assert (r.json()["outcome"], r.json()["reason"]) == ("cancel", "error")


async def test_send_action_with_a_token_no_key_opens(
    database_url: str,
    clean_db: None,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An id of the form issued before ids carried a tag: one tagged under the replaced key would
    # not be found at all without a token.
    monkeypatch.setattr("app.service.new_delay_id", lambda ids: secrets.token_urlsafe(18))
    async with running(database_url, clock, homeserver, token_keys=new_key()) as (_, client):
        delay_id = await schedule_message(client, 10_000)
    async with running(database_url, clock, homeserver, token_keys=new_key()) as (app, client):
        r = await act(client, delay_id, "send")  # tokenless: the stored token is all there is
        # Not a 401: that would log the caller out, whose own credential is not at fault.
        assert r.status_code == 404, r.text
        assert r.json()["errcode"] == "M_NOT_FOUND"
        assert homeserver.replays() == []
        status, error = await status_of(app, delay_id)
        assert status == "failed"
        assert error is not None
        assert json.loads(error)["errcode"] == "M_UNKNOWN_TOKEN"
