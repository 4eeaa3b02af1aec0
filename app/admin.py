"""The operators' rules (`/_sidecar/admin/v1/` and `python -m app admin`): look up any user's or
room's delayed events, cancel them (one, a user's, a room's), purge a user's finalised history,
and see the scheduler's backlog. It needs the database alone, so the command line runs it with
nothing but `SIDECAR_DATABASE_URL`.

A cancel here is the owner's cancel: the event is finalised as `cancelled` with reason `action`,
the tokens no scheduled event needs any more are forgotten, and the cancellation is counted (with
outcome `admin`). An event being sent (a claim holds it) cannot be cancelled, as for its owner.
Every action is logged at INFO with what it did: counts and user, room and delay ids, never
content or tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics
from app import repository as repo
from app import repository_admin as admin_repo
from app import repository_tokens as tokens_repo
from app.clock import Clock
from app.cursors import decode_cursor, encode_cursor
from app.errors import Conflict, InvalidParam, NotFound
from app.models import CANCELLED, SCHEDULED, SENT
from app.replay import log_id
from app.repository_admin import ADMIN_STATUSES, SENDING, AdminEvent
from app.repository_admin import AdminFilter as AdminFilter  # re-exported for the API

logger = logging.getLogger(__name__)

# Rows cancelled per transaction: a room's thousands of events are not held locked at once.
CANCEL_BATCH = 500
FAILURE_WINDOW_MS = 3_600_000
DEFAULT_OVERDUE_MS = 60_000
_MAX_ERRCODES = 50
_MAX_ID_BYTES = 255


def status_of(event: AdminEvent) -> str:
    """An event's status as the admin API names it (ADMIN_STATUSES)."""
    if event.status == SCHEDULED:
        return SENDING if event.claimed else "scheduled"
    if event.status == SENT:
        return "sent"
    if event.status == CANCELLED and event.reason != "error":
        return "cancelled"
    return "failed"


def as_json(event: AdminEvent) -> dict[str, Any]:
    return {
        "delay_id": event.delay_id,
        "user_id": event.user_id,
        "device_id": event.device_id,
        "room_id": event.room_id,
        "type": event.event_type,
        "state_key": event.state_key,
        "status": status_of(event),
        "reason": event.reason,
        "delay_ms": event.delay_ms,
        "created_ts": event.created_ts,
        "send_ts": event.send_ts,
        "finalised_ts": event.finalised_ts,
        "attempts": event.attempts,
        "event_id": event.event_id,
        "errcode": event.errcode,
    }


def check_user_id(value: str) -> str:
    """A Matrix user id, as far as telling a typo goes; 400 M_INVALID_PARAM otherwise."""
    if not value.startswith("@") or ":" not in value or len(value.encode()) > _MAX_ID_BYTES:
        raise InvalidParam("user_id must be a Matrix user id (@name:server)")
    return value


def check_room_id(value: str) -> str:
    if not value.startswith("!") or len(value) < 2 or len(value.encode()) > _MAX_ID_BYTES:
        raise InvalidParam("room_id must be a Matrix room id (!id:server)")
    return value


def check_status(value: str) -> str:
    if value not in ADMIN_STATUSES:
        raise InvalidParam(f"status must be one of {', '.join(ADMIN_STATUSES)}")
    return value


def _position(token: str) -> tuple[int, str]:
    position = decode_cursor(token).get("a")
    if not isinstance(position, list):
        raise InvalidParam("Invalid 'from' token")
    return position[0], position[1]


@dataclass(frozen=True, slots=True)
class AdminService:
    engine: AsyncEngine
    clock: Clock

    async def list(
        self, where: AdminFilter, *, from_token: str | None, limit: int
    ) -> dict[str, Any]:
        """A page of the events matching `where` by send time, the counts of each status over
        all of them, and `next_batch` when more follow."""
        after = _position(from_token) if from_token is not None else None
        async with self.engine.connect() as conn:
            events, more = await admin_repo.list_events(conn, where, after=after, limit=limit)
            counts = await admin_repo.count_events(conn, where)
        answer: dict[str, Any] = {
            "delayed_events": [as_json(event) for event in events],
            "counts": {**counts, "total": sum(counts.values())},
        }
        if more and events:
            answer["next_batch"] = encode_cursor({"a": [events[-1].send_ts, events[-1].delay_id]})
        logger.info(
            "admin: listed %d delayed events (user %s, room %s, status %s)",
            len(events),
            where.user_id,
            where.room_id,
            where.status,
        )
        return answer

    async def cancel_one(self, delay_id: str) -> dict[str, Any]:
        """Cancel one scheduled event, whoever's it is.

        Raises:
            NotFound: no such event. Conflict: it is finalised already, or being sent."""
        now = self.clock.now_ms()
        async with self.engine.begin() as conn:
            done = await repo.cancel(conn, delay_id, None, now)
            event = await repo.get(conn, delay_id)
        if event is None:
            raise NotFound("Delayed event not found")
        if not done:
            state = "being sent" if event.status == SCHEDULED else f"already {event.status}"
            raise Conflict(f"The delayed event is {state}")
        metrics.CANCELLED.labels(event.generation, "admin").inc()
        logger.info(
            "admin: cancelled delayed event %s of user %s in room %s",
            log_id(delay_id),
            event.user_id,
            event.room_id,
        )
        return {"cancelled": 1}

    async def cancel_user(self, user_id: str) -> dict[str, Any]:
        """Cancel every scheduled event of a user (a deactivation); how many, and how many are
        being sent (not cancelled)."""
        answer = await self._cancel_all(user_id=user_id, room_id=None)
        logger.info(
            "admin: cancelled %d delayed events of user %s (%d being sent, left alone)",
            answer["cancelled"],
            user_id,
            answer["sending"],
        )
        return answer

    async def cancel_room(self, room_id: str) -> dict[str, Any]:
        """Cancel every scheduled event in a room (a ghost participant); as `cancel_user`."""
        answer = await self._cancel_all(user_id=None, room_id=room_id)
        logger.info(
            "admin: cancelled %d delayed events in room %s (%d being sent, left alone)",
            answer["cancelled"],
            room_id,
            answer["sending"],
        )
        return answer

    async def _cancel_all(self, *, user_id: str | None, room_id: str | None) -> dict[str, Any]:
        cancelled = 0
        while True:
            now = self.clock.now_ms()
            async with self.engine.begin() as conn:
                rows = await admin_repo.cancel_batch(
                    conn, user_id=user_id, room_id=room_id, now=now, limit=CANCEL_BATCH
                )
                await tokens_repo.forget_unused_tokens(
                    conn, ((user, device) for _, user, device, _ in rows)
                )
            for _, _, _, generation in rows:
                metrics.CANCELLED.labels(generation, "admin").inc()
            cancelled += len(rows)
            if len(rows) < CANCEL_BATCH:
                break
        async with self.engine.connect() as conn:
            counts = await admin_repo.count_events(
                conn, AdminFilter(user_id=user_id, room_id=room_id)
            )
        return {"cancelled": cancelled, "sending": counts[SENDING]}

    async def purge_user(self, user_id: str) -> dict[str, Any]:
        """Delete a user's finalised history (an erasure request), and any token none of their
        events needs. Scheduled events stay: cancel them first to erase everything."""
        async with self.engine.begin() as conn:
            purged = await admin_repo.purge_finalised(conn, user_id)
            await tokens_repo.forget_unused_tokens(
                conn, await admin_repo.stored_devices(conn, user_id)
            )
            counts = await admin_repo.count_events(conn, AdminFilter(user_id=user_id))
        remaining = counts["scheduled"] + counts[SENDING]
        logger.info(
            "admin: purged %d finalised delayed events of user %s (%d still scheduled)",
            purged,
            user_id,
            remaining,
        )
        return {"purged": purged, "scheduled": remaining}

    async def stats(self, *, overdue_ms: int = DEFAULT_OVERDUE_MS) -> dict[str, Any]:
        """The backlog: scheduled events, those being sent, those due now (their send time has
        come), those overdue (due for more than `overdue_ms`) and the age of the oldest of these,
        and the failures of the last hour by errcode."""
        now = self.clock.now_ms()
        async with self.engine.connect() as conn:
            backlog = await admin_repo.backlog(conn, now=now, overdue_before=now - overdue_ms)
            failures = await admin_repo.failures_by_errcode(
                conn, since=now - FAILURE_WINDOW_MS, limit=_MAX_ERRCODES
            )
        oldest = backlog.oldest_send_ts
        logger.info("admin: read the stats")
        return {
            "scheduled": backlog.scheduled,
            "sending": backlog.sending,
            "due_now": backlog.due_now,
            "overdue": backlog.overdue,
            "overdue_after_ms": overdue_ms,
            "oldest_overdue_ms": now - oldest if oldest is not None else None,
            "failures_last_hour": failures,
        }
