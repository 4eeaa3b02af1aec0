"""The bulk lookup of MSC4486 on its unstable path, and the v1 list, which is the same lookup
unless the request uses what only the earlier v1 list knew (`status=finalised`, `delay_id=`).

Decisions where MSC4486 is silent (docs/decisions.md): `from_ts` is inclusive and `to_ts`
exclusive, both bounds on the send time whatever `dir` is; a window whose `from_ts` is after its
`to_ts` is refused; every parameter but `delay_id` may be given at most once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from app.api import requests as rq
from app.api.deps import container
from app.api.render import json_response, pages, render
from app.auth import Requester
from app.cursors import PageTokens
from app.errors import InvalidParam
from app.lookups import STATUSES, HistoryQuery
from app.models import SCHEDULED, DelayedEvent

router = APIRouter()

UNSTABLE = "/_matrix/client/unstable/org.matrix.msc4486"
_MAX_TIMESTAMP = 2**63 - 1
_MAX_ID_BYTES = 255
# Parameters only MSC4486 knows: the earlier v1 list cannot honour them.
_MSC4486_ONLY = ("from_ts", "to_ts", "dir", "room_id", "type")
_LEGACY_STATUS = "finalised"

Pairs = list[tuple[str, str, str]]


def _timestamp(pairs: Pairs, name: str) -> int | None:
    value = rq.single(pairs, name)
    if value is None:
        return None
    digits = value.lstrip("0") if value.isascii() and value.isdigit() else None
    if digits is None or len(digits) > 19 or int(digits or "0") > _MAX_TIMESTAMP:
        raise InvalidParam(f"{name} must be a timestamp in milliseconds (a non-negative integer)")
    return int(digits or "0")


def _identifier(pairs: Pairs, name: str) -> str | None:
    value = rq.single(pairs, name)
    if value is not None and (not value or len(value.encode()) > _MAX_ID_BYTES):
        raise InvalidParam(f"{name} must be 1 to {_MAX_ID_BYTES} bytes long")
    return value


def parse_query(pairs: Pairs) -> HistoryQuery:
    """The filters and direction of a bulk lookup; 400 M_INVALID_PARAM for what is unsupported."""
    status = rq.single(pairs, "status")
    if status is not None and status not in STATUSES:
        raise InvalidParam(f"status must be one of {', '.join(STATUSES)}")
    direction = rq.single(pairs, "dir")
    if direction not in (None, "f", "b"):
        raise InvalidParam("dir must be 'f' or 'b'")
    from_ts = _timestamp(pairs, "from_ts")
    to_ts = _timestamp(pairs, "to_ts")
    if from_ts is not None and to_ts is not None and from_ts > to_ts:
        raise InvalidParam("from_ts must not be after to_ts (both bound the send time)")
    return HistoryQuery(
        status=status,
        room_id=_identifier(pairs, "room_id"),
        event_type=_identifier(pairs, "type"),
        from_ts=from_ts,
        to_ts=to_ts,
        backwards=direction == "b",
    )


async def _authenticated(request: Request) -> Requester:
    """The caller, judged before anything of the query is (a bad token is a 401 first)."""
    c = container(request)
    requester = await c.auth.required(request)
    c.limits.manage(requester.user_id, "")
    return requester


async def _page(
    request: Request, requester: Requester, pairs: Pairs
) -> tuple[HistoryQuery, list[DelayedEvent], str | None]:
    """The query, a page of its events and the `next_batch` token when more follow."""
    c = container(request)
    query = parse_query(pairs)
    limit = rq.page_limit(pairs)
    from_token = rq.single(pairs, "from")
    tokens = PageTokens(c.settings.token_keys[0])
    user_id = requester.user_id
    after = tokens.open(from_token, user_id, query) if from_token is not None else None
    page = await c.lookups.history(requester, query, after=after, limit=limit)
    if not page.more or not page.events:
        return query, page.events, None
    last = page.events[-1]
    return query, page.events, tokens.make((last.send_ts, last.delay_id), user_id, query)


async def list_unstable(request: Request) -> Response:
    requester = await _authenticated(request)
    pairs = rq.query_pairs(request)
    if any(key == "delay_id" for key, _, _ in pairs):
        raise InvalidParam("delay_id is not a filter of this lookup; use /v1/delayed_events")
    _, events, next_batch = await _page(request, requester, pairs)
    return json_response(pages({"delayed_events": [render(e) for e in events]}, next_batch))


async def list_v1(
    request: Request, legacy: Callable[[Request, Requester], Awaitable[Response]]
) -> Response:
    """`GET /v1/delayed_events`: MSC4486's lookup, or `legacy` (the earlier v1 list) when asked
    for `status=finalised` or by `delay_id`. Both answers carry `scheduled` and `finalised`."""
    requester = await _authenticated(request)
    pairs = rq.query_pairs(request)
    uses_legacy = any(
        (key == "status" and value == _LEGACY_STATUS) or key == "delay_id"
        for key, value, _ in pairs
    )
    if uses_legacy:
        mixed = sorted({key for key, _, _ in pairs if key in _MSC4486_ONLY})
        if mixed:
            raise InvalidParam(
                f"{', '.join(mixed)} cannot be combined with status=finalised or delay_id"
            )
        return await legacy(request, requester)
    query, events, next_batch = await _page(request, requester, pairs)
    rendered = [(event.status == SCHEDULED, render(event)) for event in events]
    lists = {"delayed_events": [text for _, text in rendered]}
    if query.status in (None, SCHEDULED):
        lists["scheduled"] = [text for scheduled, text in rendered if scheduled]
    if query.status != SCHEDULED:
        lists["finalised"] = [text for scheduled, text in rendered if not scheduled]
    return json_response(pages(lists, next_batch))


def _query_doc(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_TIMESTAMP = {"type": "integer", "minimum": 0, "maximum": _MAX_TIMESTAMP}
OPENAPI: dict[str, Any] = {
    "parameters": [
        _query_doc("from_ts", _TIMESTAMP, "Only events to be sent at or after this time (ms)"),
        _query_doc("to_ts", _TIMESTAMP, "Only events to be sent before this time (ms)"),
        _query_doc("dir", {"type": "string", "enum": ["f", "b"]}, "f: earliest first (default)"),
        _query_doc("room_id", {"type": "string"}, "Only events of this room"),
        _query_doc("type", {"type": "string"}, "Only events of this type"),
        _query_doc("status", {"type": "string", "enum": list(STATUSES)}, "Only these events"),
        _query_doc("from", {"type": "string"}, "next_batch of the previous page of this query"),
        _query_doc("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "Page size"),
    ]
}

# The v1 list: MSC4486's parameters, and the earlier v1 list's `status=finalised` and `delay_id`.
V1_OPENAPI: dict[str, Any] = {
    "parameters": [
        *(p for p in OPENAPI["parameters"] if p["name"] != "status"),
        _query_doc(
            "status",
            {"type": "string", "enum": [*STATUSES, _LEGACY_STATUS]},
            "Only these events (finalised: the earlier v1 list's answer)",
        ),
        _query_doc(
            "delay_id",
            {"type": "array", "items": {"type": "string"}},
            "Only these events (the earlier v1 list's answer)",
        ),
    ]
}

router.add_api_route(
    UNSTABLE + "/delayed_events",
    list_unstable,
    methods=["GET"],
    summary="Look up delayed events, scheduled and finalised, by send time (MSC4486)",
    operation_id="list_msc4486",
    openapi_extra=OPENAPI,
)
