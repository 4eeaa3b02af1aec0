"""Errors at the edge: unknown routes, wrong methods, CORS, and what the sidecar answers when its
database is away. Every error is a Matrix error with `errcode` and `error`, never a stack trace."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from app.main import create_app
from tests.conftest import make_settings
from tests.integration.common import (
    ALICE,
    DELAY,
    ROOM_PATH,
    UNSTABLE,
    V1,
    V3,
    assert_error,
    schedule_message,
    send_path,
    state_path,
)
from tests.support.fakes import FakeClock, FakeHomeserver


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/_matrix/client/v3/unknown"),
        ("POST", f"{UNSTABLE}/delayed_events/"),
        ("GET", f"{UNSTABLE}/delayed_events/a/b/c"),
        ("PUT", f"{V3}/rooms/{ROOM_PATH}/delayed_event/m.room.message"),
        ("GET", "/_matrix/client/v2/delayed_events"),
    ],
)
async def test_unknown_path(client: httpx.AsyncClient, method: str, path: str) -> None:
    r = await client.request(method, path, headers=ALICE)
    assert_error(r, 404, "M_UNRECOGNIZED")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", f"{V1}/delayed_events"),
        ("PUT", f"{V1}/delayed_events/abc"),
        ("GET", f"{UNSTABLE}/delayed_events/abc/send"),
        ("POST", "/_matrix/client/versions"),
        ("GET", f"{V3}/rooms/{ROOM_PATH}/delayed_event/m.room.message/t"),
    ],
)
async def test_wrong_method(client: httpx.AsyncClient, method: str, path: str) -> None:
    r = await client.request(method, path, headers=ALICE)
    assert r.status_code in (404, 405), r.text
    assert r.json()["errcode"] == "M_UNRECOGNIZED"
    assert isinstance(r.json()["error"], str)


@pytest.mark.parametrize(
    "path",
    [
        f"{V1}/delayed_events",
        send_path() + f"?{DELAY}=10",
        "/_matrix/client/versions",
        "/nowhere",
    ],
)
async def test_options_preflight(
    client: httpx.AsyncClient, homeserver: FakeHomeserver, path: str
) -> None:
    r = await client.options(
        path,
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "Authorization, Content-Type",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    methods = r.headers["access-control-allow-methods"]
    for method in ("GET", "POST", "PUT", "DELETE", "OPTIONS"):
        assert method in methods
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed
    assert "content-type" in allowed
    assert homeserver.requests == []


async def test_every_answer_has_cors(
    client: httpx.AsyncClient, app: FastAPI, homeserver: FakeHomeserver
) -> None:
    delay_id = await schedule_message(client, 1000)
    answers = [
        await client.put(send_path("c") + f"?{DELAY}=10", json={}, headers=ALICE),
        await client.put(send_path("d") + f"?{DELAY}=-1", json={}, headers=ALICE),
        await client.put(send_path("e"), json={}, headers=ALICE),  # passed through
        await client.put(send_path("f") + f"?{DELAY}=10", json={}),
        await client.get(f"{V1}/delayed_events", headers=ALICE),
        await client.get(f"{V1}/delayed_events/{delay_id}", headers=ALICE),
        await client.get(f"{V1}/delayed_events/nope", headers=ALICE),
        await client.post(f"{UNSTABLE}/delayed_events/{delay_id}/restart"),
        await client.post(f"{UNSTABLE}/delayed_events/{delay_id}/bogus"),
        await client.get("/_matrix/client/versions"),
        await client.get("/_matrix/client/v3/capabilities"),
        await client.get("/nowhere"),
        await client.delete(f"{V1}/delayed_events"),
        await client.get("/health"),
        await client.get("/ready"),
        await client.get("/metrics"),
    ]
    for r in answers:
        assert r.headers.get("access-control-allow-origin") == "*", (r.request.url, r.status_code)
        # Exactly one set of CORS headers, even when the homeserver sent its own.
        assert len(r.headers.get_list("access-control-allow-origin")) == 1, r.request.url


@pytest.mark.parametrize(
    ("method", "path", "headers", "content"),
    [
        ("PUT", send_path() + f"?{DELAY}=x", ALICE, b"{}"),
        ("PUT", send_path() + f"?{DELAY}=1", ALICE, b"nope"),
        ("PUT", send_path() + f"?{DELAY}=1", {}, b"{}"),
        ("PUT", send_path() + f"?{DELAY}=1", {"Authorization": "Basic abc"}, b"{}"),
        ("PUT", send_path() + f"?{DELAY}=1&access_token=a&access_token=b", {}, b"{}"),
        ("PUT", send_path() + f"?{DELAY}=%ZZ", ALICE, b"{}"),
        ("PUT", send_path() + f"?{DELAY}=99999999999999999999", ALICE, b"{}"),
        ("PUT", state_path("%C3%28") + f"?{DELAY}=1", ALICE, b"{}"),
        ("PUT", send_path(version="v9") + f"?{DELAY}=1", ALICE, b"{}"),
        ("POST", f"{V1}/delayed_events/x", ALICE, b"[]"),
        ("POST", f"{V1}/delayed_events/x/cancel", ALICE, b""),
        ("GET", f"{V1}/delayed_events?limit=x", ALICE, b""),
        ("GET", f"{V1}/delayed_events?from=%", ALICE, b""),
        ("GET", "/_matrix/client/v3/" + "a" * 9000, ALICE, b""),
    ],
)
async def test_error_bodies_are_matrix_errors(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], content: bytes
) -> None:
    r = await client.request(method, path, headers=headers, content=content)
    assert 400 <= r.status_code < 600, r.text
    body = r.json()
    assert isinstance(body["errcode"], str)
    assert body["errcode"].startswith("M_")
    assert isinstance(body["error"], str)
    assert "Traceback" not in r.text


async def test_non_ascii_raw_path(app: FastAPI) -> None:
    """A raw path that is not ASCII (a client that did not percent-encode) is refused cleanly."""
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "PUT",
        "scheme": "http",
        "path": "/_matrix/client/v3/rooms/!r:t/state/m.call.member/ü",
        "raw_path": "/_matrix/client/v3/rooms/!r:t/state/m.call.member/ü".encode(),
        "query_string": f"{DELAY}=1".encode(),
        "headers": [(b"authorization", b"Bearer alice_token")],
        "client": ("127.0.0.1", 1),
        "server": ("sidecar.test", 80),
    }
    await app(scope, receive, send)  # type: ignore[arg-type]
    start = sent[0]
    assert start["status"] == 400
    headers = dict(start["headers"])  # type: ignore[arg-type]
    assert headers[b"access-control-allow-origin"] == b"*"
    assert b'"errcode": "M_INVALID_PARAM"' in sent[1]["body"]  # type: ignore[operator]


# The database away ------------------------------------------------------------------------------


@pytest.fixture
async def app_without_database(
    clock: FakeClock, homeserver: FakeHomeserver
) -> AsyncIterator[FastAPI]:
    settings = make_settings("postgresql://sidecar:secret@127.0.0.1:9/none")
    application = create_app(
        settings, clock=clock, transport=homeserver.transport(), start_scheduler=False
    )
    yield application
    await application.state.container.homeserver.client.aclose()
    await application.state.container.engine.dispose()


@pytest.fixture
async def client_without_database(
    app_without_database: FastAPI,
) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app_without_database)
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar.test") as c:
        yield c


@pytest.mark.parametrize(
    ("method", "path", "content"),
    [
        ("PUT", send_path() + f"?{DELAY}=1000", b"{}"),
        (
            "PUT",
            f"{V3}/rooms/{ROOM_PATH}/delayed_event/m.call.member/t",
            b'{"delay_ms":1,"content":{}}',
        ),
        ("POST", f"{UNSTABLE}/delayed_events/abc/restart", b"{}"),
        ("POST", f"{V1}/delayed_events/abc", b'{"action":"cancel"}'),
        ("GET", f"{V1}/delayed_events", b""),
        ("GET", f"{UNSTABLE}/delayed_events/abc", b""),
    ],
)
async def test_database_down_is_503(
    client_without_database: httpx.AsyncClient, method: str, path: str, content: bytes
) -> None:
    r = await client_without_database.request(method, path, headers=ALICE, content=content)
    body = assert_error(r, 503, "M_UNKNOWN")
    assert set(body) == {"errcode", "error"}
    assert "Traceback" not in r.text
    assert "secret" not in r.text
    assert r.headers["access-control-allow-origin"] == "*"


async def test_database_down_still_passes_through(
    client_without_database: httpx.AsyncClient, homeserver: FakeHomeserver
) -> None:
    r = await client_without_database.put(send_path("plain"), json={"a": 1}, headers=ALICE)
    assert r.status_code == 200
    assert len(homeserver.messages) == 1
    r = await client_without_database.get("/_matrix/client/versions")
    assert r.status_code == 200
    assert r.json()["unstable_features"]["org.matrix.msc4140"] is True


async def test_database_down_health(client_without_database: httpx.AsyncClient) -> None:
    assert (await client_without_database.get("/health")).status_code == 200
    r = await client_without_database.get("/ready")
    assert r.status_code == 503
    assert r.json()["database"] == "unreachable"
    r = await client_without_database.get("/metrics")
    assert r.status_code == 200
    assert "sidecar_scheduled_delayed_events" in r.text


async def test_homeserver_cors_headers_not_doubled(
    client: httpx.AsyncClient, homeserver: FakeHomeserver
) -> None:
    homeserver.fail_next.append(
        httpx.Response(
            200,
            json={"event_id": "$x"},
            headers={
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
                "X-Homeserver": "kept",
            },
        )
    )
    r = await client.put(send_path("plain"), json={}, headers=ALICE)
    assert r.status_code == 200
    assert r.json() == {"event_id": "$x"}
    assert r.headers["x-homeserver"] == "kept"
    assert r.headers.get_list("access-control-allow-origin") == ["*"]
    assert len(r.headers.get_list("access-control-allow-methods")) == 1
