"""Replaying delayed events to the homeserver, as the user who scheduled them.

A replay is: claim (one statement, with a lease) -> re-check the claim -> send -> write the
outcome under the same claim. A replica that dies between the steps leaves claims naming its
replica lock (`app.liveness`), which a peer frees as soon as it sees the lock gone (or, without a
lock, a lease that runs out), and the row falls due again. Messages are sent with a transaction id
derived from the delay_id, so the homeserver takes a repeated replay as the same event.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics
from app import repository_claims as claims_repo
from app import repository_tokens as tokens_repo
from app.clock import Clock
from app.crypto import TokenCipher
from app.errors import HomeserverError, StoredCredentialFailed
from app.homeserver import Credential, Homeserver, Refused, ReplayResult, Sent, Transient
from app.liveness import ReplicaLock
from app.logs import LogId
from app.models import CANCELLED, FAILED, SENT, DelayedEvent
from app.settings import Settings
from app.tasks import retrieve_exception

logger = logging.getLogger(__name__)

CANCELLED_BY_STATE = "M_CANCELLED_BY_STATE_UPDATE"
# The error stored with an event cancelled because newer state was set for its key.
NEWER_STATE_ERROR = json.dumps({"errcode": CANCELLED_BY_STATE, "error": "Cancelled by newer state"})


def txn_id_for(delay_id: str) -> str:
    """The transaction id of a replayed message: the same for every attempt of one event."""
    return f"msc4140.{delay_id}"


def log_id(delay_id: str) -> str:
    """How logs name an event: the first characters of its delay_id, enough to find its row but
    not to act on it (a whole delay_id lets a tokenless call send, cancel or restart it)."""
    return LogId(delay_id[:6] + "...")


def token_context(user_id: str, device_id: str | None) -> str:
    return f"{user_id}\n{device_id or ''}"


@dataclass(frozen=True, slots=True)
class NewerState:
    """Another user set the same state after this event was scheduled."""


@dataclass(frozen=True, slots=True)
class Lost:
    """The claim no longer held the row when its request was about to start: not sent."""


Attempt = ReplayResult | NewerState | Lost


class TakenOver(Exception):
    """The send action's claim was lost before its request (it waited past its lease and
    another replica took the event over): not sent by the action."""


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
        # The longest one request to the homeserver may take as a whole. httpx's timeout bounds
        # each wait (to connect, to write, for the next bytes), so an answer that trickles in
        # would keep a request, its slot and its renewed claim for ever; three of those waits
        # is as long as an honest request can take.
        self._request_deadline = 3 * settings.homeserver_timeout_seconds
        self._run: _Run | None = None
        # This replica's lock (`app.liveness`), set by the application; its claims name it.
        self.liveness: ReplicaLock | None = None
        # Asks the clock to wake the replayer at a time (ms): set by the application to the
        # scheduler's `wake`; a run calls it for the next due event while it has nothing to do.
        self.wake: Callable[[int], None] = lambda at_ms: None
        # Requests at the homeserver at once, over every room (one request holds one slot, and
        # nothing holding a slot waits for another).
        self._slots = asyncio.Semaphore(settings.replay_concurrency)
        # Set once the replica is shutting down (`drain`): nothing more is claimed.
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def run_due(self) -> int | None:
        """Replay every event that is due, earliest send time first, until none is due and every
        one claimed is handled; how many were handled. While a run is going on, another call
        only tells it that more may be due (and answers None at once): the run claims those as
        it has room, so a busy room never holds up the others."""
        if self.draining:
            return 0
        if self._run is not None:
            self._run.poke()
            return None
        self._run = run = _Run(self)
        self._idle.clear()
        try:
            return await run.go()
        finally:
            self._run = None
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """The replica is shutting down: claim nothing more, give every claim not yet at the
        homeserver back at once (free and due now, for any replica to take), and wait, at most
        `timeout` seconds, for the sends already at the homeserver to be answered and their
        outcomes written. True if the run ended in time."""
        self.draining = True
        run = self._run
        if run is not None:
            await run.drain()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def settle(self, delay_id: str, timeout: float) -> None:
        """Wait, at most `timeout` seconds, until this replica's run is done with `delay_id`
        (its send answered and its outcome written, or handed back): a lookup of an event being
        sent then reads what the homeserver made of it. At once when this replica holds no
        claim of it (another replica's claim is not waited for)."""
        if self._run is not None:
            await self._run.settled(delay_id, timeout)

    async def next_due(self) -> int | None:
        async with self.engine.connect() as conn:
            return await claims_repo.next_due(conn, self.clock.now_ms(), self.holder)

    @property
    def holder(self) -> int | None:
        """The key of the replica lock held now, which new claims name; None if none is held."""
        return self.liveness.key if self.liveness is not None else None

    async def free_dead_claims(self) -> int:
        """Make the claims of replicas that are gone due now; how many."""
        async with self.engine.begin() as conn:
            return await claims_repo.free_dead_claims(conn, self.clock.now_ms())

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
                blobs = await tokens_repo.load_tokens(conn, {(event.user_id, event.device_id)})
        return self._credential(event, blobs)

    def checks_newer_state(self, event: DelayedEvent) -> bool:
        return event.state_key is not None and self.settings.cancel_on_newer_state

    async def attempt(
        self,
        event: DelayedEvent,
        credential: Credential,
        newer_state: Awaitable[NewerState | None] | None = None,
        keeper: _ClaimKeeper | None = None,
    ) -> Attempt:
        """One try at sending `event` to the homeserver (`newer_state`: its newer-state check, if
        already started; `keeper`: the run's claims, re-checked just before the request)."""
        if self.checks_newer_state(event):
            if newer_state is None:
                newer_state = self._newer_state(event, credential, keeper)
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
        self, event: DelayedEvent, credential: Credential, keeper: _ClaimKeeper | None
    ) -> ReplayResult | Lost:
        async with self._slots:
            # An event can wait long for a slot; whether its claim still holds is asked only
            # now, with nothing left to wait for but the request itself.
            if keeper is not None and not await keeper.before_send(event):
                return Lost()
            try:
                async with asyncio.timeout(self._request_deadline):
                    return await self.homeserver.replay(
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

    async def _newer_state(
        self, event: DelayedEvent, credential: Credential, keeper: _ClaimKeeper | None = None
    ) -> NewerState | None:
        assert event.state_key is not None
        async with self._slots:
            if keeper is not None:
                await keeper.renew_if_due()
            current: dict[str, Any] | None = None  # an answer that never ends: none, as a failure
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._request_deadline):
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
        newer_state: Awaitable[NewerState | None] | None,
        keeper: _ClaimKeeper | None = None,
    ) -> bool:
        """Send a due event and record how it went; True if its outcome was handed to `writer`
        (sent), False if already written."""
        if credential is None:
            logger.warning(
                "no usable access token for %s (its device's token is gone); finalised as failed",
                log_id(event.delay_id),
            )
            await self._finalise_failed(
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
                claims_repo.SentOutcome(event, outcome.event_id, "delay", self.clock.now_ms())
            )
            return True
        if isinstance(outcome, Lost):
            logger.info("%s was taken over before its send; not sent here", log_id(event.delay_id))
            return False
        await self.record(event, outcome, reason="delay")
        return False

    async def record(self, event: DelayedEvent, outcome: Attempt, *, reason: str) -> None:
        """Write the outcome of an attempt back under the event's claim."""
        now = self.clock.now_ms()
        if isinstance(outcome, Sent):
            async with self.engine.begin() as conn:
                done = await claims_repo.finalise(
                    conn, event, status=SENT, reason=reason, now=now, event_id=outcome.event_id
                )
            count_sent(event, reason, now, done=done)
        elif isinstance(outcome, NewerState):
            async with self.engine.begin() as conn:
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
                extra={"outcome": "gave_up"},
            )
            await self._finalise_failed(event, outcome.error)
            return
        due = min(now + self.backoff_ms(event.attempts, outcome.retry_after_ms), window_end)
        async with self.engine.begin() as conn:
            await claims_repo.retry_later(
                conn, event, due_ts=due, first_failure_ts=first, in_doubt=outcome.in_doubt
            )
        self.wake(due)
        metrics.RETRIED.inc()
        logger.info(
            "homeserver unavailable for %s (%s), retrying in %d ms",
            log_id(event.delay_id),
            outcome.error.get("errcode"),
            due - now,
            extra={"outcome": "retry"},
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
            await claims_repo.finalise(
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
            error = {"errcode": "M_UNKNOWN_TOKEN", "error": "No usable access token is stored"}
            await self._finalise_failed(event, error)
            raise _credential_failed(error)
        # Its claim is kept and re-checked like a run's: it may wait long (for a request slot,
        # on the newer-state check), and a lapsed claim is another replica's to send.
        keeper = _ClaimKeeper(self)
        keeper.add([event], self.clock.now_ms())
        try:
            outcome = await self.attempt(event, credential, keeper=keeper)
        finally:
            await keeper.close()
        if isinstance(outcome, Lost):
            raise TakenOver()
        if isinstance(outcome, Sent | NewerState):
            await self.record(event, outcome, reason="action")
            if event.state_key is not None:
                # The next state event of its key, waiting for this one, may be overdue.
                self.wake(self.clock.now_ms())
            if isinstance(outcome, NewerState):
                raise _cancelled_conflict()
            return
        if isinstance(outcome, Refused) and _refuses_credential(outcome):
            # Only the caller's own token may answer 401: this one is the event's.
            await self._finalise_failed(event, outcome.error)
            raise _credential_failed(outcome.error)
        if isinstance(outcome, Refused):
            await self._release(event)
            raise HomeserverError(outcome.status, outcome.error)
        await self._retry_or_give_up(event, outcome, self.clock.now_ms())
        raise HomeserverError(502, outcome.error)

    async def _release(self, event: DelayedEvent) -> None:
        async with self.engine.begin() as conn:
            await claims_repo.release(conn, event)


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


def next_group(queue: deque[DelayedEvent]) -> list[DelayedEvent]:
    """Take from the head of a room's queue (in send-time order) what goes out next: a message
    or an authorising state event alone, or a run of `side_by_side` state events, each key at
    most once, together."""
    group = [queue.popleft()]
    keys = {(group[0].event_type, group[0].state_key)}
    while queue and side_by_side(group[0]) and side_by_side(queue[0]):
        key = (queue[0].event_type, queue[0].state_key)
        if key in keys:
            break
        keys.add(key)
        group.append(queue.popleft())
    return group


def count_sent(event: DelayedEvent, reason: str, sent_at: int, *, done: bool) -> None:
    metrics.SENT.labels(event.generation, reason).inc()
    if reason == "delay":
        metrics.LATENESS_SECONDS.observe(max(0, sent_at - event.send_ts) / 1000)
    if not done:
        logger.warning("sent %s, but its claim had lapsed", log_id(event.delay_id))


class _OutcomeWriter:
    """Writes the outcomes of a run's sent events in the background, as many to a statement as
    have come in meanwhile, while each room goes on with its next event.

    Sending on before an outcome is committed keeps every guarantee: a message repeated after a
    crash carries the same transaction id and lands once, in its place; and the next delayed state
    event for the same (room, type, state_key) can't be claimed before this one's outcome is
    committed (`claims_repo.claim_due`), so per-key order does not depend on this writer. A write
    that fails leaves the rows claimed; their lease runs out and they are replayed (as the same
    events). The run ends only once every outcome is written. Refusals and retries are written
    by the room itself, before it goes on."""

    def __init__(
        self, replayer: Replayer, on_written: Callable[[list[claims_repo.SentOutcome]], None]
    ) -> None:
        self._engine = replayer.engine
        self._on_written = on_written
        self._queue: list[claims_repo.SentOutcome] = []
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._task = asyncio.create_task(self._run())

    def put(self, outcome: claims_repo.SentOutcome) -> None:
        self._queue.append(outcome)
        self._idle.clear()
        self._ready.set()

    async def flush(self) -> None:
        """Wait until every outcome put so far is written (or its write has failed)."""
        await self._idle.wait()

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
            self._idle.set()
            if self._closing:
                return

    async def _write(self, outcomes: list[claims_repo.SentOutcome]) -> None:
        try:
            async with self._engine.begin() as conn:
                done = await claims_repo.finalise_sent_many(conn, outcomes)
        except Exception:
            logger.exception(
                "writing the outcome of %d sent events failed; they are replayed when their "
                "claim lapses",
                len(outcomes),
            )
        else:
            for outcome in outcomes:
                count_sent(
                    outcome.event, outcome.reason, outcome.ts, done=outcome.event.delay_id in done
                )
        self._on_written(outcomes)


class _StateChecks:
    """The newer-state checks of a room's delayed state events, started a few events ahead of
    their sends, so that a room of state events waits for one homeserver answer per event (the
    send's), not two. A claim holds at most one event per (room, type, state_key), and the next
    one for a key is claimable only once the earlier one is finalised, so no send still ahead of
    a check changes what it reads."""

    AHEAD = 4

    def __init__(
        self,
        replayer: Replayer,
        blobs: dict[tuple[str, str | None], bytes],
        keeper: _ClaimKeeper,
    ) -> None:
        self._replayer = replayer
        self._blobs = blobs
        self._keeper = keeper
        self._tasks: dict[str, asyncio.Task[NewerState | None]] = {}

    def take(
        self, event: DelayedEvent, upcoming: Iterable[DelayedEvent]
    ) -> Awaitable[NewerState | None] | None:
        """The check for `event` (started now if it wasn't), with the checks of the next few
        state events of `upcoming` (the room's queue behind it) started."""
        if not self._replayer.checks_newer_state(event):
            return None
        ahead = (e for e in upcoming if self._replayer.checks_newer_state(e))
        for state in itertools.chain([event], itertools.islice(ahead, self.AHEAD)):
            if state.delay_id not in self._tasks:
                self._start(state)
        return self._tasks.pop(event.delay_id, None)

    def _start(self, event: DelayedEvent) -> None:
        credential = self._replayer._credential(event, self._blobs)
        if credential is None:
            return  # finalised as failed without a send; nothing to check
        keeper = self._keeper
        task = asyncio.create_task(self._replayer._newer_state(event, credential, keeper))
        task.add_done_callback(retrieve_exception)
        self._tasks[event.delay_id] = task

    def forget(self, event: DelayedEvent) -> None:
        """`event` is handled: a check started for it and not taken (it was not sent) stops."""
        task = self._tasks.pop(event.delay_id, None)
        if task is not None:
            task.cancel()

    def close(self) -> None:
        """Stop the checks of events that were not sent (taken over by another replica)."""
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()


class _Run:
    """One run of the replayer: claims due events and works them off room by room, claiming
    more whenever it has room and something may have fallen due (`poke`), until nothing is due
    and nothing claimed is left.

    Each room has a queue, worked through by one task, in claim order (so in send-time order),
    group by group (`next_group`); rooms go side by side. It holds at most
    `SIDECAR_REPLAY_MAX_CLAIMED` claimed events (queued, being sent, or sent with the outcome not
    yet written), so a burst is claimed as it is worked off and the rest stays free for other
    replicas. The leases of everything it holds are kept alive (`_ClaimKeeper`); the outcomes of
    sent events are written by one `_OutcomeWriter`, and the run ends only once they are."""

    def __init__(self, replayer: Replayer) -> None:
        self._replayer = replayer
        self._max_claimed = replayer.settings.replay_max_claimed
        self._queues: dict[str, deque[DelayedEvent]] = {}
        self._rooms: dict[str, asyncio.Task[None]] = {}
        self._keeper = _ClaimKeeper(replayer)
        # The sealed tokens of the devices whose events are queued or being sent, and how many of
        # those each has: a run can go on as long as events keep falling due, so a device's
        # token is dropped as soon as none of its claimed events is left.
        self._blobs: dict[tuple[str, str | None], bytes] = {}
        self._uses: Counter[tuple[str, str | None]] = Counter()
        self._changed = asyncio.Event()
        self._full = False
        self._writer = _OutcomeWriter(replayer, on_written=self._written)
        self._checks = _StateChecks(replayer, self._blobs, self._keeper)
        # Lookups waiting for a held event to be handled (`settled`).
        self._waiters: dict[str, asyncio.Event] = {}

    def poke(self) -> None:
        """Something may have fallen due: claim again as soon as there is room."""
        self._changed.set()

    async def drain(self) -> None:
        """Give back every claim whose send has not reached its re-check (`before_send`); the
        rooms skip those events, the sends past it finish, and the run ends."""
        released = await self._keeper.give_back()
        in_flight = len(self._keeper)
        logger.info(
            "draining: gave back %d claimed events; %d sends still at the homeserver",
            released,
            in_flight,
        )
        self._changed.set()

    def _written(self, outcomes: list[claims_repo.SentOutcome]) -> None:
        """Outcomes the writer has written (or failed to: their claims then lapse)."""
        for outcome in outcomes:
            self._handled(outcome.event)

    async def settled(self, delay_id: str, timeout: float) -> None:
        """Wait until the run no longer holds `delay_id` (at most `timeout` seconds)."""
        if not self._keeper.holds(delay_id):
            return
        waiter = self._waiters.setdefault(delay_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.wait(), timeout)

    def _handled(self, event: DelayedEvent) -> None:
        # Until its outcome is written an event stays under the claim's renewal: a lapsed claim
        # of a sent event must not let another replica send it again.
        self._keeper.done(event)
        waiter = self._waiters.pop(event.delay_id, None)
        if waiter is not None:
            waiter.set()
        self._checks.forget(event)
        device = (event.user_id, event.device_id)
        self._uses[device] -= 1
        if self._uses[device] <= 0:
            del self._uses[device]
            self._blobs.pop(device, None)
        if event.state_key is not None:
            self.poke()  # finalised: the next state event for its key may be claimed
        if self._full and len(self._keeper) <= self._max_claimed // 2:
            self._changed.set()  # room for the next claim

    async def go(self) -> int:
        handled = 0
        try:
            while True:
                self._changed.clear()
                room = self._max_claimed - len(self._keeper)
                self._full = room <= 0
                if not self._full:
                    claimed = await self._claim(room)
                    handled += claimed
                    if claimed == room:
                        continue  # more may be due already
                    if not self._rooms:
                        await self._writer.flush()
                        if self._changed.is_set():
                            continue  # a written state event may have let its key's next one go
                        return handled
                    await self._wake_for_next()
                await self._changed.wait()
        finally:
            if self._rooms:
                await asyncio.gather(*self._rooms.values(), return_exceptions=True)
            self._checks.close()
            await self._writer.close()
            await self._keeper.close()

    async def _claim(self, limit: int) -> int:
        replayer = self._replayer
        if replayer.draining:
            return 0
        now = replayer.clock.now_ms()
        async with replayer.engine.begin() as conn:
            # The claims of a replica that is gone are taken over at once, not at their lease's end.
            await claims_repo.free_dead_claims(conn, now)
            events = await claims_repo.claim_due(
                conn, now, replayer._lease_ms, limit, replayer.holder
            )
            devices = {(e.user_id, e.device_id) for e in events}
            blobs = await tokens_repo.load_tokens(conn, devices)
        if not events:
            return 0
        if replayer.draining:
            # The drain began while this claim was on its way: give it back at once.
            await self._keeper.give_back([_ClaimKeeper._key(e) for e in events])
            return 0
        # The tokens and their counts go in together, with nothing awaited in between: an event
        # of the same device handled meanwhile must not drop the token just loaded.
        self._blobs.update(blobs)
        self._uses.update((e.user_id, e.device_id) for e in events)
        self._keeper.add(events, now)
        for event in events:
            self._queues.setdefault(event.room_id, deque()).append(event)
            if event.room_id not in self._rooms:
                self._rooms[event.room_id] = asyncio.create_task(self._work_room(event.room_id))
        return len(events)

    async def _wake_for_next(self) -> None:
        """Nothing more is due now: have the clock poke this run when the next event is."""
        try:
            next_due = await self._replayer.next_due()
        except Exception:
            logger.exception("looking up the next due event failed; the sweep finds it")
            return
        if next_due is not None:
            self._replayer.wake(next_due)

    async def _work_room(self, room_id: str) -> None:
        queue = self._queues[room_id]
        try:
            while queue:
                group = next_group(queue)
                if len(group) == 1:
                    await self._send(group[0], queue)
                else:
                    await asyncio.gather(*(self._send(event, queue) for event in group))
        finally:
            # Nothing awaits between finding the queue empty and leaving it: an event claimed
            # for this room meanwhile starts a new task.
            del self._queues[room_id]
            del self._rooms[room_id]
            self._changed.set()

    async def _send(self, event: DelayedEvent, upcoming: deque[DelayedEvent]) -> None:
        replayer = self._replayer
        handed_on = False
        try:
            if not await self._keeper.still_ours(event):
                return  # another replica took it over; it replays it from here
            credential = replayer._credential(event, self._blobs)
            newer_state = self._checks.take(event, upcoming)
            handed_on = await replayer._replay_on_timeout(
                event, credential, self._writer, newer_state, self._keeper
            )
        except Exception:
            # The claim's lease runs out and the row falls due again.
            logger.exception("replay of %s failed unexpectedly", log_id(event.delay_id))
        finally:
            if not handed_on:
                self._handled(event)


class _ClaimKeeper:
    """Keeps a run's claims alive while their events wait in their rooms' queues, wait for a
    request slot and are sent: every held claim's lease is renewed, in one statement, every
    third of the lease (on a timer, and whenever a request starts and a renewal is due), so no
    other replica takes over an event this run still means to send (which could send it twice,
    or after a later one of its room). A claim is known by (delay_id, claim_id): the same event
    claimed again after a lapse is another claim. Just before each send the event's own claim is
    checked in the table (`before_send`)."""

    def __init__(self, replayer: Replayer) -> None:
        self._replayer = replayer
        self._held: set[tuple[str, str]] = set()  # (delay_id, claim_id)
        # Held claims whose send got past `still_ours` in `before_send`: a drain leaves them to
        # finish.
        self._sending: set[tuple[str, str]] = set()
        self._renewed_at: int | None = None
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._held)

    @staticmethod
    def _key(event: DelayedEvent) -> tuple[str, str]:
        return event.delay_id, event.claim_id or ""

    def add(self, events: list[DelayedEvent], claimed_at: int) -> None:
        self._held.update(self._key(event) for event in events)
        if self._renewed_at is None:
            self._renewed_at = claimed_at
        if self._timer is None:
            self._timer = asyncio.create_task(self._renew_on_timer())

    def holds(self, delay_id: str) -> bool:
        return any(held == delay_id for held, _ in self._held)

    def done(self, event: DelayedEvent) -> None:
        self._held.discard(self._key(event))
        self._sending.discard(self._key(event))
        if not self._held:
            self._renewed_at = None

    async def still_ours(self, event: DelayedEvent) -> bool:
        """Whether the run still holds `event`'s claim (renewing every held claim if due)."""
        await self.renew_if_due()
        return self._key(event) in self._held

    async def before_send(self, event: DelayedEvent) -> bool:
        """Just before the request for `event`: whether its claim still holds the row, asked of
        the table (another replica may have taken it over, or this replica's lock may be gone),
        its lease renewed if so."""
        if not await self.still_ours(event):
            return False
        # Nothing is awaited between the check above and this: a drain either gave the claim
        # back before (not held) or leaves this send to finish.
        self._sending.add(self._key(event))
        replayer = self._replayer
        due_ts = replayer.clock.now_ms() + replayer._lease_ms
        async with replayer.engine.begin() as conn:
            held = await claims_repo.recheck_claim(conn, event, due_ts)
        if not held:
            self._held.discard(self._key(event))
        return held

    async def give_back(self, claims: Iterable[tuple[str, str]] | None = None) -> int:
        """Let go of `claims` (by default every held claim whose send has not reached
        `before_send`): their rows become free and due now, for any replica to take; how many
        rows were given back. From now on no send gets past `before_send` under a claim given
        back."""
        if claims is None:
            claims = self._held - self._sending
        given = sorted(claims)
        self._held.difference_update(given)
        if not self._held:
            self._renewed_at = None
        if not given:
            return 0
        replayer = self._replayer
        async with replayer.engine.begin() as conn:
            return await claims_repo.release_claims(conn, given, replayer.clock.now_ms())

    async def renew_if_due(self) -> None:
        if self._due_for_renewal():
            async with self._lock:
                if self._due_for_renewal():
                    await self._renew()

    async def _renew(self) -> None:
        replayer = self._replayer
        now = replayer.clock.now_ms()
        asked = sorted(self._held)
        async with replayer.engine.begin() as conn:
            kept = await claims_repo.renew_claims(conn, asked, now + replayer._lease_ms)
        # Claims added while the renewal was on its way are held all the same; claims let go of
        # meanwhile stay gone.
        self._held -= set(asked) - kept
        self._renewed_at = now

    async def _renew_on_timer(self) -> None:
        period = self._replayer._lease_ms / 3 / 1000
        while True:
            await asyncio.sleep(period)
            if not self._held:
                continue
            try:
                async with self._lock:
                    await self._renew()
            except Exception:
                logger.exception("renewing the leases of %d claimed events failed", len(self))

    def _due_for_renewal(self) -> bool:
        since = self._renewed_at
        lease = self._replayer._lease_ms
        return since is not None and self._replayer.clock.now_ms() - since >= lease // 3

    async def close(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer


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


def _cancelled_conflict() -> HomeserverError:
    return HomeserverError(
        409, {"errcode": "M_UNKNOWN", "error": "The delayed event was cancelled by newer state"}
    )


__all__ = ["CANCELLED_BY_STATE", "NEWER_STATE_ERROR", "Replayer", "TakenOver", "txn_id_for"]
