"""Secrets stay secret: no access token, `Bearer`, or event content reaches the logs (at DEBUG,
with the logging the sidecar configures for itself), error answers, response headers or metrics,
whatever endpoint is called and however the replay goes."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any
from unittest.mock import patch

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from app.__main__ import configure_logging
from tests.conftest import make_settings
from tests.integration.common import DELAY, ROOM, UNSTABLE, V1, V3, enc, run_due, state_path
from tests.security.support import found_in, marker, secret_token
from tests.support.fakes import FakeClock, FakeHomeserver

USERS = {"alice": ("@alice:test", "LAPTOP"), "bob": ("@bob:test", "BOBDEV")}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"retry_window_seconds": 10.0, "log_level": "DEBUG"}


@pytest.fixture(params=["text", "json"])
def logs(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture, database_url: str
) -> Iterator[pytest.LogCaptureFixture]:
    """Every record at DEBUG, from every logger, under the levels and the format (text or JSON)
    `serve` configures; what that handler writes is kept as `caplog.written`."""
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in ("httpx", "apscheduler", "sqlalchemy")}
    handlers = list(root.handlers)
    caplog.set_level(logging.DEBUG)
    written = io.StringIO()
    settings = make_settings(database_url, log_level="DEBUG", log_format=request.param)
    with patch("sys.stderr", written):
        configure_logging(settings)
    caplog.written = written  # type: ignore[attr-defined]
    try:
        yield caplog
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """The formatted records (tracebacks included), every attribute a structured formatter
    could print, and what the configured handler wrote."""
    written: io.StringIO = caplog.written  # type: ignore[attr-defined]
    return (
        caplog.text
        + "\n".join(repr(vars(record)) for record in caplog.records)
        + written.getvalue()
    )


class Session:
    """Drives the sidecar with recognisable tokens and content, keeping every answer."""

    def __init__(self, client: httpx.AsyncClient, homeserver: FakeHomeserver) -> None:
        self.client = client
        self.homeserver = homeserver
        self.tokens = {name: secret_token(name) for name in USERS}
        self.stranger = secret_token("stranger")  # unknown to the homeserver
        for name, (user_id, device_id) in USERS.items():
            homeserver.add_user(self.tokens[name], user_id, device_id)
        self.markers: list[str] = []
        self.answers: list[httpx.Response] = []
        self.lookups: list[httpx.Response] = []  # an owner's own content is expected here

    def auth(self, name: str) -> dict[str, str]:
        token = self.stranger if name == "stranger" else self.tokens[name]
        return {"Authorization": f"Bearer {token}"}

    def content(self, name: str) -> dict[str, Any]:
        mark = marker(name)
        self.markers.append(mark)
        return {"body": mark, "nested": {"k": [mark]}}

    async def call(
        self, method: str, path: str, *, who: str | None = "alice", lookup: bool = False, **kw: Any
    ) -> httpx.Response:
        headers = kw.pop("headers", None) or (self.auth(who) if who else {})
        r = await self.client.request(method, path, headers=headers, **kw)
        (self.lookups if lookup else self.answers).append(r)
        return r

    async def schedule(self, delay: int, who: str = "alice", txn: str | None = None) -> str:
        txn = txn or marker("txn")
        r = await self.call(
            "PUT",
            f"{V3}/rooms/{enc(ROOM)}/send/m.room.message/{txn}?{DELAY}={delay}",
            who=who,
            json=self.content("msg"),
        )
        assert r.status_code == 200, r.text
        delay_id: str = r.json()["delay_id"]
        return delay_id


def other_id(delay_id: str) -> str:
    """`delay_id` with its last character changed: an id that was never issued."""
    return delay_id[:-1] + ("y" if delay_id.endswith("x") else "x")


async def drive_every_endpoint(s: Session, app: FastAPI, clock: FakeClock) -> list[str]:
    """Every route, its errors and every kind of replay; returns the ids still scheduled."""
    hs = s.homeserver
    # Scheduling, both generations, every form.
    first = await s.schedule(60_000, txn="t1")
    assert await s.schedule(60_000, txn="t1") == first  # a repeated transaction
    r = await s.call(
        "POST", f"{V3}/rooms/{enc(ROOM)}/send/m.room.message?{DELAY}=60000", json=s.content("p")
    )
    assert r.status_code == 200
    r = await s.call(
        "PUT", state_path(enc("_@alice:test_LAPTOP")) + f"?{DELAY}=60000", json=s.content("s")
    )
    assert r.status_code == 200
    for prefix in (V3, UNSTABLE):
        r = await s.call(
            "PUT",
            f"{prefix}/rooms/{enc(ROOM)}/delayed_event/m.call.member/{marker('b')}",
            json={"delay_ms": 60_000, "state_key": "k", "content": s.content("b")},
        )
        assert r.status_code == 200, r.text
    r = await s.call(
        "PUT",
        f"{V3}/rooms/{enc(ROOM)}/send/m.room.message/q?{DELAY}=60000"
        f"&access_token={s.tokens['bob']}",
        who=None,
        json=s.content("q"),
    )
    assert r.status_code == 200, r.text
    await s.schedule(60_000, who="bob")

    # Scheduling errors, each carrying content the answer must not echo.
    bad_requests: list[tuple[str, str, bytes]] = [
        ("PUT", f"{V3}/rooms/{enc(ROOM)}/send/m.room.message/e1?{DELAY}=-5", b"{}"),
        ("PUT", f"{V3}/rooms/{enc(ROOM)}/send/m.room.message/e2?{DELAY}=10", b"{" + b"x" * 10),
        ("PUT", f"{V3}/rooms/nope/send/m.room.message/e3?{DELAY}=10", b"{}"),
        ("PUT", f"{V3}/rooms/{enc(ROOM)}/send/m.room.message/e4?{DELAY}=999999999999", b"{}"),
        ("PUT", f"{V3}/rooms/{enc(ROOM)}/send/m.room.message/e5?{DELAY}=1&{DELAY}=2", b"{}"),
        ("PUT", f"{V3}/rooms/{enc(ROOM)}/delayed_event/m.x/e6", b'{"delay_ms":"soon"}'),
        ("PUT", f"{V3}/rooms/{enc(ROOM)}/send/m.room.message/e7?{DELAY}=10", b"[1]"),
    ]
    for method, path, body in bad_requests:
        mark = marker("bad")
        s.markers.append(mark)
        content = body if body != b"{}" else b'{"body":"' + mark.encode() + b'"}'
        r = await s.call(method, path, content=content)
        assert 400 <= r.status_code < 500, (path, r.text)
    mark = marker("huge")
    s.markers.append(mark)
    r = await s.call(
        "PUT",
        f"{V3}/rooms/{enc(ROOM)}/send/m.room.message/big?{DELAY}=10",
        content=b'{"body":"' + mark.encode() * 10_000 + b'"}',
    )
    assert r.status_code == 413
    for who in (None, "stranger"):
        r = await s.call(
            "PUT",
            f"{V3}/rooms/{enc(ROOM)}/send/m.room.message/u?{DELAY}=10",
            who=who,
            json=s.content("unauth"),
        )
        assert r.status_code == 401
    r = await s.call(
        "PUT",
        f"{V3}/rooms/{enc(ROOM)}/send/m.room.message/basic?{DELAY}=10",
        headers={"Authorization": f"Basic {s.tokens['alice']}"},
        json=s.content("basic"),
    )
    assert r.status_code == 401

    # Management: every action, both prefixes, both forms, with and without a token, and errors.
    for prefix in (UNSTABLE, V1):
        r = await s.call("POST", f"{prefix}/delayed_events/{first}/restart", json={})
        assert r.status_code == 200
        r = await s.call("POST", f"{prefix}/delayed_events/{first}", json={"action": "restart"})
        assert r.status_code == 200
    assert (await s.call("POST", f"{UNSTABLE}/delayed_events/{first}/restart", who=None)).is_success
    for path, who, body in [
        (f"{V1}/delayed_events/{first}/restart", None, {}),
        (f"{V1}/delayed_events/{first}/restart", "stranger", {}),
        (f"{UNSTABLE}/delayed_events/{first}/cancel", "bob", {}),
        (f"{UNSTABLE}/delayed_events/{first}/nonsense", "alice", {}),
        (f"{V1}/delayed_events/{first}", "alice", {"action": "explode"}),
        (f"{V1}/delayed_events/{first}", "alice", {}),
        (f"{V1}/delayed_events/{other_id(first)}/send", "alice", {}),
    ]:
        r = await s.call("POST", path, who=who, json=body)
        assert 400 <= r.status_code < 500, (path, r.text)
    cancelled = await s.schedule(60_000)
    assert (await s.call("POST", f"{V1}/delayed_events/{cancelled}/cancel", json={})).is_success
    assert (
        await s.call("POST", f"{V1}/delayed_events/{cancelled}/send", json={})
    ).status_code == 409
    sent = await s.schedule(60_000)
    assert (await s.call("POST", f"{UNSTABLE}/delayed_events/{sent}/send", who=None)).is_success

    # The send action refused, and failing.
    refused = await s.schedule(60_000)
    hs.fail_next.append(httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "no"}))
    assert (await s.call("POST", f"{V1}/delayed_events/{refused}/send", json={})).status_code == 403
    hs.fail_next.append(httpx.ConnectError("refused"))
    r = await s.call("POST", f"{V1}/delayed_events/{refused}/send", json={})
    assert r.status_code == 502

    # Lookups: the owner's content is the answer here, but never a token.
    for prefix in (UNSTABLE, V1):
        for query in ("", "?status=scheduled", "?status=finalised&limit=1", f"?delay_id={first}"):
            r = await s.call("GET", f"{prefix}/delayed_events{query}", lookup=True)
            assert r.status_code == 200
        r = await s.call("GET", f"{prefix}/delayed_events/{first}", lookup=True)
        assert r.status_code == 200
    for path, who in [
        (f"{V1}/delayed_events/{first}", "bob"),
        (f"{V1}/delayed_events", None),
        (f"{V1}/delayed_events", "stranger"),
        (f"{V1}/delayed_events?from=%25", "alice"),
    ]:
        r = await s.call("GET", path, who=who)
        assert 400 <= r.status_code < 500, (path, r.text)

    # Discovery, and requests passed through, with header and query tokens.
    assert (await s.call("GET", "/_matrix/client/versions")).status_code == 200
    r = await s.call("GET", f"/_matrix/client/versions?access_token={s.tokens['bob']}", who=None)
    assert r.status_code == 200
    assert (await s.call("GET", "/_matrix/client/v3/capabilities")).status_code == 200
    r = await s.call(
        "GET", f"/_matrix/client/v3/capabilities?access_token={s.tokens['bob']}", who=None
    )
    assert r.status_code == 401  # the fake homeserver reads header tokens only
    assert (
        await s.call("GET", "/_matrix/client/v3/capabilities", who="stranger")
    ).status_code == 401
    r = await s.call("PUT", f"{V3}/rooms/{enc(ROOM)}/send/m.room.message/now", json=s.content("n"))
    assert r.status_code == 200
    # Newer state by another user cancels alice's delayed state for the key.
    r = await s.call(
        "PUT", state_path(enc("_@alice:test_LAPTOP")), who="bob", json=s.content("newer")
    )
    assert r.status_code == 200

    # Replays: sent, refused, retried, given up, an unexpected failure, no usable token.
    ok = await s.schedule(1000)
    refused_on_timeout = await s.schedule(1001)
    transient = await s.schedule(1002)
    await s.schedule(1003)  # the homeserver client raises on this one
    clock.advance(1003)
    hs.fail_next.extend(
        [
            httpx.Response(200, json={"event_id": "$ok"}),
            httpx.Response(403, json={"errcode": "M_FORBIDDEN", "error": "power levels"}),
            httpx.Response(503, content=b"<html>down</html>"),
            RuntimeError("the homeserver client broke"),
        ]
    )
    assert await run_due(app) >= 4  # and the send action's retry
    # Past the broken one's lease: until then its claim holds the room (claims made without a
    # replica lock hold their room even against their own maker's next claim).
    clock.advance(31_000)
    hs.fail_next.append(httpx.ReadTimeout("slow"))
    assert await run_due(app) >= 1  # the transient one gives up, the broken one is sent
    untokened = await s.schedule(1000, who="bob")
    async with app.state.container.engine.begin() as conn:
        await conn.execute(text("UPDATE device_token SET token = 'garbage'"))
    clock.advance(1000)
    assert await run_due(app) >= 1
    async with app.state.container.engine.connect() as conn:
        outcome = await conn.execute(
            text("SELECT delay_id, status FROM delayed_event WHERE delay_id IN (:a, :b, :c, :d)"),
            {"a": ok, "b": refused_on_timeout, "c": transient, "d": untokened},
        )
        statuses = dict(outcome.all())
    assert statuses == {
        ok: "sent",
        refused_on_timeout: "failed",
        transient: "failed",
        untokened: "failed",
    }

    # The sidecar's own port.
    for path in ("/health", "/metrics"):
        assert (await s.call("GET", path, who=None)).status_code == 200
    r = await s.call("GET", "/ready", who=None)
    assert r.json()["scheduler"] == "stopped"  # the tests drive replays themselves
    async with app.state.container.engine.connect() as conn:
        result = await conn.execute(
            text("SELECT delay_id FROM delayed_event WHERE status = 'scheduled'")
        )
        return list(result.scalars())


async def test_no_secret_in_logs_answers_or_metrics(
    client: httpx.AsyncClient,
    app: FastAPI,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    logs: pytest.LogCaptureFixture,
) -> None:
    s = Session(client, homeserver)
    scheduled = await drive_every_endpoint(s, app, clock)
    assert scheduled  # some events are still waiting: their ids are capabilities
    secrets = [*s.tokens.values(), s.stranger]
    forbidden = [*secrets, "Bearer", "bearer", *s.markers]

    logged = log_text(logs)
    assert "homeserver refused" in logged  # the replays were logged
    assert "giving up" in logged
    assert found_in(logged, forbidden) == []
    assert found_in(logged, scheduled) == []

    for r in s.answers + s.lookups:
        headers = "\n".join(f"{k}: {v}" for k, v in r.headers.multi_items())
        assert found_in(headers, forbidden) == [], r.request.url
        assert found_in(r.text, secrets + ["Bearer"]) == [], r.request.url
    for r in s.answers:
        assert found_in(r.text, s.markers) == [], (r.request.url, r.text)
    # The lookups do carry the owner's content: the check above is not vacuous.
    assert any(found_in(r.text, s.markers) for r in s.lookups)

    metrics = (await client.get("/metrics")).text
    assert "sidecar_delayed_events_failed_total" in metrics
    assert found_in(metrics, [*forbidden, *scheduled, "@alice", "@bob", ROOM]) == []


async def test_database_errors_do_not_log_statement_parameters(
    client: httpx.AsyncClient,
    app: FastAPI,
    homeserver: FakeHomeserver,
    logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected database error is logged with its traceback, but not with the values of
    the statement (the event's content, the encrypted token)."""
    s = Session(client, homeserver)
    monkeypatch.setattr("app.service.new_delay_id", lambda ids: "always-the-same-id")
    await s.schedule(60_000, txn="a")
    r = await s.call(
        "PUT",
        f"{V3}/rooms/{enc(ROOM)}/send/m.room.message/b?{DELAY}=60000",
        json=s.content("collides"),
    )
    assert r.status_code == 500
    assert r.json() == {"errcode": "M_UNKNOWN", "error": "Internal server error"}
    logged = log_text(logs)
    assert "IntegrityError" in logged  # the error was logged, with its traceback
    assert found_in(logged, [*s.tokens.values(), "Bearer", *s.markers]) == []
