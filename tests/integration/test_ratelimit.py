"""Rate limits through the API: per user with a token, per delay_id without, never in the way of
MatrixRTC's heartbeat."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tests.integration.common import ALICE, ALICE_PHONE, BOB, UNSTABLE, rows, schedule_message
from tests.support.fakes import FakeClock


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    return getattr(request, "param", {})


TIGHT = {
    "ratelimit_schedule_per_second": 1.0,
    "ratelimit_schedule_burst": 2,
    "ratelimit_manage_per_second": 1.0,
    "ratelimit_manage_burst": 2,
    "ratelimit_tokenless_per_second": 1.0,
    "ratelimit_tokenless_burst": 2,
}


@pytest.mark.parametrize("settings_overrides", [TIGHT], indirect=True)
async def test_scheduling_is_limited_per_user(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock
) -> None:
    await schedule_message(client, txn="a")
    await schedule_message(client, txn="b")
    r = await client.put(
        "/_matrix/client/v3/rooms/%21room%3Atest/send/m.room.message/c"
        "?org.matrix.msc4140.delay=1000",
        json={},
        headers=ALICE,
    )
    assert r.status_code == 429
    assert r.json()["errcode"] == "M_LIMIT_EXCEEDED"
    assert r.json()["retry_after_ms"] == 1000
    assert r.headers["Retry-After"] == "1"
    assert len(await rows(app)) == 2
    await schedule_message(client, txn="d", headers=BOB)  # another user is not affected
    clock.advance(1000)
    await schedule_message(client, txn="e")


@pytest.mark.parametrize("settings_overrides", [TIGHT], indirect=True)
async def test_management_is_limited_per_user_and_tokenless_per_delay_id(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    first = await schedule_message(client, txn="a")
    second = await schedule_message(client, txn="b")
    for _ in range(2):
        r = await client.post(f"{UNSTABLE}/delayed_events/{first}/restart", headers=ALICE)
        assert r.status_code == 200
    r = await client.post(f"{UNSTABLE}/delayed_events/{second}/restart", headers=ALICE)
    assert r.status_code == 429
    # Without a token each delay_id has its own bucket, whoever sends the request.
    for delay_id in (first, second):
        for _ in range(2):
            r = await client.post(f"{UNSTABLE}/delayed_events/{delay_id}/restart", json={})
            assert r.status_code == 200, r.text
    r = await client.post(f"{UNSTABLE}/delayed_events/{first}/restart", json={})
    assert r.status_code == 429
    assert "retry_after_ms" in r.json()
    r = await client.get(f"{UNSTABLE}/delayed_events", headers=ALICE)
    assert r.status_code == 429
    clock.advance(2000)
    r = await client.get(f"{UNSTABLE}/delayed_events", headers=ALICE)
    assert r.status_code == 200


async def test_matrixrtc_heartbeat_is_never_limited_at_the_defaults(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    # One user in a call on two devices, for ten minutes: each device restarts its delayed leave
    # every 5 s, and the SFU restarts each without a token every 8 s.
    leaves = {
        "laptop": (await schedule_message(client, 10_000, txn="l1"), ALICE),
        "phone": (
            await schedule_message(client, 10_000, txn="l2", headers=ALICE_PHONE),
            ALICE_PHONE,
        ),
    }
    statuses = []
    for tick in range(0, 600_000, 1000):
        for delay_id, headers in leaves.values():
            if tick % 5000 == 0:
                r = await client.post(
                    f"{UNSTABLE}/delayed_events/{delay_id}/restart", headers=headers
                )
                statuses.append(r.status_code)
            if tick % 8000 == 0:
                r = await client.post(f"{UNSTABLE}/delayed_events/{delay_id}/restart", json={})
                statuses.append(r.status_code)
        clock.advance(1000)
    assert len(statuses) == 2 * (600 // 5 + 600 // 8)
    assert set(statuses) == {200}
