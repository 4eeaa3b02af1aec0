"""Bad input gets a clear 4xx and changes nothing stored. The integration tests cover the common
cases (invalid delays, bodies that are not objects, bad percent-encoding, the body limit on the
query-parameter form); these are the rest: characters a database column cannot hold, numbers no
float holds, nesting, repeated parameters, over-long paths and bodies on every endpoint."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from fastapi import FastAPI

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
    stored,
)

NUL_CURSOR = base64.urlsafe_b64encode(b'{"s":[1,"a\\u0000"]}').decode().rstrip("=")
B_PATH = f"{V3}/rooms/{ROOM_PATH}/delayed_event/m.call.member/b1"


def cursor(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def nested(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


CASES = [
    # Characters no text column holds.
    ("PUT", state_path("a%00b") + f"?{DELAY}=10", b"{}", 400, "M_INVALID_PARAM"),
    ("PUT", send_path(room="!a%00b:test") + f"?{DELAY}=10", b"{}", 400, "M_INVALID_PARAM"),
    ("PUT", send_path(kind="m.%00") + f"?{DELAY}=10", b"{}", 400, "M_INVALID_PARAM"),
    ("PUT", state_path("%ED%A0%80") + f"?{DELAY}=10", b"{}", 400, "M_INVALID_PARAM"),
    ("PUT", B_PATH, b'{"delay_ms":1,"content":{},"state_key":"a\\u0000"}', 400, "M_INVALID_PARAM"),
    ("PUT", B_PATH, b'{"delay_ms":1,"content":{},"state_key":"\\ud800"}', 400, "M_INVALID_PARAM"),
    ("POST", f"{UNSTABLE}/delayed_events/a%00/cancel", b"{}", 400, "M_INVALID_PARAM"),
    ("GET", f"{V1}/delayed_events/a%00", b"", 400, "M_INVALID_PARAM"),
    ("GET", f"{V1}/delayed_events?delay_id=a%00", b"", 400, "M_INVALID_PARAM"),
    ("PUT", send_path() + f"?{DELAY}=10&ts=%00", b"{}", 400, "M_INVALID_PARAM"),
    # Numbers no float holds, NaN, and nesting.
    ("PUT", send_path() + f"?{DELAY}=10", b'{"a":1e999}', 400, "M_NOT_JSON"),
    ("PUT", send_path() + f"?{DELAY}=10", b'{"a":-1e400}', 400, "M_NOT_JSON"),
    ("PUT", send_path() + f"?{DELAY}=10", b'{"a":NaN}', 400, "M_NOT_JSON"),
    ("PUT", B_PATH, b'{"delay_ms":1e999,"content":{}}', 400, "M_NOT_JSON"),
    ("PUT", B_PATH, b'{"delay_ms":1.5,"content":{}}', 400, "M_INVALID_PARAM"),
    ("PUT", B_PATH, b'{"delay_ms":"100","content":{}}', 400, "M_INVALID_PARAM"),
    ("PUT", B_PATH, b'{"delay_ms":true,"content":{}}', 400, "M_INVALID_PARAM"),
    ("PUT", B_PATH, b'{"delay_ms":' + b"9" * 40 + b',"content":{}}', 403, "M_FORBIDDEN"),
    ("PUT", B_PATH, b'{"delay_ms":1,"delay_ms":-1,"content":{}}', 400, "M_INVALID_PARAM"),
    ("PUT", send_path() + f"?{DELAY}=10", b'{"a":' + nested(100) + b"}", 400, "M_BAD_JSON"),
    ("PUT", send_path() + f"?{DELAY}=10", b'{"a":' + nested(5000) + b"}", 400, "M_NOT_JSON"),
    ("PUT", B_PATH, b'{"delay_ms":1,"content":{"a":' + nested(99) + b"}}", 400, "M_BAD_JSON"),
    ("POST", f"{V1}/delayed_events/x", b'{"action":' + nested(100) + b"}", 400, "M_BAD_JSON"),
    # Event types and room ids.
    ("PUT", send_path(kind="") + f"?{DELAY}=10", b"{}", 404, "M_UNRECOGNIZED"),
    ("PUT", f"{V3}/rooms/{ROOM_PATH}/delayed_event/%20/b", b"{}", 400, "M_MISSING_PARAM"),
    ("PUT", send_path(room="%40user%3Atest") + f"?{DELAY}=10", b"{}", 400, "M_INVALID_PARAM"),
    ("PUT", send_path(room="%21") + f"?{DELAY}=10", b"{}", 400, "M_INVALID_PARAM"),
    ("PUT", send_path(kind="a" * 256) + f"?{DELAY}=10", b"{}", 400, "M_INVALID_PARAM"),
    # Repeated query parameters, and cursors that decode to what a column cannot hold.
    ("GET", f"{V1}/delayed_events?status=scheduled&status=finalised", b"", 400, "M_INVALID_PARAM"),
    ("GET", f"{V1}/delayed_events?limit=1&limit=2", b"", 400, "M_INVALID_PARAM"),
    ("GET", f"{V1}/delayed_events?from=a&from=b", b"", 400, "M_INVALID_PARAM"),
    (
        "GET",
        f"{V1}/delayed_events?from={cursor({'s': [10**30, 'a']})}",
        b"",
        400,
        "M_INVALID_PARAM",
    ),
    ("GET", f"{V1}/delayed_events?from={NUL_CURSOR}", b"", 400, "M_INVALID_PARAM"),
    (
        "GET",
        f"{V1}/delayed_events?from={base64.urlsafe_b64encode(nested(3000)).decode()}",
        b"",
        400,
        "M_INVALID_PARAM",
    ),
    ("GET", f"{V1}/delayed_events?limit=%EF%BC%91", b"", 400, "M_INVALID_PARAM"),
    # Over-long paths and queries.
    ("PUT", send_path("t" * 9000) + f"?{DELAY}=10", b"{}", 414, "M_TOO_LARGE"),
    ("PUT", send_path() + f"?{DELAY}=10&ts=" + "1" * 9000, b"{}", 414, "M_TOO_LARGE"),
    ("POST", f"{UNSTABLE}/delayed_events/{'x' * 9000}/cancel", b"{}", 414, "M_TOO_LARGE"),
    ("GET", f"{V1}/delayed_events?" + "delay_id=x&" * 1000, b"", 414, "M_TOO_LARGE"),
    # Over-long bodies on every endpoint that reads one.
    ("PUT", B_PATH, b'{"delay_ms":1,"content":{"a":"' + b"x" * 70_000 + b'"}}', 413, "M_TOO_LARGE"),
    ("POST", f"{V1}/delayed_events/x", b'{"action":"' + b"x" * 70_000 + b'"}', 413, "M_TOO_LARGE"),
    (
        "POST",
        f"{UNSTABLE}/delayed_events/x/cancel",
        b"{" + b" " * 70_000 + b"}",
        413,
        "M_TOO_LARGE",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "content", "status", "errcode"),
    CASES,
    ids=[f"{i}-{c[4]}" for i, c in enumerate(CASES)],
)
async def test_bad_input_is_refused_and_changes_nothing(
    client: httpx.AsyncClient,
    app: FastAPI,
    method: str,
    path: str,
    content: bytes,
    status: int,
    errcode: str,
) -> None:
    await schedule_message(client, 60_000, txn="existing")
    before = await stored(app)
    r = await client.request(method, path, content=content, headers=ALICE)
    assert_error(r, status, errcode)
    assert await stored(app) == before


@pytest.mark.parametrize(
    "raw",
    [b"\x01", b"\x7f", b"\x1b[31m", b"a\tb"],
    ids=["soh", "del", "escape", "tab"],
)
@pytest.mark.parametrize("where", ["path", "query"])
async def test_control_characters_in_the_url_are_refused(
    app: FastAPI, raw: bytes, where: str
) -> None:
    """Control characters reach the application only from a lenient server; they are refused
    before routing, so nothing is passed through, stored or replayed with them."""
    path = b"/_matrix/client/v3/rooms/%21r%3At/send/m.room.message/t"
    query = b"ts=1"
    if where == "path":
        path += raw
    else:
        query += raw
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
        "path": path.decode(),
        "raw_path": path,
        "query_string": query,
        "headers": [(b"authorization", b"Bearer alice_token")],
        "client": ("127.0.0.1", 1),
        "server": ("sidecar.test", 80),
    }
    before = await stored(app)
    await app(scope, receive, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["errcode"] == "M_INVALID_PARAM"  # type: ignore[arg-type]
    assert await stored(app) == before


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({"Authorization": b"Bearer \xe9t\xe9"}, ""),
        ({"Authorization": b"Bearer a\x01b"}, ""),
        ({}, "access_token=%A0"),
        ({}, "access_token=%E2%80%A8"),
    ],
    ids=["latin1-header", "control-header", "nbsp-query", "separator-query"],
)
async def test_tokens_that_are_not_printable_ascii(
    client: httpx.AsyncClient, app: FastAPI, headers: dict[str, bytes], query: str
) -> None:
    """No homeserver issues such a token, and it could not be sent on to whoami."""
    before = await stored(app)
    r = await client.get(f"{V1}/delayed_events?{query}", headers=headers)
    assert_error(r, 401, "M_UNKNOWN_TOKEN")
    r = await client.put(send_path() + f"?{DELAY}=10&{query}", content=b"{}", headers=headers)
    # The scheduling endpoints read their query strictly first: %A0 alone is not UTF-8.
    assert (r.status_code, r.json()["errcode"]) in {
        (401, "M_UNKNOWN_TOKEN"),
        (400, "M_INVALID_PARAM"),
    }
    assert await stored(app) == before
