"""an index of the scheduled rows by room in send order, for keeping a room's claims in order

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Built without blocking writes: replicas of the previous version keep running meanwhile.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_delayed_event_room_scheduled",
            "delayed_event",
            ["room_id", "send_ts", "delay_id"],
            postgresql_where=sa.text("status = 'scheduled'"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_delayed_event_room_scheduled",
            table_name="delayed_event",
            postgresql_concurrently=True,
            if_exists=True,
        )
