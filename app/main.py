"""The application: its lifespan owns the database engine, the homeserver client and the
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
from app.api.deps import Container
from app.api.errors import error_response
from app.api.heartbeat import HeartbeatMiddleware
from app.api.middleware import MatrixEdgeMiddleware, RawPathMiddleware
from app.auth import Authenticator
from app.clock import Clock, SystemClock
from app.crypto import TokenCipher
from app.errors import InvalidParam, MatrixError, Unrecognized
from app.homeserver import Homeserver
from app.liveness import ReplicaLock
from app.logs import RequestIdMiddleware
from app.ratelimit import RateLimits, TokenBuckets
from app.replayer import Replayer
from app.scheduler import WakeUpScheduler
from app.service import DelayedEventService
from app.settings import Settings
from app.version import version

logger = logging.getLogger(__name__)


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
        pool_timeout=5,
        connect_args={"command_timeout": 10, "timeout": 5},
        # Statement parameters hold event content and encrypted tokens: keep them out of the
        # messages of database errors, which are logged.
        hide_parameters=True,
    )
    client = httpx.AsyncClient(
        transport=transport,
        timeout=settings.homeserver_timeout_seconds,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=50),
    )
    homeserver = Homeserver(settings.homeserver_url, client)
    cipher = TokenCipher(settings.token_keys)
    replayer = Replayer(engine, homeserver, cipher, clock, settings)
    replayer.liveness = ReplicaLock(engine, settings.liveness_check_seconds)
    scheduler_box: list[WakeUpScheduler] = []
    service = DelayedEventService(
        engine, replayer, cipher, clock, settings, wake_at=lambda ts: scheduler_box[0].wake(ts)
    )
    scheduler = WakeUpScheduler(
        run_due=replayer.run_due,
        next_due=replayer.next_due,
        prune=service.prune,
        clock=clock,
        sweep_seconds=settings.sweep_interval_seconds,
        prune_seconds=settings.prune_interval_seconds,
        free_dead_claims=replayer.free_dead_claims,
        check_seconds=settings.liveness_check_seconds,
    )
    scheduler_box.append(scheduler)
    replayer.wake = scheduler.wake
    return Container(
        settings=settings,
        engine=engine,
        homeserver=homeserver,
        auth=Authenticator(homeserver, settings.whoami_cache_seconds, clock),
        service=service,
        scheduler=scheduler,
        limits=_rate_limits(settings, clock),
    )


class Drain:
    """A replica shutting down, in order: `/ready` answers 503 and nothing more is claimed from
    the first moment (`start`, synchronous, so a signal handler can call it); every claim not yet
    at the homeserver is given back, free and due now, for the other replicas; the sends already
    at the homeserver are answered (each within the homeserver timeout) and their outcomes
    written. The replica lock is given up only after that, by the lifespan's end."""

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
        self._container.service.replayer.draining = True
        self._task = asyncio.get_running_loop().create_task(self._drain())

    async def wait(self) -> None:
        """Start the drain if it hasn't started, and wait until it is done."""
        self.start()
        assert self._task is not None
        await asyncio.shield(self._task)

    async def _drain(self) -> None:
        settings = self._container.settings
        logger.info("draining: claiming nothing more; /ready answers 503")
        # A send may be tried twice (a device logged out meanwhile: again as the user), then its
        # outcome written.
        timeout = 2 * settings.homeserver_timeout_seconds + 5
        try:
            done = await self._container.service.replayer.drain(timeout)
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
        liveness = container.service.replayer.liveness
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
