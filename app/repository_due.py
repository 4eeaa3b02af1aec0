"""The statements that find what is due: which scheduled events a replica may claim now, in
what order, and when it should next look. A room's events go out from one replica at a time, in
send order; a state event waits for the earlier one of its key. The writes a claim makes after
that are `app.repository_claims`. They take a connection inside the caller's transaction and
never commit."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.models import EVENT_COLUMNS, SCHEDULED, DelayedEvent, delayed_event, event_from_row
from app.repository_claims import IN_DOUBT, LIVE_HOLDERS, new_claim_id

T = delayed_event.c


def not_waiting(table: Any = delayed_event) -> Any:
    """Not a state event waiting for an earlier one of its (room, type, state_key): the later
    state must never land first, whichever replica sends which, so it becomes claimable only once
    the earlier one is finalised."""
    row = table.c
    earlier = delayed_event.alias()
    E = earlier.c
    earlier_pending = (
        select(text("1"))
        .select_from(earlier)
        .where(
            E.status == SCHEDULED,
            E.room_id == row.room_id,
            E.event_type == row.event_type,
            E.state_key == row.state_key,
            tuple_(E.send_ts, E.delay_id) < tuple_(row.send_ts, row.delay_id),
        )
        .exists()
    )
    return or_(row.state_key.is_(None), ~earlier_pending)


def rooms_held_by_others(now: int, holder: int | None) -> Any:
    """The rooms in which another replica is sending: a row of theirs carries a claim whose lease
    runs past `now` and that is not this replica's (`holder`). Claims named by no lock cannot be
    told apart, so without a `holder` every claim counts as another's. An in-doubt claim (a
    retry after a timeout) holds no room: the retry goes out after what is sent meanwhile, as a
    retry after any transient failure does. A claim of a replica that is gone counts until its
    rows are freed (`free_dead_claims`): they are then due, and are taken in order with the rest
    of their room. Reads only the claimed rows (their own index)."""
    held = delayed_event.alias("held")
    H = held.c
    conditions = [
        H.status == SCHEDULED,
        H.claim_id.isnot(None),
        H.due_ts > now,
        ~H.claim_id.startswith(IN_DOUBT),
    ]
    if holder is not None:
        conditions.append(~H.claim_id.startswith(f"{holder}."))
    return select(H.room_id).where(*conditions)


_NO_JIT = text("SET LOCAL jit = off")


# How many statements one claim makes at most when rooms are passed over (see `claim_due`).
CLAIM_ROUNDS = 4


async def claim_due(
    conn: AsyncConnection, now: int, lease_ms: int, limit: int, holder: int | None = None
) -> list[DelayedEvent]:
    """Claim up to `limit` due events, earliest send time first, and for each state key only
    the earliest (the next one becomes claimable when it is finalised).

    A room's events are sent by one replica at a time, in send order: no event is claimed in a
    room where another replica holds a live claim (`rooms_held_by_others`), and what a claim
    takes of a room is a prefix of the room's due events. The replica holding a room claims its
    later events itself, its room queue sends them after the earlier ones.

    Rows locked by another claim are skipped, not waited for; a claim's lease moves `due_ts`
    forward, so a replica that dies mid-replay leaves rows that fall due again (at once, with
    `free_dead_claims`, when the claim names the dead replica's lock). With a `holder`, the
    claims name it, and nothing is claimed unless that lock is still held.

    A room passed over (its earlier due row locked by another transaction) does not use the
    limit up: when a statement claims fewer than `limit` because it passed rooms over, it claims
    again without those rooms, at most `CLAIM_ROUNDS` statements in all.
    """
    claim_id = new_claim_id(holder)
    # The planner's estimate of this statement grows with the rows per room and soon passes
    # PostgreSQL's JIT threshold; compiling it would cost far more than running it.
    await conn.execute(_NO_JIT)
    events: list[DelayedEvent] = []
    passed_over: set[str] = set()
    for _ in range(CLAIM_ROUNDS):
        claimed, skipped = await _claim_round(
            conn, now, lease_ms, limit - len(events), holder, claim_id, passed_over
        )
        events += claimed
        if len(events) >= limit or not skipped - passed_over:
            break
        passed_over |= skipped
    events.sort(key=lambda e: (e.send_ts, e.delay_id))
    return events


async def _claim_round(
    conn: AsyncConnection,
    now: int,
    lease_ms: int,
    limit: int,
    holder: int | None,
    claim_id: str,
    excluded: set[str],
) -> tuple[list[DelayedEvent], set[str]]:
    """One claim statement, leaving out the rooms `excluded`: the events it claimed, and the
    rooms whose due rows it took up but passed over."""
    conditions: list[Any] = [
        T.status == SCHEDULED,
        T.due_ts <= now,
        not_waiting(),
        T.room_id.not_in(rooms_held_by_others(now, holder)),
    ]
    if excluded:
        conditions.append(T.room_id.not_in(sorted(excluded)))
    if holder is not None:
        conditions.append(
            text(f"CAST(:holder AS text) IN ({LIVE_HOLDERS})").bindparams(holder=str(holder))
        )
    due = (
        select(T.delay_id, T.room_id)
        .where(*conditions)
        .order_by(T.send_ts, T.delay_id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("due")
    )
    # A room's due event passed over by this claim (locked by a concurrent claim, or claimed
    # since this statement's snapshot was taken: its lock then finds the row changed) keeps the
    # room's later ones out of it: they would overtake it, or go out beside a claim this
    # statement cannot see yet. A state event waiting for an earlier one of its key is no
    # such event: it is not claimable, and what it waits for holds the room back if anything.
    ahead = delayed_event.alias("ahead")
    passed_over = (
        select(text("1"))
        .select_from(ahead)
        .where(
            ahead.c.status == SCHEDULED,
            ahead.c.room_id == T.room_id,
            tuple_(ahead.c.send_ts, ahead.c.delay_id) < tuple_(T.send_ts, T.delay_id),
            ahead.c.due_ts <= now,
            ahead.c.delay_id.not_in(select(due.c.delay_id)),
            not_waiting(ahead),
        )
        .exists()
    )
    claimed = (
        update(delayed_event)
        .where(T.delay_id == due.c.delay_id, ~passed_over)
        .values(claim_id=claim_id, due_ts=now + lease_ms)
        .returning(*EVENT_COLUMNS)
        .cte("claimed")
    )
    # Every row the claim took up, with what it claimed of it: none where it passed it over.
    result = await conn.execute(
        select(claimed, due.c.room_id.label("taken_room"))
        .select_from(due)
        .outerjoin(claimed, claimed.c.delay_id == due.c.delay_id)
    )
    events: list[DelayedEvent] = []
    skipped: set[str] = set()
    for row in result:
        if row.delay_id is None:
            skipped.add(row.taken_room)
        else:
            events.append(event_from_row(tuple(row)[:-1]))
    return events, skipped


async def next_due(conn: AsyncConnection, now: int, holder: int | None) -> int | None:
    """The earliest time any scheduled event wants the attention of the replica `holder`. A
    state event waiting for an earlier one of its key wants none: it becomes claimable when that
    one is finalised, and the replica finalising it claims again. Nor does a due event in a room
    another replica is sending (`claim_due` would not take it): that replica claims it, or its
    lease runs out, and the lease's end is a wake-up of its own."""
    result = await conn.execute(
        select(T.due_ts)
        .where(
            T.status == SCHEDULED,
            not_waiting(),
            or_(T.due_ts > now, T.room_id.not_in(rooms_held_by_others(now, holder))),
        )
        .order_by(T.due_ts)
        .limit(1)
    )
    due: int | None = result.scalar_one_or_none()
    return due
