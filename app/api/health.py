"""Liveness, readiness and Prometheus metrics, on the sidecar's own port (not routed by nginx)."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from app.api.deps import container

router = APIRouter()


@router.get("/health", summary="The process is alive")
async def health() -> Response:
    return PlainTextResponse("OK")


@router.get(
    "/ready", summary="The database answers and the scheduler runs (503 while shutting down)"
)
async def ready(request: Request) -> Response:
    checks = await container(request).health.readiness()
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(checks, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def prometheus(request: Request) -> Response:
    await container(request).health.update_gauges()
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
