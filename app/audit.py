"""The audit: every request that may change state, as app/access.py records it, read by admins
(GET /audit) and kept AUDIT_RETENTION_DAYS."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete
from sqlmodel import Session, col, select

from core.config import get_settings
from core.db import session_scope
from core.models import AuditEntry, utcnow


def sweep_expired() -> int:
    """Remove entries older than AUDIT_RETENTION_DAYS (blocking); how many went."""
    days = get_settings().audit_retention_days
    if not days:
        return 0
    with session_scope() as session:
        result = session.execute(delete(AuditEntry).where(col(AuditEntry.at) < utcnow() - timedelta(days=days)))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def read_entries(
    session: Session,
    *,
    before_id: int | None,
    limit: int,
    principal: str | None = None,
    project: str | None = None,
    method: str | None = None,
) -> list[AuditEntry]:
    """Newest first."""
    query = select(AuditEntry).order_by(col(AuditEntry.id).desc()).limit(limit)
    if before_id is not None:
        query = query.where(col(AuditEntry.id) < before_id)
    if principal is not None:
        query = query.where(col(AuditEntry.principal) == principal)
    if project is not None:
        query = query.where(col(AuditEntry.project) == project)
    if method is not None:
        query = query.where(col(AuditEntry.method) == method)
    return list(session.exec(query).all())
