"""Byte and token counts as 64-bit integers: an H100's memory, a checkpoint over 2 GiB

PostgreSQL's `integer` holds 2**31 - 1: the first step log of a GPU job (device_total 80 GiB)
and any checkpoint over 2 GiB failed to insert there. SQLite stored them whole already.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = {
    "step_log": ("num_tokens", "vram_allocated", "vram_reserved", "vram_peak_allocated", "device_used",
                 "device_total"),
    "checkpoint": ("size_bytes",),
}


def upgrade() -> None:
    for table, columns in COLUMNS.items():
        # batch mode: SQLite cannot ALTER a column's type in place (it rebuilds the table).
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.alter_column(column, existing_type=sa.Integer(), type_=sa.BigInteger(),
                                   existing_nullable=column != "size_bytes")


def downgrade() -> None:
    for table, columns in COLUMNS.items():
        with op.batch_alter_table(table) as batch:
            for column in columns:
                batch.alter_column(column, existing_type=sa.BigInteger(), type_=sa.Integer(),
                                   existing_nullable=column != "size_bytes")
