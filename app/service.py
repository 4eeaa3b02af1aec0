"""The rules of delayed events: schedule, restart, cancel, send, look up. One database transaction
per operation; the homeserver is only called by the send action and the replayer."""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app import metrics
from app import repository as repo
from app import repository_lookup as lookup_repo
from app import repository_tokens as tokens_repo
from app.auth import Requester
from app.clock import Clock
from app.crypto import TokenCipher
from app.delay_ids import DelayIds, Kind
from app.errors import (
    Conflict,
    Forbidden,
    InvalidParam,
    LimitExceeded,
    MatrixError,
    NotFound,
    StoredCredentialFailed,
)
from app.models import CANCELLED, FAILED, SCHEDULED, SENT, DelayedEvent, storable_text
from app.replayer import NEWER_STATE_ERROR, Replayer, TakenOver, token_context
from app.restarts import RecentSeals, RestartBatcher
from app.settings import Settings


class Action(StrEnum):
    SEND = "send"
    CANCEL = "cancel"
    RESTART = "restart"


_COUNTERS = {
    Action.SEND: metrics.SENT,
    Action.CANCEL: metrics.CANCELLED,
    Action.RESTART: metrics.RESTARTED,
}


class Status(StrEnum):
    SCHEDULED = "scheduled"
    FINALISED = "finalised"


@dataclass(frozen=True, slots=True)
class ScheduleRequest:
    generation: str  # "A" or "B"
    room_id: str
    event_type: str
    state_key: str | None
    content: str  # compact JSON object
    delay_ms: int
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
        replayer: Replayer,
        cipher: TokenCipher,
        clock: Clock,
        settings: Settings,
        wake_at: Callable[[int], None],
    ) -> None:
        self.engine = engine
        self.replayer = replayer
        self.cipher = cipher
        self.clock = clock
        self.settings = settings
        self._wake_at = wake_at
        self.restarts = RestartBatcher(engine, clock)
        self._seals = RecentSeals(cipher)
        self.delay_ids = DelayIds(settings.token_keys)
        # With an application service to act as users, their access tokens are not needed.
        self._keeps_tokens = settings.appservice_token is None

    # Scheduling --------------------------------------------------------------------------------

    def check_delay(self, delay_ms: int, generation: str) -> None:
        """Refuse a delay over the maximum, in the shape each generation's clients act on."""
        limit = self.settings.max_delay_ms
        # Beyond a bigint, a delay is over the maximum whatever the setting (it cannot be stored),
        # and too long to be worth repeating in the answer.
        beyond = delay_ms >= 2**63
        if delay_ms <= limit and not beyond:
            return
        requested = "" if beyond else f" ({delay_ms}ms)"
        message = f"The requested delay{requested} exceeds the allowed maximum ({limit}ms)"
        if generation == "B":
            raise Forbidden(message)
        raise MatrixError(
            message,
            status=400,
            errcode="M_UNKNOWN",
            extra={
                "org.matrix.msc4140.errcode": "M_MAX_DELAY_EXCEEDED",
                "org.matrix.msc4140.max_delay": limit,
                "max_delay": limit,
            },
        )

    async def schedule(self, requester: Requester, request: ScheduleRequest) -> str:
        """Store a delayed event and return its delay_id; a repeated transaction returns the
        first one's.

        Raises:
            LimitExceeded: the user has as many scheduled events as allowed.
        """
        self.check_delay(request.delay_ms, request.generation)
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
                raise self._too_many(earliest, now)
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
                delay_ms=request.delay_ms,
                created_ts=now,
                send_ts=now + request.delay_ms,
            )
            if self._keeps_tokens:
                await tokens_repo.store_token(conn, user, device, **self._sealed(requester, now))
        metrics.SCHEDULED.labels(request.generation, "ok").inc()
        self._wake_at(now + request.delay_ms)
        return delay_id

    def _too_many(self, earliest: int | None, now: int) -> LimitExceeded:
        message = "The maximum number of delayed events has been reached."
        if earliest is None or earliest <= now:
            return LimitExceeded(message)
        wait_ms = earliest - now
        return LimitExceeded(
            message,
            extra={"retry_after_ms": wait_ms},
            headers={"Retry-After": str(math.ceil(wait_ms / 1000))},
        )

    async def refresh_token(self, conn: AsyncConnection, requester: Requester) -> None:
        """Every authenticated request refreshes the token its device's events replay with."""
        if self._keeps_tokens:
            now = self.clock.now_ms()
            await tokens_repo.refresh_token(
                conn, requester.user_id, requester.device_id, **self._sealed(requester, now)
            )

    def _sealed(self, requester: Requester, now: int) -> dict[str, Any]:
        context = token_context(requester.user_id, requester.device_id)
        return {
            "token": self.cipher.encrypt(requester.token, context=context),
            "digest": self.cipher.digest(requester.token),
            "now": now,
        }

    # Management --------------------------------------------------------------------------------

    async def manage(
        self, requester: Requester | None, delay_id: str, action: Action, *, v1: bool
    ) -> None:
        """Apply `action` to a delayed event.

        With a requester, only their own events are found. On the unstable paths a finalised
        event is not found (as MatrixRTC expects); on v1, repeating what happened succeeds and
        anything else conflicts.

        Raises:
            NotFound, Conflict, HomeserverError (the send action's refusal).
        """
        generation = "B" if v1 else "A"
        if requester is None and self.delay_ids.kind(delay_id) is Kind.FORGED:
            # No event can have this id: refused before any database call.
            _COUNTERS[action].labels(generation, "refused").inc()
            raise NotFound("Delayed event not found")
        owner = requester.user_id if requester is not None else None
        now = self.clock.now_ms()
        if action is Action.RESTART:
            await self._restart(requester, delay_id, owner, v1=v1, now=now)
            return
        counter = metrics.SENT if action is Action.SEND else metrics.CANCELLED
        claimed: DelayedEvent | None = None
        async with self.engine.begin() as conn:
            if action is Action.CANCEL:
                done = await repo.cancel(conn, delay_id, owner, now)
            else:
                lease = int(self.settings.claim_lease_seconds * 1000)
                holder = self.replayer.holder
                claimed = await repo.claim_one(conn, delay_id, owner, now, lease, holder)
                done = claimed is not None
            if requester is not None:
                await self.refresh_token(conn, requester)
            existing = None if done else await repo.get(conn, delay_id)
        if not done:
            counter.labels(generation, "refused").inc()
            self._refuse(existing, owner, action, v1=v1, now=now)
            return
        if claimed is not None:
            try:
                await self.replayer.send_now(claimed)
            except StoredCredentialFailed as exc:
                # Finalised by the failure: answered as a repeat of the action would be now.
                if v1:
                    raise Conflict(exc.message) from None
                raise NotFound(exc.message) from None
            except TakenOver:
                # Another replica sends it (or has): answered as the action arriving now would be.
                async with self.engine.connect() as conn:
                    existing = await repo.get(conn, delay_id)
                counter.labels(generation, "refused").inc()
                self._refuse(existing, owner, action, v1=v1, now=now)
            return
        counter.labels(generation, "ok").inc()

    async def _restart(
        self, requester: Requester | None, delay_id: str, owner: str | None, *, v1: bool, now: int
    ) -> None:
        """The heartbeat: batched with the restarts arriving at the same time (app.restarts)."""
        generation = "B" if v1 else "A"
        token = None
        if requester is not None and self._keeps_tokens:
            token = self._seals.seal(requester.user_id, requester.device_id, requester.token)
        if await self.restarts.restart(delay_id, owner, token):
            metrics.RESTARTED.labels(generation, "ok").inc()
            return
        metrics.RESTARTED.labels(generation, "refused").inc()
        async with self.engine.connect() as conn:
            existing = await repo.get(conn, delay_id)
        self._refuse(existing, owner, Action.RESTART, v1=v1, now=now)

    @staticmethod
    def _refuse(
        event: DelayedEvent | None, owner: str | None, action: Action, *, v1: bool, now: int
    ) -> None:
        """Why an action did nothing: a 404, a 409, or (v1) a harmless repeat."""
        if event is None or (owner is not None and event.user_id != owner):
            raise NotFound("Delayed event not found")
        in_flight = event.status == SCHEDULED  # claimed by a replay that is sending it right now
        sent = event.status == SENT or in_flight
        cancelled = event.status in (CANCELLED, FAILED)
        if not v1:
            raise NotFound("Delayed event not found")
        if (action is Action.SEND and sent) or (action is Action.CANCEL and cancelled):
            return
        outcome = "sent" if sent else "cancelled"
        raise Conflict(f"The delayed event was already {outcome}")

    # Lookup ------------------------------------------------------------------------------------

    async def get(self, requester: Requester, delay_id: str) -> RenderedJSON:
        """One of the requester's events, scheduled or finalised. An event this replica is
        sending is shown once the send is over (bounded by the homeserver's timeout): an event
        the homeserver has accepted is never shown as still scheduled."""
        async with self.engine.begin() as conn:
            await self.refresh_token(conn, requester)
            event = await repo.get(conn, delay_id)
        if event is None or event.user_id != requester.user_id:
            raise NotFound("Delayed event not found")
        if event.status == SCHEDULED and event.claim_id is not None:
            await self.replayer.settle(delay_id, self.settings.homeserver_timeout_seconds)
            async with self.engine.connect() as conn:
                event = await repo.get(conn, delay_id) or event
        return RenderedJSON(render(event))

    async def list(
        self,
        requester: Requester,
        *,
        status: Status | None,
        delay_ids: list[str],
        from_token: str | None,
        limit: int,
    ) -> RenderedJSON:
        """A page of the requester's events: scheduled by send time, finalised newest first; at
        most `limit` of each, and no more once the page passes `PAGE_BYTES` (at least one)."""
        cursor = decode_cursor(from_token) if from_token else {}
        want_scheduled = status in (None, Status.SCHEDULED) and cursor.get("s") != "done"
        want_finalised = status in (None, Status.FINALISED) and cursor.get("f") != "done"
        scheduled = finalised = lookup_repo.Page([], more=False)
        async with self.engine.begin() as conn:
            await self.refresh_token(conn, requester)
            if want_scheduled:
                scheduled = await lookup_repo.list_scheduled(
                    conn,
                    requester.user_id,
                    delay_ids=delay_ids,
                    after=_position(cursor.get("s")),
                    limit=limit,
                    max_bytes=PAGE_BYTES // 2,  # its items are shown twice (two list names)
                )
            if want_finalised:
                finalised = await lookup_repo.list_finalised(
                    conn,
                    requester.user_id,
                    delay_ids=delay_ids,
                    after=_position(cursor.get("f")),
                    limit=limit,
                    max_bytes=PAGE_BYTES // 2,  # its items show their content twice
                )
        budget = _Budget(PAGE_BYTES)
        next_cursor: dict[str, Any] = {}
        scheduled_items = budget.take(scheduled, "s", cursor, next_cursor, lambda e: e.send_ts)
        finalised_items = budget.take(
            finalised, "f", cursor, next_cursor, lambda e: e.finalised_ts or 0, copies=1
        )
        items = "[" + ",".join(scheduled_items) + "]"
        parts = ['"delayed_events":' + items]
        if status in (None, Status.SCHEDULED):
            parts.append('"scheduled":' + items)  # the same items, rendered once
        if status in (None, Status.FINALISED):
            parts.append('"finalised":[' + ",".join(finalised_items) + "]")
        if budget.more:
            parts.append('"next_batch":' + json.dumps(encode_cursor(next_cursor)))
        return RenderedJSON("{" + ",".join(parts) + "}")

    # Newer state -------------------------------------------------------------------------------

    async def note_state_set(
        self, *, room_id: str, event_type: str, state_key: str, sender: str
    ) -> None:
        """A state event passed through to the homeserver: cancel other users' delayed state for
        the same key, when the rule is on."""
        if not self.settings.cancel_on_newer_state:
            return
        error = NEWER_STATE_ERROR
        async with self.engine.begin() as conn:
            cancelled = await repo.cancel_by_newer_state(
                conn,
                room_id=room_id,
                event_type=event_type,
                state_key=state_key,
                sender=sender,
                now=self.clock.now_ms(),
                error=error,
            )
        for _ in cancelled:
            metrics.CANCELLED.labels("A", "newer_state").inc()

    async def prune(self) -> int:
        """Forget finalised events past the retention age or the per-user count."""
        now = self.clock.now_ms()
        older_than = now - int(self.settings.finalised_retention_days * 86_400_000)
        async with self.engine.begin() as conn:
            return await repo.prune_finalised(
                conn, older_than=older_than, keep_per_user=self.settings.finalised_max_per_user
            )


# Rendering -------------------------------------------------------------------------------------

# A page of a lookup stops once its items pass this size: a page of 1,000 events of 64 KiB
# content would otherwise be read and rendered (about 100 MB) in one go, holding up every other
# request of the process meanwhile. 256 KiB keeps each page's hold on the event loop to a few
# milliseconds (docs/benchmarks.md, "Contention").
PAGE_BYTES = 1 << 18


@dataclass(frozen=True, slots=True)
class RenderedJSON:
    """A JSON document the service has rendered; the API sends it as it is."""

    text: str


class _Budget:
    """What is left of a page's size; its first item is always taken."""

    def __init__(self, size: int) -> None:
        self._left = size
        self._taken = 0
        self.more = False  # some list goes on after this page

    def take(
        self,
        page: lookup_repo.Page,
        key: str,
        cursor: dict[str, Any],
        next_cursor: dict[str, Any],
        position: Callable[[DelayedEvent], int],
        copies: int = 2,
    ) -> list[str]:
        """Render the events of `page` while the budget lasts (each shown `copies` times in the
        answer); set `next_cursor[key]` to where the list goes on (`done` when it is over)."""
        items: list[str] = []
        for event in page.events:
            if self._taken and self._left <= 0:
                break
            item = render(event)
            items.append(item)
            self._left -= copies * len(item)
            self._taken += 1
        more = page.more or len(items) < len(page.events)
        self.more = self.more or more
        if items:
            last = page.events[len(items) - 1]
            next_cursor[key] = [position(last), last.delay_id] if more else "done"
        elif not more:
            next_cursor[key] = "done"
        elif key in cursor:  # nothing of this list fitted: it goes on where it was
            next_cursor[key] = cursor[key]
        return items


def render(event: DelayedEvent) -> str:
    """An event as lookups show it, as JSON text: the union of the field names both generations
    use. The stored content (compact JSON) and error are spliced in as they are, never parsed,
    and a finalised event's scheduled fields are rendered once for the flat and nested copies."""
    fields: dict[str, Any] = {
        "delay_id": event.delay_id,
        "room_id": event.room_id,
        "type": event.event_type,
        "delay": event.delay_ms,
        "delay_ms": event.delay_ms,
        "running_since": event.running_since,
        "scheduled_at": event.running_since,
        "delayed_since_ts": event.running_since,
    }
    if event.state_key is not None:
        fields["state_key"] = event.state_key
    scheduled = _splice(fields, {"content": event.content})
    if event.status == SCHEDULED:
        return scheduled
    outcome: dict[str, Any] = {"finalised_ts": event.finalised_ts}
    if event.event_id is not None:
        outcome["event_id"] = event.event_id
    error = {"error": event.error} if event.error is not None else {}
    return _splice(
        {**fields, **outcome, "outcome": "send" if event.status == SENT else "cancel"},
        {
            "reason": json.dumps(event.reason),
            "content": event.content,
            **error,
            "finalised": _splice(outcome, error),
            "delayed_event": scheduled,
        },
    )


def _splice(fields: dict[str, Any], rendered: dict[str, str]) -> str:
    """A JSON object of `fields` and of members already rendered as JSON text."""
    members = [json.dumps(fields)[1:-1]] if fields else []
    members += [f"{json.dumps(name)}:{text}" for name, text in rendered.items()]
    return "{" + ",".join(members) + "}"


def encode_cursor(cursor: dict[str, Any]) -> str:
    raw = json.dumps(cursor, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        cursor = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidParam("Invalid 'from' token") from None
    if not isinstance(cursor, dict) or not all(
        v == "done" or _position(v) is not None for v in cursor.values()
    ):
        raise InvalidParam("Invalid 'from' token")
    return cursor


def _position(value: Any) -> tuple[int, str] | None:
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], int)
        and -(2**63) <= value[0] < 2**63
        and isinstance(value[1], str)
        and storable_text(value[1])
    ):
        return value[0], value[1]
    return None
