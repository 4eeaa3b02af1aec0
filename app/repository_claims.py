"""The writes of a claim: a replica holds the events it claimed (`app.repository_due`) under a
lease it renews, and writes each outcome back under its claim. Like app.repository, they take a
connection inside the caller's transaction and never commit."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Text,
    and_,
    bindparam,
    cast,
    column,
    func,
    or_,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import TypeEngine

from app.models import (
    SCHEDULED,
    SENT,
    DelayedEvent,
    delayed_event,
)
from app.repository_tokens import forget_unused_tokens

T = delayed_event.c


def new_claim_id(holder: int | None) -> str:
    """A fresh claim id; one made by a replica holding its lock (`app.liveness`) starts with the
    lock's key and a dot, so that the claim dies with the replica."""
    claim = secrets.token_hex(8)
    return f"{holder}.{claim}" if holder is not None else claim


IN_DOUBT = "doubt-"


def in_doubt_claim_id() -> str:
    """The claim id held by an event whose last send timed out: no replica holds it, but the
    homeserver may have taken the event, so it counts as being sent until a retry settles it."""
    return IN_DOUBT + secrets.token_hex(8)


# The keys of the replica locks held now, in this database (`app.liveness`), as text.
LIVE_HOLDERS = """
    SELECT l.objid::text FROM pg_locks AS l
    WHERE l.locktype = 'advisory' AND l.classid = 4140 AND l.objsubid = 2 AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def _holder_alive() -> ColumnElement[bool]:
    """The row's claim names no replica lock (an older replica's, or an in-doubt one: its lease
    alone counts), or names one that is held."""
    live = text(LIVE_HOLDERS).columns(column("objid", Text))
    return or_(func.strpos(T.claim_id, ".") == 0, func.split_part(T.claim_id, ".", 1).in_(live))


def held_by_claim(delay_id: Any, claim_id: Any, *, lock_held: bool = False) -> ColumnElement[bool]:
    """The guard of every write a claim makes to its row: the row `delay_id` is still scheduled
    and still carries the claim `claim_id` (values for one row, or the columns of an unnest of
    many), so no other claim has taken it over and its outcome is not written yet.

    `lock_held` adds that the replica lock the claim names (if any) is still held, for the writes
    made before a send (`renew_claims`, `recheck_claim`): once the lock is gone, another replica
    makes the row due (`free_dead_claims`) and a new claim may send it at any moment, so this one
    must not. The writes made after a send (an outcome, a retry, a release) go without it: until
    a new claim takes the row over, it is still this claim's to settle."""
    held = and_(T.delay_id == delay_id, T.claim_id == claim_id, T.status == SCHEDULED)
    return and_(held, _holder_alive()) if lock_held else held


def _unnest(name: str, **columns: tuple[str, type[TypeEngine[Any]]]) -> Any:
    """`unnest(...) AS name (column, ...)`: one row per index of the arrays bound by the names
    given, as {column: (array's bind name, element type)}."""
    arrays = [cast(bindparam(array), ARRAY(kind)) for array, kind in columns.values()]
    return (
        func.unnest(*arrays)
        .table_valued(*(column(key, kind) for key, (_, kind) in columns.items()))
        .render_derived(name=name)
    )


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
        .where(held_by_claim(event.delay_id, event.claim_id))
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


@dataclass(frozen=True, slots=True)
class SentOutcome:
    """A replay the homeserver took: the row to finalise, under the claim that sent it."""

    event: DelayedEvent
    event_id: str
    reason: str
    ts: int


_SENT = _unnest(
    "s",
    delay_id=("delay_ids", Text),
    claim_id=("claim_ids", Text),
    event_id=("event_ids", Text),
    reason=("reasons", Text),
    ts=("ts", BigInteger),
)
_FINALISE_SENT_MANY = (
    update(delayed_event)
    .where(held_by_claim(_SENT.c.delay_id, _SENT.c.claim_id))
    .values(
        status=SENT,
        reason=_SENT.c.reason,
        event_id=_SENT.c.event_id,
        error=None,
        finalised_ts=_SENT.c.ts,
        due_ts=None,
        claim_id=None,
    )
    .returning(T.delay_id)
)


async def finalise_sent_many(conn: AsyncConnection, outcomes: list[SentOutcome]) -> set[str]:
    """`finalise` many sent events as `sent` in one statement, each only if the claim that sent
    it still holds its row, then forget the tokens none of their devices needs any more; the
    delay_ids finalised. Rows and devices are taken in key order, so two writers never wait on
    each other crosswise."""
    ordered = sorted(outcomes, key=lambda o: o.event.delay_id)
    result = await conn.execute(
        _FINALISE_SENT_MANY,
        {
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


_CLAIMS = _unnest("c", delay_id=("delay_ids", Text), claim_id=("claim_ids", Text))
_RENEW_CLAIMS = (
    update(delayed_event)
    .where(held_by_claim(_CLAIMS.c.delay_id, _CLAIMS.c.claim_id, lock_held=True))
    .values(due_ts=bindparam("until"))
    .returning(T.delay_id, T.claim_id)
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
            "until": due_ts,
            "delay_ids": [delay_id for delay_id, _ in held],
            "claim_ids": [claim_id for _, claim_id in held],
        },
    )
    return {(row.delay_id, row.claim_id) for row in result}


async def recheck_claim(conn: AsyncConnection, event: DelayedEvent, due_ts: int) -> bool:
    """Just before a request for `event`: whether its claim still holds the row (and its replica
    lock is held), extending its lease to `due_ts` if so."""
    assert event.claim_id is not None
    return bool(await renew_claims(conn, [(event.delay_id, event.claim_id)], due_ts))


_FREE_DEAD_CLAIMS = (
    update(delayed_event)
    .where(
        T.status == SCHEDULED,
        T.claim_id.isnot(None),
        T.due_ts > bindparam("now"),
        ~_holder_alive(),
    )
    .values(due_ts=bindparam("now"))
    .returning(T.delay_id)
)


async def free_dead_claims(conn: AsyncConnection, now: int) -> int:
    """Make the rows claimed by replicas that are gone (their lock is not held) due now, instead
    of when their lease runs out; how many. The rows keep their claim, so they still count as
    being sent until a new claim replays them. Reads only the claimed rows (their own index)."""
    result = await conn.execute(_FREE_DEAD_CLAIMS, {"now": now})
    return len(result.all())


async def retry_later(
    conn: AsyncConnection,
    event: DelayedEvent,
    *,
    due_ts: int,
    first_failure_ts: int,
    in_doubt: bool,
) -> bool:
    """Release a claim after a transient failure, to be tried again at `due_ts`. `in_doubt`: the
    homeserver may have taken the event (the request timed out): the row keeps a claim that no
    replica holds (`in_doubt_claim_id`), so that until the retry settles it the event counts as
    being sent."""
    result = await conn.execute(
        update(delayed_event)
        .where(held_by_claim(event.delay_id, event.claim_id))
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
        .where(held_by_claim(event.delay_id, event.claim_id))
        .values(claim_id=None, due_ts=T.send_ts)
    )


_RELEASE_CLAIMS = (
    update(delayed_event)
    .where(held_by_claim(_CLAIMS.c.delay_id, _CLAIMS.c.claim_id))
    .values(claim_id=None, due_ts=bindparam("now"))
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
            "delay_ids": [delay_id for delay_id, _ in claims],
            "claim_ids": [claim_id for _, claim_id in claims],
        },
    )
    return int(result.rowcount)
