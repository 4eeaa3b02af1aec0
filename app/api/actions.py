"""Send, cancel and restart, as the routes (`app.api.manage`) and the heartbeat's own path
(`app.api.heartbeat`) both answer them: who is calling, the rate limit, the body, the service
call, and its refusals in the shape of the request's generation."""

from __future__ import annotations

from starlette.requests import Request

from app.api import requests as rq
from app.api.answers import answering
from app.api.deps import container
from app.auth import Requester
from app.delay_ids import Kind
from app.domain import Action, Generation
from app.errors import InvalidParam, MissingParam, MissingToken


async def requester(request: Request, delay_id: str, generation: Generation) -> Requester | None:
    """The caller of an action, if a token came (B requires one); rate limited per user, else per
    delay_id (an id the sidecar cannot have issued takes no bucket: the service refuses it at no
    cost). A call without a token is settled with the limits once answered (`act`), so that only
    guessed untagged ids spend their shared budget (`app.ratelimit`)."""
    c = container(request)
    found = await c.auth.optional(request)
    if found is None and generation is Generation.B:
        raise MissingToken("Missing access token")
    if found is not None:
        c.limits.manage(found.user_id, delay_id)
        return found
    kind = c.service.delay_ids.kind(delay_id)
    if kind is not Kind.FORGED:
        c.limits.manage(None, delay_id, untagged=kind is Kind.UNTAGGED)
    return None


async def act(request: Request, raw_delay_id: str, action: Action, generation: Generation) -> None:
    """send, cancel or restart by the split path (`raw_delay_id` still percent-encoded)."""
    delay_id = rq.path_segment(raw_delay_id, "delay id")
    caller = await requester(request, delay_id, generation)
    c = container(request)
    honoured = False
    try:
        await rq.read_body(request, c.settings.max_body_bytes)  # {} or empty; contents unused
        with answering(generation):
            await c.service.manage(caller, delay_id, action, generation)
        honoured = True
    finally:
        if caller is None:
            c.limits.settle_untagged(delay_id, honoured=honoured)


async def act_from_body(request: Request, raw_delay_id: str, generation: Generation) -> None:
    """send, cancel or restart by the body form (`{"action": ...}`)."""
    delay_id = rq.path_segment(raw_delay_id, "delay id")
    caller = await requester(request, delay_id, generation)
    c = container(request)
    honoured = False
    try:
        body = rq.parse_json_object(await rq.read_body(request, c.settings.max_body_bytes))
        if "action" not in body:
            raise MissingParam("'action' is missing")
        try:
            action = Action(body["action"])
        except (ValueError, TypeError):
            raise InvalidParam("'action' must be one of send, cancel, restart") from None
        with answering(generation):
            await c.service.manage(caller, delay_id, action, generation)
        honoured = True
    finally:
        if caller is None:
            c.limits.settle_untagged(delay_id, honoured=honoured)
