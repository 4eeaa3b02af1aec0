"""an index of the claimed rows, for finding the claims of replicas that are gone

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Built without blocking writes: replicas of the previous version keep running meanwhile.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_delayed_event_claimed",
            "delayed_event",
            ["due_ts"],
            postgresql_where=sa.text("status = 'scheduled' AND claim_id IS NOT NULL"),
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_delayed_event_claimed",
            table_name="delayed_event",
            postgresql_concurrently=True,
            if_exists=True,
        )
