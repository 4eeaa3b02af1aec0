"""This replica's replay: a run started whenever something may be due (`app.replay.run`), the
drain when the replica shuts down, and what lookups and the clock ask of it."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from app import repository_claims as claims_repo
from app import repository_due as due_repo
from app.clock import Clock
from app.liveness import ReplicaLock
from app.replay.claims import ClaimKeeper
from app.replay.engine import ReplayEngine
from app.replay.run import Run
from app.replay.tokens import Credentials
from app.replay.wakeup import WakeUp
from app.settings import Settings


class ReplayRunner:
    """Starts a run when something may be due, and answers for the run going on."""

    def __init__(
        self,
        engine: AsyncEngine,
        replay: ReplayEngine,
        credentials: Credentials,
        clock: Clock,
        settings: Settings,
        wakeup: WakeUp,
        liveness: ReplicaLock | None,
    ) -> None:
        self._engine = engine
        self._replay = replay
        self._credentials = credentials
        self._clock = clock
        self._wakeup = wakeup
        self._max_claimed = settings.replay_max_claimed
        self.lease_ms = int(settings.claim_lease_seconds * 1000)
        # This replica's lock (`app.liveness`); its claims name it.
        self.liveness = liveness
        # Set once the replica is shutting down (`drain`): nothing more is claimed.
        self.draining = False
        self._run: Run | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def run(self) -> Run | None:
        """The run going on, if any."""
        return self._run

    @property
    def holder(self) -> int | None:
        """The key of the replica lock held now, which new claims name; None if none is held."""
        return self.liveness.key if self.liveness is not None else None

    def new_keeper(self) -> ClaimKeeper:
        """A keeper of claims with this replica's lease."""
        return ClaimKeeper(self._engine, self._clock, self.lease_ms)

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
        self._run = run = Run(
            self._engine,
            self._replay,
            self._credentials,
            self.new_keeper(),
            self._clock,
            self._wakeup,
            lease_ms=self.lease_ms,
            max_claimed=self._max_claimed,
            holder=lambda: self.holder,
            draining=lambda: self.draining,
            next_due=lambda: self.next_due(),
        )
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
        async with self._engine.connect() as conn:
            return await due_repo.next_due(conn, self._clock.now_ms(), self.holder)

    async def free_dead_claims(self) -> int:
        """Make the claims of replicas that are gone due now; how many."""
        async with self._engine.begin() as conn:
            return await claims_repo.free_dead_claims(conn, self._clock.now_ms())
