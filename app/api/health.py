"""Liveness, readiness and Prometheus metrics, on the sidecar's own port (not routed by nginx)."""

from __future__ import annotations

import asyncio
import json
import logging

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, literal, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from app import metrics
from app.api.deps import Container, container
from app.models import SCHEDULED, delayed_event

logger = logging.getLogger(__name__)
router = APIRouter()
_DB_CHECK_SECONDS = 2.0
# Up to this many scheduled events the gauge is an exact count (an index-only read of at most this
# many entries); beyond it, PostgreSQL's estimate.
SCHEDULED_EXACT_UP_TO = 10_000
_HORIZON_MARGIN_MS = 60_000


@router.get("/health", summary="The process is alive")
async def health() -> Response:
    return PlainTextResponse("OK")


@router.get(
    "/ready", summary="The database answers and the scheduler runs (503 while shutting down)"
)
async def ready(request: Request) -> Response:
    c = container(request)
    if c.scheduler.draining:
        # Shutting down: the load balancer sends new requests elsewhere.
        status = "draining"
    else:
        status = "ok" if c.scheduler.running else "stopped"
    checks = {"database": "ok", "scheduler": status}
    try:
        async with asyncio.timeout(_DB_CHECK_SECONDS):
            async with c.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    except Exception:
        checks["database"] = "unreachable"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(checks, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def prometheus(request: Request) -> Response:
    c = container(request)
    metrics.DATABASE_POOL_IN_USE.set(_checked_out(c.engine))
    try:
        async with asyncio.timeout(_DB_CHECK_SECONDS):
            async with c.engine.connect() as conn:
                await _database_figures(conn, c.service.clock.now_ms(), _overdue_horizon_ms(c))
    except Exception:
        metrics.SCRAPE_ERRORS.inc()
        logger.warning("could not read the database figures for /metrics")
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _checked_out(engine: AsyncEngine) -> int:
    checkedout = getattr(engine.sync_engine.pool, "checkedout", None)
    return int(checkedout()) if checkedout is not None else 0


def _overdue_horizon_ms(c: Container) -> int:
    """How far past now a row still waiting for its first send can have its `due_ts`: a retry is
    put off by at most the longest backoff (with its jitter), a claim by one lease."""
    s = c.settings
    longest = max(s.retry_max_backoff_seconds * 1.1, s.claim_lease_seconds)
    return int(longest * 1000) + _HORIZON_MARGIN_MS


async def _database_figures(conn: AsyncConnection, now: int, horizon_ms: int) -> None:
    """The scheduled count and the oldest overdue event's age, each through an index and never a
    scan of the whole table: the count reads at most SCHEDULED_EXACT_UP_TO index entries and
    beyond that takes the planner's estimate; an overdue row is due (`due_ts`, indexed for the
    scheduled rows) within the horizon, so only the rows due soon are read for the oldest."""
    T = delayed_event.c
    capped = select(literal(1)).where(T.status == SCHEDULED).limit(SCHEDULED_EXACT_UP_TO + 1)
    count = int(
        (await conn.execute(select(func.count()).select_from(capped.subquery()))).scalar_one()
    )
    if count > SCHEDULED_EXACT_UP_TO:
        count = max(count, await _estimated_scheduled(conn))
    metrics.SCHEDULED_NOW.set(count)
    oldest = (
        await conn.execute(
            select(func.min(T.send_ts)).where(
                T.status == SCHEDULED, T.due_ts <= now + horizon_ms, T.send_ts <= now
            )
        )
    ).scalar_one()
    metrics.OLDEST_OVERDUE_SECONDS.set(0 if oldest is None else max(0, now - int(oldest)) / 1000)


async def _estimated_scheduled(conn: AsyncConnection) -> int:
    """The planner's estimate of the scheduled rows (from the table's statistics, scaled to its
    current size), read from EXPLAIN: no row is read."""
    plan = (
        await conn.execute(
            text(
                "EXPLAIN (FORMAT JSON) SELECT 1 FROM delayed_event WHERE status = :status"
            ).bindparams(status=SCHEDULED)
        )
    ).scalar_one()
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])
