"""Requests with made-up access tokens cannot tie up the homeserver client: whoami calls for
tokens never seen valid are capped (a request beyond the cap is answered 429 at once, while a
token seen valid is still looked up when its cached answer runs out), a refused token is
remembered briefly, and replays have a connection pool of their own that nothing a client sends
can fill."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import uvicorn

from app.main import create_app
from tests.conftest import make_settings
from tests.integration.common import ALICE, UNSTABLE, schedule_message, send_path
from tests.support.apps import app_and_client
from tests.support.fakes import FakeClock, FakeHomeserver

WHOAMI = "/_matrix/client/v3/account/whoami"


def _restart(c: httpx.AsyncClient, token: str) -> Awaitable[httpx.Response]:
    return c.post(
        f"{UNSTABLE}/delayed_events/x/restart",
        json={},
        headers={"Authorization": f"Bearer {token}"},
    )


def _whoami_calls(homeserver: FakeHomeserver) -> int:
    return sum(1 for r in homeserver.requests if r.url.path == WHOAMI)


async def test_a_flood_of_made_up_tokens_holds_no_more_whoami_calls_than_the_limit(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """300 requests with distinct made-up tokens while the homeserver holds every whoami: at most
    `SIDECAR_WHOAMI_MAX_CONCURRENT` whoami calls are under way, every other request is answered
    at once with 429 M_LIMIT_EXCEEDED and Retry-After, and a known token still works."""
    gate = asyncio.Event()
    crowded = asyncio.Event()
    held = peak = 0
    limit = 20  # SIDECAR_WHOAMI_MAX_CONCURRENT's default
    flood = 300

    async def gated(request: httpx.Request) -> httpx.Response:
        nonlocal held, peak
        if request.url.path == WHOAMI and request.headers["authorization"].startswith(
            "Bearer bogus"
        ):
            held += 1
            peak = max(peak, held)
            if held > limit:
                crowded.set()
            await gate.wait()
            held -= 1
        return homeserver.handle(request)

    async with app_and_client(database_url, clock, httpx.MockTransport(gated)) as (app, c):
        assert (await c.get(f"{UNSTABLE}/delayed_events", headers=ALICE)).status_code == 200

        answered = asyncio.Event()
        done = 0

        def count(_: object) -> None:
            nonlocal done
            done += 1
            if done == flood - limit:
                answered.set()

        tasks = [asyncio.ensure_future(_restart(c, f"bogus{i}")) for i in range(flood)]
        for task in tasks:
            task.add_done_callback(count)
        await _first(answered.wait(), crowded.wait())
        try:
            assert not crowded.is_set(), f"{held} whoami calls at once (limit {limit})"
            assert peak == limit
            refused = [t.result() for t in tasks if t.done()]
            assert len(refused) == flood - limit
            for r in refused:
                assert r.status_code == 429, r.text
                assert r.json()["errcode"] == "M_LIMIT_EXCEEDED"
                assert r.json()["retry_after_ms"] > 0
                assert int(r.headers["retry-after"]) >= 1
                assert "bogus" not in r.text
                assert "bogus" not in str(r.headers)
            # A token already known is answered from the cache meanwhile.
            assert (await c.get(f"{UNSTABLE}/delayed_events", headers=ALICE)).status_code == 200
        finally:
            gate.set()
            held_ones = await asyncio.gather(*tasks)
        assert [r.json()["errcode"] for r in held_ones].count("M_UNKNOWN_TOKEN") == limit
        # The calls are over: a new token is looked up again.
        r = await _restart(c, "bogus-later")
        assert (r.status_code, r.json()["errcode"]) == (401, "M_UNKNOWN_TOKEN")
        assert app.state.container.settings.whoami_max_concurrent == limit


async def test_a_refused_token_is_remembered_briefly(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """The same made-up token again and again costs the homeserver one whoami per
    `SIDECAR_WHOAMI_REFUSAL_CACHE_SECONDS`, each answered with the homeserver's refusal."""
    async with app_and_client(
        database_url, clock, homeserver.transport(), whoami_refusal_cache_seconds=5
    ) as (_, c):
        first = await _restart(c, "made-up")
        assert (first.status_code, first.json()["errcode"]) == (401, "M_UNKNOWN_TOKEN")
        for _ in range(5):
            again = await _restart(c, "made-up")
            assert (again.status_code, again.json()) == (401, first.json())
        assert _whoami_calls(homeserver) == 1

        clock.advance(4_999)
        await _restart(c, "made-up")
        assert _whoami_calls(homeserver) == 1
        clock.advance(1)
        assert (await _restart(c, "made-up")).status_code == 401
        assert _whoami_calls(homeserver) == 2

        # Only the refused token is remembered as refused.
        assert (await c.get(f"{UNSTABLE}/delayed_events", headers=ALICE)).status_code == 200


async def test_a_homeserver_failure_is_not_remembered_as_a_refusal(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """A whoami the homeserver could not answer (502) says nothing about the token: the next
    request asks again, and a real token works as soon as the homeserver is back."""
    homeserver.answers[WHOAMI] = lambda _: httpx.Response(502)
    async with app_and_client(database_url, clock, homeserver.transport()) as (_, c):
        assert (await c.get(f"{UNSTABLE}/delayed_events", headers=ALICE)).status_code == 502
        del homeserver.answers[WHOAMI]
        assert (await c.get(f"{UNSTABLE}/delayed_events", headers=ALICE)).status_code == 200


class _HeldBogusWhoami:
    """A homeserver whose whoami calls for tokens starting with `bogus` are held until `gate` is
    set; `full` is set once `limit` of them are held."""

    def __init__(self, homeserver: FakeHomeserver, limit: int) -> None:
        self.homeserver = homeserver
        self.limit = limit
        self.gate = asyncio.Event()
        self.full = asyncio.Event()
        self.held = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == WHOAMI and request.headers["authorization"].startswith(
            "Bearer bogus"
        ):
            self.held += 1
            if self.held >= self.limit:
                self.full.set()
            await self.gate.wait()
        return self.homeserver.handle(request)

    async def hold(self, c: httpx.AsyncClient) -> list[asyncio.Future[httpx.Response]]:
        """`limit` requests with made-up tokens, each holding a whoami call."""
        flood = [asyncio.ensure_future(_restart(c, f"bogus{i}")) for i in range(self.limit)]
        await _first(self.full.wait(), asyncio.wait(flood, return_when=asyncio.FIRST_COMPLETED))
        assert self.full.is_set(), [f.result().text for f in flood if f.done()]
        return flood


async def test_a_flood_of_made_up_tokens_does_not_refuse_a_known_token_whose_answer_expired(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """Made-up tokens hold every whoami call the limit allows just as a real user's cached
    answer runs out: that user's heartbeat is still looked up and answered, not refused 429 (its
    delayed leave would otherwise fire and drop it from the call)."""
    held = _HeldBogusWhoami(homeserver, limit=20)  # SIDECAR_WHOAMI_MAX_CONCURRENT's default
    async with app_and_client(database_url, clock, httpx.MockTransport(held)) as (_, c):
        delay_id = await schedule_message(c, 600_000)  # Alice's token is now known
        clock.advance(60_000)  # the whoami cache (60 s) runs out, as it does every minute
        flood = await held.hold(c)
        try:
            calls = _whoami_calls(homeserver)
            r = await c.post(
                f"{UNSTABLE}/delayed_events/{delay_id}/restart", json={}, headers=ALICE
            )
            assert r.status_code == 200, (r.status_code, r.text)
            assert _whoami_calls(homeserver) == calls + 1  # looked up again, not served stale
            # A new token of a user the homeserver knows was never seen valid: it waits for
            # the flood like any other unknown token.
            r = await _restart(c, "alice_token_2")
            assert (r.status_code, r.json()["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        finally:
            held.gate.set()
            answers = await asyncio.gather(*flood)
        assert {r.status_code for r in answers} == {401}


async def test_a_token_logged_out_on_the_homeserver_is_refused_once_its_answer_expires(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """A token seen valid and then logged out keeps working for at most
    `SIDECAR_WHOAMI_CACHE_SECONDS` (60 s); the next lookup's 401 refuses it and forgets that it
    was ever valid, so from then on it is an unknown token, subject to the whoami limit."""
    held = _HeldBogusWhoami(homeserver, limit=20)
    async with app_and_client(
        database_url, clock, httpx.MockTransport(held), whoami_refusal_cache_seconds=5
    ) as (_, c):
        delay_id = await schedule_message(c, 600_000)
        del homeserver.tokens["alice_token"]  # logged out on the homeserver
        restart = f"{UNSTABLE}/delayed_events/{delay_id}/restart"
        clock.advance(59_999)
        assert (await c.post(restart, json={}, headers=ALICE)).status_code == 200
        clock.advance(1)
        r = await c.post(restart, json={}, headers=ALICE)
        assert (r.status_code, r.json()["errcode"]) == (401, "M_UNKNOWN_TOKEN")
        assert "alice_token" not in r.text

        clock.advance(5_000)  # the refusal is no longer remembered
        flood = await held.hold(c)
        try:
            r = await c.post(restart, json={}, headers=ALICE)
            assert (r.status_code, r.json()["errcode"]) == (429, "M_LIMIT_EXCEEDED")
        finally:
            held.gate.set()
            await asyncio.gather(*flood)


async def test_the_limit_still_holds_for_tokens_never_seen_valid(
    database_url: str, clean_db: None, clock: FakeClock, homeserver: FakeHomeserver
) -> None:
    """With the limit's worth of whoami calls held, one more made-up token and a real token
    never seen before are both answered 429 at once."""
    held = _HeldBogusWhoami(homeserver, limit=20)
    async with app_and_client(database_url, clock, httpx.MockTransport(held)) as (_, c):
        await schedule_message(c, 600_000)
        flood = await held.hold(c)
        try:
            for token in ("bogus-one-more", "bob_token"):
                r = await _restart(c, token)
                assert (r.status_code, r.json()["errcode"]) == (429, "M_LIMIT_EXCEEDED")
                assert token not in r.text
            assert held.held == 20
        finally:
            held.gate.set()
            await asyncio.gather(*flood)
        assert (await _restart(c, "bob_token")).status_code != 429


class _LoopbackHomeserver:
    """Just enough of a homeserver on a real socket (the client's connection pool is only real
    with real connections): whoami for Alice, and every `send` taken. Sends whose transaction
    id starts with `flood` are held until `gate` is set; `full` is set once `pool` are held."""

    def __init__(self, pool: int) -> None:
        self.gate = asyncio.Event()
        self.full = asyncio.Event()
        self.held = 0
        self.pool = pool
        self.sent: list[str] = []

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        assert scope["type"] == "http"
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        path: str = scope["path"]
        status, body = 404, {"errcode": "M_UNRECOGNIZED", "error": "Unrecognized request"}
        if path == WHOAMI:
            status, body = 200, {"user_id": "@alice:test", "device_id": "ALICEDEV"}
        elif "/send/" in path and scope["method"] == "PUT":
            if path.rsplit("/", 1)[-1].startswith("flood"):
                self.held += 1
                if self.held == self.pool:
                    self.full.set()
                await self.gate.wait()
            else:
                self.sent.append(path)
            status, body = 200, {"event_id": f"$e{len(self.sent)}"}
        raw = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": raw})


async def test_replays_reach_the_homeserver_while_client_requests_fill_the_client_pool(
    database_url: str, clean_db: None, clock: FakeClock
) -> None:
    """Pass-through requests the homeserver holds fill the clients' connection pool (100): a due
    event's replay still reaches the homeserver at once, on the replays' own pool, instead of
    waiting for a connection until the held requests time out."""
    pool = 100
    homeserver = _LoopbackHomeserver(pool)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(1024)
    port = listening.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(homeserver, lifespan="off", log_config=None, access_log=False)
    )
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    app = create_app(
        make_settings(database_url, homeserver_url=f"http://127.0.0.1:{port}"),
        clock=clock,
        start_scheduler=False,
    )
    container = app.state.container
    floods: list[asyncio.Future[httpx.Response]] = []
    try:
        to_app = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=to_app, base_url="http://sidecar.test") as c:
            await schedule_message(c, 1000)
            floods = [
                asyncio.ensure_future(c.put(send_path(f"flood{i}"), json={}, headers=ALICE))
                for i in range(pool)
            ]
            await homeserver.full.wait()

            clock.advance(1000)
            run = asyncio.ensure_future(container.replay.run_due())
            any_flood_over = asyncio.ensure_future(
                asyncio.wait(floods, return_when=asyncio.FIRST_COMPLETED)
            )
            await asyncio.wait({run, any_flood_over}, return_when=asyncio.FIRST_COMPLETED)
            any_flood_over.cancel()
            waited = "the replay waited for a connection until held client requests timed out"
            assert run.done(), waited
            assert not any(f.done() for f in floods), waited
            assert run.result() == 1
            assert len(homeserver.sent) == 1
            homeserver.gate.set()
            answers = await asyncio.gather(*floods)
            assert {r.status_code for r in answers} == {200}
    finally:
        homeserver.gate.set()
        await asyncio.gather(*floods, return_exceptions=True)
        await container.homeserver.client.aclose()
        await container.replay_homeserver.client.aclose()
        await container.engine.dispose()
        server.should_exit = True
        await serving


async def _first(*waits: Awaitable[Any]) -> None:
    """Until the first of `waits` is over; the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
