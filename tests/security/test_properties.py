"""Property-based tests of the request parsers and the API: whatever arrives (any query string,
path segment, body, delay, room id or event type), the answer is 200 or a Matrix-shaped 4xx,
never a 5xx, and a refused request changes nothing stored."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.api import requests as rq
from app.errors import MatrixError
from tests.integration.common import stored

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TOKENS = ["alice_token", "bob_token"]
ROOM = "%21room%3Atest"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # Every example reaches the parsers: no rate limit or per-user cap answers first.
    return {
        "ratelimit_schedule_per_second": 0,
        "ratelimit_manage_per_second": 0,
        "ratelimit_tokenless_per_second": 0,
        "max_scheduled_per_user": 100_000,
    }


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def raw_request(
    app: FastAPI,
    method: str,
    path: bytes,
    query: bytes = b"",
    body: bytes = b"",
    token: str | None = "alice_token",
) -> Answer:
    """One request as a server hands it to the application: path and query exactly these bytes."""
    messages: list[dict[str, Any]] = []
    headers = [(b"content-type", b"application/json")]
    if token is not None:
        headers.append((b"authorization", b"Bearer " + token.encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path.decode("latin-1"),
        "raw_path": path,
        "query_string": query,
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("sidecar.test", 80),
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    start = messages[0]
    payload = b"".join(m.get("body", b"") for m in messages[1:])
    return Answer(start["status"], dict(start["headers"]), payload)


async def check(app: FastAPI, method: str, path: bytes, query: bytes = b"", **kw: Any) -> Answer:
    """The request's answer, after checking the properties every answer has."""
    before = await stored(app)
    answer = await raw_request(app, method, path, query, **kw)
    assert answer.status < 500, (method, path, query, answer.body)
    if answer.status >= 400:
        body = answer.json()
        assert isinstance(body, dict), answer.body
        assert isinstance(body.get("errcode"), str), answer.body
        assert body["errcode"].startswith("M_"), answer.body
        assert isinstance(body.get("error"), str), answer.body
        assert await stored(app) == before, (method, path, query, answer.body)
    return answer


# Strategies ------------------------------------------------------------------------------------

HEX = "0123456789abcdefABCDEF"
# Characters that matter to a URL parser, with room for bad percent-encodings.
URL_ALPHABET = st.sampled_from(list(HEX + "%%%&;=+./?#!@:_-~ ") + ["é", "\x00", "ü", "\u2028"])


def percent_encoded(text: str) -> str:
    return quote(text, safe="")


segments = st.one_of(
    st.text(max_size=40).map(percent_encoded),  # any unicode, correctly encoded
    st.text(URL_ALPHABET, max_size=40).map(lambda s: s.replace("/", "%2F").replace("?", "%3F")),
    st.binary(max_size=30).map(lambda b: "".join(f"%{x:02X}" for x in b)),  # any bytes
    st.sampled_from(["", "%", "%2", "%zz", "%00", "%ED%A0%80", "%C3%28", "a" * 300, "."]),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def nested(depth: int) -> bytes:
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"


bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=8), json_values, max_size=5).map(
        lambda v: json.dumps(v).encode()
    ),
    st.binary(max_size=200),
    st.integers(min_value=1, max_value=3000).map(nested),
    st.sampled_from(
        [
            b"",
            b"{",
            b'{"a": NaN}',
            b'{"a": Infinity}',
            b'{"a": -Infinity}',
            b'{"a": 1e999}',
            b'{"a": -1e400}',
            b'{"a": 1' + b"0" * 5000 + b"}",
            b'{"a": 1, "a": 2}',
            b'{"delay_ms": 5, "delay_ms": -5, "content": {}}',
            b'{"\\ud800": "\\udfff"}',
            b'{"a": "\\u0000"}',
            b"\xef\xbb\xbf{}",
            b'{"a": "\xff"}',
            b"null",
            b"[]",
        ]
    ),
)
delays = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats().map(str),
    st.text(max_size=12),
    st.sampled_from(["", "0", "00", "+1", "-0", "1_000", "1e3", "0x10", "١٢", "٣", " 1", "1 "]),
).map(percent_encoded)
queries = st.one_of(
    st.binary(max_size=120),
    st.text(URL_ALPHABET, max_size=80).map(lambda s: s.encode()),
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "org.matrix.msc4140.delay",
                    "org.matrix%2Emsc4140%2Edelay",
                    "org.matrix.msc4140.parent_delay_id",
                    "access_token",
                    "status",
                    "delay_id",
                    "from",
                    "limit",
                    "ts",
                ]
            ),
            st.one_of(delays, segments),
        ),
        max_size=4,
    ).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs).encode()),
)
tokens = st.sampled_from([*TOKENS, None, "unknown", ""])


# Parsers ---------------------------------------------------------------------------------------


@PROPERTY
@given(raw=st.text(max_size=60))
@example(raw="%00")
@example(raw="%ED%A0%80")
def test_path_segment_decodes_or_refuses(raw: str) -> None:
    try:
        value = rq.path_segment(raw, "segment")
    except MatrixError as exc:
        refused: MatrixError | None = exc
    else:
        refused = None
    if refused is not None:
        assert (refused.status, refused.errcode) == (400, "M_INVALID_PARAM")
        return
    assert "\x00" not in value
    value.encode("utf-8")  # storable: no lone surrogate
    assert len(value.encode()) <= 255


@PROPERTY
@given(body=bodies)
def test_json_object_parses_or_refuses(body: bytes) -> None:
    try:
        value = rq.parse_json_object(body)
        # What is stored is JSON that any parser reads back to the same value (an integer too
        # long to read is refused here).
        stored_form = rq.compact_json(value)
    except MatrixError as exc:
        refused: MatrixError | None = exc
    else:
        refused = None
    if refused is not None:
        assert refused.status == 400
        assert refused.errcode in ("M_NOT_JSON", "M_BAD_JSON")
        return
    assert isinstance(value, dict)
    assert stored_form.isascii()
    assert json.loads(stored_form) == value


@PROPERTY
@given(value=delays)
def test_delay_is_a_non_negative_integer_or_refused(value: str) -> None:
    try:
        delay = rq.parse_delay(value)
    except MatrixError as exc:
        refused: MatrixError | None = exc
    else:
        refused = None
    if refused is not None:
        assert (refused.status, refused.errcode) == (400, "M_INVALID_PARAM")
        return
    assert delay >= 0
    significant = value.lstrip("0")
    if len(significant) > 18:
        assert delay == rq.TOO_LONG  # beyond any maximum
    else:
        assert str(delay) == significant or delay == 0


# The API ---------------------------------------------------------------------------------------


@PROPERTY
@given(query=queries, body=bodies, token=tokens)
# Nested deeper than a JSON parser's recursion: passed through, the homeserver refuses it.
@example(query=b"", body=b"[" * 5000 + b"]" * 5000, token="alice_token")
async def test_schedule_a_any_query_and_body(
    app: FastAPI, query: bytes, body: bytes, token: str | None
) -> None:
    await check(
        app,
        "PUT",
        f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/t".encode(),
        query,
        body=body,
        token=token,
    )


@PROPERTY
@given(
    version=st.sampled_from(["v3", "r0", "unstable", "v1", "%76%33"]),
    room=st.one_of(st.just(ROOM), segments),
    kind=st.one_of(st.just("m.call.member"), segments),
    key=st.one_of(st.none(), segments),
    txn=segments,
    delay=delays,
    body=bodies,
)
async def test_schedule_a_any_path(
    app: FastAPI,
    version: str,
    room: str,
    kind: str,
    key: str | None,
    txn: str,
    delay: str,
    body: bytes,
) -> None:
    base = f"/_matrix/client/{version}/rooms/{room}"
    path = f"{base}/send/{kind}/{txn}" if key is None else f"{base}/state/{kind}/{key}"
    answer = await check(
        app, "PUT", path.encode(), f"org.matrix.msc4140.delay={delay}".encode(), body=body
    )
    if answer.status == 200:
        assert set(answer.json()) == {"delay_id"}


@PROPERTY
@given(
    prefix=st.sampled_from(["v3", "unstable/org.matrix.msc4140"]),
    room=st.one_of(st.just(ROOM), segments),
    kind=st.one_of(st.just("m.call.member"), segments),
    txn=segments,
    body=st.one_of(
        bodies,
        st.fixed_dictionaries(
            {"delay_ms": st.one_of(json_values, st.integers()), "content": json_values},
            optional={"state_key": json_values, "delay": json_values},
        ).map(lambda v: json.dumps(v).encode()),
    ),
    token=tokens,
)
async def test_schedule_b_any_path_and_body(
    app: FastAPI, prefix: str, room: str, kind: str, txn: str, body: bytes, token: str | None
) -> None:
    path = f"/_matrix/client/{prefix}/rooms/{room}/delayed_event/{kind}/{txn}"
    await check(app, "PUT", path.encode(), body=body, token=token)


@PROPERTY
@given(
    prefix=st.sampled_from(["unstable/org.matrix.msc4140", "v1"]),
    delay_id=segments,
    action=st.one_of(st.none(), st.sampled_from(["send", "cancel", "restart"]), segments),
    body=bodies,
    token=tokens,
)
async def test_manage_any_id_action_and_body(
    app: FastAPI, prefix: str, delay_id: str, action: str | None, body: bytes, token: str | None
) -> None:
    path = f"/_matrix/client/{prefix}/delayed_events/{delay_id}"
    if action is not None:
        path += f"/{action}"
    await check(app, "POST", path.encode(), body=body, token=token)


@PROPERTY
@given(
    prefix=st.sampled_from(["unstable/org.matrix.msc4140", "v1"]),
    delay_id=st.one_of(st.none(), segments),
    query=queries,
    token=tokens,
)
@example(prefix="v1", delay_id=None, query=b"access_token=%A0", token=None)
async def test_lookup_any_query(
    app: FastAPI, prefix: str, delay_id: str | None, query: bytes, token: str | None
) -> None:
    path = f"/_matrix/client/{prefix}/delayed_events"
    if delay_id is not None:
        path += f"/{delay_id}"
    await check(app, "GET", path.encode(), query, token=token)


@PROPERTY
@given(
    path=st.lists(segments, min_size=1, max_size=8).map(lambda parts: "/" + "/".join(parts)),
    method=st.sampled_from(["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD"]),
    query=queries,
    body=bodies,
)
async def test_any_path_any_method(
    app: FastAPI, path: str, method: str, query: bytes, body: bytes
) -> None:
    await check(app, method, path.encode(), query, body=body)


@PROPERTY
@given(cursor=json_values)
@example(cursor={"s": [10**30, "a"]})
@example(cursor={"s": [1, "a\x00"]})
@example(cursor={"f": [-(2**63) - 1, "a"]})
@example(cursor={"s": [1, "\ud800"]})
async def test_any_from_token(app: FastAPI, cursor: Any) -> None:
    token = base64.urlsafe_b64encode(json.dumps(cursor).encode()).decode().rstrip("=")
    await check(app, "GET", b"/_matrix/client/v1/delayed_events", f"from={token}".encode())
