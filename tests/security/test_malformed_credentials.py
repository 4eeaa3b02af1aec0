"""A malformed credential is the client's error: the sidecar refuses it itself with the
homeserver's usual 401, before any request leaves for the homeserver, on every route (the
pass-through ones, the heartbeat's fast path and lookups included)."""

from __future__ import annotations

import httpx
import pytest

from tests.support.fakes import FakeHomeserver

ROOM = "%21room%3Atest"
ROUTES = {
    "versions": ("GET", "/_matrix/client/versions"),
    "capabilities": ("GET", "/_matrix/client/v3/capabilities"),
    "passed-through send": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t1"),
    "passed-through state": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/state/m.call/k"),
    "schedule A": (
        "PUT",
        f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t2?org.matrix.msc4140.delay=10",
    ),
    "schedule B": ("PUT", f"/_matrix/client/v3/rooms/{ROOM}/delayed_event/m.call/t3"),
    "heartbeat": ("POST", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/x/restart"),
    "v1 restart": ("POST", "/_matrix/client/v1/delayed_events/x/restart"),
    "cancel": ("POST", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/x/cancel"),
    "body action": ("POST", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/x"),
    "list": ("GET", "/_matrix/client/unstable/org.matrix.msc4140/delayed_events"),
    "get": ("GET", "/_matrix/client/v1/delayed_events/x"),
}
# (Authorization header values, query parameters) of each malformed credential.
SHAPES: dict[str, tuple[list[bytes], str]] = {
    "empty bearer": ([b"Bearer "], ""),
    "bearer alone": ([b"Bearer"], ""),
    "two spaces, no token": ([b"Bearer  "], ""),
    "space before the token": ([b"Bearer  alice_token"], ""),
    "space inside the token": ([b"Bearer alice _token"], ""),
    "tab inside the token": ([b"Bearer alice\t_token"], ""),
    "control character": ([b"Bearer alice_token\x01"], ""),
    "DEL": ([b"Bearer alice_token\x7f"], ""),
    "non-ASCII (latin-1)": ([b"Bearer alice_t\xe9ken"], ""),
    "non-ASCII (UTF-8)": ([b"Bearer alice_t\xc3\xa9ken"], ""),
    "other scheme": ([b"Basic YWxpY2U6cHc="], ""),
    "two headers": ([b"Bearer alice_token", b"Bearer alice_token"], ""),
    "header and query": ([b"Bearer alice_token"], "access_token=alice_token"),
    "header and encoded query name": ([b"Bearer alice_token"], "access%5Ftoken=alice_token"),
    "header and query after ;": ([b"Bearer alice_token"], "a=1;access_token=alice_token"),
    "query repeated": ([], "access_token=alice_token&access_token=alice_token"),
    "query empty": ([], "access_token="),
    "query space": ([], "access_token=alice%20_token"),
    "query plus": ([], "access_token=alice+_token"),
    "query control": ([], "access_token=alice_token%01"),
    "query non-ASCII": ([], "access_token=alice_t%C3%A9ken"),
    "query invalid UTF-8": ([], "access_token=alice_t%E9ken"),
}


def _with_query(path: str, query: str) -> str:
    if not query:
        return path
    return path + ("&" if "?" in path else "?") + query


@pytest.mark.parametrize("shape", SHAPES.keys())
@pytest.mark.parametrize("route", ROUTES.keys())
async def test_malformed_credentials_are_refused_before_any_outbound_call(
    client: httpx.AsyncClient, homeserver: FakeHomeserver, route: str, shape: str
) -> None:
    method, path = ROUTES[route]
    headers, query = SHAPES[shape]
    raw_headers = [(b"authorization", value) for value in headers]
    raw_headers.append((b"content-type", b"application/json"))
    r = await client.request(
        method,
        _with_query(path, query),
        content=b'{"delay_ms": 10, "content": {}, "action": "cancel"}',
        headers=httpx.Headers(raw_headers),
    )
    assert r.status_code == 401, r.text
    assert r.json()["errcode"] in ("M_MISSING_TOKEN", "M_UNKNOWN_TOKEN")
    assert homeserver.requests == []


async def test_a_well_formed_token_still_reaches_the_homeserver(
    client: httpx.AsyncClient, homeserver: FakeHomeserver
) -> None:
    for query in ("", "?access_token=alice_token", "?access%5Ftoken=alice_token"):
        headers = {} if query else {"Authorization": "Bearer alice_token"}
        r = await client.get("/_matrix/client/versions" + query, headers=headers)
        assert r.status_code == 200, r.text
    assert len(homeserver.requests) == 3
    assert homeserver.requests[0].headers["authorization"] == "Bearer alice_token"
    assert homeserver.requests[2].url.query == b"access%5Ftoken=alice_token"


async def test_surrounding_whitespace_of_the_header_is_not_part_of_it(
    client: httpx.AsyncClient, homeserver: FakeHomeserver
) -> None:
    r = await client.get(
        "/_matrix/client/v3/capabilities",
        headers=httpx.Headers([(b"authorization", b"Bearer alice_token ")]),
    )
    assert r.status_code == 200, r.text
    assert homeserver.requests[0].headers["authorization"] == "Bearer alice_token"
