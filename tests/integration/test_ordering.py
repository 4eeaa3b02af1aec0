"""Order of replays: send-time order overall, and never a later state event before an earlier one
for the same (room, type, state_key)."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from tests.support.fakes import FakeClock, FakeHomeserver

ROOM = "%21room%3Atest"


async def _state(
    client: httpx.AsyncClient, token: str, key: str, delay: int, n: int, kind: str = "m.topic"
) -> str:
    r = await client.put(
        f"/_matrix/client/v3/rooms/{ROOM}/state/{kind}/{key}?org.matrix.msc4140.delay={delay}",
        json={"n": n},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200, r.text
    delay_id: str = r.json()["delay_id"]
    return delay_id


async def test_overdue_events_replay_in_send_time_order(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    # Memberships go one after the other (state with a key each that authorises nothing, such
    # as call memberships, goes out side by side, in no particular order among itself).
    for n, delay in enumerate([5000, 1000, 3000, 2000, 4000]):
        await _state(client, "alice_token", f"k{n}", delay, n, kind="m.room.member")
    clock.advance(10_000)
    await app.state.container.replay.run_due()
    order = [r.url.raw_path.decode().rsplit("/", 1)[-1] for r in homeserver.replays()]
    assert order == ["k1", "k3", "k2", "k4", "k0"]


async def test_later_state_for_one_key_waits_for_the_earlier(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    await _state(client, "alice_token", "same", 1000, 1)
    await _state(client, "alice_token", "same", 2000, 2)
    # The earlier one fails transiently; the later one must not overtake it.
    homeserver.fail_next.append(httpx.Response(503, json={"errcode": "M_UNKNOWN", "error": "x"}))
    clock.advance(3000)
    replay = app.state.container.replay
    await replay.run_due()
    assert ("!room:test", "m.topic", "same") not in homeserver.state
    clock.advance(60_000)
    await replay.run_due()
    assert homeserver.state[("!room:test", "m.topic", "same")]["content"] == {"n": 2}
    contents = [r.content for r in homeserver.replays()]
    assert contents == [b'{"n":1}', b'{"n":1}', b'{"n":2}']
