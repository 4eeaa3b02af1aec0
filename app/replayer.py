"""Replaying delayed events to the homeserver, as the user who scheduled them.

A replay is: claim (one statement, with a lease) -> send -> write the outcome under the same claim.
A replica that dies between the steps leaves a lease that runs out, and the row falls due again.
Messages are sent with a transaction id derived from the delay_id, so the homeserver takes a
repeated replay as the same event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics
from app import repository as repo
from app.clock import Clock
from app.crypto import TokenCipher
from app.errors import HomeserverError
from app.homeserver import Credential, Homeserver, Refused, ReplayResult, Sent, Transient
from app.models import CANCELLED, FAILED, SENT
from app.repository import DelayedEvent
from app.settings import Settings

logger = logging.getLogger(__name__)

CANCELLED_BY_STATE = "M_CANCELLED_BY_STATE_UPDATE"
_BATCH = 200


def txn_id_for(delay_id: str) -> str:
    """The transaction id of a replayed message: the same for every attempt of one event."""
    return f"msc4140.{delay_id}"


def log_id(delay_id: str) -> str:
    """How logs name an event: the first characters of its delay_id, enough to find its row but
    not to act on it (a whole delay_id lets a tokenless call send, cancel or restart it)."""
    return delay_id[:6] + "..."


def token_context(user_id: str, device_id: str | None) -> str:
    return f"{user_id}\n{device_id or ''}"


@dataclass(frozen=True, slots=True)
class NewerState:
    """Another user set the same state after this event was scheduled."""


Attempt = ReplayResult | NewerState


class Replayer:
    def __init__(
        self,
        engine: AsyncEngine,
        homeserver: Homeserver,
        cipher: TokenCipher,
        clock: Clock,
        settings: Settings,
    ) -> None:
        self.engine = engine
        self.homeserver = homeserver
        self.cipher = cipher
        self.clock = clock
        self.settings = settings
        self._lease_ms = int(settings.claim_lease_seconds * 1000)
        self._run_lock = asyncio.Lock()
        # Requests at the homeserver at once, over every room (one request holds one slot, and
        # nothing holding a slot waits for another).
        self._slots = asyncio.Semaphore(settings.replay_concurrency)

    async def run_due(self) -> int:
        """Replay every event that is due now, earliest send time first; how many were handled."""
        async with self._run_lock:
            handled = 0
            while True:
                now = self.clock.now_ms()
                async with self.engine.begin() as conn:
                    events = await repo.claim_due(conn, now, self._lease_ms, _BATCH)
                    blobs = await repo.load_tokens(conn, {(e.user_id, e.device_id) for e in events})
                if not events:
                    return handled
                await self._replay_batch(events, blobs, _ClaimKeeper(self, events, now))
                handled += len(events)

    async def next_due(self) -> int | None:
        async with self.engine.connect() as conn:
            return await repo.next_due(conn)

    async def _replay_batch(
        self,
        events: list[DelayedEvent],
        blobs: dict[tuple[str, str | None], bytes],
        keeper: _ClaimKeeper,
    ) -> None:
        # Rooms are replayed side by side; within a room, in send-time order: an event is sent
        # once the homeserver has answered the previous one, so a later event never lands before
        # an earlier one. The one exception is a run of state events that `side_by_side` allows
        # to go out together (MatrixRTC's call memberships: no event's authorisation depends on
        # them, and each has a key of its own). At most `replay_concurrency` requests are at the
        # homeserver at once (`_slots`). What a room waits for is only the homeserver's answers:
        # outcomes are written in the background (`_OutcomeWriter`), and the newer-state checks
        # of its state events are made a few events ahead (`_StateChecks`).
        by_room: dict[str, list[DelayedEvent]] = {}
        for event in events:
            by_room.setdefault(event.room_id, []).append(event)
        writer = _OutcomeWriter(self)

        async def one(event: DelayedEvent, checks: _StateChecks) -> None:
            if not await keeper.still_ours(event):
                return  # another replica took it over; it replays it from here
            credential = self._credential(event, blobs)
            try:
                await self._replay_on_timeout(event, credential, writer, checks)
            except Exception:
                # The claim's lease runs out and the row falls due again.
                logger.exception("replay of %s failed unexpectedly", log_id(event.delay_id))

        async def room_worker(room_events: list[DelayedEvent]) -> None:
            checks = _StateChecks(self, room_events, blobs)
            try:
                for group in in_order(room_events):
                    if len(group) == 1:
                        await one(group[0], checks)
                    else:
                        await asyncio.gather(*(one(event, checks) for event in group))
            finally:
                checks.close()

        try:
            await asyncio.gather(*(room_worker(group) for group in by_room.values()))
        finally:
            await writer.close()

    def _credential(
        self, event: DelayedEvent, blobs: dict[tuple[str, str | None], bytes]
    ) -> Credential | None:
        """How to send as the event's user: the application service, else the device's token."""
        if self.settings.appservice_token is not None:
            as_token = self.settings.appservice_token.get_secret_value()
            return Credential(as_token, event.user_id, event.device_id)
        blob = blobs.get((event.user_id, event.device_id))
        if blob is None:
            return None
        token = self.cipher.decrypt(blob, context=token_context(event.user_id, event.device_id))
        return Credential(token) if token is not None else None

    async def load_credential(self, event: DelayedEvent) -> Credential | None:
        blobs: dict[tuple[str, str | None], bytes] = {}
        if self.settings.appservice_token is None:
            async with self.engine.connect() as conn:
                blobs = await repo.load_tokens(conn, {(event.user_id, event.device_id)})
        return self._credential(event, blobs)

    def checks_newer_state(self, event: DelayedEvent) -> bool:
        return event.state_key is not None and self.settings.cancel_on_newer_state

    async def attempt(
        self,
        event: DelayedEvent,
        credential: Credential,
        newer_state: Awaitable[NewerState | None] | None = None,
    ) -> Attempt:
        """One try at sending `event` to the homeserver (`newer_state`: its newer-state check, if
        already started)."""
        if self.checks_newer_state(event):
            if newer_state is None:
                newer_state = self._newer_state(event, credential)
            newer = await newer_state
            if newer is not None:
                return newer
        started = asyncio.get_running_loop().time()
        result = await self._replay(event, credential)
        if (
            isinstance(result, Refused)
            and credential.as_device is not None
            and str(result.error.get("errcode", "")).endswith("UNKNOWN_DEVICE")
        ):
            # The device was logged out since; the event still goes out, as the user.
            result = await self._replay(event, credential.without_device())
        metrics.REPLAY_SECONDS.observe(asyncio.get_running_loop().time() - started)
        return result

    async def _replay(self, event: DelayedEvent, credential: Credential) -> ReplayResult:
        async with self._slots:
            return await self.homeserver.replay(
                credential=credential,
                room_id=event.room_id,
                event_type=event.event_type,
                state_key=event.state_key,
                content=event.content,
                query=event.query,
                txn_id=txn_id_for(event.delay_id),
            )

    async def _newer_state(self, event: DelayedEvent, credential: Credential) -> NewerState | None:
        assert event.state_key is not None
        async with self._slots:
            current = await self.homeserver.state_event(
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

    async def _replay_on_timeout(
        self,
        event: DelayedEvent,
        credential: Credential | None,
        writer: _OutcomeWriter,
        checks: _StateChecks,
    ) -> None:
        if credential is None:
            await self._finalise_failed(
                event,
                {
                    "errcode": "M_UNKNOWN_TOKEN",
                    "error": "No usable access token is stored for the device that scheduled it",
                },
            )
            return
        outcome = await self.attempt(event, credential, checks.take(event))
        if isinstance(outcome, Sent):
            writer.put(repo.SentOutcome(event, outcome.event_id, "delay", self.clock.now_ms()))
        else:
            await self.record(event, outcome, reason="delay")

    async def record(self, event: DelayedEvent, outcome: Attempt, *, reason: str) -> None:
        """Write the outcome of an attempt back under the event's claim."""
        now = self.clock.now_ms()
        if isinstance(outcome, Sent):
            async with self.engine.begin() as conn:
                done = await repo.finalise(
                    conn, event, status=SENT, reason=reason, now=now, event_id=outcome.event_id
                )
            count_sent(event, reason, now, done=done)
        elif isinstance(outcome, NewerState):
            error = {"errcode": CANCELLED_BY_STATE, "error": "Cancelled by newer state"}
            async with self.engine.begin() as conn:
                await repo.finalise(
                    conn, event, status=CANCELLED, reason="error", now=now, error=json.dumps(error)
                )
            metrics.CANCELLED.labels(event.generation, "newer_state").inc()
        elif isinstance(outcome, Refused):
            logger.info(
                "homeserver refused %s: %s %s",
                log_id(event.delay_id),
                outcome.status,
                outcome.error.get("errcode"),
            )
            await self._finalise_failed(event, outcome.error)
        else:
            await self._retry_or_give_up(event, outcome, now)

    async def _retry_or_give_up(self, event: DelayedEvent, outcome: Transient, now: int) -> None:
        first = event.first_failure_ts if event.first_failure_ts is not None else now
        window_end = first + int(self.settings.retry_window_seconds * 1000)
        if now >= window_end:
            logger.warning(
                "giving up on %s after %d attempts: %s",
                log_id(event.delay_id),
                event.attempts + 1,
                outcome.error.get("errcode"),
            )
            await self._finalise_failed(event, outcome.error)
            return
        due = min(now + self.backoff_ms(event.attempts, outcome.retry_after_ms), window_end)
        async with self.engine.begin() as conn:
            await repo.retry_later(conn, event, due_ts=due, first_failure_ts=first)
        metrics.RETRIED.inc()
        logger.info(
            "homeserver unavailable for %s (%s), retrying in %d ms",
            log_id(event.delay_id),
            outcome.error.get("errcode"),
            due - now,
        )

    def backoff_ms(self, attempts: int, retry_after_ms: int | None) -> int:
        """How long to wait before the next try: the homeserver's word for a 429, else doubling."""
        cap = int(self.settings.retry_max_backoff_seconds * 1000)
        if retry_after_ms is not None and retry_after_ms >= 0:
            return min(max(retry_after_ms, 50), cap)
        base = min(cap, 500 * 2 ** min(attempts, 20))
        return int(base * random.uniform(0.9, 1.1))

    async def _finalise_failed(self, event: DelayedEvent, error: dict[str, Any]) -> None:
        async with self.engine.begin() as conn:
            await repo.finalise(
                conn,
                event,
                status=FAILED,
                reason="error",
                now=self.clock.now_ms(),
                error=json.dumps(error, separators=(",", ":")),
            )
        metrics.FAILED.labels(event.generation, metrics.errcode_label(error.get("errcode"))).inc()

    async def send_now(self, event: DelayedEvent) -> None:
        """The send action on a claimed event: replay it now and tell the caller how it went.

        A refusal is answered with the homeserver's error and the event stays scheduled on its own
        timer; a transient failure is retried like any due event.
        """
        credential = await self.load_credential(event)
        if credential is None:
            await self._release(event)
            raise HomeserverError(
                401,
                {"errcode": "M_UNKNOWN_TOKEN", "error": "No usable access token is stored"},
            )
        outcome = await self.attempt(event, credential)
        if isinstance(outcome, Sent | NewerState):
            await self.record(event, outcome, reason="action")
            if isinstance(outcome, NewerState):
                raise _cancelled_conflict()
            return
        if isinstance(outcome, Refused):
            await self._release(event)
            raise HomeserverError(outcome.status, outcome.error)
        await self._retry_or_give_up(event, outcome, self.clock.now_ms())
        raise HomeserverError(502, outcome.error)

    async def _release(self, event: DelayedEvent) -> None:
        async with self.engine.begin() as conn:
            await repo.release(conn, event)


# State whose order against the room's other state matters beyond its own key: the events that
# authorise later ones (a power-level change before the state it permits, a membership before
# the member's own state).
AUTH_STATE_TYPES = frozenset(
    {
        "m.room.create",
        "m.room.power_levels",
        "m.room.member",
        "m.room.join_rules",
        "m.room.third_party_invite",
    }
)


def side_by_side(event: DelayedEvent) -> bool:
    """Whether `event` may be sent together with the room's neighbouring events like it: a state
    event that authorises nothing. Its own key keeps its order anyway (a claim holds at most one
    event per key, the next one is claimable only once this one is finalised)."""
    return event.state_key is not None and event.event_type not in AUTH_STATE_TYPES


def in_order(room_events: list[DelayedEvent]) -> list[list[DelayedEvent]]:
    """A room's events (in send-time order) as the groups to send one after the other: each
    message or authorising state event alone, and runs of `side_by_side` state events, each key
    at most once, together."""
    groups: list[list[DelayedEvent]] = []
    keys: set[tuple[str, str | None]] = set()
    for event in room_events:
        key = (event.event_type, event.state_key)
        last = groups[-1] if groups else None
        if last is not None and side_by_side(event) and side_by_side(last[-1]) and key not in keys:
            last.append(event)
        else:
            groups.append([event])
            keys = set()
        keys.add(key)
    return groups


def count_sent(event: DelayedEvent, reason: str, sent_at: int, *, done: bool) -> None:
    metrics.SENT.labels(event.generation, reason).inc()
    if reason == "delay":
        metrics.LATENESS_SECONDS.observe(max(0, sent_at - event.send_ts) / 1000)
    if not done:
        logger.warning("sent %s, but its claim had lapsed", log_id(event.delay_id))


class _OutcomeWriter:
    """Writes the outcomes of a batch's sent events in the background, as many to a statement as
    have come in meanwhile, while each room goes on with its next event.

    Sending on before an outcome is committed keeps every guarantee: a message repeated after a
    crash carries the same transaction id and lands once, in its place; and the next delayed state
    event for the same (room, type, state_key) can't be claimed before this one's outcome is
    committed (`repo.claim_due`), so per-key order does not depend on this writer. A write that
    fails leaves the rows claimed; their lease runs out and they are replayed (as the same
    events). The batch ends, and the next claim is made, only once every outcome is written.
    Refusals and retries are written by the room itself, before it goes on."""

    def __init__(self, replayer: Replayer) -> None:
        self._engine = replayer.engine
        self._queue: list[repo.SentOutcome] = []
        self._ready = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._run())

    def put(self, outcome: repo.SentOutcome) -> None:
        self._queue.append(outcome)
        self._ready.set()

    async def close(self) -> None:
        self._closing = True
        self._ready.set()
        await self._task

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._queue:
                outcomes, self._queue = self._queue, []
                await self._write(outcomes)
            if self._closing:
                return

    async def _write(self, outcomes: list[repo.SentOutcome]) -> None:
        try:
            async with self._engine.begin() as conn:
                done = await repo.finalise_sent_many(conn, outcomes)
        except Exception:
            logger.exception(
                "writing the outcome of %d sent events failed; they are replayed when their "
                "claim lapses",
                len(outcomes),
            )
            return
        for outcome in outcomes:
            count_sent(
                outcome.event, outcome.reason, outcome.ts, done=outcome.event.delay_id in done
            )


class _StateChecks:
    """The newer-state checks of a room's delayed state events, started a few events ahead of
    their sends, so that a room of state events waits for one homeserver answer per event (the
    send's), not two. A claimed batch holds at most one event per (room, type, state_key), so no
    earlier send of the batch changes what a check reads."""

    AHEAD = 4

    def __init__(
        self,
        replayer: Replayer,
        events: list[DelayedEvent],
        blobs: dict[tuple[str, str | None], bytes],
    ) -> None:
        self._replayer = replayer
        self._blobs = blobs
        self._events = [e for e in events if replayer.checks_newer_state(e)]
        self._index = {e.delay_id: i for i, e in enumerate(self._events)}
        self._tasks: dict[str, asyncio.Task[NewerState | None]] = {}

    def take(self, event: DelayedEvent) -> Awaitable[NewerState | None] | None:
        """The check for `event` (started now if it wasn't), and the next ones started."""
        at = self._index.get(event.delay_id)
        if at is None:
            return None
        for ahead in self._events[at : at + 1 + self.AHEAD]:
            if ahead.delay_id not in self._tasks:
                self._start(ahead)
        return self._tasks.pop(event.delay_id, None)

    def _start(self, event: DelayedEvent) -> None:
        credential = self._replayer._credential(event, self._blobs)
        if credential is None:
            return  # finalised as failed without a send; nothing to check
        task = asyncio.create_task(self._replayer._newer_state(event, credential))
        task.add_done_callback(_retrieve)
        self._tasks[event.delay_id] = task

    def close(self) -> None:
        """Stop the checks of events that were not sent (taken over by another replica)."""
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # awaited by its event, or dropped with it: never reported as lost


class _ClaimKeeper:
    """Keeps a batch's claim alive while its events are sent one after another, renewing the
    lease well before it runs out, so no other replica takes over an event of a room that is still
    being worked through (which could send a later state event before an earlier one)."""

    def __init__(self, replayer: Replayer, events: list[DelayedEvent], claimed_at: int) -> None:
        self._replayer = replayer
        self._claim_id = events[0].claim_id or ""
        self._pending = [e.delay_id for e in events]
        self._renewed_at = claimed_at
        self._held = set(self._pending)
        self._lock = asyncio.Lock()

    async def still_ours(self, event: DelayedEvent) -> bool:
        lease = self._replayer._lease_ms
        if self._replayer.clock.now_ms() - self._renewed_at >= lease // 3:
            async with self._lock:
                now = self._replayer.clock.now_ms()
                if now - self._renewed_at >= lease // 3:
                    async with self._replayer.engine.begin() as conn:
                        self._held = await repo.renew_claim(
                            conn, self._claim_id, self._pending, now + lease
                        )
                    self._renewed_at = now
        return event.delay_id in self._held


def _cancelled_conflict() -> HomeserverError:
    return HomeserverError(
        409, {"errcode": "M_UNKNOWN", "error": "The delayed event was cancelled by newer state"}
    )


__all__ = ["CANCELLED_BY_STATE", "Replayer", "txn_id_for"]
