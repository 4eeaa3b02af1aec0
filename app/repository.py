"""The statements of the delayed events as their owners drive them: scheduling, restarting,
cancelling and the send action's claim, cancellation by newer state, and pruning. The statements
of the replays are in app/repository_claims.py, of the device tokens in
app/repository_tokens.py, of the lookups in app/repository_lookup.py. Functions take a connection
inside the caller's transaction and never commit: the caller's unit of work does."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import and_, delete, func, insert, literal_column, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app import repository_tokens as tokens_repo
from app.models import (
    CANCELLED,
    EVENT_COLUMNS,
    SCHEDULED,
    DelayedEvent,
    delayed_event,
    event_from_row,
)
from app.repository_claims import new_claim_id

T = delayed_event.c


def _not_in_flight() -> Any:
    """A scheduled row that no claim holds. A claim whose lease lapsed still holds it: its replica
    may have died after the homeserver took the event, and only the next replay (deduplicated by
    the homeserver) can tell; until then the event counts as being sent."""
    return T.claim_id.is_(None)


async def lock_user(conn: AsyncConnection, user_id: str) -> None:
    """Serialise scheduling per user for the rest of the transaction, so the cap can't be raced."""
    await conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(user_id, 4140))))


async def find_by_txn(
    conn: AsyncConnection, user_id: str, device_id: str | None, txn_key: str
) -> str | None:
    """The delay_id an earlier request of the same transaction created, if any."""
    result = await conn.execute(
        select(T.delay_id).where(
            T.user_id == user_id,
            func.coalesce(T.device_id, literal_column("''")) == (device_id or ""),
            T.txn_key == txn_key,
        )
    )
    return result.scalar_one_or_none()


async def count_scheduled(conn: AsyncConnection, user_id: str) -> tuple[int, int | None]:
    """How many events the user has scheduled (in flight included), and the earliest send time."""
    result = await conn.execute(
        select(func.count(), func.min(T.send_ts)).where(T.user_id == user_id, T.status == SCHEDULED)
    )
    count, earliest = result.one()
    return int(count), earliest


async def insert_event(
    conn: AsyncConnection,
    *,
    delay_id: str,
    user_id: str,
    device_id: str | None,
    txn_key: str | None,
    generation: str,
    room_id: str,
    event_type: str,
    state_key: str | None,
    content: str,
    query: str,
    delay_ms: int,
    created_ts: int,
    send_ts: int,
) -> None:
    """Store a newly scheduled event, due at its send time."""
    await conn.execute(
        insert(delayed_event).values(
            delay_id=delay_id,
            user_id=user_id,
            device_id=device_id,
            txn_key=txn_key,
            generation=generation,
            room_id=room_id,
            event_type=event_type,
            state_key=state_key,
            content=content,
            query=query,
            delay_ms=delay_ms,
            created_ts=created_ts,
            send_ts=send_ts,
            status=SCHEDULED,
            due_ts=send_ts,
            attempts=0,
        )
    )


async def get(conn: AsyncConnection, delay_id: str) -> DelayedEvent | None:
    """One event, whatever its status."""
    result = await conn.execute(select(*EVENT_COLUMNS).where(T.delay_id == delay_id))
    row = result.one_or_none()
    return event_from_row(row) if row is not None else None


def _owned(delay_id: str, user_id: str | None) -> Any:
    condition = T.delay_id == delay_id
    return and_(condition, T.user_id == user_id) if user_id is not None else condition


_RESTART_MANY = text(
    f"""
    WITH refreshed AS ({tokens_repo.REFRESH_MANY})
    UPDATE delayed_event AS e
    SET send_ts = :now + e.delay_ms, due_ts = :now + e.delay_ms,
        claim_id = NULL, attempts = 0, first_failure_ts = NULL
    FROM unnest(CAST(:delay_ids AS text[]), CAST(:owners AS text[])) AS r (delay_id, owner)
    WHERE e.delay_id = r.delay_id AND (r.owner IS NULL OR e.user_id = r.owner)
      AND e.status = :scheduled AND e.claim_id IS NULL
    RETURNING e.delay_id, e.user_id
    """
)


async def restart_many(
    conn: AsyncConnection,
    requests: list[tuple[str, str | None]],
    tokens: dict[tokens_repo.Device, tuple[bytes, bytes]],
    now: int,
) -> set[tuple[str, str]]:
    """Start the delay of many (delay_id, owner or None) again from `now` (only scheduled events
    no claim holds, owned by `owner` when given), and `refresh_token` for many
    {(user, device): (sealed token, digest)} (`tokens_repo.REFRESH_MANY`), in one statement
    (atomic on its own); the (delay_id, user_id) of each event restarted. Rows are taken in key
    order, so two batches never wait on each other crosswise."""
    ordered = sorted(requests, key=lambda r: (r[0], r[1] or ""))
    result = await conn.execute(
        _RESTART_MANY,
        {
            "now": now,
            "scheduled": SCHEDULED,
            "delay_ids": [delay_id for delay_id, _ in ordered],
            "owners": [owner for _, owner in ordered],
            **tokens_repo.refresh_many(tokens),
        },
    )
    return {(row.delay_id, row.user_id) for row in result}


async def cancel(conn: AsyncConnection, delay_id: str, user_id: str | None, now: int) -> bool:
    """Finalise a scheduled event as cancelled by the owner; False if it can't be cancelled."""
    result = await conn.execute(
        update(delayed_event)
        .where(_owned(delay_id, user_id), T.status == SCHEDULED, _not_in_flight())
        .values(status=CANCELLED, reason="action", finalised_ts=now, due_ts=None, claim_id=None)
        .returning(T.user_id, T.device_id)
    )
    row = result.one_or_none()
    if row is None:
        return False
    await tokens_repo.forget_unused_tokens(conn, [(row.user_id, row.device_id)])
    return True


async def claim_one(
    conn: AsyncConnection,
    delay_id: str,
    user_id: str | None,
    now: int,
    lease_ms: int,
    holder: int | None,
) -> DelayedEvent | None:
    """Claim one scheduled event for an immediate replay (the send action)."""
    result = await conn.execute(
        update(delayed_event)
        .where(_owned(delay_id, user_id), T.status == SCHEDULED, _not_in_flight())
        .values(claim_id=new_claim_id(holder), due_ts=now + lease_ms)
        .returning(*EVENT_COLUMNS)
    )
    row = result.one_or_none()
    return event_from_row(row) if row is not None else None


async def cancel_by_newer_state(
    conn: AsyncConnection,
    *,
    room_id: str,
    event_type: str,
    state_key: str,
    senders: Collection[str],
    now: int,
    error: str,
) -> list[str]:
    """Cancel other users' pending delayed state events for a (room, type, state_key) that was
    just set by one of `senders`; their own are left alone."""
    result = await conn.execute(
        update(delayed_event)
        .where(
            T.status == SCHEDULED,
            T.room_id == room_id,
            T.event_type == event_type,
            T.state_key == state_key,
            T.user_id.not_in(list(senders)),
            _not_in_flight(),
        )
        .values(
            status=CANCELLED,
            reason="error",
            error=error,
            finalised_ts=now,
            due_ts=None,
            claim_id=None,
        )
        .returning(T.delay_id, T.user_id, T.device_id)
    )
    cancelled = list(result)
    await tokens_repo.forget_unused_tokens(
        conn, ((row.user_id, row.device_id) for row in cancelled)
    )
    return [row.delay_id for row in cancelled]


async def prune_finalised(conn: AsyncConnection, *, older_than: int, keep_per_user: int) -> int:
    """Delete finalised history past its age, and past the newest `keep_per_user` of each user."""
    aged = await conn.execute(
        delete(delayed_event).where(T.status != SCHEDULED, T.finalised_ts < older_than)
    )
    ranked = (
        select(
            T.delay_id,
            func.row_number()
            .over(partition_by=T.user_id, order_by=(T.finalised_ts.desc(), T.delay_id))
            .label("rank"),
        )
        .where(T.status != SCHEDULED)
        .subquery()
    )
    surplus = await conn.execute(
        delete(delayed_event).where(
            T.delay_id.in_(select(ranked.c.delay_id).where(ranked.c.rank > keep_per_user))
        )
    )
    return int(aged.rowcount) + int(surplus.rowcount)
