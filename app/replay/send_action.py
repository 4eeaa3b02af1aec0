"""The send action of the request path: a claimed event replayed now, and the caller told how
it went."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from app.clock import Clock
from app.errors import HomeserverError, StoredCredentialFailed
from app.homeserver import Refused, Sent, Transient
from app.liveness import ReplicaLock
from app.models import DelayedEvent
from app.replay.claims import ClaimKeeper
from app.replay.engine import Lost, NewerState, ReplayEngine
from app.replay.tokens import Credentials
from app.replay.wakeup import WakeUp


class TakenOver(Exception):
    """The send action's claim was lost before its request (it waited past its lease and
    another replica took the event over): not sent by the action."""


class CancelledByNewerState(Exception):
    """The send action found newer state of another user for the event's key: the event is
    finalised as cancelled, not sent."""


class SendAction:
    def __init__(
        self,
        engine: ReplayEngine,
        credentials: Credentials,
        new_keeper: Callable[[], ClaimKeeper],
        clock: Clock,
        wakeup: WakeUp,
        liveness: ReplicaLock | None,
    ) -> None:
        self._engine = engine
        self._credentials = credentials
        self._new_keeper = new_keeper
        self._clock = clock
        self._wakeup = wakeup
        self._liveness = liveness

    @property
    def holder(self) -> int | None:
        """The key of the replica lock held now, which the action's claim names; None if none
        is held."""
        return self._liveness.key if self._liveness is not None else None

    async def send(self, event: DelayedEvent) -> None:
        """Replay the claimed `event` now and tell the caller how it went.

        A refusal is answered with the homeserver's error and the event stays scheduled on its own
        timer; a transient failure is retried like any due event. A homeserver error that its
        caller would read as about the delayed event itself (a 404: "no such delayed event") is
        answered as a 502 that names it.

        Raises:
            StoredCredentialFailed: the stored credential was missing or refused (finalised).
            CancelledByNewerState: newer state was found (finalised as cancelled).
            TakenOver: the claim was lost before the request (not sent here).
            HomeserverError: the homeserver's refusal; 429 with the time of the scheduled retry
                for its rate limit; 502 for another transient failure.
        """
        engine = self._engine
        credential = await self._credentials.load(event)
        if credential is None:
            error = {"errcode": "M_UNKNOWN_TOKEN", "error": "No usable access token is stored"}
            await engine.finalise_failed(event, error)
            raise _credential_failed(error)
        # Its claim is kept and re-checked like a run's: it may wait long (for a request slot,
        # on the newer-state check), and a lapsed claim is another replica's to send.
        keeper = self._new_keeper()
        keeper.add([event], self._clock.now_ms())
        try:
            outcome = await engine.attempt(event, credential, keeper=keeper)
        finally:
            await keeper.close()
        if isinstance(outcome, Lost):
            raise TakenOver()
        if isinstance(outcome, Sent | NewerState):
            await engine.record(event, outcome, reason="action")
            if event.state_key is not None:
                # The next state event of its key, waiting for this one, may be overdue.
                self._wakeup.wake(self._clock.now_ms())
            if isinstance(outcome, NewerState):
                raise CancelledByNewerState()
            return
        if isinstance(outcome, Refused) and _refuses_credential(outcome):
            # Only the caller's own token may answer 401: this one is the event's.
            await engine.finalise_failed(event, outcome.error)
            raise _credential_failed(outcome.error)
        if isinstance(outcome, Refused):
            await engine.release(event)
            raise _relayed(outcome.status, outcome.error, "it stays scheduled")
        now = self._clock.now_ms()
        due = await engine.retry_or_give_up(event, outcome, now)
        if outcome.status == 429 and due is not None:
            raise _rate_limited(outcome, due - now)
        fate = "it is retried" if due is not None else "it is finalised with that error"
        raise _relayed(502, outcome.error, fate)


def _refuses_credential(refused: Refused) -> bool:
    return refused.status == 401 or refused.error.get("errcode") in (
        "M_UNKNOWN_TOKEN",
        "M_MISSING_TOKEN",
    )


def _credential_failed(error: dict[str, Any]) -> StoredCredentialFailed:
    errcode = error.get("errcode")
    return StoredCredentialFailed(
        f"The delayed event could not be sent: the credential stored for it was refused "
        f"({errcode if isinstance(errcode, str) else 'M_UNKNOWN'}); it is finalised with that error"
    )


# Errcodes the sidecar's own clients read as about the delayed event or its endpoint (gone;
# not understood, so retried in the other form), never the homeserver's answer to a replay.
_MISREAD = ("M_NOT_FOUND", "M_UNRECOGNIZED")


def _relayed(status: int, error: dict[str, Any], fate: str) -> HomeserverError:
    """The homeserver's error as the send action answers it: as it came, unless its caller would
    read it as the delayed event's own (404, "not found"), then a 502 that names it."""
    errcode = error.get("errcode")
    if status != 404 and errcode not in _MISREAD:
        return HomeserverError(status, error)
    said = error.get("error")
    named = errcode if isinstance(errcode, str) else "no errcode"
    if isinstance(said, str):
        named = f"{named}: {said}"
    message = f"The homeserver refused the delayed event ({status} {named}); {fate}"
    return HomeserverError(502, {"errcode": "M_UNKNOWN", "error": message})


def _rate_limited(outcome: Transient, retry_in_ms: int) -> HomeserverError:
    """The homeserver's rate limit, with the time until the event's own retry. A retry due now
    still asks for a wait (at least 1 ms, and `Retry-After: 1`): clients read 0 as "at once"."""
    said = outcome.error.get("error")
    message = said if isinstance(said, str) else "The homeserver is rate limiting"
    wait_ms = max(retry_in_ms, 1)
    return HomeserverError(
        429,
        {"errcode": "M_LIMIT_EXCEEDED", "error": message, "retry_after_ms": wait_ms},
        {"Retry-After": str(max(math.ceil(wait_ms / 1000), 1))},
    )
