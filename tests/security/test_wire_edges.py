"""A replay says exactly what the client asked: a state key that reads as a dot segment (`.` or
`..`) stays that state key, in the replay and in the newer-state check."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from tests.integration.common import ROOM, run_due, schedule_b
from tests.security.support import status_of
from tests.support.fakes import FakeClock, FakeHomeserver

MEMBER = "m.call.member"


@pytest.mark.parametrize("key", [".", ".."])
async def test_a_dot_state_key_is_replayed_as_that_key(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver, key: str
) -> None:
    # httpx resolves `.`/`..` segments of a URL: unescaped, "." became the empty state key and
    # ".." a PUT to the room's state list.
    homeserver.state[(ROOM, MEMBER, "")] = {"sender": "@bob:test", "content": {"keep": True}}
    r = await schedule_b(client, {"delay_ms": 0, "state_key": key, "content": {"k": key}})
    assert r.status_code == 200, r.text
    assert await run_due(app) == 1
    [replay] = homeserver.replays()
    assert replay.url.raw_path.split(b"?")[0].endswith(b"/state/m.call.member/" + b"%2E" * len(key))
    assert homeserver.state[(ROOM, MEMBER, key)]["content"] == {"k": key}
    assert homeserver.state[(ROOM, MEMBER, "")]["content"] == {"keep": True}
    assert (await status_of(app, r.json()["delay_id"]))[0] == "sent"


async def test_the_newer_state_check_reads_the_dot_state_key(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    r = await schedule_b(client, {"delay_ms": 10, "state_key": ".", "content": {"mine": 1}})
    assert r.status_code == 200, r.text
    clock.advance(5)
    # Bob sets the empty key, not ".": Alice's event must still go out.
    homeserver.state[(ROOM, MEMBER, "")] = {
        "sender": "@bob:test",
        "origin_server_ts": clock.now_ms(),
        "content": {},
    }
    clock.advance(5)
    assert await run_due(app) == 1
    assert homeserver.state[(ROOM, MEMBER, ".")]["content"] == {"mine": 1}
    assert (await status_of(app, r.json()["delay_id"]))[0] == "sent"
