"""Passing requests through to the homeserver, and adding MSC4140 to its discovery answers."""

from __future__ import annotations

import logging
from typing import Any

import httpx
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from app.api import requests as rq
from app.api.deps import Container, container
from app.auth import access_token
from app.errors import HomeserverUnavailable, MatrixError
from app.homeserver import json_object, response_headers

logger = logging.getLogger(__name__)
router = APIRouter()


def _target(request: Request) -> str:
    query = request.scope.get("query_string", b"").decode("latin-1")
    path: str = request.scope["path"]
    return path + ("?" + query if query else "")


async def pass_through(
    request: Request, c: Container, *, state: tuple[str, str, str | None] | None = None
) -> Response:
    """Forward the request unchanged and answer with the homeserver's answer. A state event that
    the homeserver accepted cancels other users' delayed state for the same key."""
    access_token(request)  # a malformed credential is refused here, not sent on
    body = await rq.read_body(request, c.settings.max_body_bytes)
    response = await c.homeserver.forward(
        request.method, _target(request), list(request.headers.items()), body
    )
    if state is not None and state[2] is not None and request.method == "PUT":
        if response.status_code == 200:
            await _note_state(request, c, state)
    return _relay(response)


def _relay(response: httpx.Response) -> Response:
    """The homeserver's answer, as it gave it."""
    relayed = Response(response.content, response.status_code)
    relayed.raw_headers = [
        (k, v) for k, v in relayed.raw_headers if k != b"content-type"
    ] + _encoded(response_headers(response))
    return relayed


def _encoded(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def _note_state(request: Request, c: Container, state: tuple[str, str, str | None]) -> None:
    room, kind, key = state
    try:
        requester = await c.auth.required(request)
        await c.service.note_state_set(
            room_id=rq.room_id(room),
            event_type=rq.event_type(kind),
            state_key=rq.path_segment(key or "", "state key"),
            sender=requester.user_id,
            acting_as=_acting_as(request),
        )
    except MatrixError:
        logger.info("could not apply the newer-state rule to a passed-through state event")


def _acting_as(request: Request) -> frozenset[str]:
    """The users the request named with `user_id`, read as the homeserver reads the query. With
    an application service's token the homeserver sends the event as that user (having checked
    the service may act as them); with a user's own token it ignores the parameter and the
    sender is the token's owner. Which of the two the homeserver did is not in its answer, so
    both count as the sender: neither one's own delayed state is cancelled."""
    return frozenset(value for name, value, _ in rq.query_pairs(request) if name == "user_id")


async def _merged(request: Request, add: Any) -> Response:
    c = container(request)
    access_token(request)  # a malformed credential is refused here, not sent on
    response = await c.homeserver.forward(
        "GET", _target(request), list(request.headers.items()), b""
    )
    if response.status_code != 200:
        return _relay(response)
    body = json_object(response)
    if body is None:
        raise HomeserverUnavailable("the homeserver gave an invalid answer")
    add(c, body)
    merged = JSONResponse(body)
    merged.raw_headers += _encoded(response_headers(response, skip=("content-type",)))
    return merged


def _add_feature(c: Container, body: dict[str, Any]) -> None:
    features = body.get("unstable_features")
    if not isinstance(features, dict):
        features = {}
    features["org.matrix.msc4140"] = True
    features["org.matrix.msc4486"] = True
    body["unstable_features"] = features


def _add_capability(c: Container, body: dict[str, Any]) -> None:
    capabilities = body.get("capabilities")
    if not isinstance(capabilities, dict):
        capabilities = {}
    limits = {
        "max_delay_ms": c.settings.max_delay_ms,
        "max_scheduled": c.settings.max_scheduled_per_user,
    }
    capabilities["m.delayed_events"] = dict(limits)
    capabilities["org.matrix.msc4140.delayed_events"] = dict(limits)
    body["capabilities"] = capabilities


@router.get("/_matrix/client/versions", summary="The homeserver's versions, with MSC4140")
async def versions(request: Request) -> Response:
    return await _merged(request, _add_feature)


@router.get("/_matrix/client/v3/capabilities", summary="Capabilities, with delayed events")
@router.get("/_matrix/client/r0/capabilities", include_in_schema=False)
async def capabilities(request: Request) -> Response:
    return await _merged(request, _add_capability)
