"""job.phase, step_log.eval_loss, and the row checks of uploaded files

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 00:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("job", sa.Column("phase", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
    op.add_column("step_log", sa.Column("eval_loss", sa.Float(), nullable=True))
    # batch mode: SQLite cannot ALTER a column's nullability in place.
    with op.batch_alter_table("file") as batch:
        batch.alter_column("row_format", existing_type=sqlmodel.sql.sqltypes.AutoString(), nullable=True)
        batch.add_column(sa.Column("columns", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("bad_rows", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("bad_row_examples", sa.JSON(), nullable=True))


def downgrade() -> None:
    # 0003 knew no file without a format; such rows keep a name that says so.
    op.execute("UPDATE file SET row_format = 'unknown' WHERE row_format IS NULL")
    with op.batch_alter_table("file") as batch:
        batch.drop_column("bad_row_examples")
        batch.drop_column("bad_rows")
        batch.drop_column("columns")
        batch.alter_column("row_format", existing_type=sqlmodel.sql.sqltypes.AutoString(), nullable=False)
    op.drop_column("step_log", "eval_loss")
    op.drop_column("job", "phase")
