"""delayed events and device tokens

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "delayed_event",
        sa.Column("delay_id", sa.String(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=True),
        sa.Column("txn_key", sa.Text(), nullable=True),
        sa.Column("generation", sa.String(length=1), nullable=False),
        sa.Column("room_id", sa.Text(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("state_key", sa.Text(), nullable=True),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("query", sa.Text(), server_default="", nullable=False),
        sa.Column("delay_ms", sa.BigInteger(), nullable=False),
        sa.Column("created_ts", sa.BigInteger(), nullable=False),
        sa.Column("send_ts", sa.BigInteger(), nullable=False),
        sa.Column("due_ts", sa.BigInteger(), nullable=True),
        sa.Column("claim_id", sa.String(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("first_failure_ts", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=True),
        sa.Column("event_id", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("finalised_ts", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("delay_id", name="pk_delayed_event"),
    )
    op.create_index(
        "ix_delayed_event_due",
        "delayed_event",
        ["due_ts"],
        postgresql_where=sa.text("status = 'scheduled'"),
    )
    op.create_index(
        "ix_delayed_event_user_scheduled",
        "delayed_event",
        ["user_id", "send_ts"],
        postgresql_where=sa.text("status = 'scheduled'"),
    )
    op.create_index(
        "ix_delayed_event_user_finalised",
        "delayed_event",
        ["user_id", "finalised_ts"],
        postgresql_where=sa.text("status != 'scheduled'"),
    )
    op.create_index(
        "uq_delayed_event_txn",
        "delayed_event",
        ["user_id", sa.text("coalesce(device_id, '')"), "txn_key"],
        unique=True,
        postgresql_where=sa.text("txn_key IS NOT NULL"),
    )
    op.create_index(
        "ix_delayed_event_state",
        "delayed_event",
        ["room_id", "event_type", "state_key"],
        postgresql_where=sa.text("status = 'scheduled' AND state_key IS NOT NULL"),
    )
    op.create_table(
        "device_token",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("device_id", sa.Text(), nullable=False),
        sa.Column("token", sa.LargeBinary(), nullable=False),
        sa.Column("digest", sa.LargeBinary(), nullable=False),
        sa.Column("updated_ts", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "device_id", name="pk_device_token"),
    )


def downgrade() -> None:
    op.drop_table("device_token")
    op.drop_index("ix_delayed_event_state", table_name="delayed_event")
    op.drop_index("uq_delayed_event_txn", table_name="delayed_event")
    op.drop_index("ix_delayed_event_user_finalised", table_name="delayed_event")
    op.drop_index("ix_delayed_event_user_scheduled", table_name="delayed_event")
    op.drop_index("ix_delayed_event_due", table_name="delayed_event")
    op.drop_table("delayed_event")
