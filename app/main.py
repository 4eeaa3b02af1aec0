"""The application: its lifespan owns the database engine, the homeserver clients and the
scheduler."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from sqlalchemy.ext.asyncio import create_async_engine
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from app import metrics
from app.api import admin, health, history, manage, proxy, schedule
from app.api.answers import unanswered
from app.api.deps import Container
from app.api.errors import error_response
from app.api.heartbeat import HeartbeatMiddleware
from app.api.middleware import MatrixEdgeMiddleware, RawPathMiddleware
from app.auth import Authenticator
from app.clock import Clock, SystemClock
from app.crypto import TokenCipher
from app.domain import DomainError
from app.errors import InvalidParam, MatrixError, Unrecognized
from app.health import HealthService
from app.homeserver import Homeserver
from app.liveness import ReplicaLock
from app.logs import RequestIdMiddleware
from app.lookups import Lookups
from app.ratelimit import RateLimits, TokenBuckets
from app.replay import (
    Credentials,
    ReplayEngine,
    ReplayRunner,
    SendAction,
    WakeUp,
    longest_attempt_seconds,
)
from app.scheduler import WakeUpScheduler
from app.service import DelayedEventService
from app.settings import Settings
from app.version import version

logger = logging.getLogger(__name__)

# The database's bounds: waiting for a pooled connection, and again for a new one to connect;
# one statement.
DATABASE_WAIT_SECONDS = 5
STATEMENT_SECONDS = 10


def shutdown_seconds(settings: Settings) -> float:
    """How long a stopping replica waits for the work it has begun, in the drain and for the
    requests still open alike: the longest attempt of one send (its newer-state check and its
    sends, each within the request deadline) and the write of its outcome. The replica lock,
    which keeps peers off its claims, is given up only after that; given up sooner, a peer would
    send again what is still at the homeserver, and a state event has no transaction id to make
    the homeserver drop the repeat."""
    write = 2 * DATABASE_WAIT_SECONDS + STATEMENT_SECONDS
    return longest_attempt_seconds(settings) + write


def build_container(
    settings: Settings,
    *,
    clock: Clock | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Container:
    """Wire the parts together; nothing is started yet."""
    clock = clock or SystemClock()
    engine = create_async_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_pre_ping=True,
        pool_timeout=DATABASE_WAIT_SECONDS,
        connect_args={"command_timeout": STATEMENT_SECONDS, "timeout": DATABASE_WAIT_SECONDS},
        # Statement parameters hold event content and encrypted tokens: keep them out of the
        # messages of database errors, which are logged.
        hide_parameters=True,
    )
    # Two clients, two connection pools: one for what clients send (whoami, pass-through), one
    # for replays, so that nothing a client sends can keep a replay waiting for a connection.
    homeserver = Homeserver(settings.homeserver_url, _homeserver_client(settings, transport))
    replay_homeserver = Homeserver(settings.homeserver_url, _homeserver_client(settings, transport))
    # The one wake-up: asked for times by the service, the runs and the send action; the
    # scheduler's alarm answers it once started.
    wakeup = WakeUp()
    liveness = ReplicaLock(engine, settings.liveness_check_seconds)
    credentials = Credentials(engine, TokenCipher(settings.token_keys), settings)
    replay_engine = ReplayEngine(engine, replay_homeserver, clock, settings, wakeup)
    replay = ReplayRunner(engine, replay_engine, credentials, clock, settings, wakeup, liveness)
    send_action = SendAction(replay_engine, credentials, replay.new_keeper, clock, wakeup, liveness)
    service = DelayedEventService(
        engine, replay, send_action, credentials, clock, settings, wake_at=wakeup.wake
    )
    scheduler = WakeUpScheduler(
        wakeup=wakeup,
        run_due=replay.run_due,
        next_due=replay.next_due,
        prune=service.prune,
        clock=clock,
        sweep_seconds=settings.sweep_interval_seconds,
        prune_seconds=settings.prune_interval_seconds,
        free_dead_claims=replay.free_dead_claims,
        check_seconds=settings.liveness_check_seconds,
    )
    return Container(
        settings=settings,
        engine=engine,
        homeserver=homeserver,
        replay_homeserver=replay_homeserver,
        auth=Authenticator(
            homeserver,
            settings.whoami_cache_seconds,
            clock,
            max_lookups=settings.whoami_max_concurrent,
            refusal_ttl_seconds=settings.whoami_refusal_cache_seconds,
        ),
        service=service,
        replay_engine=replay_engine,
        replay=replay,
        lookups=Lookups(engine, settings, tokens=service, sends=replay),
        scheduler=scheduler,
        limits=_rate_limits(settings, clock),
        health=HealthService(engine, scheduler, clock, settings),
    )


class Drain:
    """A replica shutting down, in order: `/ready` answers 503 and nothing more is claimed from
    the first moment (`start`, synchronous, so a signal handler can call it); every claim not yet
    at the homeserver is given back, free and due now, for the other replicas; the sends already
    at the homeserver are answered and their outcomes written, for at most `shutdown_seconds`.
    The replica lock is given up only after that, by the lifespan's end."""

    def __init__(self, container: Container) -> None:
        self._container = container
        self._task: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        if self._task is not None:
            return
        self._container.scheduler.drain()
        self._container.replay.draining = True
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def wait(self) -> None:
        """Start the drain if it hasn't started, and wait until it is done."""
        self.start()
        assert self._task is not None
        await asyncio.shield(self._task)

    async def _drain(self) -> None:
        settings = self._container.settings
        logger.info("draining: claiming nothing more; /ready answers 503")
        timeout = shutdown_seconds(settings)
        try:
            done = await self._container.replay.drain(timeout)
        except Exception:
            logger.exception("draining failed; claims left are taken over once the lock is gone")
            return
        if done:
            logger.info("drained: every send answered and its outcome written")
        else:
            logger.warning(
                "sends still unanswered after %.0f s; they are taken over once the lock is gone",
                timeout,
            )


def _homeserver_client(
    settings: Settings, transport: httpx.AsyncBaseTransport | None
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=transport,
        timeout=settings.homeserver_timeout_seconds,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=50),
    )


def _rate_limits(settings: Settings, clock: Clock) -> RateLimits:
    def now() -> float:
        return clock.now_ms() / 1000

    return RateLimits(
        schedule=TokenBuckets(
            settings.ratelimit_schedule_per_second, settings.ratelimit_schedule_burst, now
        ),
        manage=TokenBuckets(
            settings.ratelimit_manage_per_second, settings.ratelimit_manage_burst, now
        ),
        tokenless=TokenBuckets(
            settings.ratelimit_tokenless_per_second, settings.ratelimit_tokenless_burst, now
        ),
        untagged=TokenBuckets(
            settings.ratelimit_untagged_per_second, settings.ratelimit_untagged_burst, now
        ),
    )


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    start_scheduler: bool = True,
) -> FastAPI:
    """The ASGI application. Tests pass a fake clock and transport, and may leave the scheduler
    stopped to drive replays themselves."""
    container = build_container(settings, clock=clock, transport=transport)
    drain = Drain(container)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        liveness = container.replay.liveness
        if start_scheduler:
            # The lock first: the first run's claims name it.
            if liveness is not None:
                await liveness.start()
            container.scheduler.start()
        try:
            yield
        finally:
            # No new requests come in now; a SIGTERM has started the drain already (`serve`).
            await drain.wait()
            container.scheduler.shutdown()
            if liveness is not None:
                await liveness.stop()
            await container.homeserver.client.aclose()
            await container.replay_homeserver.client.aclose()
            await container.service.restarts.close()
            await container.engine.dispose()

    app = FastAPI(
        title="MSC4140 delayed-events sidecar",
        version=version(),
        lifespan=lifespan,
        redirect_slashes=False,
    )
    app.state.container = container
    app.state.drain = drain
    # Routes are matched in order: the heartbeat's (manage) first.
    for module in (manage, schedule, history, proxy, health, admin):
        app.include_router(module.router)
    app.add_exception_handler(MatrixError, _matrix_error)  # type: ignore[arg-type]
    app.add_exception_handler(DomainError, unanswered)
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_middleware(HeartbeatMiddleware)
    app.add_middleware(metrics.RequestMetricsMiddleware)
    app.add_middleware(MatrixEdgeMiddleware)
    app.add_middleware(RawPathMiddleware)
    app.add_middleware(RequestIdMiddleware)
    metrics.BUILD.info({"version": version()})
    return app


async def _matrix_error(request: Request, exc: MatrixError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code in (404, 405):
        error: MatrixError = Unrecognized("Unrecognized request", status=exc.status_code)
    else:
        error = MatrixError(str(exc.detail), status=exc.status_code)
    return error_response(error)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(InvalidParam("Invalid request parameters"))
