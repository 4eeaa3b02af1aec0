"""Discovery: /versions and /capabilities are the homeserver's answers with MSC4140 added."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.integration.common import ALICE, assert_error, bearer
from tests.support.fakes import FakeHomeserver

VERSIONS = "/_matrix/client/versions"
Answer = Callable[[httpx.Request], httpx.Response]


def last_forwarded(homeserver: FakeHomeserver, path: str) -> httpx.Request:
    matching = [r for r in homeserver.requests if r.url.path == path]
    assert matching, path
    return matching[-1]


async def test_versions_adds_msc4140(client: httpx.AsyncClient, homeserver: FakeHomeserver) -> None:
    homeserver.versions_body = {
        "versions": ["r0.6.1", "v1.11"],
        "unstable_features": {"x.y": True, "org.matrix.msc4140": False},
        "server": {"name": "fake"},
    }
    r = await client.get(VERSIONS, headers=ALICE)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {
        "versions": ["r0.6.1", "v1.11"],
        "unstable_features": {
            "x.y": True,
            "org.matrix.msc4140": True,
            "org.matrix.msc4486": True,
        },
        "server": {"name": "fake"},
    }
    assert bearer(last_forwarded(homeserver, VERSIONS)) == "alice_token"


@pytest.mark.parametrize("features", [None, "garbage", ["x"]], ids=["absent", "string", "list"])
async def test_versions_without_feature_map(
    client: httpx.AsyncClient, homeserver: FakeHomeserver, features: object
) -> None:
    body: dict[str, object] = {"versions": ["v1.11"]}
    if features is not None:
        body["unstable_features"] = features
    homeserver.versions_body = body
    r = await client.get(VERSIONS)
    assert r.status_code == 200
    assert r.json() == {
        "versions": ["v1.11"],
        "unstable_features": {"org.matrix.msc4140": True, "org.matrix.msc4486": True},
    }
    assert "authorization" not in last_forwarded(homeserver, VERSIONS).headers


async def test_versions_query_forwarded(
    client: httpx.AsyncClient, homeserver: FakeHomeserver
) -> None:
    r = await client.get("/_matrix/client/versions?x=1")
    assert r.status_code == 200
    forwarded = last_forwarded(homeserver, VERSIONS)
    assert forwarded.url.query == b"x=1"


@pytest.mark.parametrize("body", ["a string", ["list"], 3])
async def test_versions_garbled(
    client: httpx.AsyncClient, homeserver: FakeHomeserver, body: object
) -> None:
    homeserver.versions_body = body
    assert_error(await client.get(VERSIONS), 502, "M_UNKNOWN")


async def test_versions_not_json(client: httpx.AsyncClient, homeserver: FakeHomeserver) -> None:
    homeserver.answers[VERSIONS] = lambda request: httpx.Response(200, content=b"<html>")
    assert_error(await client.get(VERSIONS), 502, "M_UNKNOWN")


async def test_versions_homeserver_error_passes_through(
    client: httpx.AsyncClient, homeserver: FakeHomeserver
) -> None:
    homeserver.answers[VERSIONS] = lambda request: httpx.Response(
        503, json={"errcode": "M_UNKNOWN", "error": "starting"}, headers={"X-Hs": "1"}
    )
    r = await client.get(VERSIONS)
    assert r.status_code == 503
    assert r.json() == {"errcode": "M_UNKNOWN", "error": "starting"}
    assert r.headers["x-hs"] == "1"


async def test_versions_homeserver_unreachable(
    client: httpx.AsyncClient, homeserver: FakeHomeserver
) -> None:
    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    homeserver.answers[VERSIONS] = unreachable
    assert_error(await client.get(VERSIONS), 502, "M_UNKNOWN")


@pytest.mark.parametrize("version", ["v3", "r0"])
async def test_capabilities_adds_delayed_events(
    client: httpx.AsyncClient, homeserver: FakeHomeserver, version: str
) -> None:
    homeserver.answers[f"/_matrix/client/{version}/capabilities"] = lambda request: httpx.Response(
        200,
        json={"capabilities": {"m.change_password": {"enabled": False}}, "extra": "kept"},
    )
    r = await client.get(f"/_matrix/client/{version}/capabilities", headers=ALICE)
    assert r.status_code == 200, r.text
    body = r.json()
    limits = {"max_delay_ms": 86_400_000, "max_scheduled": 100}
    assert body == {
        "capabilities": {
            "m.change_password": {"enabled": False},
            "m.delayed_events": limits,
            "org.matrix.msc4140.delayed_events": limits,
        },
        "extra": "kept",
    }
    forwarded = last_forwarded(homeserver, f"/_matrix/client/{version}/capabilities")
    assert bearer(forwarded) == "alice_token"


@pytest.mark.parametrize(
    "settings_overrides", [{"max_delay_ms": 120_000, "max_scheduled_per_user": 7}]
)
async def test_capabilities_follow_settings(client: httpx.AsyncClient) -> None:
    r = await client.get("/_matrix/client/v3/capabilities", headers=ALICE)
    assert r.status_code == 200, r.text
    caps = r.json()["capabilities"]
    assert caps["m.change_password"] == {"enabled": 1}
    assert caps["m.delayed_events"] == {"max_delay_ms": 120_000, "max_scheduled": 7}
    assert caps["org.matrix.msc4140.delayed_events"] == caps["m.delayed_events"]


async def test_capabilities_homeserver_error_passes_through(client: httpx.AsyncClient) -> None:
    r = await client.get("/_matrix/client/v3/capabilities")
    assert r.status_code == 401
    assert r.json() == {"errcode": "M_MISSING_TOKEN", "error": "Missing access token"}
    r = await client.get(
        "/_matrix/client/v3/capabilities", headers={"Authorization": "Bearer nobody"}
    )
    assert r.status_code == 401


async def test_pass_through_keeps_repeated_headers_and_drops_homeserver_cors(
    client: httpx.AsyncClient, homeserver: FakeHomeserver
) -> None:
    homeserver.fail_next.append(
        httpx.Response(
            200,
            headers=[
                ("Set-Cookie", "a=1"),
                ("Set-Cookie", "b=2"),
                ("Access-Control-Allow-Origin", "*"),
            ],
            json={"event_id": "$plain"},
        )
    )
    r = await client.put(
        "/_matrix/client/v3/rooms/%21room%3Atest/send/m.room.message/plain",
        json={"body": "now"},
        headers={"Authorization": "Bearer alice_token"},
    )
    assert r.status_code == 200
    assert r.json() == {"event_id": "$plain"}
    assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert r.headers.get_list("access-control-allow-origin") == ["*"]
