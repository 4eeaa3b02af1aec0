"""One run of the replay: claim what is due (one statement, with a lease), work it off room by
room, write the outcomes under the same claims. A replica that dies between the steps leaves
claims naming its replica lock (`app.liveness`), which a peer frees as soon as it sees the lock
gone (or, without a lock, a lease that runs out), and the row falls due again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from app import repository_claims as claims_repo
from app import repository_due as due_repo
from app import repository_tokens as tokens_repo
from app.clock import Clock
from app.homeserver import Credential
from app.models import DelayedEvent
from app.replay.claims import ClaimKeeper, claim_of
from app.replay.engine import ReplayEngine
from app.replay.order import next_group
from app.replay.outcomes import OutcomeWriter, log_id
from app.replay.state_checks import StateChecks
from app.replay.tokens import Credentials, Device
from app.replay.wakeup import WakeUp, wake_up_time

logger = logging.getLogger(__name__)


class Run:
    """One run: claims due events and works them off room by room, claiming more whenever it
    has room and something may have fallen due (`poke`), until nothing is due and nothing
    claimed is left.

    Each room has a queue, worked through by one task, in claim order (so in send-time order),
    group by group (`next_group`); rooms go side by side. It holds at most
    `SIDECAR_REPLAY_MAX_CLAIMED` claimed events (queued, being sent, or sent with the outcome not
    yet written), so a burst is claimed as it is worked off and the rest stays free for other
    replicas. The leases of everything it holds are kept alive (`ClaimKeeper`); the outcomes of
    sent events are written by one `OutcomeWriter`, and the run ends only once they are."""

    def __init__(
        self,
        engine: AsyncEngine,
        replay: ReplayEngine,
        credentials: Credentials,
        keeper: ClaimKeeper,
        clock: Clock,
        wakeup: WakeUp,
        *,
        lease_ms: int,
        max_claimed: int,
        holder: Callable[[], int | None],
        draining: Callable[[], bool],
        next_due: Callable[[], Awaitable[int | None]],
    ) -> None:
        self._engine = engine
        self._replay = replay
        self._credentials = credentials
        self._keeper = keeper
        self._clock = clock
        self._wakeup = wakeup
        self._lease_ms = lease_ms
        self._max_claimed = max_claimed
        self._holder = holder
        self._draining = draining
        self._next_due = next_due
        self._queues: dict[str, deque[DelayedEvent]] = {}
        self._rooms: dict[str, asyncio.Task[None]] = {}
        # The sealed tokens of the devices whose events are queued or being sent, and how many of
        # those each has: a run can go on as long as events keep falling due, so a device's
        # token is dropped as soon as none of its claimed events is left.
        self._sealed: dict[Device, bytes] = {}
        self._uses: Counter[Device] = Counter()
        self._changed = asyncio.Event()
        self._full = False
        self._claimed_at = 0
        self._writer = OutcomeWriter(engine, on_written=self._written)
        self._checks = StateChecks(replay, self._credential, keeper)
        # Lookups waiting for a held event to be handled (`settled`).
        self._waiters: dict[str, asyncio.Event] = {}

    def devices(self) -> set[Device]:
        """The devices whose sealed tokens the run holds now."""
        return set(self._sealed)

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

    def _credential(self, event: DelayedEvent) -> Credential | None:
        return self._credentials.open(event, self._sealed)

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
            self._sealed.pop(device, None)
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
        if self._draining():
            return 0
        now = self._clock.now_ms()
        self._claimed_at = now
        async with self._engine.begin() as conn:
            # The claims of a replica that is gone are taken over at once, not at their lease's end.
            await claims_repo.free_dead_claims(conn, now)
            events = await due_repo.claim_due(conn, now, self._lease_ms, limit, self._holder())
            devices = {(e.user_id, e.device_id) for e in events}
            sealed = await tokens_repo.load_tokens(conn, devices)
        if not events:
            return 0
        if self._draining():
            # The drain began while this claim was on its way: give it back at once.
            await self._keeper.give_back([claim_of(e) for e in events])
            return 0
        # The tokens and their counts go in together, with nothing awaited in between: an event
        # of the same device handled meanwhile must not drop the token just loaded.
        self._sealed.update(sealed)
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
            next_due = await self._next_due()
        except Exception:
            logger.exception("looking up the next due event failed; the sweep finds it")
            return
        if next_due is not None:
            self._wakeup.wake(wake_up_time(next_due, self._claimed_at, self._clock.now_ms()))

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
        handed_on = False
        try:
            if not await self._keeper.still_ours(event):
                return  # another replica took it over; it replays it from here
            credential = self._credential(event)
            newer_state = self._checks.take(event, upcoming)
            handed_on = await self._replay.send_due(
                event, credential, self._writer, newer_state, self._keeper
            )
        except Exception:
            # The claim's lease runs out and the row falls due again.
            logger.exception("replay of %s failed unexpectedly", log_id(event.delay_id))
        finally:
            if not handed_on:
                self._handled(event)
