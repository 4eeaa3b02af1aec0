"""The statements behind readiness and the database gauges: each reads through an index, never
the whole table."""

from __future__ import annotations

import json

from sqlalchemy import func, literal, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from app.models import SCHEDULED, delayed_event

T = delayed_event.c


async def ping(conn: AsyncConnection) -> None:
    """A round trip to the database."""
    await conn.execute(text("SELECT 1"))


async def count_scheduled(conn: AsyncConnection, exact_up_to: int) -> int:
    """The scheduled events: an exact count up to `exact_up_to` (an index-only read of at most
    that many entries), beyond it the larger of that and the planner's estimate."""
    capped = select(literal(1)).where(T.status == SCHEDULED).limit(exact_up_to + 1)
    count = int(
        (await conn.execute(select(func.count()).select_from(capped.subquery()))).scalar_one()
    )
    if count > exact_up_to:
        count = max(count, await _estimated_scheduled(conn))
    return count


async def oldest_overdue_send_ts(conn: AsyncConnection, now: int, horizon_ms: int) -> int | None:
    """The earliest send time of a scheduled event overdue at `now`. An overdue row is due
    (`due_ts`, indexed for the scheduled rows) within `horizon_ms`, so only the rows due soon are
    read."""
    oldest = (
        await conn.execute(
            select(func.min(T.send_ts)).where(
                T.status == SCHEDULED, T.due_ts <= now + horizon_ms, T.send_ts <= now
            )
        )
    ).scalar_one()
    return None if oldest is None else int(oldest)


async def _estimated_scheduled(conn: AsyncConnection) -> int:
    """The planner's estimate of the scheduled rows (from the table's statistics, scaled to its
    current size), read from EXPLAIN: no row is read."""
    plan = (
        await conn.execute(
            text(
                "EXPLAIN (FORMAT JSON) SELECT 1 FROM delayed_event WHERE status = :status"
            ).bindparams(status=SCHEDULED)
        )
    ).scalar_one()
    if isinstance(plan, str):
        plan = json.loads(plan)
    return int(plan[0]["Plan"]["Plan Rows"])
