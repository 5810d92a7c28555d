"""The planner learns: each finished job's measured peak and tokens/s against its plan

planner_measurement: one row per succeeded job, read by POST /jobs/estimate (core/measurements.py).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "planner_measurement",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("shape_key", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("method", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("optim", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("precision", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("strategy", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("card", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("card_memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("micro_batch", sa.Integer(), nullable=False),
        sa.Column("gradient_accumulation_steps", sa.Integer(), nullable=False),
        sa.Column("max_seq_length", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("planned_bytes", sa.BigInteger(), nullable=True),
        sa.Column("peak_bytes", sa.BigInteger(), nullable=True),
        sa.Column("planned_tokens_per_second", sa.Float(), nullable=True),
        sa.Column("tokens_per_second", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_planner_measurement_shape", "planner_measurement", ["shape_key", "method"])


def downgrade() -> None:
    op.drop_index("ix_planner_measurement_shape", table_name="planner_measurement")
    op.drop_table("planner_measurement")
