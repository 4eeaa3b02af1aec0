"""The memory of refused tokens is bounded: past its size the oldest refusal is forgotten (and
that token is asked about again), so made-up tokens cannot grow it without end."""

from __future__ import annotations

import httpx
import pytest

from app.auth import Authenticator
from app.errors import HomeserverError
from app.homeserver import Homeserver
from tests.support.fakes import FakeClock


async def test_the_oldest_refusal_is_forgotten_past_the_size() -> None:
    asked: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers["authorization"])
        return httpx.Response(401, json={"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        auth = Authenticator(
            Homeserver("http://hs.test", client),
            60,
            FakeClock(),
            refusal_ttl_seconds=5,
            max_refused=2,
        )
        for token in ("one", "two", "three", "three", "two", "one"):
            with pytest.raises(HomeserverError) as refused:
                await auth.authenticate(token)
            assert refused.value.status == 401
    # "one" was forgotten when "three" was refused; "two" and "three" were still remembered.
    assert asked == ["Bearer one", "Bearer two", "Bearer three", "Bearer one"]
