"""The words of delayed events that every layer shares, and the errors the rules raise.

The rules (`app.service`, `app.lookups`) raise the errors below; how one looks on the wire, which
may differ per generation, is the API's decision (`app.api.answers`)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal


class Generation(StrEnum):
    """Which shape of MSC4140 a request speaks (stored with each event, a metrics label).

    A: the deployed one — the delay as a query parameter on send and state, management on the
    unstable prefix. B: the merged MSC — the `delayed_event` endpoint, management on v1."""

    A = "A"
    B = "B"


class Action(StrEnum):
    SEND = "send"
    CANCEL = "cancel"
    RESTART = "restart"


class Status(StrEnum):
    """The lists of the msc4140 lookup."""

    SCHEDULED = "scheduled"
    FINALISED = "finalised"


class DomainError(Exception):
    """A rule refused a request."""


class MaxDelayExceeded(DomainError):
    """The delay is over the maximum. `requested` is None when it is beyond any stored value."""

    def __init__(self, requested: int | None, limit: int) -> None:
        super().__init__(requested, limit)
        self.requested = requested
        self.limit = limit


class TooMany(DomainError):
    """The user has as many scheduled events as allowed; `retry_after_ms` is when the earliest
    of them is due (None when it is due already)."""

    def __init__(self, retry_after_ms: int | None) -> None:
        super().__init__(retry_after_ms)
        self.retry_after_ms = retry_after_ms


class EventNotFound(DomainError):
    """No delayed event of this id (for this owner)."""


class AlreadyFinalised(DomainError):
    """The action finds the event finalised (or being sent) and is not a repeat of what
    happened to it."""

    def __init__(self, outcome: Literal["sent", "cancelled"]) -> None:
        super().__init__(outcome)
        self.outcome = outcome


class CredentialFailed(DomainError):
    """The send action could not send: the credential stored for the event is gone or was
    refused, and the event is finalised with that error. The event's failure, not the caller's."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SendFailed(DomainError):
    """The send action's replay was refused by the homeserver (or did not reach it): its status,
    error body and headers, answered as they are."""

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers
