"""The one renderer of Matrix errors: a MatrixError (status, body, headers) as a response, for
routes and exception handlers, or as raw ASGI messages, for middleware that answers ahead of
the framework."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Send

from app.errors import MatrixError


def error_response(exc: MatrixError) -> Response:
    """The error as a JSON response with its status and headers."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def send_error(
    send: Send, exc: MatrixError, extra_headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Send the error as raw ASGI messages: its status, body and headers, then `extra_headers`."""
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
    await send_json(send, exc.status, exc.body(), [*headers, *extra_headers])


async def send_json(
    send: Send, status: int, body: dict[str, Any], headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Send a JSON answer as raw ASGI messages."""
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
