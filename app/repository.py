"""Every SQL statement of the sidecar. Functions take a connection inside the caller's transaction
and never commit: the caller's unit of work does."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, insert, literal_column, or_, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from app.models import CANCELLED, FAILED, SCHEDULED, SENT, delayed_event, device_token

T = delayed_event.c


@dataclass(frozen=True, slots=True)
class DelayedEvent:
    delay_id: str
    user_id: str
    device_id: str | None
    generation: str
    room_id: str
    event_type: str
    state_key: str | None
    content: str
    query: str
    delay_ms: int
    created_ts: int
    send_ts: int
    due_ts: int | None
    claim_id: str | None
    attempts: int
    first_failure_ts: int | None
    status: str
    reason: str | None
    event_id: str | None
    error: str | None
    finalised_ts: int | None

    @property
    def running_since(self) -> int:
        return self.send_ts - self.delay_ms


_COLUMNS = [getattr(T, name) for name in DelayedEvent.__slots__]


def _event(row: Any) -> DelayedEvent:
    return DelayedEvent(*row)


def new_claim_id(holder: int | None = None) -> str:
    """A fresh claim id; one made by a replica holding its lock (`app.liveness`) starts with the
    lock's key and a dot, so that the claim dies with the replica."""
    claim = secrets.token_hex(8)
    return f"{holder}.{claim}" if holder is not None else claim


def in_doubt_claim_id() -> str:
    """The claim id held by an event whose last send timed out: no replica holds it, but the
    homeserver may have taken the event, so it counts as being sent until a retry settles it."""
    return "doubt-" + secrets.token_hex(8)


# The keys of the replica locks held now, in this database (`app.liveness`), as text.
_LIVE_HOLDERS = """
    SELECT l.objid::text FROM pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.classid = 4140 AND l.objsubid = 2 AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def _holder_alive(column: str = "claim_id") -> str:
    """SQL: the claim in `column` names no replica lock (an older replica's, or an in-doubt one:
    its lease alone counts), or names one that is held."""
    return f"(strpos({column}, '.') = 0 OR split_part({column}, '.', 1) IN ({_LIVE_HOLDERS}))"


def _not_in_flight(now: int) -> Any:
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


async def insert_event(conn: AsyncConnection, **values: Any) -> None:
    """Store a newly scheduled event."""
    await conn.execute(
        insert(delayed_event).values(
            status=SCHEDULED, due_ts=values["send_ts"], attempts=0, **values
        )
    )


async def get(conn: AsyncConnection, delay_id: str) -> DelayedEvent | None:
    """One event, whatever its status."""
    result = await conn.execute(select(*_COLUMNS).where(T.delay_id == delay_id))
    row = result.one_or_none()
    return _event(row) if row is not None else None


def _owned(delay_id: str, user_id: str | None) -> Any:
    condition = T.delay_id == delay_id
    return and_(condition, T.user_id == user_id) if user_id is not None else condition


_RESTART_MANY = text(
    """
    WITH refreshed AS (
        UPDATE device_token AS d SET token = t.token, digest = t.digest, updated_ts = :now
        FROM unnest(CAST(:users AS text[]), CAST(:devices AS text[]), CAST(:tokens AS bytea[]),
                    CAST(:digests AS bytea[])) AS t (user_id, device_id, token, digest)
        WHERE d.user_id = t.user_id AND d.device_id = t.device_id AND d.digest <> t.digest
    )
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
    tokens: dict[tuple[str, str | None], tuple[bytes, bytes]],
    now: int,
) -> set[tuple[str, str]]:
    """Start the delay of many (delay_id, owner or None) again from `now` (only scheduled events
    no claim holds, owned by `owner` when given), and `refresh_token` for many
    {(user, device): (sealed token, digest)}, in one statement (atomic on its own); the
    (delay_id, user_id) of each event restarted. Rows are taken in key order, so two batches
    never wait on each other crosswise."""
    ordered = sorted(requests, key=lambda r: (r[0], r[1] or ""))
    devices = sorted(tokens.items(), key=lambda item: (item[0][0], item[0][1] or ""))
    result = await conn.execute(
        _RESTART_MANY,
        {
            "now": now,
            "scheduled": SCHEDULED,
            "delay_ids": [delay_id for delay_id, _ in ordered],
            "owners": [owner for _, owner in ordered],
            "users": [user for (user, _), _ in devices],
            "devices": [device or "" for (_, device), _ in devices],
            "tokens": [token for _, (token, _) in devices],
            "digests": [digest for _, (_, digest) in devices],
        },
    )
    return {(row.delay_id, row.user_id) for row in result}


async def cancel(conn: AsyncConnection, delay_id: str, user_id: str | None, now: int) -> bool:
    """Finalise a scheduled event as cancelled by the owner; False if it can't be cancelled."""
    result = await conn.execute(
        update(delayed_event)
        .where(_owned(delay_id, user_id), T.status == SCHEDULED, _not_in_flight(now))
        .values(status=CANCELLED, reason="action", finalised_ts=now, due_ts=None, claim_id=None)
        .returning(T.user_id, T.device_id)
    )
    row = result.one_or_none()
    if row is None:
        return False
    await forget_unused_tokens(conn, [(row.user_id, row.device_id)])
    return True


async def claim_one(
    conn: AsyncConnection,
    delay_id: str,
    user_id: str | None,
    now: int,
    lease_ms: int,
    holder: int | None = None,
) -> DelayedEvent | None:
    """Claim one scheduled event for an immediate replay (the send action)."""
    result = await conn.execute(
        update(delayed_event)
        .where(_owned(delay_id, user_id), T.status == SCHEDULED, _not_in_flight(now))
        .values(claim_id=new_claim_id(holder), due_ts=now + lease_ms)
        .returning(*_COLUMNS)
    )
    row = result.one_or_none()
    return _event(row) if row is not None else None


def _not_waiting() -> Any:
    """Not a state event waiting for an earlier one of its (room, type, state_key): the later
    state must never land first, whichever replica sends which, so it becomes claimable only once
    the earlier one is finalised."""
    earlier = delayed_event.alias("earlier")
    E = earlier.c
    earlier_pending = (
        select(text("1"))
        .select_from(earlier)
        .where(
            E.status == SCHEDULED,
            E.room_id == T.room_id,
            E.event_type == T.event_type,
            E.state_key == T.state_key,
            tuple_(E.send_ts, E.delay_id) < tuple_(T.send_ts, T.delay_id),
        )
        .exists()
    )
    return or_(T.state_key.is_(None), ~earlier_pending)


async def claim_due(
    conn: AsyncConnection, now: int, lease_ms: int, limit: int, holder: int | None = None
) -> list[DelayedEvent]:
    """Claim up to `limit` due events, earliest send time first, and for each state key only
    the earliest (the next one becomes claimable when it is finalised).

    Rows locked by another replica's claim are skipped, not waited for; a claim's lease moves
    `due_ts` forward, so a replica that dies mid-replay leaves rows that fall due again (at once,
    with `free_dead_claims`, when the claim names the dead replica's lock). With a `holder`, the
    claims name it, and nothing is claimed unless that lock is still held.
    """
    conditions: list[Any] = [T.status == SCHEDULED, T.due_ts <= now, _not_waiting()]
    if holder is not None:
        conditions.append(
            text(f"CAST(:holder AS text) IN ({_LIVE_HOLDERS})").bindparams(holder=str(holder))
        )
    due = (
        select(T.delay_id)
        .where(*conditions)
        .order_by(T.send_ts, T.delay_id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("due")
    )
    claim_id = new_claim_id(holder)
    result = await conn.execute(
        update(delayed_event)
        .where(T.delay_id == due.c.delay_id)
        .values(claim_id=claim_id, due_ts=now + lease_ms)
        .returning(*_COLUMNS)
    )
    events = [_event(row) for row in result]
    events.sort(key=lambda e: (e.send_ts, e.delay_id))
    return events


async def finalise(
    conn: AsyncConnection,
    event: DelayedEvent,
    *,
    status: str,
    reason: str,
    now: int,
    event_id: str | None = None,
    error: str | None = None,
) -> bool:
    """Write a replay's outcome, if the claim that replayed it still holds the row."""
    result = await conn.execute(
        update(delayed_event)
        .where(T.delay_id == event.delay_id, T.claim_id == event.claim_id, T.status == SCHEDULED)
        .values(
            status=status,
            reason=reason,
            event_id=event_id,
            error=error,
            finalised_ts=now,
            due_ts=None,
            claim_id=None,
        )
    )
    if result.rowcount != 1:
        return False
    await forget_unused_tokens(conn, [(event.user_id, event.device_id)])
    return True


_FINALISE_SENT_MANY = text(
    """
    UPDATE delayed_event AS e
    SET status = :sent, reason = s.reason, event_id = s.event_id, error = NULL,
        finalised_ts = s.ts, due_ts = NULL, claim_id = NULL
    FROM unnest(CAST(:delay_ids AS text[]), CAST(:claim_ids AS text[]),
                CAST(:event_ids AS text[]), CAST(:reasons AS text[]), CAST(:ts AS bigint[]))
         AS s (delay_id, claim_id, event_id, reason, ts)
    WHERE e.delay_id = s.delay_id AND e.claim_id = s.claim_id AND e.status = :scheduled
    RETURNING e.delay_id
    """
)

# A schedule stores its device's token (an upsert, which locks the row) in the transaction that
# inserts its event. A DELETE alone would not see that event until it commits, and under READ
# COMMITTED it would go on to delete the row once the schedule commits. So the rows are locked
# first, in key order (waiting for any schedule holding one), and the DELETE, a statement of its
# own, then sees every event committed meanwhile.
_LOCK_TOKENS = text(
    """
    SELECT 1 FROM device_token AS d
    JOIN unnest(CAST(:users AS text[]), CAST(:devices AS text[])) AS t (user_id, device_id)
      ON d.user_id = t.user_id AND d.device_id = t.device_id
    ORDER BY d.user_id, d.device_id
    FOR UPDATE OF d
    """
)

_FORGET_UNUSED_TOKENS = text(
    """
    DELETE FROM device_token AS d
    USING unnest(CAST(:users AS text[]), CAST(:devices AS text[])) AS t (user_id, device_id)
    WHERE d.user_id = t.user_id AND d.device_id = t.device_id
      AND NOT EXISTS (
        SELECT 1 FROM delayed_event AS e
        WHERE e.user_id = d.user_id AND coalesce(e.device_id, '') = d.device_id
          AND e.status = :scheduled
      )
    """
)


@dataclass(frozen=True, slots=True)
class SentOutcome:
    """A replay the homeserver took: the row to finalise, under the claim that sent it."""

    event: DelayedEvent
    event_id: str
    reason: str
    ts: int


async def finalise_sent_many(conn: AsyncConnection, outcomes: list[SentOutcome]) -> set[str]:
    """`finalise` many sent events as `sent` in one statement, each only if the claim that sent
    it still holds its row, then forget the tokens none of their devices needs any more; the
    delay_ids finalised. Rows and devices are taken in key order, so two writers never wait on
    each other crosswise."""
    ordered = sorted(outcomes, key=lambda o: o.event.delay_id)
    result = await conn.execute(
        _FINALISE_SENT_MANY,
        {
            "sent": SENT,
            "scheduled": SCHEDULED,
            "delay_ids": [o.event.delay_id for o in ordered],
            "claim_ids": [o.event.claim_id for o in ordered],
            "event_ids": [o.event_id for o in ordered],
            "reasons": [o.reason for o in ordered],
            "ts": [o.ts for o in ordered],
        },
    )
    done = set(result.scalars())
    await forget_unused_tokens(conn, ((o.event.user_id, o.event.device_id) for o in ordered))
    return done


_RENEW_CLAIMS = text(
    f"""
    UPDATE delayed_event AS e SET due_ts = :due_ts
    FROM unnest(CAST(:delay_ids AS text[]), CAST(:claim_ids AS text[])) AS c (delay_id, claim_id)
    WHERE e.delay_id = c.delay_id AND e.claim_id = c.claim_id AND e.status = :scheduled
      AND {_holder_alive("e.claim_id")}
    RETURNING e.delay_id, e.claim_id
    """
)


async def renew_claims(
    conn: AsyncConnection, held: list[tuple[str, str]], due_ts: int
) -> set[tuple[str, str]]:
    """Extend the leases of these (delay_id, claim_id); the (delay_id, claim_id)s still held: the
    row still carries the claim, and the replica lock the claim names (if any) is still held."""
    if not held:
        return set()
    result = await conn.execute(
        _RENEW_CLAIMS,
        {
            "due_ts": due_ts,
            "scheduled": SCHEDULED,
            "delay_ids": [delay_id for delay_id, _ in held],
            "claim_ids": [claim_id for _, claim_id in held],
        },
    )
    return {(row.delay_id, row.claim_id) for row in result}


_FREE_DEAD_CLAIMS = text(
    f"""
    UPDATE delayed_event AS e SET due_ts = :now
    WHERE e.status = :scheduled AND e.claim_id IS NOT NULL AND e.due_ts > :now
      AND NOT {_holder_alive("e.claim_id")}
    RETURNING e.delay_id
    """
)


async def free_dead_claims(conn: AsyncConnection, now: int) -> int:
    """Make the rows claimed by replicas that are gone (their lock is not held) due now, instead
    of when their lease runs out; how many. The rows keep their claim, so they still count as
    being sent until a new claim replays them. Reads only the claimed rows (their own index)."""
    result = await conn.execute(_FREE_DEAD_CLAIMS, {"now": now, "scheduled": SCHEDULED})
    return len(result.all())


async def recheck_claim(conn: AsyncConnection, event: DelayedEvent, due_ts: int) -> bool:
    """Just before a request for `event`: whether its claim still holds the row (and its replica
    lock is held), extending its lease to `due_ts` if so."""
    assert event.claim_id is not None
    return bool(await renew_claims(conn, [(event.delay_id, event.claim_id)], due_ts))


async def retry_later(
    conn: AsyncConnection,
    event: DelayedEvent,
    *,
    due_ts: int,
    first_failure_ts: int,
    in_doubt: bool = False,
) -> bool:
    """Release a claim after a transient failure, to be tried again at `due_ts`. `in_doubt`: the
    homeserver may have taken the event (the request timed out): the row keeps a claim that no
    replica holds (`in_doubt_claim_id`), so that until the retry settles it the event counts as
    being sent."""
    result = await conn.execute(
        update(delayed_event)
        .where(T.delay_id == event.delay_id, T.claim_id == event.claim_id, T.status == SCHEDULED)
        .values(
            claim_id=in_doubt_claim_id() if in_doubt else None,
            due_ts=due_ts,
            attempts=T.attempts + 1,
            first_failure_ts=first_failure_ts,
        )
    )
    return result.rowcount == 1


async def release(conn: AsyncConnection, event: DelayedEvent) -> None:
    """Give a claimed event back to its own timer (a refused send action keeps it scheduled)."""
    await conn.execute(
        update(delayed_event)
        .where(T.delay_id == event.delay_id, T.claim_id == event.claim_id, T.status == SCHEDULED)
        .values(claim_id=None, due_ts=T.send_ts)
    )


_RELEASE_CLAIMS = text(
    """
    UPDATE delayed_event AS e SET claim_id = NULL, due_ts = :now
    FROM unnest(CAST(:delay_ids AS text[]), CAST(:claim_ids AS text[])) AS c (delay_id, claim_id)
    WHERE e.delay_id = c.delay_id AND e.claim_id = c.claim_id AND e.status = :scheduled
    """
)


async def release_claims(conn: AsyncConnection, claims: list[tuple[str, str]], now: int) -> int:
    """Give these (delay_id, claim_id) back, free and due now (a replica shutting down leaves
    them to the others); how many rows still carried their claim."""
    if not claims:
        return 0
    result = await conn.execute(
        _RELEASE_CLAIMS,
        {
            "now": now,
            "scheduled": SCHEDULED,
            "delay_ids": [delay_id for delay_id, _ in claims],
            "claim_ids": [claim_id for _, claim_id in claims],
        },
    )
    return int(result.rowcount)


async def next_due(conn: AsyncConnection) -> int | None:
    """The earliest time any scheduled event wants attention. A state event waiting for an
    earlier one of its key wants none: it becomes claimable when that one is finalised, and the
    replica finalising it claims again."""
    result = await conn.execute(
        select(T.due_ts).where(T.status == SCHEDULED, _not_waiting()).order_by(T.due_ts).limit(1)
    )
    due: int | None = result.scalar_one_or_none()
    return due


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
        select(*_COLUMNS).where(*where, T.delay_id.in_(kept)).order_by(*order)
    )
    return Page([_event(row) for row in result], more=len(kept) < len(sized))


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


async def cancel_by_newer_state(
    conn: AsyncConnection,
    *,
    room_id: str,
    event_type: str,
    state_key: str,
    sender: str,
    now: int,
    error: str,
) -> list[str]:
    """Cancel other users' pending delayed state events for a (room, type, state_key) that was
    just set by `sender`; the sender's own are left alone."""
    result = await conn.execute(
        update(delayed_event)
        .where(
            T.status == SCHEDULED,
            T.room_id == room_id,
            T.event_type == event_type,
            T.state_key == state_key,
            T.user_id != sender,
            _not_in_flight(now),
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
    await forget_unused_tokens(conn, ((row.user_id, row.device_id) for row in cancelled))
    return [row.delay_id for row in cancelled]


async def count_all_scheduled(conn: AsyncConnection) -> int:
    result = await conn.execute(select(func.count()).where(T.status == SCHEDULED))
    return int(result.scalar_one())


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


# Device tokens ---------------------------------------------------------------------------------

D = device_token.c


async def store_token(
    conn: AsyncConnection,
    user_id: str,
    device_id: str | None,
    *,
    token: bytes,
    digest: bytes,
    now: int,
) -> None:
    """Keep this device's newest token; writes nothing if the stored one is the same."""
    statement = pg_insert(device_token).values(
        user_id=user_id, device_id=device_id or "", token=token, digest=digest, updated_ts=now
    )
    await conn.execute(
        statement.on_conflict_do_update(
            index_elements=[D.user_id, D.device_id],
            set_={"token": token, "digest": digest, "updated_ts": now},
            where=D.digest != statement.excluded.digest,
        )
    )


async def refresh_token(
    conn: AsyncConnection,
    user_id: str,
    device_id: str | None,
    *,
    token: bytes,
    digest: bytes,
    now: int,
) -> None:
    """Replace a stored token with a newer one; devices with nothing stored are left out."""
    await conn.execute(
        update(device_token)
        .where(D.user_id == user_id, D.device_id == (device_id or ""), D.digest != digest)
        .values(token=token, digest=digest, updated_ts=now)
    )


async def load_tokens(
    conn: AsyncConnection, devices: set[tuple[str, str | None]]
) -> dict[tuple[str, str | None], bytes]:
    """The stored (encrypted) tokens of these (user, device) pairs."""
    if not devices:
        return {}
    keys = {(user, device or ""): (user, device) for user, device in devices}
    result = await conn.execute(
        select(D.user_id, D.device_id, D.token).where(
            tuple_(D.user_id, D.device_id).in_(list(keys))
        )
    )
    return {keys[(row.user_id, row.device_id)]: bytes(row.token) for row in result}


async def forget_unused_tokens(
    conn: AsyncConnection, devices: Iterable[tuple[str, str | None]]
) -> None:
    """Delete the tokens of these (user, device)s that none of their events needs any more (none
    is scheduled). The rows are locked first, in key order (so two callers never wait on each
    other crosswise), which waits for a schedule of the same device still committing; only then
    is it decided what to delete, so a token a newly scheduled event needs is kept."""
    ordered = sorted({(user, device or "") for user, device in devices})
    if not ordered:
        return
    keys = {"users": [user for user, _ in ordered], "devices": [device for _, device in ordered]}
    if not (await conn.execute(_LOCK_TOKENS, keys)).first():
        return  # nothing stored for them: nothing to forget
    await conn.execute(_FORGET_UNUSED_TOKENS, {"scheduled": SCHEDULED, **keys})


__all__ = ["CANCELLED", "FAILED", "SCHEDULED", "SENT", "DelayedEvent"]
