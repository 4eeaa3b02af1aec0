"""The heartbeat's own path. MatrixRTC restarts every participant's delayed leave every few
seconds, so `POST …/delayed_events/{delay_id}/restart` is answered here, ahead of the framework's
routing, validation and serialisation, through the very same action as the routed endpoint
(`app.api.actions`). The routed endpoint stays declared for the API description.

A call without a token on an id the sidecar never issued (`app.delay_ids`), or on an id of the
untagged form not yet known while their shared budget is spent, is refused here before anything
else is done for it: such calls are what a flood of guessed ids is made of, and they share the
event loop with everyone's heartbeat."""

from __future__ import annotations

import re
from urllib.parse import unquote

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app import metrics
from app.api import actions
from app.api.answers import matrix_error, record_generation
from app.api.deps import Container
from app.api.errors import send_error, send_json
from app.delay_ids import Kind
from app.domain import Action, DomainError, Generation
from app.errors import MatrixError, NotFound

_RESTART = re.compile(
    r"^/_matrix/client/(?:(?P<v1>v1)|unstable/org\.matrix\.msc4140)/delayed_events/"
    r"(?P<delay_id>[^/]+)/restart$"
)
# How request metrics name the heartbeat's route (its own series, apart from the routed actions).
_TEMPLATES = {
    Generation.B: "/_matrix/client/v1/delayed_events/{delay_id}/restart",
    Generation.A: "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}/restart",
}


# A delay_id as the sidecar issues them (and no longer than the routes accept): nothing to decode.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")


def _names_access_token(query: bytes) -> bool:
    """Whether a query string has an `access_token` parameter, its name read as `app.auth` reads
    it (`&` and `;` separate, `+` is a space, the name percent-decoded)."""
    if b"access_token" not in query and b"%" not in query:
        return False
    for part in re.split("[&;]", query.decode("latin-1")):
        if unquote(part.partition("=")[0].replace("+", " ")) == "access_token":
            return True
    return False


def _early_refusal(scope: Scope, delay_id: str) -> MatrixError | None:
    """The answer the full path would give a call without a token that cannot be honoured,
    whatever its body, found without the body, the framework's request, the limits or the
    database, so that a flood of made-up ids costs as little as it can: 404 for an id the
    sidecar cannot have issued, 429 for an id of the untagged form while their shared budget is
    spent. None when the full path must judge: an `access_token` query parameter (whatever its
    value), an `Authorization` header, or a body of unknown length or over the limit (refused
    413 first). Any other query parameter changes nothing for a restart."""
    if not _PLAIN_ID.fullmatch(delay_id) or _names_access_token(scope.get("query_string", b"")):
        return None
    declared = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            return None
        if name == b"content-length":
            declared = value
    if declared is None or not declared.isdigit():
        return None
    container: Container = scope["app"].state.container
    if int(declared) > container.settings.max_body_bytes:
        return None
    kind = container.service.delay_ids.kind(delay_id)
    if kind is Kind.FORGED:
        metrics.RESTARTED.labels("A", "refused").inc()  # as the service counts it
        return NotFound("Delayed event not found")
    if kind is Kind.UNTAGGED:
        return container.limits.untagged_refusal(delay_id)
    return None


class HeartbeatMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = _RESTART.match(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        generation = Generation.B if match["v1"] is not None else Generation.A
        scope[metrics.ROUTE_TEMPLATE] = _TEMPLATES[generation]
        record_generation(scope, generation)
        refusal = _early_refusal(scope, match["delay_id"]) if match["v1"] is None else None
        if refusal is not None:
            await send_error(send, refusal)
            return
        request = Request(scope, receive)
        try:
            await actions.act(request, match["delay_id"], Action.RESTART, generation)
        except MatrixError as exc:
            await send_error(send, exc)
            return
        except DomainError as exc:
            # Ahead of the framework, so of its exception handlers: answered here alike.
            await send_error(send, matrix_error(exc, generation))
            return
        await send_json(send, 200, {})
