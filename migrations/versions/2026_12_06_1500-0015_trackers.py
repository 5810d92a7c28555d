"""Idempotent creates; the tokens a job trained on

Table idempotency_key: the Idempotency-Key of a create request, whose it is, the route and a
digest of its body, and the job or file it made (app/idempotency.py). job.trained_tokens: the
tokens its trainers trained on, every attempt's.

Revision ID: 0015
Revises: 0013
Create Date: 2026-12-06 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0015"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "idempotency_key",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("principal", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("route", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("resource", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("resource_id", sa.Integer(), nullable=False),
        sa.Column("request_sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("principal", "key", name="uq_idempotency_key_principal_key"),
    )
    with op.batch_alter_table("idempotency_key") as batch:
        batch.create_index("ix_idempotency_key_created_at", ["created_at"], unique=False)
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("trained_tokens", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job") as batch:
        batch.drop_column("trained_tokens")
    with op.batch_alter_table("idempotency_key") as batch:
        batch.drop_index("ix_idempotency_key_created_at")
    op.drop_table("idempotency_key")
