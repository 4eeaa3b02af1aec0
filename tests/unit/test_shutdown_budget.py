"""A stopping replica keeps its lock until the sends it has begun are answered: the drain's wait
and uvicorn's grace for open requests (a send action among them) each cover the longest send, so
no peer takes a claim over while its send is still at the homeserver."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI

from app.__main__ import server_config
from app.main import Drain
from app.replay import request_deadline_seconds
from app.settings import Settings

BASE: dict[str, Any] = {
    "database_url": "postgresql://x@localhost/db",
    "homeserver_url": "http://hs",
    "token_keys": [b"k" * 32],
}
TIMEOUTS = [0.05, 1.0, 10.0, 37.5]


def longest_send(settings: Settings) -> float:
    """One send: the newer-state check, the request, and the request again as the user (the
    device logged out meanwhile), each bounded by the engine's request deadline."""
    return 3 * request_deadline_seconds(settings)


def test_the_engines_request_deadline_is_three_homeserver_timeouts() -> None:
    settings = Settings(**BASE, homeserver_timeout_seconds=10)
    assert request_deadline_seconds(settings) == 30


class _Replay:
    def __init__(self) -> None:
        self.draining = False
        self.timeouts: list[float] = []

    async def drain(self, timeout: float) -> bool:
        self.timeouts.append(timeout)
        return True


async def _drain_timeout(settings: Settings) -> float:
    replay = _Replay()
    container: Any = SimpleNamespace(
        settings=settings, scheduler=SimpleNamespace(drain=lambda: None), replay=replay
    )
    await asyncio.wait_for(Drain(container).wait(), 5)
    (timeout,) = replay.timeouts
    return timeout


@pytest.mark.parametrize("timeout", TIMEOUTS)
async def test_the_drain_waits_for_the_longest_send(timeout: float) -> None:
    settings = Settings(**BASE, homeserver_timeout_seconds=timeout)
    # More than the send itself: its outcome is written after it.
    assert await _drain_timeout(settings) > longest_send(settings)


@pytest.mark.parametrize("timeout", TIMEOUTS)
def test_open_requests_get_as_long_as_the_drain(timeout: float) -> None:
    settings = Settings(**BASE, homeserver_timeout_seconds=timeout)
    config = server_config(FastAPI(), settings)
    assert config.timeout_graceful_shutdown is not None
    assert config.timeout_graceful_shutdown > longest_send(settings)
    assert config.timeout_graceful_shutdown >= asyncio.run(_drain_timeout(settings))


def test_the_default_budget() -> None:
    """With the default 10 s homeserver timeout: three requests of 30 s and 20 s to write."""
    settings = Settings(**BASE)
    assert asyncio.run(_drain_timeout(settings)) == 110
    assert server_config(FastAPI(), settings).timeout_graceful_shutdown == 110
