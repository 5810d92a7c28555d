"""A job's events (GET /jobs/{id}/events), as every process adds them."""

from __future__ import annotations

from sqlmodel import Session

from core.contract import EventKind
from core.models import JobEvent


def add_event(*, session: Session, job_id: int, kind: EventKind, message: str) -> None:
    """The event, and its deliveries to the job's webhooks, in the caller's transaction."""
    from core.webhooks import queue_event

    session.add(JobEvent(job_id=job_id, kind=kind, message=message))
    queue_event(session=session, job_id=job_id, kind=kind, message=message)
