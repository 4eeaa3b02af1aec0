"""Log formats and request ids: `SIDECAR_LOG_FORMAT=json` writes one JSON object a line with the
facts the text line holds picked out, and every line a request causes carries its request id."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from app import logs
from app.logs import LogId, RequestIdMiddleware
from app.replay import log_id
from app.settings import Settings

logger = logging.getLogger("app.test_logs")


@pytest.fixture
def written() -> Iterator[io.StringIO]:
    """What the handler `serve` configures writes, in JSON."""
    stream = io.StringIO()
    handler = logs.configure("INFO", "json", stream)
    try:
        yield stream
    finally:
        logging.getLogger().removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_pick_out_delay_id_errcode_and_outcome(written: io.StringIO) -> None:
    logger.info(
        "homeserver refused %s: %s %s",
        log_id("AbCdEfGhIjKl"),
        403,
        "M_FORBIDDEN",
        extra={"outcome": "failed"},
    )
    logger.warning("plain line")
    first, second = lines(written)
    assert first["message"] == "homeserver refused AbCdEf...: 403 M_FORBIDDEN"
    assert first["level"] == "INFO"
    assert first["logger"] == "app.test_logs"
    assert first["delay_id"] == "AbCdEf..."
    assert first["errcode"] == "M_FORBIDDEN"
    assert first["outcome"] == "failed"
    assert first["time"].endswith("Z")
    assert "request_id" not in first
    assert second["message"] == "plain line"
    assert {"delay_id", "errcode", "outcome"}.isdisjoint(second)


def test_json_line_holds_the_traceback(written: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    (entry,) = lines(written)
    assert "ValueError: boom" in entry["exc_info"]


def test_log_id_is_a_prefix() -> None:
    assert isinstance(log_id("AbCdEfGhIjKl"), LogId)
    assert "GhIjKl" not in log_id("AbCdEfGhIjKl")


def test_log_format_setting() -> None:
    base: dict[str, Any] = {
        "database_url": "postgresql://x@localhost/db",
        "homeserver_url": "http://hs",
        "token_keys": [b"k" * 32],
    }
    assert Settings(**base).log_format == "text"
    assert Settings(**base, log_format="JSON").log_format == "json"
    with pytest.raises(ValueError, match="text or json"):
        Settings(**base, log_format="xml")


async def _logging_app(scope: Scope, receive: Receive, send: Send) -> None:
    logger.info("inside the request")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("abc-123_X.y:z", True),
        ("has space", False),
        ('quote"d', False),
        ("x" * 65, False),
        ("-leading-dash", False),
        (None, False),
    ],
)
async def test_request_id_is_taken_when_sane(
    written: io.StringIO, sent: str | None, kept: bool
) -> None:
    transport = httpx.ASGITransport(app=RequestIdMiddleware(_logging_app))
    headers = {"X-Request-ID": sent} if sent is not None else {}
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/", headers=headers)
    request_id = r.headers["x-request-id"]
    assert (request_id == sent) is kept
    assert len(request_id) <= 64
    assert " " not in request_id
    (entry,) = lines(written)
    assert entry["request_id"] == request_id
    logger.info("after the request")
    assert "request_id" not in lines(written)[-1]


async def test_text_lines_carry_the_request_id() -> None:
    stream = io.StringIO()
    handler = logs.configure("INFO", "text", stream)
    try:
        transport = httpx.ASGITransport(app=RequestIdMiddleware(_logging_app))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.get("/", headers={"X-Request-ID": "req-42"})
    finally:
        logging.getLogger().removeHandler(handler)
    assert "app.test_logs [req-42]: inside the request" in stream.getvalue()


async def test_generated_request_ids_differ() -> None:
    transport = httpx.ASGITransport(app=RequestIdMiddleware(_logging_app))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        ids = [(await client.get("/")).headers["x-request-id"] for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(len(i) <= 64 and i.isalnum() for i in ids)
