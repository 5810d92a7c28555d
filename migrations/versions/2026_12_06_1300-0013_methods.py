"""Preference and reward methods: each step log's method metrics, and the trainer a job ran

step_log.method_metrics (TRL's figures beyond loss, learning rate and grad norm: rewards/margins,
reward, kl, ...) and job.trainer (the method, the trainer class and whether Unsloth's or TRL's).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("step_log") as batch:
        batch.add_column(sa.Column("method_metrics", sa.JSON(), nullable=True))
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("trainer", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.drop_column("trainer")
    with op.batch_alter_table("step_log") as batch:
        batch.drop_column("method_metrics")
