"""Shared fixtures: a real, throwaway PostgreSQL with the real migrations applied (or the one
TEST_DATABASE_URL names), a fake clock and a fake homeserver for tests below the end-to-end
level."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from devstack.postgres import start_throwaway
from fastapi import FastAPI
from hypothesis import settings as hypothesis_settings
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from app.__main__ import migrate
from app.crypto import new_key
from app.main import create_app
from app.settings import Settings
from tests.support.fakes import FakeClock, FakeHomeserver

HOMESERVER = "http://homeserver.test"

# In CI the property tests run the same examples every time (a red run is reproducible); locally
# they explore new ones on each run.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A migrated database: the one in TEST_DATABASE_URL, or a throwaway server of our own."""
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        migrate(given)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="sidecar-pg-") as tmp:
        os.chmod(tmp, 0o755)
        server = start_throwaway(Path(tmp) / "data")
        try:
            server.create_database("sidecar_test")
            url = server.database_url("sidecar_test")
            migrate(url)
            yield url
        finally:
            server.stop()


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "homeserver_url": HOMESERVER,
        "token_keys": new_key(),
        "database_pool_size": 5,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def clean_db(database_url: str) -> None:
    engine = create_async_engine(database_url)
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE delayed_event, device_token"))
    await engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def homeserver(clock: FakeClock) -> FakeHomeserver:
    hs = FakeHomeserver(clock)
    hs.add_user("alice_token", "@alice:test", "ALICEDEV")
    hs.add_user("alice_token_2", "@alice:test", "ALICEDEV")
    hs.add_user("alice_phone", "@alice:test", "PHONE")
    hs.add_user("bob_token", "@bob:test", "BOBDEV")
    return hs


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {}


@pytest.fixture
async def app(
    database_url: str,
    clean_db: None,
    clock: FakeClock,
    homeserver: FakeHomeserver,
    settings_overrides: dict[str, Any],
) -> AsyncIterator[FastAPI]:
    settings = make_settings(database_url, **settings_overrides)
    application = create_app(
        settings, clock=clock, transport=homeserver.transport(), start_scheduler=False
    )
    yield application
    container = application.state.container
    await container.homeserver.client.aclose()
    await container.replay_homeserver.client.aclose()
    await container.service.restarts.close()
    await container.engine.dispose()


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar.test") as c:
        yield c


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.path)
        if "/tests/integration/" in path:
            item.add_marker(pytest.mark.integration)
        elif "/tests/e2e/" in path:
            item.add_marker(pytest.mark.e2e)


__all__ = ["asyncio"]
