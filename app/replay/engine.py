"""One attempt at sending one delayed event to the homeserver, as the user who scheduled it, and
its outcome written under the event's claim. An attempt answers with a value (sent, a transient
failure, a refusal, newer state, a lost claim), never with an HTTP error.

Messages are sent with a transaction id derived from the delay_id, so the homeserver takes a
repeated replay as the same event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics
from app import repository_claims as claims_repo
from app.clock import Clock
from app.homeserver import Credential, Homeserver, Refused, ReplayResult, Sent, Transient
from app.models import CANCELLED, FAILED, SENT, DelayedEvent
from app.replay.claims import ClaimKeeper
from app.replay.outcomes import OutcomeWriter, count_sent, log_id
from app.replay.wakeup import WakeUp
from app.settings import Settings

logger = logging.getLogger(__name__)

CANCELLED_BY_STATE = "M_CANCELLED_BY_STATE_UPDATE"
# The error stored with an event cancelled because newer state was set for its key.
NEWER_STATE_ERROR = json.dumps({"errcode": CANCELLED_BY_STATE, "error": "Cancelled by newer state"})


def txn_id_for(delay_id: str) -> str:
    """The transaction id of a replayed message: the same for every attempt of one event."""
    return f"msc4140.{delay_id}"


@dataclass(frozen=True, slots=True)
class NewerState:
    """Another user set the same state after this event was scheduled."""


@dataclass(frozen=True, slots=True)
class Lost:
    """The claim no longer held the row when its request was about to start: not sent."""


Attempt = ReplayResult | NewerState | Lost


def request_deadline_seconds(settings: Settings) -> float:
    """The longest one request to the homeserver may take as a whole. httpx's timeout bounds
    each wait (to connect, to write, for the next bytes), so an answer that trickles in would
    keep a request, its slot and its renewed claim for ever; three of those waits is as long as
    an honest request can take."""
    return 3 * settings.homeserver_timeout_seconds


def longest_attempt_seconds(settings: Settings) -> float:
    """The longest one `ReplayEngine.attempt` may take at the homeserver: its newer-state check,
    its send, and the send again as the user when the device was logged out meanwhile."""
    return 3 * request_deadline_seconds(settings)


class ReplayEngine:
    def __init__(
        self,
        engine: AsyncEngine,
        homeserver: Homeserver,
        clock: Clock,
        settings: Settings,
        wakeup: WakeUp,
    ) -> None:
        self._engine = engine
        self._homeserver = homeserver
        self._clock = clock
        self._settings = settings
        self._wakeup = wakeup
        self._request_deadline = request_deadline_seconds(settings)
        # Requests at the homeserver at once, over every room (one request holds one slot, and
        # nothing holding a slot waits for another).
        self._slots = asyncio.Semaphore(settings.replay_concurrency)

    def checks_newer_state(self, event: DelayedEvent) -> bool:
        return event.state_key is not None and self._settings.cancel_on_newer_state

    async def attempt(
        self,
        event: DelayedEvent,
        credential: Credential,
        newer_state: Awaitable[NewerState | None] | None = None,
        keeper: ClaimKeeper | None = None,
    ) -> Attempt:
        """One try at sending `event` to the homeserver (`newer_state`: its newer-state check, if
        already started; `keeper`: the claims, re-checked just before the request)."""
        if self.checks_newer_state(event):
            if newer_state is None:
                newer_state = self.newer_state(event, credential, keeper)
            newer = await newer_state
            if newer is not None:
                return newer
        started = asyncio.get_running_loop().time()
        result = await self._replay(event, credential, keeper)
        if (
            isinstance(result, Refused)
            and credential.as_device is not None
            and str(result.error.get("errcode", "")).endswith("UNKNOWN_DEVICE")
        ):
            # The device was logged out since; the event still goes out, as the user.
            result = await self._replay(event, credential.without_device(), keeper)
        metrics.REPLAY_SECONDS.observe(asyncio.get_running_loop().time() - started)
        return result

    async def _replay(
        self, event: DelayedEvent, credential: Credential, keeper: ClaimKeeper | None
    ) -> ReplayResult | Lost:
        async with self._slots:
            # An event can wait long for a slot; whether its claim still holds is asked only
            # now, with nothing left to wait for but the request itself.
            if keeper is not None and not await keeper.before_send(event):
                return Lost()
            try:
                async with asyncio.timeout(self._request_deadline):
                    return await self._homeserver.replay(
                        credential=credential,
                        room_id=event.room_id,
                        event_type=event.event_type,
                        state_key=event.state_key,
                        content=event.content,
                        query=event.query,
                        txn_id=txn_id_for(event.delay_id),
                    )
            except TimeoutError:
                # The homeserver has the whole request and may have taken the event.
                error = {"errcode": "M_UNKNOWN", "error": "homeserver answer took too long"}
                return Transient(error, in_doubt=True)

    async def newer_state(
        self, event: DelayedEvent, credential: Credential, keeper: ClaimKeeper | None = None
    ) -> NewerState | None:
        """Whether another user set the state of `event`'s key after it was scheduled."""
        assert event.state_key is not None
        async with self._slots:
            if keeper is not None:
                await keeper.renew_if_due()
            current: dict[str, Any] | None = None  # an answer that never ends: none, as a failure
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._request_deadline):
                    current = await self._homeserver.state_event(
                        credential=credential,
                        room_id=event.room_id,
                        event_type=event.event_type,
                        state_key=event.state_key,
                    )
        if current is None:
            return None
        sender, ts = current.get("sender"), current.get("origin_server_ts")
        if not isinstance(sender, str) or not isinstance(ts, int) or sender == event.user_id:
            return None
        if ts <= event.created_ts:
            return None
        return NewerState()

    async def send_due(
        self,
        event: DelayedEvent,
        credential: Credential | None,
        writer: OutcomeWriter,
        newer_state: Awaitable[NewerState | None] | None,
        keeper: ClaimKeeper | None = None,
    ) -> bool:
        """Send a due event and record how it went; True if its outcome was handed to `writer`
        (sent), False if already written."""
        if credential is None:
            logger.warning(
                "no usable access token for %s (its device's token is gone); finalised as failed",
                log_id(event.delay_id),
            )
            await self.finalise_failed(
                event,
                {
                    "errcode": "M_UNKNOWN_TOKEN",
                    "error": "No usable access token is stored for the device that scheduled it",
                },
            )
            return False
        outcome = await self.attempt(event, credential, newer_state, keeper)
        if isinstance(outcome, Sent):
            writer.put(
                claims_repo.SentOutcome(event, outcome.event_id, "delay", self._clock.now_ms())
            )
            return True
        if isinstance(outcome, Lost):
            logger.info("%s was taken over before its send; not sent here", log_id(event.delay_id))
            return False
        await self.record(event, outcome, reason="delay")
        return False

    async def record(self, event: DelayedEvent, outcome: Attempt, *, reason: str) -> None:
        """Write the outcome of an attempt back under the event's claim."""
        now = self._clock.now_ms()
        if isinstance(outcome, Sent):
            async with self._engine.begin() as conn:
                done = await claims_repo.finalise(
                    conn, event, status=SENT, reason=reason, now=now, event_id=outcome.event_id
                )
            count_sent(event, reason, now, done=done)
        elif isinstance(outcome, NewerState):
            async with self._engine.begin() as conn:
                await claims_repo.finalise(
                    conn, event, status=CANCELLED, reason="error", now=now, error=NEWER_STATE_ERROR
                )
            metrics.CANCELLED.labels(event.generation, "newer_state").inc()
        elif isinstance(outcome, Lost):
            return
        elif isinstance(outcome, Refused):
            logger.info(
                "homeserver refused %s: %s %s",
                log_id(event.delay_id),
                outcome.status,
                outcome.error.get("errcode"),
                extra={"outcome": "refused"},
            )
            await self.finalise_failed(event, outcome.error)
        else:
            await self.retry_or_give_up(event, outcome, now)

    async def retry_or_give_up(
        self, event: DelayedEvent, outcome: Transient, now: int
    ) -> int | None:
        """A transient failure: try again after a backoff, or fail once the retry window is
        over. The time of the next try, None if given up."""
        first = event.first_failure_ts if event.first_failure_ts is not None else now
        window_end = first + int(self._settings.retry_window_seconds * 1000)
        if now >= window_end:
            logger.warning(
                "giving up on %s after %d attempts: %s",
                log_id(event.delay_id),
                event.attempts + 1,
                outcome.error.get("errcode"),
                extra={"outcome": "gave_up"},
            )
            await self.finalise_failed(event, outcome.error)
            return None
        due = min(now + self.backoff_ms(event.attempts, outcome.retry_after_ms), window_end)
        async with self._engine.begin() as conn:
            await claims_repo.retry_later(
                conn, event, due_ts=due, first_failure_ts=first, in_doubt=outcome.in_doubt
            )
        self._wakeup.wake(due)
        metrics.RETRIED.inc()
        logger.info(
            "homeserver unavailable for %s (%s), retrying in %d ms",
            log_id(event.delay_id),
            outcome.error.get("errcode"),
            due - now,
            extra={"outcome": "retry"},
        )
        return due

    def backoff_ms(self, attempts: int, retry_after_ms: int | None) -> int:
        """How long to wait before the next try: the homeserver's word for a 429, else doubling."""
        cap = int(self._settings.retry_max_backoff_seconds * 1000)
        if retry_after_ms is not None and retry_after_ms >= 0:
            return min(max(retry_after_ms, 50), cap)
        base = min(cap, 500 * 2 ** min(attempts, 20))
        return int(base * random.uniform(0.9, 1.1))

    async def finalise_failed(self, event: DelayedEvent, error: dict[str, Any]) -> None:
        async with self._engine.begin() as conn:
            await claims_repo.finalise(
                conn,
                event,
                status=FAILED,
                reason="error",
                now=self._clock.now_ms(),
                error=json.dumps(error, separators=(",", ":")),
            )
        metrics.FAILED.labels(event.generation, metrics.errcode_label(error.get("errcode"))).inc()

    async def release(self, event: DelayedEvent) -> None:
        """Give a claimed event back to its own timer."""
        async with self._engine.begin() as conn:
            await claims_repo.release(conn, event)
