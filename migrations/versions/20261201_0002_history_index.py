"""index for the bulk lookup (MSC4486): a user's events by send time

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Built without blocking writes: replicas of the previous version keep running meanwhile.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_delayed_event_user_send",
            "delayed_event",
            ["user_id", "send_ts", "delay_id"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_delayed_event_user_send",
            table_name="delayed_event",
            postgresql_concurrently=True,
            if_exists=True,
        )
