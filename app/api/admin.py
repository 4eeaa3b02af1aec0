"""The operators' admin API, under `/_sidecar/admin/v1/` on the sidecar's own port (the shipped
nginx never routes it from the public listener). The rules are app/admin.py's.

Off (404 `M_UNRECOGNIZED`, as for any unknown path) while `SIDECAR_ADMIN_TOKEN` is unset. Every
request carries that token as `Authorization: Bearer …`; it is compared in constant time (digests
of both sides) and never logged. No token: 401 `M_MISSING_TOKEN`; any other token, a user's own
Matrix access token included: 403 `M_FORBIDDEN` (the homeserver is never asked about it).

    GET  /_sidecar/admin/v1/delayed_events?user_id=&room_id=&status=&limit=&from=
    POST /_sidecar/admin/v1/delayed_events/{delay_id}/cancel
    POST /_sidecar/admin/v1/users/{user_id}/cancel
    POST /_sidecar/admin/v1/rooms/{room_id}/cancel
    POST /_sidecar/admin/v1/users/{user_id}/purge
    GET  /_sidecar/admin/v1/stats?overdue_ms=
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

from fastapi import APIRouter, Depends
from starlette.requests import Request

from app.admin import (
    DEFAULT_OVERDUE_MS,
    AdminFilter,
    AdminService,
    check_room_id,
    check_status,
    check_user_id,
)
from app.api import requests as rq
from app.api.deps import container
from app.errors import Forbidden, InvalidParam, MissingToken, Unrecognized

logger = logging.getLogger(__name__)

PREFIX = "/_sidecar/admin/v1"
_MAX_OVERDUE_MS = 2**53


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


async def admin_service(request: Request) -> AdminService:
    """The admin rules, for a request carrying the admin token; 404 while the API is off."""
    c = container(request)
    expected = c.settings.admin_token
    if expected is None:
        raise Unrecognized("Unrecognized request")
    headers = request.headers.getlist("authorization")
    if not headers:
        raise MissingToken("Missing admin token")
    if len(headers) > 1:
        raise MissingToken("Too many Authorization headers")
    scheme, _, given = headers[0].strip(" \t").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise MissingToken("Invalid Authorization header")
    if not hmac.compare_digest(_digest(given), _digest(expected.get_secret_value())):
        logger.warning("admin: refused %s %s (not the admin token)", request.method, PREFIX)
        raise Forbidden("This is not the admin token")
    return AdminService(c.engine, c.service.clock)


router = APIRouter(prefix=PREFIX, include_in_schema=False)
Admin = Depends(admin_service)


async def _drain(request: Request) -> None:
    """Read (and ignore) a POST's body, within the usual size limit."""
    await rq.read_body(request, container(request).settings.max_body_bytes)


def _overdue_ms(pairs: list[tuple[str, str, str]]) -> int:
    value = rq.single(pairs, "overdue_ms")
    if value is None:
        return DEFAULT_OVERDUE_MS
    if not value.isascii() or not value.isdigit() or rq.digits_value(value) > _MAX_OVERDUE_MS:
        raise InvalidParam("overdue_ms must be a non-negative integer (milliseconds)")
    return rq.digits_value(value)


@router.get("/delayed_events")
async def list_events(request: Request, admin: AdminService = Admin) -> dict[str, Any]:
    pairs = rq.query_pairs(request)
    known = {"user_id", "room_id", "status", "limit", "from"}
    unknown = sorted({key for key, _, _ in pairs} - known)
    if unknown:
        raise InvalidParam(f"Unknown parameter: {', '.join(unknown)}")
    user_id, room_id, status = (rq.single(pairs, name) for name in ("user_id", "room_id", "status"))
    where = AdminFilter(
        user_id=check_user_id(user_id) if user_id is not None else None,
        room_id=check_room_id(room_id) if room_id is not None else None,
        status=check_status(status) if status is not None else None,
    )
    return await admin.list(where, from_token=rq.single(pairs, "from"), limit=rq.page_limit(pairs))


@router.post("/delayed_events/{delay_id}/cancel")
async def cancel_one(
    request: Request, delay_id: str, admin: AdminService = Admin
) -> dict[str, Any]:
    await _drain(request)
    return await admin.cancel_one(rq.path_segment(delay_id, "delay id"))


@router.post("/users/{user_id}/cancel")
async def cancel_user(
    request: Request, user_id: str, admin: AdminService = Admin
) -> dict[str, Any]:
    await _drain(request)
    return await admin.cancel_user(check_user_id(rq.path_segment(user_id, "user id")))


@router.post("/rooms/{room_id}/cancel")
async def cancel_room(
    request: Request, room_id: str, admin: AdminService = Admin
) -> dict[str, Any]:
    await _drain(request)
    return await admin.cancel_room(check_room_id(rq.path_segment(room_id, "room id")))


@router.post("/users/{user_id}/purge")
async def purge_user(request: Request, user_id: str, admin: AdminService = Admin) -> dict[str, Any]:
    await _drain(request)
    return await admin.purge_user(check_user_id(rq.path_segment(user_id, "user id")))


@router.get("/stats")
async def stats(request: Request, admin: AdminService = Admin) -> dict[str, Any]:
    pairs = rq.query_pairs(request)
    return await admin.stats(overdue_ms=_overdue_ms(pairs))
