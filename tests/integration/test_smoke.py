from __future__ import annotations

import httpx

from tests.support.fakes import FakeClock, FakeHomeserver

AUTH = {"Authorization": "Bearer alice_token"}
ROOM = "%21room%3Atest"


async def test_schedule_and_replay(
    client: httpx.AsyncClient, clock: FakeClock, homeserver: FakeHomeserver, app
) -> None:
    r = await client.put(
        f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1?org.matrix.msc4140.delay=1000",
        json={"body": "hi"},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    delay_id = r.json()["delay_id"]
    replay = app.state.container.replay
    assert await replay.run_due() == 0
    clock.advance(1000)
    assert await replay.run_due() == 1
    assert len(homeserver.messages) == 1
    r = await client.get(f"/_matrix/client/v1/delayed_events/{delay_id}", headers=AUTH)
    assert r.json()["outcome"] == "send", r.text
