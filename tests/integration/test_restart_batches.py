"""Restarts that arrive together are written in one batch; each still gets the answer it would
have had alone."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI

from tests.integration.common import ALICE, ALICE_2, BOB, V1, act, rows, schedule_message
from tests.support.fakes import FakeClock


async def test_restarts_in_one_batch_are_answered_each_for_its_own_event(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock
) -> None:
    start = clock.now_ms()
    alices = await schedule_message(client, 10_000, txn="a", headers=ALICE)
    bobs = await schedule_message(client, 20_000, txn="b", headers=BOB)
    clock.advance(3000)
    answers = await asyncio.gather(
        act(client, alices, "restart", headers=BOB),  # not Bob's: not found, batch or not
        act(client, alices, "restart", headers=ALICE_2),
        act(client, bobs, "restart"),  # no token: the delay_id is the capability
        act(client, "no-such-id", "restart", headers=ALICE),
        act(client, bobs, "restart", prefix=V1, headers=ALICE),
    )
    assert [r.status_code for r in answers] == [404, 200, 200, 404, 404]
    send_ts = {row["delay_id"]: row["send_ts"] for row in await rows(app)}
    assert send_ts == {alices: start + 3000 + 10_000, bobs: start + 3000 + 20_000}


async def test_a_restart_after_the_event_was_cancelled_is_not_found(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    delay_id = await schedule_message(client, 10_000)
    assert (await act(client, delay_id, "cancel", headers=ALICE)).status_code == 200
    answers = await asyncio.gather(
        *(act(client, delay_id, "restart", headers=ALICE) for _ in range(5))
    )
    assert {r.status_code for r in answers} == {404}
