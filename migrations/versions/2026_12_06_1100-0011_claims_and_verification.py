"""Webhook claims that expire, and checkpoints verified on a schedule

webhook_delivery.claimed_at and claimed_by (a claim older than WEBHOOK_CLAIM_LEASE_S is taken
back); checkpoint.verified_at, verify_requested_at, changed_seen_at and verify_claimed_at, and the
checkpoint status `corrupt`.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # A native enum there; SQLite stores the status as text and needs nothing.
        op.execute("ALTER TYPE checkpointstatus ADD VALUE IF NOT EXISTS 'corrupt'")
    with op.batch_alter_table("webhook_delivery") as batch:
        batch.add_column(sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("claimed_by", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    with op.batch_alter_table("checkpoint") as batch:
        batch.add_column(sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("verify_requested_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("changed_seen_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("verify_claimed_at", sa.DateTime(timezone=True), nullable=True))
    # A claim of an older version had no time: taken back at once by the first sender.
    op.execute("UPDATE webhook_delivery SET claimed_at = created_at WHERE status = 'sending'")
    # Checkpoints hashed before verification existed count as verified when they were saved: the
    # schedule comes to them in turn, not all at once after the upgrade.
    op.execute("UPDATE checkpoint SET verified_at = created_at WHERE status = 'ready'")


def downgrade() -> None:
    # 0009 knows no corrupt checkpoint and would serve it with the sha256 it no longer has: its
    # record goes (the folder stays on disk, for GET /storage's orphans and the operator).
    op.execute("UPDATE checkpoint SET status = 'removed' WHERE status = 'corrupt'")
    with op.batch_alter_table("checkpoint") as batch:
        batch.drop_column("verify_claimed_at")
        batch.drop_column("changed_seen_at")
        batch.drop_column("verify_requested_at")
        batch.drop_column("verified_at")
    with op.batch_alter_table("webhook_delivery") as batch:
        batch.drop_column("claimed_by")
        batch.drop_column("claimed_at")
