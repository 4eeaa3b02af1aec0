"""The rules of delayed events: schedule, restart, cancel, send. One database transaction per
operation; the homeserver is only called by the send action and the replay run. Refusals are the
errors of `app.domain`; the API decides how they look. Lookups are `app.lookups`."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import metrics
from app import repository as repo
from app import repository_tokens as tokens_repo
from app.auth import Requester
from app.clock import Clock
from app.delay_ids import DelayIds, Kind
from app.domain import (
    Action,
    AlreadyFinalised,
    CredentialFailed,
    EventNotFound,
    Generation,
    MaxDelayExceeded,
    SendFailed,
    TooMany,
)
from app.errors import HomeserverError, StoredCredentialFailed
from app.models import CANCELLED, FAILED, SCHEDULED, SENT, DelayedEvent
from app.replay import (
    NEWER_STATE_ERROR,
    CancelledByNewerState,
    Credentials,
    ReplayRunner,
    SendAction,
    TakenOver,
)
from app.restarts import RestartBatcher
from app.settings import Settings

_COUNTERS = {
    Action.SEND: metrics.SENT,
    Action.CANCEL: metrics.CANCELLED,
    Action.RESTART: metrics.RESTARTED,
}


@dataclass(frozen=True, slots=True)
class AllowedDelay:
    """A delay within the maximum: made by `DelayedEventService.check_delay`, once a request."""

    ms: int


@dataclass(frozen=True, slots=True)
class ScheduleRequest:
    generation: Generation
    room_id: str
    event_type: str
    state_key: str | None
    content: str  # compact JSON object
    delay: AllowedDelay
    query: str
    txn_key: str | None


def new_delay_id(ids: DelayIds) -> str:
    """An opaque, url-safe id with 144 random bits and a keyed tag (`app.delay_ids`): holding it
    is what lets a tokenless call act."""
    return ids.new()


class DelayedEventService:
    def __init__(
        self,
        engine: AsyncEngine,
        replay: ReplayRunner,
        send_action: SendAction,
        credentials: Credentials,
        clock: Clock,
        settings: Settings,
        wake_at: Callable[[int], None],
    ) -> None:
        self.engine = engine
        self.replay = replay
        self.send_action = send_action
        self.credentials = credentials
        self.clock = clock
        self.settings = settings
        self._wake_at = wake_at
        self.restarts = RestartBatcher(engine, clock)
        self.delay_ids = DelayIds(settings.token_keys)
        # With an application service to act as users, their access tokens are not needed.
        self._keeps_tokens = settings.appservice_token is None

    # Scheduling --------------------------------------------------------------------------------

    def check_delay(self, delay_ms: int) -> AllowedDelay:
        """The delay, if it is within the maximum.

        Raises:
            MaxDelayExceeded: it is not.
        """
        limit = self.settings.max_delay_ms
        # Beyond a bigint, a delay is over the maximum whatever the setting (it cannot be stored),
        # and too long to be worth repeating in the answer.
        beyond = delay_ms >= 2**63
        if delay_ms <= limit and not beyond:
            return AllowedDelay(delay_ms)
        raise MaxDelayExceeded(None if beyond else delay_ms, limit)

    async def schedule(self, requester: Requester, request: ScheduleRequest) -> str:
        """Store a delayed event and return its delay_id; a repeated transaction returns the
        first one's.

        Raises:
            TooMany: the user has as many scheduled events as allowed.
        """
        delay_ms = request.delay.ms
        now = self.clock.now_ms()
        user, device = requester.user_id, requester.device_id
        async with self.engine.begin() as conn:
            await repo.lock_user(conn, user)
            if request.txn_key is not None:
                existing = await repo.find_by_txn(conn, user, device, request.txn_key)
                if existing is not None:
                    await self.refresh_token(conn, requester)
                    metrics.SCHEDULED.labels(request.generation, "repeat").inc()
                    return existing
            count, earliest = await repo.count_scheduled(conn, user)
            if count >= self.settings.max_scheduled_per_user:
                metrics.SCHEDULED.labels(request.generation, "limited").inc()
                due_in = earliest - now if earliest is not None else 0
                raise TooMany(due_in if due_in > 0 else None)
            delay_id = new_delay_id(self.delay_ids)
            await repo.insert_event(
                conn,
                delay_id=delay_id,
                user_id=user,
                device_id=device,
                txn_key=request.txn_key,
                generation=request.generation,
                room_id=request.room_id,
                event_type=request.event_type,
                state_key=request.state_key,
                content=request.content,
                query=request.query,
                delay_ms=delay_ms,
                created_ts=now,
                send_ts=now + delay_ms,
            )
            if self._keeps_tokens:
                sealed = self.credentials.seal(requester)
                await tokens_repo.store_token(
                    conn, user, device, token=sealed.token, digest=sealed.digest, now=now
                )
        metrics.SCHEDULED.labels(request.generation, "ok").inc()
        self._wake_at(now + delay_ms)
        return delay_id

    async def refresh_token(self, conn: AsyncConnection, requester: Requester) -> None:
        """Every authenticated request refreshes the token its device's events replay with."""
        if self._keeps_tokens:
            now = self.clock.now_ms()
            sealed = self.credentials.seal(requester)
            await tokens_repo.refresh_token(
                conn,
                requester.user_id,
                requester.device_id,
                token=sealed.token,
                digest=sealed.digest,
                now=now,
            )

    # Management --------------------------------------------------------------------------------

    async def manage(
        self, requester: Requester | None, delay_id: str, action: Action, generation: Generation
    ) -> None:
        """Apply `action` to a delayed event.

        With a requester, only their own events are found. Generation B's actions are
        idempotent: repeating what happened to a finalised event succeeds.

        Raises:
            EventNotFound, AlreadyFinalised, CredentialFailed, SendFailed (the send action's).
        """
        if requester is None and self.delay_ids.kind(delay_id) is Kind.FORGED:
            # No event can have this id: refused before any database call.
            _COUNTERS[action].labels(generation, "refused").inc()
            raise EventNotFound()
        owner = requester.user_id if requester is not None else None
        now = self.clock.now_ms()
        if action is Action.RESTART:
            await self._restart(requester, delay_id, owner, generation, now=now)
            return
        counter = metrics.SENT if action is Action.SEND else metrics.CANCELLED
        claimed: DelayedEvent | None = None
        async with self.engine.begin() as conn:
            if action is Action.CANCEL:
                done = await repo.cancel(conn, delay_id, owner, now)
            else:
                lease = int(self.settings.claim_lease_seconds * 1000)
                holder = self.send_action.holder
                claimed = await repo.claim_one(conn, delay_id, owner, now, lease, holder)
                done = claimed is not None
            if requester is not None:
                await self.refresh_token(conn, requester)
            existing = None if done else await repo.get(conn, delay_id)
        if not done:
            counter.labels(generation, "refused").inc()
            self._refuse(existing, owner, action, generation)
            return
        if claimed is not None:
            try:
                await self.send_action.send(claimed)
            except StoredCredentialFailed as exc:
                # Finalised by the failure: answered as a repeat of the action would be now.
                raise CredentialFailed(exc.message) from None
            except CancelledByNewerState:
                # Finalised as cancelled: answered as any action on a cancelled event is.
                raise AlreadyFinalised("cancelled") from None
            except HomeserverError as exc:
                raise SendFailed(exc.status, exc.body(), exc.headers) from None
            except TakenOver:
                # Another replica sends it (or has): answered as the action arriving now would be.
                async with self.engine.connect() as conn:
                    existing = await repo.get(conn, delay_id)
                counter.labels(generation, "refused").inc()
                self._refuse(existing, owner, action, generation)
            return
        counter.labels(generation, "ok").inc()

    async def _restart(
        self,
        requester: Requester | None,
        delay_id: str,
        owner: str | None,
        generation: Generation,
        *,
        now: int,
    ) -> None:
        """The heartbeat: batched with the restarts arriving at the same time (app.restarts)."""
        token = None
        if requester is not None and self._keeps_tokens:
            token = self.credentials.seal(requester)
        if await self.restarts.restart(delay_id, owner, token):
            metrics.RESTARTED.labels(generation, "ok").inc()
            return
        metrics.RESTARTED.labels(generation, "refused").inc()
        async with self.engine.connect() as conn:
            existing = await repo.get(conn, delay_id)
        self._refuse(existing, owner, Action.RESTART, generation)

    @staticmethod
    def _refuse(
        event: DelayedEvent | None, owner: str | None, action: Action, generation: Generation
    ) -> None:
        """Why an action did nothing: not found, already finalised, or (B) a harmless repeat."""
        if event is None or (owner is not None and event.user_id != owner):
            raise EventNotFound()
        in_flight = event.status == SCHEDULED  # claimed by a replay that is sending it right now
        sent = event.status == SENT or in_flight
        cancelled = event.status in (CANCELLED, FAILED)
        repeated = (action is Action.SEND and sent) or (action is Action.CANCEL and cancelled)
        if repeated and generation is Generation.B:
            return
        raise AlreadyFinalised("sent" if sent else "cancelled")

    # Newer state -------------------------------------------------------------------------------

    async def note_state_set(
        self,
        *,
        room_id: str,
        event_type: str,
        state_key: str,
        sender: str,
        acting_as: Collection[str] = (),
    ) -> None:
        """A state event passed through to the homeserver: cancel other users' delayed state for
        the same key, when the rule is on. `sender` owns the request's token; `acting_as` are the
        users it may have been sent as instead (an application service's `user_id`): none of
        their own delayed state is cancelled."""
        if not self.settings.cancel_on_newer_state:
            return
        error = NEWER_STATE_ERROR
        async with self.engine.begin() as conn:
            cancelled = await repo.cancel_by_newer_state(
                conn,
                room_id=room_id,
                event_type=event_type,
                state_key=state_key,
                senders={sender, *acting_as},
                now=self.clock.now_ms(),
                error=error,
            )
        for _ in cancelled:
            metrics.CANCELLED.labels(Generation.A, "newer_state").inc()

    async def prune(self) -> int:
        """Forget finalised events past the retention age or the per-user count."""
        now = self.clock.now_ms()
        older_than = now - int(self.settings.finalised_retention_days * 86_400_000)
        async with self.engine.begin() as conn:
            return await repo.prune_finalised(
                conn, older_than=older_than, keep_per_user=self.settings.finalised_max_per_user
            )
