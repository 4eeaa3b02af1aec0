"""The statements of the operators' admin API (app/admin.py): any user's or room's delayed events,
listed without their content, cancelled in bulk, their finalised history purged, and the
scheduler's backlog counted. Like app.repository, it takes a connection inside the caller's
transaction and never commits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.models import CANCELLED, SCHEDULED, delayed_event, device_token
from app.repository_history import STATUSES, status_condition

T = delayed_event.c

# An event a claim holds is being sent: the homeserver may have it already, so it can no longer
# be cancelled (its outcome is written when the send is over).
SENDING = "sending"
ADMIN_STATUSES = (*STATUSES, SENDING)

_CONDITIONS: dict[str, Any] = {
    **{status: status_condition(status) for status in STATUSES},
    SENDING: and_(T.status == SCHEDULED, T.claim_id.isnot(None)),
}

# The errcode of a stored error (the homeserver's answer, or the sidecar's own, as JSON text),
# read without parsing it: a row whose error is not JSON is shown without one.
_ERRCODE = func.substring(T.error, r'"errcode" *: *"([^"\\]{1,128})"')


@dataclass(frozen=True, slots=True)
class AdminEvent:
    """A delayed event as operators see it: where and when, never its content."""

    delay_id: str
    user_id: str
    device_id: str | None
    room_id: str
    event_type: str
    state_key: str | None
    status: str
    reason: str | None
    claimed: bool
    delay_ms: int
    created_ts: int
    send_ts: int
    finalised_ts: int | None
    attempts: int
    event_id: str | None
    errcode: str | None


_COLUMNS = (
    T.delay_id,
    T.user_id,
    T.device_id,
    T.room_id,
    T.event_type,
    T.state_key,
    T.status,
    T.reason,
    T.claim_id.isnot(None),
    T.delay_ms,
    T.created_ts,
    T.send_ts,
    T.finalised_ts,
    T.attempts,
    T.event_id,
    _ERRCODE,
)


@dataclass(frozen=True, slots=True)
class AdminFilter:
    """Which events: a user's, a room's, both or all, of one status (ADMIN_STATUSES) or any."""

    user_id: str | None = None
    room_id: str | None = None
    status: str | None = None


def _where(where: AdminFilter) -> list[Any]:
    conditions: list[Any] = []
    if where.user_id is not None:
        conditions.append(T.user_id == where.user_id)
    if where.room_id is not None:
        conditions.append(T.room_id == where.room_id)
    if where.status is not None:
        conditions.append(_CONDITIONS[where.status])
    return conditions


async def list_events(
    conn: AsyncConnection, where: AdminFilter, *, after: tuple[int, str] | None, limit: int
) -> tuple[list[AdminEvent], bool]:
    """Up to `limit` events matching `where` by (send_ts, delay_id), strictly after the keyset
    position `after`; and whether more follow."""
    conditions = _where(where)
    if after is not None:
        conditions.append(tuple_(T.send_ts, T.delay_id) > tuple_(*after))
    result = await conn.execute(
        select(*_COLUMNS).where(*conditions).order_by(T.send_ts, T.delay_id).limit(limit + 1)
    )
    events = [AdminEvent(*row) for row in result]
    return events[:limit], len(events) > limit


async def count_events(conn: AsyncConnection, where: AdminFilter) -> dict[str, int]:
    """How many events of each status match `where` (its own status aside)."""
    conditions = _where(AdminFilter(user_id=where.user_id, room_id=where.room_id))
    counts = [
        func.count().filter(condition).label(status) for status, condition in _CONDITIONS.items()
    ]
    row = (await conn.execute(select(*counts).select_from(delayed_event).where(*conditions))).one()
    return {status: int(row._mapping[status]) for status in _CONDITIONS}


async def cancel_batch(
    conn: AsyncConnection, *, user_id: str | None, room_id: str | None, now: int, limit: int
) -> list[tuple[str, str, str | None, str]]:
    """Finalise up to `limit` scheduled events of a user or a room that no claim holds as
    cancelled by action, as the owner's cancel does, rows taken in key order; the (delay_id,
    user_id, device_id, generation) of each. The caller forgets the tokens no longer needed."""
    chosen = (
        select(T.delay_id)
        .where(
            T.status == SCHEDULED,
            T.claim_id.is_(None),
            *_where(AdminFilter(user_id=user_id, room_id=room_id)),
        )
        .order_by(T.delay_id)
        .limit(limit)
        .with_for_update()
        .cte("chosen")
    )
    result = await conn.execute(
        update(delayed_event)
        .where(T.delay_id == chosen.c.delay_id, T.status == SCHEDULED, T.claim_id.is_(None))
        .values(status=CANCELLED, reason="action", finalised_ts=now, due_ts=None, claim_id=None)
        .returning(T.delay_id, T.user_id, T.device_id, T.generation)
    )
    return [(row.delay_id, row.user_id, row.device_id, row.generation) for row in result]


async def purge_finalised(conn: AsyncConnection, user_id: str) -> int:
    """Delete every finalised event of a user; how many."""
    result = await conn.execute(
        delete(delayed_event).where(T.user_id == user_id, T.status != SCHEDULED)
    )
    return int(result.rowcount)


async def stored_devices(conn: AsyncConnection, user_id: str) -> list[tuple[str, str]]:
    """The (user, device) of each token stored for a user."""
    D = device_token.c
    result = await conn.execute(select(D.user_id, D.device_id).where(D.user_id == user_id))
    return [(row.user_id, row.device_id) for row in result]


@dataclass(frozen=True, slots=True)
class Backlog:
    scheduled: int
    sending: int
    due_now: int
    overdue: int
    oldest_send_ts: int | None  # of the overdue events


async def backlog(conn: AsyncConnection, *, now: int, overdue_before: int) -> Backlog:
    """The scheduled events: all, those being sent, those whose send time has come
    (`send_ts <= now`), and those overdue (`send_ts < overdue_before`) with the earliest send
    time among them."""
    scheduled = T.status == SCHEDULED
    overdue = T.send_ts < overdue_before
    row = (
        await conn.execute(
            select(
                func.count(),
                func.count().filter(T.claim_id.isnot(None)),
                func.count().filter(T.send_ts <= now),
                func.count().filter(overdue),
                func.min(T.send_ts).filter(overdue),
            ).where(scheduled)
        )
    ).one()
    return Backlog(int(row[0]), int(row[1]), int(row[2]), int(row[3]), row[4])


async def failures_by_errcode(conn: AsyncConnection, *, since: int, limit: int) -> dict[str, int]:
    """How many events failed (MSC4486's `failed`) since `since`, by errcode, the `limit`
    commonest; "unknown" for an error without one."""
    errcode = func.coalesce(_ERRCODE, "unknown").label("errcode")
    result = await conn.execute(
        select(errcode, func.count().label("n"))
        .where(status_condition("failed"), T.finalised_ts >= since)
        .group_by(errcode)
        .order_by(func.count().desc(), errcode)
        .limit(limit)
    )
    return {row.errcode: int(row.n) for row in result}
