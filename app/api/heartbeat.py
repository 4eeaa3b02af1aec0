"""The heartbeat's own path. MatrixRTC restarts every participant's delayed leave every few
seconds, so `POST …/delayed_events/{delay_id}/restart` is answered here, ahead of the framework's
routing, validation and serialisation, through the very same action as the routed endpoint
(`app.api.actions`). The routed endpoint stays declared for the API description."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app import metrics
from app.api import actions
from app.api.answers import matrix_error, record_generation
from app.api.errors import send_error, send_json
from app.domain import Action, DomainError, Generation
from app.errors import MatrixError

_RESTART = re.compile(
    r"^/_matrix/client/(?:(?P<v1>v1)|unstable/org\.matrix\.msc4140)/delayed_events/"
    r"(?P<delay_id>[^/]+)/restart$"
)
# How request metrics name the heartbeat's route (its own series, apart from the routed actions).
_TEMPLATES = {
    Generation.B: "/_matrix/client/v1/delayed_events/{delay_id}/restart",
    Generation.A: "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}/restart",
}


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
