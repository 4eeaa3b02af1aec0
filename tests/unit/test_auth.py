"""The whoami cache: one homeserver call per token however many requests wait for it, refusals
shared but never cached, a caller going away does not cancel the others' answer."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from app.auth import Authenticator
from app.errors import HomeserverError
from app.homeserver import Homeserver
from tests.support.fakes import FakeClock


class Whoami:
    """A homeserver whose whoami answers only when the test lets it."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.status = 200

    async def handle(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/_matrix/client/v3/account/whoami"
        self.calls += 1
        await self.release.wait()
        if self.status != 200:
            return httpx.Response(
                self.status, json={"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown token"}
            )
        return httpx.Response(200, json={"user_id": "@alice:test", "device_id": "PHONE"})


@pytest.fixture
async def whoami() -> Whoami:
    return Whoami()


def authenticator(whoami: Whoami, ttl: float = 60, clock: FakeClock | None = None) -> Authenticator:
    client = httpx.AsyncClient(transport=httpx.MockTransport(whoami.handle))
    return Authenticator(Homeserver("http://hs.test", client), ttl, clock or FakeClock())


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_concurrent_requests_share_one_call(whoami: Whoami) -> None:
    auth = authenticator(whoami)
    waiting = [asyncio.create_task(auth.authenticate("tok")) for _ in range(50)]
    await _settle()
    whoami.release.set()
    answers = await asyncio.gather(*waiting)
    assert whoami.calls == 1
    assert {(a.user_id, a.device_id) for a in answers} == {("@alice:test", "PHONE")}
    # Cached afterwards: no further call.
    await auth.authenticate("tok")
    assert whoami.calls == 1


async def test_different_tokens_are_looked_up_separately(whoami: Whoami) -> None:
    auth = authenticator(whoami)
    whoami.release.set()
    await asyncio.gather(auth.authenticate("a"), auth.authenticate("b"), auth.authenticate("a"))
    assert whoami.calls == 2


async def test_a_refusal_reaches_every_waiter_and_is_remembered_briefly(whoami: Whoami) -> None:
    clock = FakeClock()
    auth = authenticator(whoami, clock=clock)
    whoami.status = 401
    waiting = [asyncio.create_task(auth.authenticate("bad")) for _ in range(5)]
    await _settle()
    whoami.release.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert whoami.calls == 1
    assert all(isinstance(r, HomeserverError) and r.status == 401 for r in results)
    whoami.status = 200
    with pytest.raises(HomeserverError):
        await auth.authenticate("bad")  # the refusal is remembered: not asked again
    assert whoami.calls == 1
    clock.advance(5000)
    assert (await auth.authenticate("bad")).user_id == "@alice:test"
    assert whoami.calls == 2


async def test_a_caller_going_away_does_not_cancel_the_others(whoami: Whoami) -> None:
    auth = authenticator(whoami)
    leaving = asyncio.create_task(auth.authenticate("tok"))
    staying = asyncio.create_task(auth.authenticate("tok"))
    await _settle()
    leaving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    whoami.release.set()
    assert (await staying).user_id == "@alice:test"
    assert whoami.calls == 1


async def test_no_cache_still_shares_the_call_in_flight(whoami: Whoami) -> None:
    auth = authenticator(whoami, ttl=0)
    waiting = [asyncio.create_task(auth.authenticate("tok")) for _ in range(3)]
    await _settle()
    whoami.release.set()
    await asyncio.gather(*waiting)
    assert whoami.calls == 1
    await auth.authenticate("tok")  # nothing cached: asked again
    assert whoami.calls == 2


async def test_a_cached_answer_expires_on_the_clock(whoami: Whoami) -> None:
    clock = FakeClock()
    auth = authenticator(whoami, ttl=60, clock=clock)
    whoami.release.set()
    await auth.authenticate("tok")
    clock.advance(59_999)
    await auth.authenticate("tok")  # still cached
    assert whoami.calls == 1
    clock.advance(1)
    await auth.authenticate("tok")  # expired: asked again
    assert whoami.calls == 2
