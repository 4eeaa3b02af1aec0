"""The schema. PostgreSQL is the only source of truth: a delayed event is one row from the moment it
is scheduled until it is pruned, long after it was finalised."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def storable_text(value: str) -> bool:
    """Whether a PostgreSQL text column can hold `value`: no NUL character, and valid Unicode (no
    lone surrogates, which JSON escapes can produce)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Values of `delayed_event.status`. Only SCHEDULED rows are ever replayed.
SCHEDULED = "scheduled"
SENT = "sent"
CANCELLED = "cancelled"
FAILED = "failed"

delayed_event = Table(
    "delayed_event",
    metadata,
    Column("delay_id", String, primary_key=True),
    Column("user_id", Text, nullable=False),
    # NULL for a user without a device (an application service's own user).
    Column("device_id", Text),
    # The raw request path of a scheduling request that carries a transaction id; a repeat of it
    # by the same (user, device) is the same transaction.
    Column("txn_key", Text),
    # "A": the query-parameter form; "B": the dedicated delayed_event endpoint.
    Column("generation", String(1), nullable=False),
    Column("room_id", Text, nullable=False),
    Column("event_type", Text, nullable=False),
    Column("state_key", Text),
    # The event content as compact ASCII JSON, replayed as it came.
    Column("content", Text, nullable=False),
    # Query parameters replayed with the event (e.g. a sticky duration), raw and percent-encoded.
    Column("query", Text, nullable=False, server_default=""),
    Column("delay_ms", BigInteger, nullable=False),
    Column("created_ts", BigInteger, nullable=False),
    # When the event is to be sent: the start of the current delay period plus delay_ms.
    Column("send_ts", BigInteger, nullable=False),
    # When a replica should next look at the row: send_ts, a retry time, or the end of a claim's
    # lease. NULL once finalised.
    Column("due_ts", BigInteger),
    # Set while one replica is replaying the row; guards the write of its outcome.
    Column("claim_id", String),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("first_failure_ts", BigInteger),
    Column("status", String(16), nullable=False),
    # How it was finalised: "delay" (timed out and sent), "action" (send/cancel action), "error".
    Column("reason", String(16)),
    Column("event_id", Text),
    Column("error", Text),
    Column("finalised_ts", BigInteger),
)

Index(
    "ix_delayed_event_due",
    delayed_event.c.due_ts,
    postgresql_where=delayed_event.c.status == SCHEDULED,
)
Index(
    "ix_delayed_event_user_scheduled",
    delayed_event.c.user_id,
    delayed_event.c.send_ts,
    postgresql_where=delayed_event.c.status == SCHEDULED,
)
Index(
    "ix_delayed_event_user_finalised",
    delayed_event.c.user_id,
    delayed_event.c.finalised_ts,
    postgresql_where=delayed_event.c.status != SCHEDULED,
)
# The bulk lookup (MSC4486): a user's whole history, scheduled and finalised, by send time in
# either direction; its filters (status, room, type, time window) are applied along this order.
Index(
    "ix_delayed_event_user_send",
    delayed_event.c.user_id,
    delayed_event.c.send_ts,
    delayed_event.c.delay_id,
)
Index(
    "uq_delayed_event_txn",
    delayed_event.c.user_id,
    func.coalesce(delayed_event.c.device_id, text("''")),
    delayed_event.c.txn_key,
    unique=True,
    postgresql_where=delayed_event.c.txn_key.isnot(None),
)
# The claimed rows, few at any time: where the claims of replicas that are gone are looked for.
Index(
    "ix_delayed_event_claimed",
    delayed_event.c.due_ts,
    postgresql_where=(delayed_event.c.status == SCHEDULED) & delayed_event.c.claim_id.isnot(None),
)
# A room's scheduled rows in send order: a claim checks that what it takes of a room is the
# room's due prefix (`due_repo.claim_due`).
Index(
    "ix_delayed_event_room_scheduled",
    delayed_event.c.room_id,
    delayed_event.c.send_ts,
    delayed_event.c.delay_id,
    postgresql_where=delayed_event.c.status == SCHEDULED,
)
Index(
    "ix_delayed_event_state",
    delayed_event.c.room_id,
    delayed_event.c.event_type,
    delayed_event.c.state_key,
    postgresql_where=(delayed_event.c.status == SCHEDULED) & delayed_event.c.state_key.isnot(None),
)

# The newest access token seen from each device that has scheduled events, encrypted.
device_token = Table(
    "device_token",
    metadata,
    Column("user_id", Text, primary_key=True),
    # "" for no device.
    Column("device_id", Text, primary_key=True),
    Column("token", LargeBinary, nullable=False),
    Column("digest", LargeBinary, nullable=False),
    Column("updated_ts", BigInteger, nullable=False),
)


@dataclass(frozen=True, slots=True)
class DelayedEvent:
    """A row of `delayed_event` as the statements read it (all but `txn_key`)."""

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


# The columns a DelayedEvent is read from, in the order of its fields.
EVENT_COLUMNS = tuple(getattr(delayed_event.c, name) for name in DelayedEvent.__slots__)


def event_from_row(row: Any) -> DelayedEvent:
    """The DelayedEvent of a row selected (or returned) as EVENT_COLUMNS."""
    return DelayedEvent(*row)
