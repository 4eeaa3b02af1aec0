"""Liveness, readiness and Prometheus metrics, on the sidecar's own port (not routed by nginx)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from app import metrics
from app import repository as repo
from app.api.deps import container

logger = logging.getLogger(__name__)
router = APIRouter()
_DB_CHECK_SECONDS = 2.0


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
    try:
        async with asyncio.timeout(_DB_CHECK_SECONDS):
            async with c.engine.connect() as conn:
                metrics.SCHEDULED_NOW.set(await repo.count_all_scheduled(conn))
    except Exception:
        logger.warning("could not count scheduled events for /metrics")
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
