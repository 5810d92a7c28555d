"""A job's status changes as conditional updates: `running -> paused` lands only if the job is
still running, so the API, a worker and a reconciler racing on one job never undo each other."""

from __future__ import annotations

from sqlalchemy import update
from sqlmodel import Session, col

from core.models import Job, JobStatus


def move_job(session: Session, job_id: int, was: JobStatus, **values: object) -> bool:
    """Set `values` on the job if its status is still `was`; whether it was (not committed)."""
    result = session.execute(update(Job).where(col(Job.id) == job_id, col(Job.status) == was).values(**values))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]
