"""Starts that were asked for (pause, a worker's stop, a smaller batch) kept apart from those after a
lost worker, and when a running job stopped making progress

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("requested_restarts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("stalled_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.drop_column("stalled_since")
        batch.drop_column("requested_restarts")
