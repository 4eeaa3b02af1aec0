"""The send action replays with the credential stored for the event, not the caller's: only the
caller's own token may answer 401 (clients log out on M_UNKNOWN_TOKEN). When the stored
credential fails, the event is finalised with that error and the caller gets a non-auth error."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from tests.integration.common import ALICE_PHONE, UNSTABLE, V1, act, assert_error, schedule_state
from tests.support.fakes import FakeHomeserver

AUTH_ERRCODES = ("M_UNKNOWN_TOKEN", "M_MISSING_TOKEN")


async def _status(app: FastAPI, delay_id: str) -> tuple[str, dict[str, str] | None]:
    async with app.state.container.engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT status, error FROM delayed_event WHERE delay_id = :d"),
                {"d": delay_id},
            )
        ).one()
    return row.status, json.loads(row.error) if row.error else None


async def _forget_stored_tokens(app: FastAPI) -> None:
    async with app.state.container.engine.begin() as conn:
        await conn.execute(text("DELETE FROM device_token"))


def _not_auth(r: httpx.Response) -> None:
    assert r.status_code != 401, r.text
    assert r.json()["errcode"] not in AUTH_ERRCODES, r.text


async def test_the_callers_own_bad_token_is_a_401(client: httpx.AsyncClient, app: FastAPI) -> None:
    delay_id = await schedule_state(client)
    r = await act(client, delay_id, "send", headers={"Authorization": "Bearer nope"})
    assert_error(r, 401, "M_UNKNOWN_TOKEN")
    assert (await _status(app, delay_id))[0] == "scheduled"


# Callers other than the scheduling device, and what a failed stored credential answers them.
OTHER_CALLERS = pytest.mark.parametrize(
    ("prefix", "headers", "status", "errcode"),
    [(UNSTABLE, None, 404, "M_NOT_FOUND"), (V1, ALICE_PHONE, 409, "M_UNKNOWN")],
    ids=["tokenless unstable", "other device v1"],
)


@OTHER_CALLERS
async def test_no_stored_token_is_not_the_callers_logout(
    client: httpx.AsyncClient,
    app: FastAPI,
    homeserver: FakeHomeserver,
    prefix: str,
    headers: dict[str, str] | None,
    status: int,
    errcode: str,
) -> None:
    delay_id = await schedule_state(client)
    await _forget_stored_tokens(app)
    r = await act(client, delay_id, "send", prefix=prefix, headers=headers)
    _not_auth(r)
    assert_error(r, status, errcode)
    event_status, error = await _status(app, delay_id)
    assert event_status == "failed"
    assert error is not None
    assert error["errcode"] == "M_UNKNOWN_TOKEN"
    assert homeserver.replays() == []


@OTHER_CALLERS
async def test_a_refused_stored_token_is_recorded_not_the_callers_logout(
    client: httpx.AsyncClient,
    app: FastAPI,
    homeserver: FakeHomeserver,
    prefix: str,
    headers: dict[str, str] | None,
    status: int,
    errcode: str,
) -> None:
    delay_id = await schedule_state(client)
    # The scheduling device logged out: its stored token is refused at the send.
    del homeserver.tokens["alice_token"]
    r = await act(client, delay_id, "send", prefix=prefix, headers=headers)
    _not_auth(r)
    assert_error(r, status, errcode)
    assert "M_UNKNOWN_TOKEN" in r.json()["error"]
    event_status, error = await _status(app, delay_id)
    assert event_status == "failed"
    assert error is not None
    assert error["errcode"] == "M_UNKNOWN_TOKEN"
    assert len(homeserver.replays()) == 1


@pytest.mark.parametrize("settings_overrides", [{"appservice_token": "as_refused"}])
async def test_a_refused_application_service_token_is_not_the_callers_logout(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    """The homeserver does not know the application service's token (a wrong setting)."""
    delay_id = await schedule_state(client)
    r = await act(client, delay_id, "send", prefix=V1, headers=ALICE_PHONE)
    _not_auth(r)
    assert_error(r, 409, "M_UNKNOWN")
    event_status, error = await _status(app, delay_id)
    assert event_status == "failed"
    assert error is not None
    assert error["errcode"] == "M_UNKNOWN_TOKEN"
