"""A job's status changes as conditional updates: `running -> paused` lands only if the job is
still running, so the API, a worker and a reconciler racing on one job never undo each other.
A deleted job (its row kept as a tombstone) never moves again."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col

from core.models import Job, JobStatus


def move_job(
    session: Session, job_id: int, was: JobStatus, *, unless_cancelled: bool = False, **values: object
) -> bool:
    """Set `values` on the job if its status is still `was` (and, with `unless_cancelled`, no cancel
    has been asked for: a job whose cancel was accepted is never paused or queued again); whether
    it was (not committed)."""
    conditions: list[Any] = [col(Job.id) == job_id, col(Job.status) == was, col(Job.deleted_at).is_(None)]
    if unless_cancelled:
        conditions.append(col(Job.cancel_requested_at).is_(None))
    result = session.execute(update(Job).where(*conditions).values(**values))
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]
