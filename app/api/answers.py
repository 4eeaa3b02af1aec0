"""How the rules' refusals (`app.domain`) look on the wire, per generation: the one place that
turns a domain error into a Matrix error. `app.api.errors` renders the result."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from app.api.errors import error_response
from app.domain import (
    AlreadyFinalised,
    CredentialFailed,
    DomainError,
    EventNotFound,
    Generation,
    MaxDelayExceeded,
    SendFailed,
    TooMany,
)
from app.errors import Conflict, Forbidden, HomeserverError, LimitExceeded, MatrixError, NotFound

NOT_FOUND = "Delayed event not found"


def matrix_error(exc: DomainError, generation: Generation) -> MatrixError:
    """The Matrix error answering `exc` to a request of `generation`."""
    match exc:
        case MaxDelayExceeded():
            return _max_delay(exc, generation)
        case TooMany():
            return _too_many(exc)
        case EventNotFound():
            return NotFound(NOT_FOUND)
        case AlreadyFinalised():
            # The unstable paths do not find a finalised event, as MatrixRTC expects.
            if generation is Generation.A:
                return NotFound(NOT_FOUND)
            return Conflict(f"The delayed event was already {exc.outcome}")
        case CredentialFailed():
            # Answered as a repeat of the action would be now that the event is finalised.
            if generation is Generation.A:
                return NotFound(exc.message)
            return Conflict(exc.message)
        case SendFailed():
            return HomeserverError(exc.status, exc.body, exc.headers)
    raise TypeError(f"no answer for {type(exc).__name__}")  # pragma: no cover


# The request scope's key for the generation a route or middleware knows its request speaks.
GENERATION = "sidecar.generation"

# Generation B's paths: the dedicated schedule endpoint (v3 or unstable msc4140), v1 management
# and lookups, MSC4486's unstable lookup. Matched on the path as sent, still percent-encoded, so
# that an encoded `/` in a room id, type or state key cannot spell one.
_GENERATION_B = re.compile(
    r"^/_matrix/client/(?:"
    r"(?:v3|unstable/org\.matrix\.msc4140)/rooms/[^/]*/delayed_event(?:/|$)"
    r"|v1/"
    r"|unstable/org\.matrix\.msc4486/"
    r")"
)


def record_generation(scope: MutableMapping[str, Any], generation: Generation) -> None:
    """Note on the request's scope the generation it speaks, for `unanswered`."""
    scope[GENERATION] = generation


def generation_of(path: str) -> Generation:
    """The generation a path (as sent, still percent-encoded) speaks."""
    return Generation.B if _GENERATION_B.match(path) else Generation.A


async def unanswered(request: Request, exc: Exception) -> Response:
    """The exception handler behind `answering`: a refusal that reached the framework without
    one is still a Matrix error, shaped for the generation its route recorded (else its path's),
    never a 500."""
    assert isinstance(exc, DomainError)
    return error_response(matrix_error(exc, request_generation(request.scope)))


def request_generation(scope: MutableMapping[str, Any]) -> Generation:
    """The generation recorded for the request, else its path's."""
    recorded = scope.get(GENERATION)
    if isinstance(recorded, Generation):
        return recorded
    return generation_of(scope["path"])


@contextmanager
def answering(generation: Generation) -> Iterator[None]:
    """Within it, a domain error is raised again as the Matrix error answering it."""
    try:
        yield
    except DomainError as exc:
        raise matrix_error(exc, generation) from None


def _max_delay(exc: MaxDelayExceeded, generation: Generation) -> MatrixError:
    """Each generation's clients act on their own shape: js-sdk reads Gen A's msc4140 fields."""
    requested = "" if exc.requested is None else f" ({exc.requested}ms)"
    message = f"The requested delay{requested} exceeds the allowed maximum ({exc.limit}ms)"
    if generation is Generation.B:
        return Forbidden(message)
    return MatrixError(
        message,
        status=400,
        errcode="M_UNKNOWN",
        extra={
            "org.matrix.msc4140.errcode": "M_MAX_DELAY_EXCEEDED",
            "org.matrix.msc4140.max_delay": exc.limit,
            "max_delay": exc.limit,
        },
    )


def _too_many(exc: TooMany) -> LimitExceeded:
    message = "The maximum number of delayed events has been reached."
    if exc.retry_after_ms is None:
        return LimitExceeded(message)
    return LimitExceeded(
        message,
        extra={"retry_after_ms": exc.retry_after_ms},
        headers={"Retry-After": str(math.ceil(exc.retry_after_ms / 1000))},
    )
