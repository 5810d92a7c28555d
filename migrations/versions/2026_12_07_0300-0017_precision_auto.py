"""precision "auto" becomes the default: jobs stored before say bf16, the default they were given

A spec stores an option at its default by leaving it out (app/crud.LATER_OPTION_DEFAULTS), so a job
submitted while bf16 was the default has no `precision`; read after this change it would mean
"auto" (fp8 on an FP8 card), and a resumed attempt would train in other numerics than the first.
This writes bf16 into those specs. Deleted jobs (an empty spec) are left as they are.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

job = sa.table("job", sa.column("id", sa.Integer()), sa.column("spec", sa.JSON()))


def upgrade() -> None:
    connection = op.get_bind()
    for job_id, spec in connection.execute(sa.select(job.c.id, job.c.spec)).all():
        if isinstance(spec, dict) and spec and "precision" not in spec:
            connection.execute(job.update().where(job.c.id == job_id).values(spec={**spec, "precision": "bf16"}))


def downgrade() -> None:
    # 0016's code reads a missing precision as bf16 and knows no "auto": jobs submitted since, with
    # precision left at "auto" (so absent), train in bf16 there, as every job did before.
    pass
