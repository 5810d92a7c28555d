"""Who may do what on a shared box: projects, principals, tokens, the audit, owners

Tables project (with quotas), principal, api_token (SHA-256 of each token) and audit_entry;
job.project_id, job.submitted_by and file.project_id. Jobs and files that existed before belong
to the project `default` (id 1), which this revision creates.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "project",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("max_gpus", sa.Integer(), nullable=True),
        sa.Column("max_queued_jobs", sa.Integer(), nullable=True),
        sa.Column("max_checkpoint_bytes", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.execute("INSERT INTO project (id, name, created_at) VALUES (1, 'default', CURRENT_TIMESTAMP)")
    if op.get_bind().dialect.name == "postgresql":
        # The row above took id 1 by hand: the sequence starts after it.
        op.execute("SELECT setval(pg_get_serial_sequence('project', 'id'), 1)")
    op.create_table(
        "principal",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("role", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["project_id"], ["project.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    with op.batch_alter_table("principal") as batch:
        batch.create_index(batch.f("ix_principal_project_id"), ["project_id"], unique=False)
    op.create_table(
        "api_token",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("principal_id", sa.Integer(), nullable=False),
        sa.Column("prefix", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("sha256", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("description", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rate_limit_per_minute", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["principal_id"], ["principal.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("prefix"),
    )
    with op.batch_alter_table("api_token") as batch:
        batch.create_index(batch.f("ix_api_token_principal_id"), ["principal_id"], unique=False)
    op.create_table(
        "audit_entry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("principal", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("role", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("project", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("token_prefix", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("method", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("path", sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("client", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("target", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_entry") as batch:
        batch.create_index("ix_audit_entry_at", ["at"], unique=False)
    # Every job and file that exists belongs to the default project.
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("project_id", sa.Integer(), server_default="1", nullable=False))
        batch.add_column(sa.Column("submitted_by", sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch.create_foreign_key("fk_job_project_id_project", "project", ["project_id"], ["id"])
        batch.create_index("ix_job_project_id_id", ["project_id", "id"], unique=False)
    with op.batch_alter_table("file") as batch:
        batch.add_column(sa.Column("project_id", sa.Integer(), server_default="1", nullable=False))
        batch.create_foreign_key("fk_file_project_id_project", "project", ["project_id"], ["id"])
        batch.create_index(batch.f("ix_file_project_id"), ["project_id"], unique=False)


def downgrade() -> None:
    # Ownership, tokens and the audit go; jobs and files stay, as everyone's again.
    with op.batch_alter_table("file") as batch:
        batch.drop_index(batch.f("ix_file_project_id"))
        batch.drop_constraint("fk_file_project_id_project", type_="foreignkey")
        batch.drop_column("project_id")
    with op.batch_alter_table("job") as batch:
        batch.drop_index("ix_job_project_id_id")
        batch.drop_constraint("fk_job_project_id_project", type_="foreignkey")
        batch.drop_column("submitted_by")
        batch.drop_column("project_id")
    with op.batch_alter_table("audit_entry") as batch:
        batch.drop_index("ix_audit_entry_at")
    op.drop_table("audit_entry")
    with op.batch_alter_table("api_token") as batch:
        batch.drop_index(batch.f("ix_api_token_principal_id"))
    op.drop_table("api_token")
    with op.batch_alter_table("principal") as batch:
        batch.drop_index(batch.f("ix_principal_project_id"))
    op.drop_table("principal")
    op.drop_table("project")
