"""Matrix-shaped errors: every error the sidecar answers with is one of these, rendered in
one place (`app.api.errors`). The rules raise `app.domain`'s errors instead, which the API turns
into these per generation (`app.api.answers`).

MatrixError(status, errcode, message, extra, headers)
 ├── NotFound               404 M_NOT_FOUND
 ├── Conflict               409 M_UNKNOWN
 ├── InvalidParam           400 M_INVALID_PARAM
 ├── MissingParam           400 M_MISSING_PARAM
 ├── NotJson / BadJson      400 M_NOT_JSON / M_BAD_JSON
 ├── TooLarge               413 M_TOO_LARGE
 ├── MissingToken           401 M_MISSING_TOKEN
 ├── LimitExceeded          429 M_LIMIT_EXCEEDED
 ├── Forbidden              403 M_FORBIDDEN
 ├── StoredCredentialFailed (the send action's replay credential failed; answered as 404/409)
 ├── HomeserverUnavailable  502 M_UNKNOWN (the homeserver could not be reached)
 └── DatabaseUnavailable    503 M_UNKNOWN
"""

from __future__ import annotations

from typing import Any


class MatrixError(Exception):
    """An error with an HTTP status and a Matrix `errcode`, rendered as `{"errcode", "error"}`."""

    status = 500
    errcode = "M_UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        errcode: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if errcode is not None:
            self.errcode = errcode
        self.extra = extra or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"errcode": self.errcode, "error": self.message, **self.extra}


class NotFound(MatrixError):
    status = 404
    errcode = "M_NOT_FOUND"


class Unrecognized(MatrixError):
    status = 404
    errcode = "M_UNRECOGNIZED"


class Conflict(MatrixError):
    status = 409
    errcode = "M_UNKNOWN"


class InvalidParam(MatrixError):
    status = 400
    errcode = "M_INVALID_PARAM"


class MissingParam(MatrixError):
    status = 400
    errcode = "M_MISSING_PARAM"


class NotJson(MatrixError):
    status = 400
    errcode = "M_NOT_JSON"


class BadJson(MatrixError):
    status = 400
    errcode = "M_BAD_JSON"


class TooLarge(MatrixError):
    status = 413
    errcode = "M_TOO_LARGE"


class MissingToken(MatrixError):
    status = 401
    errcode = "M_MISSING_TOKEN"


class Forbidden(MatrixError):
    status = 403
    errcode = "M_FORBIDDEN"


class LimitExceeded(MatrixError):
    status = 429
    errcode = "M_LIMIT_EXCEEDED"


class StoredCredentialFailed(MatrixError):
    """The credential stored to send an event is gone or was refused. The event's failure, not
    the caller's: never a 401 or a token errcode, on which clients log their user out."""

    status = 409
    errcode = "M_UNKNOWN"


class HomeserverUnavailable(MatrixError):
    status = 502
    errcode = "M_UNKNOWN"


class DatabaseUnavailable(MatrixError):
    status = 503
    errcode = "M_UNKNOWN"


class HomeserverError(MatrixError):
    """The homeserver refused a request; carries its status and body back to the client."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        errcode = body.get("errcode") if isinstance(body.get("errcode"), str) else "M_UNKNOWN"
        message = body.get("error") if isinstance(body.get("error"), str) else "homeserver error"
        extra = {k: v for k, v in body.items() if k not in ("errcode", "error")}
        super().__init__(
            str(message), status=status, errcode=str(errcode), extra=extra, headers=headers
        )
