"""Managing and looking up delayed events, on the unstable prefix (generation A: token optional
for actions, finalised events are not found) and on v1 (token required, 200/409 on finalised)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from app.api import history, openapi
from app.api import requests as rq
from app.api.deps import container
from app.auth import Requester
from app.delay_ids import Kind
from app.errors import InvalidParam, MissingParam, MissingToken, Unrecognized
from app.service import Action, RenderedJSON, Status

router = APIRouter()

UNSTABLE = "/_matrix/client/unstable/org.matrix.msc4140"
V1 = "/_matrix/client/v1"


async def _requester(request: Request, delay_id: str, *, v1: bool) -> Requester | None:
    """The caller of an action, if a token came; rate limited per user, else per delay_id (an
    id the sidecar cannot have issued takes no bucket: the service refuses it at no cost)."""
    c = container(request)
    requester = await c.auth.optional(request)
    if requester is None and v1:
        raise MissingToken("Missing access token")
    if requester is not None:
        c.limits.manage(requester.user_id, delay_id)
        return requester
    kind = c.service.delay_ids.kind(delay_id)
    if kind is not Kind.FORGED:
        c.limits.manage(None, delay_id, untagged=kind is Kind.UNTAGGED)
    return None


async def split_action(
    request: Request, delay_id: str, action: Action, *, v1: bool
) -> dict[str, Any]:
    """send, cancel or restart by the split path (`delay_id` still percent-encoded)."""
    delay_id = rq.path_segment(delay_id, "delay id")
    requester = await _requester(request, delay_id, v1=v1)
    c = container(request)
    await rq.read_body(request, c.settings.max_body_bytes)  # {} or empty; contents unused
    await c.service.manage(requester, delay_id, action, v1=v1)
    return {}


async def _act_from_body(request: Request, delay_id: str, *, v1: bool) -> dict[str, Any]:
    delay_id = rq.path_segment(delay_id, "delay id")
    requester = await _requester(request, delay_id, v1=v1)
    c = container(request)
    body = rq.parse_json_object(await rq.read_body(request, c.settings.max_body_bytes))
    if "action" not in body:
        raise MissingParam("'action' is missing")
    try:
        action = Action(body["action"])
    except (ValueError, TypeError):
        raise InvalidParam("'action' must be one of send, cancel, restart") from None
    await c.service.manage(requester, delay_id, action, v1=v1)
    return {}


def _json(rendered: RenderedJSON) -> Response:
    """A document the service rendered, sent as it is (no second pass over large contents)."""
    return Response(rendered.text, media_type="application/json")


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
    page = await c.service.list(
        requester,
        status=status,
        delay_ids=delay_ids,
        from_token=rq.single(pairs, "from"),
        limit=rq.page_limit(pairs),
    )
    return _json(page)


async def _get(request: Request, delay_id: str) -> Response:
    c = container(request)
    requester = await c.auth.required(request)
    c.limits.manage(requester.user_id, "")
    return _json(await c.service.get(requester, rq.path_segment(delay_id, "delay id")))


def _add_routes(prefix: str, v1: bool) -> None:
    tag = "v1" if v1 else "unstable"

    async def act(request: Request, delay_id: str, action: str) -> dict[str, Any]:
        try:
            parsed = Action(action)
        except ValueError:
            raise Unrecognized("Unrecognized request") from None
        return await split_action(request, delay_id, parsed, v1=v1)

    async def act_from_body(request: Request, delay_id: str) -> dict[str, Any]:
        return await _act_from_body(request, delay_id, v1=v1)

    async def list_events(request: Request) -> Response:
        if v1:
            return await history.list_v1(request, legacy=_list)
        return await _list(request)

    async def get_event(request: Request, delay_id: str) -> Response:
        return await _get(request, delay_id)

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
        openapi_extra=history.V1_OPENAPI if v1 else openapi.LIST,
    )
    router.add_api_route(
        base + "/{delay_id}",
        get_event,
        methods=["GET"],
        summary="Get one delayed event",
        operation_id=f"get_{tag}",
    )


_add_routes(UNSTABLE, v1=False)
_add_routes(V1, v1=True)
