"""Scheduling: the query-parameter form on /send and /state (generation A) and the dedicated
delayed_event endpoint (generation B). A /send or /state request that reaches the sidecar without
the delay parameter is passed through to the homeserver unchanged."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response

from app.api import openapi
from app.api import requests as rq
from app.api.answers import answering
from app.api.deps import Container, container
from app.api.proxy import pass_through
from app.auth import Requester, access_token
from app.domain import Generation
from app.errors import InvalidParam, MissingParam
from app.models import storable_text
from app.service import ScheduleRequest

router = APIRouter()


class _ClientVersion(Convertor[str]):
    """The client-API version of a path: one segment, or Synapse's legacy two-segment `api/v1`."""

    regex = "api/v1|[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("client_version", _ClientVersion())

_A = "/_matrix/client/{version:client_version}/rooms/{room}"
_B_PREFIXES = ("/_matrix/client/v3", "/_matrix/client/unstable/org.matrix.msc4140")
# Every prefix under which Synapse serves send and state (the legacy `api/v1` included).
_A_VERSIONS = {"r0", "v3", "unstable", "api/v1"}


async def _schedule_a(
    request: Request, *, version: str, room: str, kind: str, state_key: str | None, txn: str | None
) -> Response | dict[str, Any]:
    c = container(request)
    if version not in _A_VERSIONS:
        raise InvalidParam(f"Unsupported API version '{version}'")
    access_token(request)  # a malformed credential is the first thing wrong with a request
    pairs = rq.query_pairs(request)
    delay = rq.single(pairs, rq.DELAY_PARAM)
    if delay is None:
        if rq.single(pairs, rq.PARENT_PARAM) is not None:
            # Fail closed: an event meant to wait must never be sent at once.
            raise MissingParam(f"{rq.PARENT_PARAM} needs {rq.DELAY_PARAM}")
        return await pass_through(request, c, state=(room, kind, state_key))
    delay_ms = rq.parse_delay(delay)
    query = rq.replayed_query(pairs)
    requester = await c.auth.required(request)
    c.limits.schedule(requester.user_id)
    # Over the maximum is the first thing wrong with a request that gets this far, whatever its
    # body.
    with answering(Generation.A):
        allowed = c.service.check_delay(delay_ms)
    content = rq.parse_json_object(await rq.read_body(request, c.settings.max_body_bytes))
    schedule = ScheduleRequest(
        generation=Generation.A,
        room_id=rq.room_id(room),
        event_type=rq.event_type(kind),
        state_key=rq.path_segment(state_key, "state key") if state_key is not None else None,
        content=rq.compact_json(content),
        delay=allowed,
        query=query,
        txn_key=rq.txn_key("send", room, kind, txn) if txn is not None else None,
    )
    return await _scheduled(c, requester, schedule)


async def _scheduled(
    c: Container, requester: Requester, schedule: ScheduleRequest
) -> dict[str, Any]:
    with answering(schedule.generation):
        return {"delay_id": await c.service.schedule(requester, schedule)}


@router.put(
    _A + "/send/{event_type}/{txn_id}",
    summary="Schedule a delayed message",
    openapi_extra=openapi.SCHEDULE_A,
)
async def send_message(
    request: Request, version: str, room: str, event_type: str, txn_id: str
) -> Any:
    return await _schedule_a(
        request, version=version, room=room, kind=event_type, state_key=None, txn=txn_id
    )


@router.post(
    _A + "/send/{event_type}",
    summary="Schedule a delayed message (no txn id)",
    openapi_extra=openapi.SCHEDULE_A,
)
async def send_message_no_txn(request: Request, version: str, room: str, event_type: str) -> Any:
    return await _schedule_a(
        request, version=version, room=room, kind=event_type, state_key=None, txn=None
    )


@router.put(
    _A + "/state/{event_type}/{state_key}",
    summary="Schedule a delayed state event",
    openapi_extra=openapi.SCHEDULE_A,
)
async def put_state(
    request: Request, version: str, room: str, event_type: str, state_key: str
) -> Any:
    return await _schedule_a(
        request, version=version, room=room, kind=event_type, state_key=state_key, txn=None
    )


@router.put(
    _A + "/state/{event_type}/",
    summary="Schedule a delayed state event (empty key)",
    openapi_extra=openapi.SCHEDULE_A,
)
@router.put(
    _A + "/state/{event_type}",
    summary="Schedule a delayed state event (empty key)",
    openapi_extra=openapi.SCHEDULE_A,
)
async def put_state_empty_key(request: Request, version: str, room: str, event_type: str) -> Any:
    return await _schedule_a(
        request, version=version, room=room, kind=event_type, state_key="", txn=None
    )


async def _schedule_b(request: Request, room: str, kind: str, txn: str) -> dict[str, Any]:
    c = container(request)
    access_token(request)
    rq.refuse_identity(rq.query_pairs(request))
    requester = await c.auth.required(request)
    c.limits.schedule(requester.user_id)
    body = rq.parse_json_object(await rq.read_body(request, c.settings.max_body_bytes))
    delay = body.get("delay_ms", body.get("delay"))
    if delay is None:
        raise MissingParam("delay_ms is required")
    if isinstance(delay, rq.LongInteger) and not delay.negative:
        delay = rq.TOO_LONG
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise InvalidParam("delay_ms must be a non-negative integer")
    content = body.get("content")
    if content is None:
        raise MissingParam("content is required")
    if not isinstance(content, dict):
        raise InvalidParam("content must be a JSON object")
    state_key = body.get("state_key")
    if state_key is not None and not isinstance(state_key, str):
        raise InvalidParam("state_key must be a string")
    if state_key is not None and not storable_text(state_key):
        raise InvalidParam("Invalid character in state_key")
    if state_key is not None and len(state_key.encode()) > 255:
        raise InvalidParam("state key is too long")
    room_id, event_type = rq.room_id(room), rq.event_type(kind)
    compact = rq.compact_json(content)
    txn_key = rq.txn_key("delayed_event", room, kind, txn)
    # Over the maximum is answered only for an otherwise valid request.
    with answering(Generation.B):
        allowed = c.service.check_delay(delay)
    schedule = ScheduleRequest(
        generation=Generation.B,
        room_id=room_id,
        event_type=event_type,
        state_key=state_key,
        content=compact,
        delay=allowed,
        query="",
        txn_key=txn_key,
    )
    return await _scheduled(c, requester, schedule)


def _add_b_routes() -> None:
    for prefix in _B_PREFIXES:

        async def schedule_b(request: Request, room: str, event_type: str, txn_id: str) -> Any:
            return await _schedule_b(request, room, event_type, txn_id)

        router.add_api_route(
            prefix + "/rooms/{room}/delayed_event/{event_type}/{txn_id}",
            schedule_b,
            methods=["PUT"],
            summary="Schedule a delayed event (body: delay_ms, state_key?, content)",
            operation_id=f"schedule_delayed_event_{prefix.rsplit('/', 1)[-1].replace('.', '_')}",
            openapi_extra=openapi.SCHEDULE_B,
        )


_add_b_routes()
