"""What the API answers when PostgreSQL is stopping or starting: asyncpg refuses the connection
with SQLSTATE 57P03, which SQLAlchemy wraps as a plain DBAPIError. That is the database being
away (503), not a failure of the sidecar (500)."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from sqlalchemy.exc import DBAPIError
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.middleware import MatrixEdgeMiddleware


class _AdaptedError(Exception):
    """The shape of SQLAlchemy's asyncpg adapter error: the driver's error is its cause."""


def _wrapped(driver_error: Exception) -> DBAPIError:
    adapted = _AdaptedError(str(driver_error))
    adapted.__cause__ = driver_error
    return DBAPIError("SELECT 1", None, adapted)


def _app(error: Exception) -> ASGIApp:
    async def fail(scope: Scope, receive: Receive, send: Send) -> None:
        raise error

    return fail


async def _status(error: Exception) -> tuple[int, dict[str, str]]:
    app = MatrixEdgeMiddleware(_app(error))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar.test") as client:
        answer = await client.get("/x")
    return answer.status_code, answer.json()


@pytest.mark.parametrize(
    "driver_error",
    [
        asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
    ],
    ids=["shutting-down", "starting-up", "admin-shutdown", "connection-gone"],
)
async def test_database_stopping_or_starting_is_503(driver_error: Exception) -> None:
    status, body = await _status(_wrapped(driver_error))
    assert status == 503
    assert body == {"errcode": "M_UNKNOWN", "error": "Database unavailable"}


async def test_other_database_errors_stay_500() -> None:
    status, body = await _status(_wrapped(asyncpg.exceptions.UniqueViolationError("duplicate")))
    assert status == 500
    assert body["errcode"] == "M_UNKNOWN"


@pytest.mark.parametrize(
    "driver_error",
    [
        asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
        asyncpg.exceptions.SerializationError("could not serialize access"),
    ],
    ids=["deadlock", "serialization"],
)
async def test_a_transaction_the_database_rolled_back_is_503(driver_error: Exception) -> None:
    """PostgreSQL broke a deadlock (or a serialization conflict) by rolling one side back:
    nothing of that request was stored, and the same request again succeeds."""
    status, body = await _status(_wrapped(driver_error))
    assert status == 503
    assert body == {"errcode": "M_UNKNOWN", "error": "Database busy, try again"}
