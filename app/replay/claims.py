"""The claims a replica holds while it sends their events, kept alive until their outcomes are
written."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from sqlalchemy.ext.asyncio import AsyncEngine

from app import repository_claims as claims_repo
from app.clock import Clock
from app.models import DelayedEvent

logger = logging.getLogger(__name__)

# A claim: (delay_id, claim_id). The same event claimed again after a lapse is another claim.
Claim = tuple[str, str]


def claim_of(event: DelayedEvent) -> Claim:
    return event.delay_id, event.claim_id or ""


class ClaimKeeper:
    """Keeps claims alive while their events wait in their rooms' queues, wait for a request
    slot and are sent: every held claim's lease is renewed, in one statement, every third of the
    lease (on a timer, and whenever a request starts and a renewal is due), so no other replica
    takes over an event this replica still means to send (which could send it twice, or after a
    later one of its room). Just before each send the event's own claim is checked in the table
    (`before_send`)."""

    def __init__(self, engine: AsyncEngine, clock: Clock, lease_ms: int) -> None:
        self._engine = engine
        self._clock = clock
        self._lease_ms = lease_ms
        self._held: set[Claim] = set()
        # Held claims whose send got past `still_ours` in `before_send`: a drain leaves them to
        # finish.
        self._sending: set[Claim] = set()
        self._renewed_at: int | None = None
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._held)

    def add(self, events: list[DelayedEvent], claimed_at: int) -> None:
        self._held.update(claim_of(event) for event in events)
        if self._renewed_at is None:
            self._renewed_at = claimed_at
        if self._timer is None:
            self._timer = asyncio.create_task(self._renew_on_timer())

    def holds(self, delay_id: str) -> bool:
        return any(held == delay_id for held, _ in self._held)

    def done(self, event: DelayedEvent) -> None:
        self._held.discard(claim_of(event))
        self._sending.discard(claim_of(event))
        if not self._held:
            self._renewed_at = None

    async def still_ours(self, event: DelayedEvent) -> bool:
        """Whether `event`'s claim is still held (renewing every held claim if due)."""
        await self.renew_if_due()
        return claim_of(event) in self._held

    async def before_send(self, event: DelayedEvent) -> bool:
        """Just before the request for `event`: whether its claim still holds the row, asked of
        the table (another replica may have taken it over, or this replica's lock may be gone),
        its lease renewed if so."""
        if not await self.still_ours(event):
            return False
        # Nothing is awaited between the check above and this: a drain either gave the claim
        # back before (not held) or leaves this send to finish.
        self._sending.add(claim_of(event))
        due_ts = self._clock.now_ms() + self._lease_ms
        async with self._engine.begin() as conn:
            held = await claims_repo.recheck_claim(conn, event, due_ts)
        if not held:
            self._held.discard(claim_of(event))
        return held

    async def give_back(self, claims: Iterable[Claim] | None = None) -> int:
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
        async with self._engine.begin() as conn:
            return await claims_repo.release_claims(conn, given, self._clock.now_ms())

    async def renew_if_due(self) -> None:
        if self._due_for_renewal():
            async with self._lock:
                if self._due_for_renewal():
                    await self._renew()

    async def _renew(self) -> None:
        now = self._clock.now_ms()
        asked = sorted(self._held)
        async with self._engine.begin() as conn:
            kept = await claims_repo.renew_claims(conn, asked, now + self._lease_ms)
        # Claims added while the renewal was on its way are held all the same; claims let go of
        # meanwhile stay gone.
        self._held -= set(asked) - kept
        self._renewed_at = now

    async def _renew_on_timer(self) -> None:
        period = self._lease_ms / 3 / 1000
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
        return since is not None and self._clock.now_ms() - since >= self._lease_ms // 3

    async def close(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
