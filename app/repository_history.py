"""The statement behind the bulk lookup (MSC4486): a user's delayed events, scheduled and finalised
together, in order of intended send time, read through `ix_delayed_event_user_send`. Like
app.repository, it takes a connection inside the caller's transaction and never commits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, and_, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from app.models import CANCELLED, EVENT_COLUMNS, FAILED, SCHEDULED, SENT, delayed_event
from app.repository_lookup import Page, bounded_page

T = delayed_event.c

# What each MSC4486 status is in stored terms. A row cancelled with reason "error" (newer state)
# counts as failed, like one the homeserver refused; "cancelled" is the cancel action only.
# An event a claim holds is being sent (the homeserver may have it already): it is not listed
# as scheduled, nor at all until its outcome is written.
_UNCLAIMED = or_(T.status != SCHEDULED, T.claim_id.is_(None))
_STATUS: dict[str, Any] = {
    "scheduled": and_(T.status == SCHEDULED, T.claim_id.is_(None)),
    "sent": T.status == SENT,
    "cancelled": and_(T.status == CANCELLED, T.reason.is_distinct_from("error")),
    "failed": or_(T.status == FAILED, and_(T.status == CANCELLED, T.reason == "error")),
}
STATUSES = tuple(_STATUS)


def status_condition(status: str) -> Any:
    """The stored rows an MSC4486 status (one of STATUSES) stands for."""
    return _STATUS[status]


@dataclass(frozen=True, slots=True)
class HistoryFilter:
    """Which of a user's events, and which way. `from_ts` is inclusive, `to_ts` exclusive; both
    bound the send time whatever the direction."""

    user_id: str
    status: str | None = None
    room_id: str | None = None
    event_type: str | None = None
    from_ts: int | None = None
    to_ts: int | None = None
    backwards: bool = False


async def list_history(
    conn: AsyncConnection,
    where: HistoryFilter,
    *,
    after: tuple[int, str] | None,
    limit: int,
    max_bytes: int,
) -> Page:
    """Up to `limit` events matching `where`, by (send_ts, delay_id) ascending (descending when
    `backwards`), strictly past the keyset position `after`, and no more once their stored
    content and errors reach `max_bytes` (at least one)."""
    conditions, order = _conditions(where, after)
    return await bounded_page(conn, conditions, order, limit, max_bytes)


def history_statement(
    where: HistoryFilter, *, after: tuple[int, str] | None, limit: int
) -> Select[Any]:
    """The SELECT that orders and filters a page of `list_history` (the tests EXPLAIN it)."""
    conditions, order = _conditions(where, after)
    return select(*EVENT_COLUMNS).where(*conditions).order_by(*order).limit(limit)


def _conditions(
    where: HistoryFilter, after: tuple[int, str] | None
) -> tuple[list[Any], tuple[Any, ...]]:
    conditions: list[Any] = [T.user_id == where.user_id]
    conditions.append(_STATUS[where.status] if where.status is not None else _UNCLAIMED)
    if where.room_id is not None:
        conditions.append(T.room_id == where.room_id)
    if where.event_type is not None:
        conditions.append(T.event_type == where.event_type)
    if where.from_ts is not None:
        conditions.append(T.send_ts >= where.from_ts)
    if where.to_ts is not None:
        conditions.append(T.send_ts < where.to_ts)
    position = tuple_(T.send_ts, T.delay_id)
    if after is not None:
        mark = tuple_(*after)
        conditions.append(position < mark if where.backwards else position > mark)
    if where.backwards:
        return conditions, (T.send_ts.desc(), T.delay_id.desc())
    return conditions, (T.send_ts, T.delay_id)
