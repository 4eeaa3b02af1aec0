"""The rules' refusals as each generation's clients see them."""

from __future__ import annotations

import pytest

from app.api.answers import answering, matrix_error
from app.domain import (
    AlreadyFinalised,
    CredentialFailed,
    EventNotFound,
    Generation,
    MaxDelayExceeded,
    SendFailed,
    TooMany,
)
from app.errors import MatrixError


def test_over_the_maximum_delay_per_generation() -> None:
    a = matrix_error(MaxDelayExceeded(5001, 5000), Generation.A)
    assert (a.status, a.body()) == (
        400,
        {
            "errcode": "M_UNKNOWN",
            "error": "The requested delay (5001ms) exceeds the allowed maximum (5000ms)",
            "org.matrix.msc4140.errcode": "M_MAX_DELAY_EXCEEDED",
            "org.matrix.msc4140.max_delay": 5000,
            "max_delay": 5000,
        },
    )
    b = matrix_error(MaxDelayExceeded(None, 5000), Generation.B)
    assert (b.status, b.body()) == (
        403,
        {
            "errcode": "M_FORBIDDEN",
            "error": "The requested delay exceeds the allowed maximum (5000ms)",
        },
    )


@pytest.mark.parametrize("generation", list(Generation))
def test_too_many_says_when_to_retry(generation: Generation) -> None:
    error = matrix_error(TooMany(1500), generation)
    assert (error.status, error.errcode, error.extra) == (
        429,
        "M_LIMIT_EXCEEDED",
        {"retry_after_ms": 1500},
    )
    assert error.headers == {"Retry-After": "2"}
    assert matrix_error(TooMany(None), generation).headers == {}


def test_a_finalised_event_is_not_found_on_a_and_a_conflict_on_b() -> None:
    a = matrix_error(AlreadyFinalised("sent"), Generation.A)
    assert (a.status, a.body()) == (
        404,
        {"errcode": "M_NOT_FOUND", "error": "Delayed event not found"},
    )
    b = matrix_error(AlreadyFinalised("cancelled"), Generation.B)
    assert (b.status, b.body()) == (
        409,
        {"errcode": "M_UNKNOWN", "error": "The delayed event was already cancelled"},
    )
    for generation in Generation:
        assert matrix_error(EventNotFound(), generation).status == 404


def test_a_failed_credential_is_never_a_token_error() -> None:
    for generation, status in ((Generation.A, 404), (Generation.B, 409)):
        error = matrix_error(CredentialFailed("it failed"), generation)
        assert (error.status, error.message) == (status, "it failed")
        assert error.errcode in ("M_NOT_FOUND", "M_UNKNOWN")


def test_the_homeserver_s_refusal_is_answered_as_it_came() -> None:
    body = {"errcode": "M_FORBIDDEN", "error": "no", "extra": 1}
    error = matrix_error(SendFailed(403, body, {"X-A": "b"}), Generation.B)
    assert (error.status, error.body(), error.headers) == (403, body, {"X-A": "b"})


def test_answering_raises_the_matrix_error() -> None:
    with pytest.raises(MatrixError) as raised, answering(Generation.A):
        raise EventNotFound()
    assert raised.value.status == 404


@pytest.mark.parametrize(
    ("path", "status", "errcode"),
    [
        ("/_matrix/client/v1/delayed_events/x/cancel", 409, "M_UNKNOWN"),
        ("/_matrix/client/unstable/org.matrix.msc4140/delayed_events/x", 404, "M_NOT_FOUND"),
    ],
)
async def test_a_refusal_that_escapes_its_route_is_still_a_matrix_error(
    path: str, status: int, errcode: str
) -> None:
    """A route that forgets `answering` still answers with the path's generation, not a 500."""
    import httpx
    from fastapi import FastAPI

    from app.api.answers import unanswered
    from app.domain import DomainError

    app = FastAPI()
    app.add_exception_handler(DomainError, unanswered)

    @app.api_route("/{rest:path}", methods=["GET", "POST"])
    async def refuse(rest: str) -> None:
        raise AlreadyFinalised("cancelled")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
        response = await client.post(path)
    assert response.status_code == status
    assert response.json()["errcode"] == errcode
