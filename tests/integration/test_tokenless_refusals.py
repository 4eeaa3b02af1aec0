"""Tokenless restarts that cannot be honoured are refused as early and as cheaply as they can be:
an id the sidecar never issued before its body is read, and a flood of ids of the form issued
before ids carried a tag lets no more than a handful of database lookups through at once, while
the restarts of events that exist under such ids go on."""

from __future__ import annotations

import json
import secrets
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Message

from app.delay_ids import DelayIds
from tests.integration.common import UNSTABLE, act, assert_error, rows, schedule_message
from tests.integration.test_forged_ids import Checkouts
from tests.support.fakes import FakeClock

TIGHT_UNTAGGED = {"ratelimit_untagged_per_second": 1.0, "ratelimit_untagged_burst": 2}


@pytest.fixture
def settings_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    return getattr(request, "param", {})


def restart_scope(
    app: FastAPI, delay_id: str, headers: list[tuple[bytes, bytes]], query: bytes = b""
) -> Any:
    path = f"{UNSTABLE}/delayed_events/{delay_id}/restart"
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"sidecar.test"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("sidecar.test", 80),
        "app": app,
    }


async def call_without_body(
    app: FastAPI, delay_id: str, headers: list[tuple[bytes, bytes]], query: bytes = b""
) -> tuple[int, dict[str, str], Any, bool]:
    """One tokenless restart whose body never arrives: status, headers, body, and whether the
    body was asked for."""
    asked = False
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal asked
        asked = True
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(restart_scope(app, delay_id, headers, query), receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    names = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], names, json.loads(body), asked


async def test_an_id_never_issued_is_refused_before_the_body_is_read(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    forged = DelayIds([secrets.token_bytes(32)]).new()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    status, names, body, asked = await call_without_body(app, forged, headers)
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
    assert not asked
    # The same answer as with a body (CORS included).
    full = await act(client, forged, "restart")
    assert_error(full, 404, "M_NOT_FOUND")
    assert body == full.json()
    assert names["access-control-allow-origin"] == full.headers["access-control-allow-origin"]


@pytest.mark.parametrize(
    "query",
    [b"x=1", b"%41=1", b"x%=", b"access_token_x=t", b"x=access_token", b"ACCESS_TOKEN=t"],
    ids=["other", "encoded-name", "bad-escape", "longer-name", "as-a-value", "capitals"],
)
async def test_a_query_without_an_access_token_does_not_delay_the_refusal(
    app: FastAPI, query: bytes
) -> None:
    forged = DelayIds([secrets.token_bytes(32)]).new()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    with Checkouts(app) as checkouts:
        status, _, body, asked = await call_without_body(app, forged, headers, query)
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
    assert not asked
    assert checkouts.count == 0


@pytest.mark.parametrize(
    "query",
    [b"access_token=", b"x=1&access_token", b"x=1;%61ccess_token=", b"access%5Ftoken="],
    ids=["empty", "no-value", "encoded-after-a-semicolon", "encoded-underscore"],
)
async def test_a_query_naming_an_access_token_goes_the_full_path(
    app: FastAPI, query: bytes
) -> None:
    # The sidecar reads these as an (empty) access token: refused as such, not as a tokenless call.
    forged = DelayIds([secrets.token_bytes(32)]).new()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    status, _, body, _ = await call_without_body(app, forged, headers, query)
    assert (status, body["errcode"]) == (401, "M_MISSING_TOKEN")


async def test_an_oversized_body_is_still_refused_first(app: FastAPI) -> None:
    forged = DelayIds([secrets.token_bytes(32)]).new()
    too_large = str(10 * 1024 * 1024 * 1024).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", too_large)]
    status, _, body, _ = await call_without_body(app, forged, headers)
    assert (status, body["errcode"]) == (413, "M_TOO_LARGE")


async def test_a_flood_of_untagged_ids_lets_few_lookups_through_at_once(
    client: httpx.AsyncClient,
) -> None:
    real = await schedule_message(client, 60_000)
    # 300 random ids of the untagged form, all at one instant (the clock does not move).
    statuses = [
        (await act(client, secrets.token_urlsafe(18), "restart")).status_code for _ in range(300)
    ]
    looked_up = [s for s in statuses if s != 429]
    assert set(looked_up) <= {404}
    assert 1 <= len(looked_up) <= 10
    assert (await act(client, real, "restart")).status_code == 200


@pytest.mark.parametrize("settings_overrides", [TIGHT_UNTAGGED], indirect=True)
async def test_a_spent_untagged_budget_refuses_before_the_body_is_read(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    for _ in range(2):
        assert (await act(client, secrets.token_urlsafe(18), "restart")).status_code == 404
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    status, names, body, asked = await call_without_body(app, secrets.token_urlsafe(18), headers)
    assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
    assert not asked
    assert names["retry-after"] == "1"
    # The same answer as the routed form gives.
    routed = await act(client, secrets.token_urlsafe(18), "restart", body_form=True)
    assert_error(routed, 429, "M_LIMIT_EXCEEDED")
    assert body == routed.json()


@pytest.mark.parametrize("settings_overrides", [TIGHT_UNTAGGED], indirect=True)
async def test_guesses_that_empty_the_untagged_budget_do_not_refuse_an_existing_id(
    app: FastAPI, client: httpx.AsyncClient, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.service.new_delay_id", lambda ids: secrets.token_urlsafe(18))
    old = await schedule_message(client, 10_000)  # an id of the form issued before tags
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    # Restarts on an existing id spend nothing: more of them than the burst, at one instant.
    for _ in range(4):
        assert (await act(client, old, "restart")).status_code == 200
    for _ in range(3):
        clock.advance(1000)  # the budget refills; the guesses spend it again at once
        statuses = [
            (await act(client, secrets.token_urlsafe(18), "restart")).status_code for _ in range(5)
        ]
        assert 404 in statuses
        assert statuses[-1] == 429
        status, _, body, _ = await call_without_body(app, secrets.token_urlsafe(18), headers)
        assert (status, body["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        # The participant's heartbeat goes on, by the heartbeat's path and the routed form.
        assert (await act(client, old, "restart")).status_code == 200
        assert (await act(client, old, "restart", body_form=True)).status_code == 200
        [row] = await rows(app)
        assert row["send_ts"] == clock.now_ms() + 10_000
