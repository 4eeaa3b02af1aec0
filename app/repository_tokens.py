"""The statements of the device tokens: the newest access token seen from each device that has
scheduled events, encrypted, stored with its events and forgotten once none is scheduled. Like
app.repository, they take a connection inside the caller's transaction and never commit."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from app.models import SCHEDULED, device_token

D = device_token.c

# A device: (user_id, device_id), None for a user without one (stored as "").
Device = tuple[str, str | None]


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


# `refresh_token` for many devices at once, as a statement to embed (app.repository.restart_many
# runs it in the same statement as the restarts): binds :now and the arrays of `refresh_many`.
# The rows are locked first, in the order of their keys' code points (`COLLATE "C"`, whatever the
# database's collation), and only then updated: a join alone takes them in whatever order its
# plan reads them. `forget_unused_tokens` locks in that same order, so a restart batch and a
# finalise touching the same devices never wait on each other crosswise.
REFRESH_MANY = """
    UPDATE device_token AS d SET token = l.token, digest = l.digest, updated_ts = :now
    FROM (
        SELECT k.user_id, k.device_id, t.token, t.digest
        FROM device_token AS k
        JOIN unnest(CAST(:users AS text[]), CAST(:devices AS text[]), CAST(:tokens AS bytea[]),
                    CAST(:digests AS bytea[])) AS t (user_id, device_id, token, digest)
          ON k.user_id = t.user_id AND k.device_id = t.device_id
        WHERE k.digest <> t.digest
        ORDER BY k.user_id COLLATE "C", k.device_id COLLATE "C"
        FOR UPDATE OF k
    ) AS l
    WHERE d.user_id = l.user_id AND d.device_id = l.device_id AND d.digest <> l.digest
"""


def refresh_many(tokens: dict[Device, tuple[bytes, bytes]]) -> dict[str, Any]:
    """The parameters of REFRESH_MANY for {(user, device): (sealed token, digest)} (all but
    :now), the devices in key order (the statement locks them in that order itself)."""
    devices = sorted(tokens.items(), key=lambda item: (item[0][0], item[0][1] or ""))
    return {
        "users": [user for (user, _), _ in devices],
        "devices": [device or "" for (_, device), _ in devices],
        "tokens": [token for _, (token, _) in devices],
        "digests": [digest for _, (_, digest) in devices],
    }


async def load_tokens(conn: AsyncConnection, devices: set[Device]) -> dict[Device, bytes]:
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


# A schedule stores its device's token (an upsert, which locks the row) in the transaction that
# inserts its event. A DELETE alone would not see that event until it commits, and under READ
# COMMITTED it would go on to delete the row once the schedule commits. So the rows are locked
# first, in key order (waiting for any schedule holding one), and the DELETE, a statement of its
# own, then sees every event committed meanwhile. Key order is code point order (`COLLATE "C"`),
# as REFRESH_MANY locks: under the database's own collation (en_US, say) upper and lower case or
# "_" would sort otherwise.
_LOCK_TOKENS = text(
    """
    SELECT 1 FROM device_token AS d
    JOIN unnest(CAST(:users AS text[]), CAST(:devices AS text[])) AS t (user_id, device_id)
      ON d.user_id = t.user_id AND d.device_id = t.device_id
    ORDER BY d.user_id COLLATE "C", d.device_id COLLATE "C"
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


async def forget_unused_tokens(conn: AsyncConnection, devices: Iterable[Device]) -> None:
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
