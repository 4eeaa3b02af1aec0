"""RawPathMiddleware refuses requests it cannot read exactly as the homeserver would, whatever
HTTP implementation produced the ASGI scope (h11 keeps a raw `#` in raw_path or query_string;
httptools drops it and the protocol marks the scope instead)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from app.api.middleware import RAW_HASH_SEEN, RawPathMiddleware

SEND = b"/_matrix/client/v3/rooms/%21r%3Ax/send/m.room.message"
STATE = b"/_matrix/client/v3/rooms/%21r%3Ax/state/m.call"
FORM = b"application/x-www-form-urlencoded"


async def answer(
    raw_path: bytes,
    query: bytes = b"",
    method: str = "PUT",
    headers: list[tuple[bytes, bytes]] | None = None,
    **extra: Any,
) -> tuple[int, dict[str, Any] | None]:
    """(status, JSON) of the middleware's refusal, or (0, None) when it let the request through."""
    sent: list[Message] = []
    reached = False

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal reached
        reached = True

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": raw_path.decode("latin-1"),
        "raw_path": raw_path,
        "query_string": query,
        "headers": headers or [],
        **extra,
    }
    await RawPathMiddleware(inner)(scope, receive, send)
    if reached:
        return 0, None
    return sent[0]["status"], json.loads(sent[1]["body"])


REFUSED = {
    "h11: # after ?": (SEND + b"/t1", b"x%41=1#&org.matrix.msc4140.delay=1", "PUT", None),
    "h11: # before ?": (SEND + b"/t1#", b"org.matrix.msc4140.delay=1", "PUT", None),
    "key %2F..": (STATE + b"/k%2F..%2F..", b"org.matrix.msc4140.delay=1", "PUT", None),
    "key ..%2F": (STATE + b"/..%2Fk", b"", "PUT", None),
    "key %2F%2E%2E mixed case": (STATE + b"/k%2f%2E.", b"", "PUT", None),
    "literal dot segment": (STATE + b"/./k", b"", "PUT", None),
    "trailing dot": (STATE + b"/.", b"", "PUT", None),
    "form POST send": (SEND, b"", "POST", [(b"content-type", FORM)]),
    "form POST state": (STATE + b"/k", b"", "POST", [(b"Content-Type", b"Multipart/Form-Data")]),
    "form in a second header": (
        SEND, b"", "POST", [(b"content-type", b"application/json"), (b"content-type", FORM)]
    ),
}  # fmt: skip


@pytest.mark.parametrize(("raw", "query", "method", "headers"), REFUSED.values(), ids=REFUSED)
async def test_refused(
    raw: bytes, query: bytes, method: str, headers: list[tuple[bytes, bytes]] | None
) -> None:
    status, body = await answer(raw, query, method, headers)
    assert status == 400
    assert body is not None
    assert body["errcode"] == "M_UNRECOGNIZED"


async def test_a_hash_noted_by_the_protocol_is_refused() -> None:
    status, _ = await answer(SEND + b"/t1", b"x=1", **{RAW_HASH_SEEN: True})
    assert status == 400


PASSED = {
    "plain send": (SEND + b"/t1", b"org.matrix.msc4140.delay=1", "PUT", None),
    "dots inside a segment": (STATE + b"/a.b..c%2F.d%2F...", b"", "PUT", None),
    "form PUT (never merged)": (SEND + b"/t1", b"", "PUT", [(b"content-type", FORM)]),
    "JSON POST": (SEND, b"", "POST", [(b"content-type", b"application/json")]),
    "form POST elsewhere": (
        b"/_matrix/client/unstable/org.matrix.msc4140/delayed_events/abc/restart", b"", "POST",
        [(b"content-type", FORM)],
    ),
}  # fmt: skip


@pytest.mark.parametrize(("raw", "query", "method", "headers"), PASSED.values(), ids=PASSED)
async def test_passed(
    raw: bytes, query: bytes, method: str, headers: list[tuple[bytes, bytes]] | None
) -> None:
    assert await answer(raw, query, method, headers) == (0, None)
