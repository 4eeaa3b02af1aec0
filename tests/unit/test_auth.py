"""The whoami cache: one homeserver call per token however many requests wait for it, refusals
shared but never cached, a caller going away does not cancel the others' answer, and tokens seen
valid are exempt from the limit on lookups (a bounded memory)."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from app.auth import Authenticator
from app.errors import HomeserverError, LimitExceeded
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


class Gates:
    """A homeserver knowing the tokens in `valid`, whose whoami for a token in `held` waits
    until `release` is set; `asked` counts the calls per token."""

    def __init__(self, *valid: str) -> None:
        self.valid = set(valid)
        self.held: set[str] = set()
        self.release = asyncio.Event()
        self.asked: dict[str, int] = {}

    async def handle(self, request: httpx.Request) -> httpx.Response:
        token = request.headers["authorization"].removeprefix("Bearer ")
        self.asked[token] = self.asked.get(token, 0) + 1
        if token in self.held:
            await self.release.wait()
        if token not in self.valid:
            return httpx.Response(401, json={"errcode": "M_UNKNOWN_TOKEN", "error": "Unknown"})
        return httpx.Response(200, json={"user_id": "@alice:test", "device_id": "PHONE"})

    def authenticator(self, clock: FakeClock, **limits: int) -> Authenticator:
        client = httpx.AsyncClient(transport=httpx.MockTransport(self.handle))
        return Authenticator(Homeserver("http://hs.test", client), 60, clock, **limits)


async def test_a_known_tokens_lookup_does_not_take_an_unknown_tokens_place() -> None:
    """A token seen valid whose answer ran out is looked up whatever the limit, and its lookup
    under way leaves the limit's places to tokens never seen."""
    clock = FakeClock()
    gates = Gates("known", "new")
    auth = gates.authenticator(clock, max_lookups=1)
    await auth.authenticate("known")
    clock.advance(60_000)
    gates.held = {"known", "bogus"}
    refresh = asyncio.create_task(auth.authenticate("known"))
    unknown = asyncio.create_task(auth.authenticate("bogus"))
    await _settle()
    assert gates.asked == {"known": 2, "bogus": 1}
    with pytest.raises(LimitExceeded):
        await auth.authenticate("new")  # the one place is taken by "bogus"
    gates.release.set()
    assert (await refresh).user_id == "@alice:test"
    with pytest.raises(HomeserverError):
        await unknown


async def test_the_memory_of_valid_tokens_is_bounded() -> None:
    """Past `max_known` tokens seen valid, the least recently used one is forgotten and is an
    unknown token again, subject to the limit."""
    clock = FakeClock()
    gates = Gates("one", "two")
    auth = gates.authenticator(clock, max_lookups=1, max_known=1)
    await auth.authenticate("one")
    await auth.authenticate("two")  # "one" is forgotten
    clock.advance(60_000)
    gates.held = {"bogus"}
    unknown = asyncio.create_task(auth.authenticate("bogus"))
    await _settle()
    assert (await auth.authenticate("two")).user_id == "@alice:test"
    with pytest.raises(LimitExceeded):
        await auth.authenticate("one")
    gates.release.set()
    with pytest.raises(HomeserverError):
        await unknown
