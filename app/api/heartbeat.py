"""The heartbeat's own path. MatrixRTC restarts every participant's delayed leave every few
seconds, so `POST …/delayed_events/{delay_id}/restart` is answered here, ahead of the framework's
routing, validation and serialisation, through the very same rules as the routed endpoint
(`manage._act`). The routed endpoint stays declared for the API description."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app import metrics
from app.api.errors import send_error, send_json
from app.api.manage import split_action
from app.errors import MatrixError
from app.service import Action

_RESTART = re.compile(
    r"^/_matrix/client/(?:(?P<v1>v1)|unstable/org\.matrix\.msc4140)/delayed_events/"
    r"(?P<delay_id>[^/]+)/restart$"
)
# How request metrics name the heartbeat's route (its own series, apart from the routed actions).
_TEMPLATES = {
    True: "/_matrix/client/v1/delayed_events/{delay_id}/restart",
    False: "/_matrix/client/unstable/org.matrix.msc4140/delayed_events/{delay_id}/restart",
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
        scope[metrics.ROUTE_TEMPLATE] = _TEMPLATES[match["v1"] is not None]
        request = Request(scope, receive)
        try:
            await split_action(
                request, match["delay_id"], Action.RESTART, v1=match["v1"] is not None
            )
        except MatrixError as exc:
            await send_error(send, exc)
            return
        await send_json(send, 200, {})
