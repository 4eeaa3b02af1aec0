"""Calls without a token on ids the sidecar never issued are refused without a database call (a
flood of random ids cannot take the connections the heartbeat needs); ids issued before ids
carried a tag still work, within one shared budget that never touches callers with a token."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event

from app.delay_ids import DelayIds, Kind
from tests.integration.common import (
    ALICE,
    BOB,
    UNSTABLE,
    V1,
    act,
    assert_error,
    rows,
    schedule_message,
)
from tests.support.apps import app_and_client
from tests.support.fakes import FakeClock, FakeHomeserver


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    return getattr(request, "param", {})


class Checkouts:
    """Counts the connections taken from an app's pool."""

    def __init__(self, app: FastAPI) -> None:
        self.count = 0
        self._pool = app.state.container.engine.sync_engine.pool

    def _taken(self, *args: Any) -> None:
        self.count += 1

    def __enter__(self) -> Checkouts:
        event.listen(self._pool, "checkout", self._taken)
        return self

    def __exit__(self, *args: Any) -> None:
        event.remove(self._pool, "checkout", self._taken)


def forged_ids(real: str) -> Iterator[str]:
    yield DelayIds([os.urandom(32)]).new()  # tagged under a key this sidecar does not have
    yield real[:-1] + ("A" if real[-1] != "A" else "B")  # one character off
    yield real[:24] + base64.urlsafe_b64encode(os.urandom(9)).decode()  # a guessed tag
    yield "x"
    yield secrets.token_urlsafe(30)


def untagged_id(ids: Any) -> str:
    return secrets.token_urlsafe(18)  # the form delay_ids had before they carried a tag


async def test_forged_ids_are_not_found_without_a_database_call(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    real = await schedule_message(client, 60_000)
    assert app.state.container.service.delay_ids.kind(real) is Kind.TAGGED
    before = await rows(app)
    with Checkouts(app) as checkouts:
        for forged in forged_ids(real):
            for action in ("restart", "cancel", "send"):
                for body_form in (False, True):
                    r = await act(client, forged, action, body_form=body_form)
                    assert_error(r, 404, "M_NOT_FOUND")
    assert checkouts.count == 0
    assert await rows(app) == before
    # The check is not vacuous: the real id takes a connection and works.
    with Checkouts(app) as checkouts:
        assert (await act(client, real, "restart")).status_code == 200
    assert checkouts.count >= 1


async def test_many_forged_ids_never_reach_the_rate_limits_or_the_database(
    client: httpx.AsyncClient, app: FastAPI
) -> None:
    real = await schedule_message(client, 60_000)
    issuer = DelayIds([os.urandom(32)])
    with Checkouts(app) as checkouts:
        for _ in range(300):  # beyond every burst at the defaults
            r = await client.post(f"{UNSTABLE}/delayed_events/{issuer.new()}/restart")
            assert_error(r, 404, "M_NOT_FOUND")
    assert checkouts.count == 0
    assert (await act(client, real, "restart")).status_code == 200


async def test_ids_issued_before_tags_still_work(
    client: httpx.AsyncClient, app: FastAPI, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.service.new_delay_id", untagged_id)
    old = await schedule_message(client, 10_000)
    assert app.state.container.service.delay_ids.kind(old) is Kind.UNTAGGED
    clock.advance(5000)
    assert (await act(client, old, "restart")).status_code == 200
    [row] = await rows(app)
    assert row["send_ts"] == clock.now_ms() + 10_000
    assert (await act(client, old, "restart", headers=ALICE, prefix=V1)).status_code == 200
    assert (await act(client, old, "cancel", body_form=True)).status_code == 200
    [row] = await rows(app)
    assert row["status"] == "cancelled"


async def test_ids_tagged_under_an_older_key_still_work(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    old_key, new_key = (base64.urlsafe_b64encode(os.urandom(32)).decode() for _ in range(2))
    transport = homeserver.transport()
    async with app_and_client(database_url, clock, transport, token_keys=old_key) as (_, client):
        delay_id = await schedule_message(client, 10_000)
    rotated = f"{new_key},{old_key}"
    async with app_and_client(database_url, clock, transport, token_keys=rotated) as (_, client):
        assert (await act(client, delay_id, "restart")).status_code == 200
        newer = await schedule_message(client, 10_000, txn="t2")
    async with app_and_client(database_url, clock, transport, token_keys=new_key) as (_, client):
        assert (await act(client, newer, "restart")).status_code == 200
        # Once the key that tagged an id is removed, tokenless calls on it are refused.
        assert_error(await act(client, delay_id, "restart"), 404, "M_NOT_FOUND")
        assert (await act(client, delay_id, "restart", headers=ALICE)).status_code == 200


TIGHT_UNTAGGED = {"ratelimit_untagged_per_second": 1.0, "ratelimit_untagged_burst": 2}


@pytest.mark.parametrize("settings_overrides", [TIGHT_UNTAGGED], indirect=True)
async def test_the_untagged_budget_never_holds_up_owners_with_a_token(
    client: httpx.AsyncClient, app: FastAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    tagged = await schedule_message(client, 60_000, txn="tagged", headers=BOB)
    monkeypatch.setattr("app.service.new_delay_id", untagged_id)
    old = await schedule_message(client, 60_000, txn="old")
    statuses = [
        (await act(client, secrets.token_urlsafe(18), "restart")).status_code for _ in range(50)
    ]
    assert statuses[:2] == [404, 404]
    assert set(statuses[2:]) == {429}
    with Checkouts(app) as checkouts:
        assert_error(await act(client, old, "restart"), 429, "M_LIMIT_EXCEEDED")
    assert checkouts.count == 0
    # The flood spent the shared budget only: the owner with a token, and tokenless calls on
    # tagged ids, go on.
    for _ in range(20):
        assert (await act(client, old, "restart", headers=ALICE)).status_code == 200
    assert (await act(client, tagged, "restart")).status_code == 200
    assert (await act(client, tagged, "restart", headers=BOB)).status_code == 200
