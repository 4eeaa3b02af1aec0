"""An application on the test database with a chosen homeserver transport, and a client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from app.main import create_app
from tests.conftest import make_settings
from tests.support.fakes import FakeClock


@asynccontextmanager
async def app_and_client(
    database_url: str, clock: FakeClock, transport: httpx.AsyncBaseTransport, **overrides: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The application (scheduler stopped) talking to the homeserver through `transport`, and a
    client for it; leaving the block is the process ending."""
    app = create_app(
        make_settings(database_url, **overrides),
        clock=clock,
        transport=transport,
        start_scheduler=False,
    )
    try:
        to_app = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=to_app, base_url="http://sidecar.test") as client:
            yield app, client
    finally:
        await app.state.container.homeserver.client.aclose()
        await app.state.container.replay_homeserver.client.aclose()
        await app.state.container.service.restarts.close()
        await app.state.container.engine.dispose()
