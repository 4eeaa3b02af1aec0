"""The statements behind the lookups of a user's own events (GET of the scheduled and finalised
lists), and the size-bounded page the bulk lookup (app/repository_history.py) shares. Like
app.repository, they take a connection inside the caller's transaction and never commit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.models import EVENT_COLUMNS, SCHEDULED, DelayedEvent, delayed_event, event_from_row

T = delayed_event.c


@dataclass(frozen=True, slots=True)
class Page:
    """A page of a lookup: the events, in order, and whether more come after them."""

    events: list[DelayedEvent]
    more: bool


def _stored_size() -> Any:
    """What a row's content and error take as stored (read from the row's header: nothing is
    decompressed or fetched for it)."""
    return func.octet_length(T.content) + func.coalesce(func.octet_length(T.error), 0)


async def bounded_page(
    conn: AsyncConnection, where: list[Any], order: tuple[Any, ...], limit: int, max_bytes: int
) -> Page:
    """Up to `limit` rows matching `where` in `order`, cut once their stored content and errors
    reach `max_bytes` (at least one row): first the sizes alone, then only the rows kept, so a
    page over large contents never reads more than it shows."""
    sized = (
        await conn.execute(
            select(T.delay_id, _stored_size()).where(*where).order_by(*order).limit(limit + 1)
        )
    ).all()
    kept: list[str] = []
    total = 0
    for delay_id, size in sized[:limit]:
        if kept and total >= max_bytes:
            break
        kept.append(delay_id)
        total += size
    if not kept:
        return Page([], more=False)
    result = await conn.execute(
        select(*EVENT_COLUMNS).where(*where, T.delay_id.in_(kept)).order_by(*order)
    )
    return Page([event_from_row(row) for row in result], more=len(kept) < len(sized))


async def list_scheduled(
    conn: AsyncConnection,
    user_id: str,
    *,
    delay_ids: list[str],
    after: tuple[int, str] | None,
    limit: int,
    max_bytes: int,
) -> Page:
    """A user's scheduled events by send time, after the keyset position `after`: at most
    `limit`, and no more once their content reaches `max_bytes`. An event a claim holds is being
    sent (the homeserver may have it already): it is not listed."""
    where = [T.user_id == user_id, T.status == SCHEDULED, T.claim_id.is_(None)]
    if delay_ids:
        where.append(T.delay_id.in_(delay_ids))
    if after is not None:
        where.append(or_(T.send_ts > after[0], and_(T.send_ts == after[0], T.delay_id > after[1])))
    return await bounded_page(conn, where, (T.send_ts, T.delay_id), limit, max_bytes)


async def list_finalised(
    conn: AsyncConnection,
    user_id: str,
    *,
    delay_ids: list[str],
    after: tuple[int, str] | None,
    limit: int,
    max_bytes: int,
) -> Page:
    """A user's finalised events, newest first, after the keyset position `after`: at most
    `limit`, and no more once their content and errors reach `max_bytes`."""
    where = [T.user_id == user_id, T.status != SCHEDULED]
    if delay_ids:
        where.append(T.delay_id.in_(delay_ids))
    if after is not None:
        where.append(
            or_(
                T.finalised_ts < after[0],
                and_(T.finalised_ts == after[0], T.delay_id > after[1]),
            )
        )
    return await bounded_page(conn, where, (T.finalised_ts.desc(), T.delay_id), limit, max_bytes)
