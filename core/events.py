"""A job's events (GET /jobs/{id}/events), as every process adds them."""

from __future__ import annotations

from sqlmodel import Session

from core.contract import EventKind
from core.models import JobEvent


def add_event(*, session: Session, job_id: int, kind: EventKind, message: str) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, message=message))
