"""Pausing and deleting jobs: the `paused` status, job.pause_requested_at and job.deleted_at

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # A native enum there; SQLite stores the status as text and needs nothing.
        op.execute("ALTER TYPE jobstatus ADD VALUE IF NOT EXISTS 'paused' AFTER 'running'")
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("pause_requested_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # 0005 knew no paused job: they go back to the queue (they resume from their checkpoint).
    # PostgreSQL cannot drop a value from an enum type; `paused` stays in it, unused.
    op.execute("UPDATE job SET status = 'queued' WHERE status = 'paused'")
    op.execute("DELETE FROM job WHERE deleted_at IS NOT NULL")
    with op.batch_alter_table("job") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("pause_requested_at")
