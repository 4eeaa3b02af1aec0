"""Logging: plain text (the default) or one JSON object per line (`SIDECAR_LOG_FORMAT=json`), and
a request id per HTTP request, carried by a context variable into every line the request causes.

Log lines name events by a delay_id prefix only (`LogId`), never a whole delay_id, a token or
event content; the JSON fields are the same facts the text line holds, picked out."""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
import sys
import time
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
REQUEST_ID_HEADER = b"x-request-id"
# A request id a client or proxy may choose: short, and nothing a log reader could mistake for
# structure (no spaces, quotes or control characters).
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
# Fields a log call may pass with `extra=`, copied into the JSON object.
EXTRA_FIELDS = ("delay_id", "outcome", "errcode")
# What a Matrix errcode looks like: recognised among a log call's arguments.
_ERRCODE = re.compile(r"(?:[A-Z][A-Z0-9]*\.)*M_[A-Z_]{2,64}")
_HANDLER_NAME = "sidecar"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_suffix)s: %(message)s"


class LogId(str):
    """A delay_id prefix as logs show it; the JSON format lists it as `delay_id`."""

    __slots__ = ()


class RequestIdMiddleware:
    """Give each HTTP request an id: the client's `X-Request-ID` when it is a sane token, else a
    new one. The id is set for the request's log lines and returned in the answer's header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _chosen_id(scope.get("headers", []))
        header = (REQUEST_ID_HEADER, request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), header])
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


# New request ids: this process's random prefix and a counter. Unique across replicas and
# restarts without a system call per request (the heartbeat's path is hot; ids are no secret).
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)


def _chosen_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER:
            if _SANE_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


class ContextFilter(logging.Filter):
    """Put the current request id on every record (`request_id`, None outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request_id = request_id
        record.request_suffix = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then request_id, delay_id,
    outcome and errcode where known, and the exception's traceback as `exc_info`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update(_facts(record))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def _facts(record: logging.LogRecord) -> dict[str, str]:
    """delay_id, outcome and errcode: passed as `extra=`, or found among the call's arguments
    (a LogId, an errcode)."""
    facts: dict[str, str] = {}
    for name in EXTRA_FIELDS:
        value = record.__dict__.get(name)
        if value is not None:
            facts[name] = str(value)
    args = record.args if isinstance(record.args, tuple) else ()
    for arg in args:
        if isinstance(arg, LogId):
            facts.setdefault("delay_id", str(arg))
        elif isinstance(arg, str) and _ERRCODE.fullmatch(arg):
            facts.setdefault("errcode", arg)
    return facts


def _iso_time(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def configure(level: str, log_format: str, stream: Any = None) -> logging.Handler:
    """Route every logger through one handler on stderr in the chosen format."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(ContextFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request URL at INFO; URLs carry room ids, not secrets, but are noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # APScheduler reports every run of the wake-up and sweep jobs at INFO.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # uvicorn's own lines go through the same handler.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler
