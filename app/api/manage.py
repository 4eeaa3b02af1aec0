"""Managing and looking up delayed events, on the unstable prefix (generation A: token optional
for actions, finalised events are not found) and on v1 (token required, 200/409 on finalised)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from app.api import actions, history, openapi, render
from app.api import requests as rq
from app.api.answers import answering
from app.api.deps import container
from app.auth import Requester
from app.cursors import as_position, decode_cursor
from app.domain import Action, Generation, Status
from app.errors import InvalidParam, Unrecognized
from app.lookups import ListQuery

router = APIRouter()

UNSTABLE = "/_matrix/client/unstable/org.matrix.msc4140"
V1 = "/_matrix/client/v1"


async def _list(request: Request, requester: Requester | None = None) -> Response:
    """The msc4140 list (and the earlier v1 list); `requester` when the caller is judged already."""
    c = container(request)
    if requester is None:
        requester = await c.auth.required(request)
        c.limits.manage(requester.user_id, "")
    pairs = rq.query_pairs(request)
    status_value = rq.single(pairs, "status")
    try:
        status = Status(status_value) if status_value is not None else None
    except ValueError:
        raise InvalidParam("status must be 'scheduled' or 'finalised'") from None
    delay_ids = [value for key, value, _ in pairs if key == "delay_id"]
    if len(delay_ids) > rq.MAX_PAGE:
        raise InvalidParam(f"At most {rq.MAX_PAGE} delay_id values")
    from_token = rq.single(pairs, "from")
    limit = rq.page_limit(pairs)
    cursor = decode_cursor(from_token) if from_token else {}
    query = ListQuery(
        delay_ids=delay_ids,
        limit=limit,
        scheduled=status in (None, Status.SCHEDULED) and cursor.get("s") != "done",
        finalised=status in (None, Status.FINALISED) and cursor.get("f") != "done",
        scheduled_after=as_position(cursor.get("s")),
        finalised_after=as_position(cursor.get("f")),
    )
    lists = await c.lookups.lists(requester, query)
    return render.json_response(render.msc4140_lists(lists, status, cursor))


async def _get(request: Request, delay_id: str, generation: Generation) -> Response:
    c = container(request)
    requester = await c.auth.required(request)
    c.limits.manage(requester.user_id, "")
    delay_id = rq.path_segment(delay_id, "delay id")
    with answering(generation):
        event = await c.lookups.get(requester, delay_id)
    return render.json_response(render.render(event))


def _add_routes(prefix: str, generation: Generation) -> None:
    tag = "v1" if generation is Generation.B else "unstable"

    async def act(request: Request, delay_id: str, action: str) -> dict[str, Any]:
        try:
            parsed = Action(action)
        except ValueError:
            raise Unrecognized("Unrecognized request") from None
        await actions.act(request, delay_id, parsed, generation)
        return {}

    async def act_from_body(request: Request, delay_id: str) -> dict[str, Any]:
        await actions.act_from_body(request, delay_id, generation)
        return {}

    async def list_events(request: Request) -> Response:
        if generation is Generation.B:
            return await history.list_v1(request, legacy=_list)
        return await _list(request)

    async def get_event(request: Request, delay_id: str) -> Response:
        return await _get(request, delay_id, generation)

    base = prefix + "/delayed_events"
    router.add_api_route(
        base + "/{delay_id}/{action}",
        act,
        methods=["POST"],
        summary="Send, cancel or restart a delayed event",
        operation_id=f"act_{tag}",
        openapi_extra=openapi.ACT,
    )
    router.add_api_route(
        base + "/{delay_id}",
        act_from_body,
        methods=["POST"],
        summary='Send, cancel or restart a delayed event (body {"action": ...})',
        operation_id=f"act_from_body_{tag}",
        openapi_extra=openapi.ACT_FROM_BODY,
    )
    router.add_api_route(
        base,
        list_events,
        methods=["GET"],
        summary="List delayed events",
        operation_id=f"list_{tag}",
        openapi_extra=history.V1_OPENAPI if generation is Generation.B else openapi.LIST,
    )
    router.add_api_route(
        base + "/{delay_id}",
        get_event,
        methods=["GET"],
        summary="Get one delayed event",
        operation_id=f"get_{tag}",
    )


_add_routes(UNSTABLE, Generation.A)
_add_routes(V1, Generation.B)
