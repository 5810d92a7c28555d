"""Keeps the database and the queue in step, so no job is lost or left `running` forever.

Runs in the worker (at start and as an RQ maintenance task) and in the API (a background
loop), so a host whose only worker died still ends its jobs. Every step is a conditional
update, so several processes reconciling at once do no harm."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from redis import Redis
from rq import Queue
from rq.exceptions import AbandonedJobError, NoSuchJobError
from rq.job import Job as RQJob
from rq.job import JobStatus as RQStatus
from rq.registry import StartedJobRegistry
from rq.timeouts import TimerDeathPenalty
from sqlalchemy import update
from sqlmodel import Session, col, select

from core.checkpoint_store import sync_records
from core.config import get_settings
from core.contract import ErrorCode, EventKind
from core.db import session_scope
from core.events import add_event
from core.models import Job, JobStatus, utcnow
from core.queue import enqueue_job, get_queue, parse_rq_job_id, rq_job_id

logger = logging.getLogger(__name__)

LIVE_RQ_STATES = {RQStatus.QUEUED, RQStatus.STARTED, RQStatus.SCHEDULED, RQStatus.DEFERRED}


def recover_lost_job(
    *, session: Session, job_id: int, reason: str, connection: Redis | None = None, attempt: int | None = None
) -> str:
    """A job whose worker is gone: queue it again (it resumes from its last checkpoint) while
    attempts remain, else fail it with `worker_lost`; one whose cancel was accepted ends cancelled,
    never queued again. With `attempt`, only that attempt is recovered: a report about an earlier,
    superseded attempt changes nothing. Returns what was done."""
    for _ in range(2):  # a second look when a cancel landed between the read and the update
        outcome = _recover(session=session, job_id=job_id, reason=reason, connection=connection, attempt=attempt)
        if outcome != "raced":
            return outcome
    return "nothing"


def counted_attempts(job: Job) -> int:
    """Starts that count against MAX_ATTEMPTS: those that followed a lost worker, not the ones a
    pause, a worker's graceful stop or a smaller micro-batch asked for."""
    return job.attempts - job.requested_restarts


def _recover(*, session: Session, job_id: int, reason: str, connection: Redis | None, attempt: int | None) -> str:
    settings = get_settings()
    job = session.get(Job, job_id)
    # A status another version of the service wrote (a plain string here) is left to that version.
    if job is None or not isinstance(job.status, JobStatus) or job.status.finished or job.deleted_at is not None:
        return "nothing"
    current_attempt = job.attempts if job.status == JobStatus.running else job.attempts + 1
    if attempt is not None and attempt != current_attempt:
        return "nothing"
    values: dict[str, Any]
    if job.status == JobStatus.running and job.cancel_requested_at is not None:
        outcome, values = (
            "cancelled",
            {
                "status": JobStatus.cancelled,
                "error_code": ErrorCode.cancelled,
                "error_message": f"cancelled; its worker stopped before confirming ({reason})",
            },
        )
    elif counted_attempts(job) < settings.max_attempts:
        outcome, values = "requeued", {"status": JobStatus.queued, "heartbeat_at": None, "worker_name": None}
    else:
        outcome, values = (
            "failed",
            {
                "status": JobStatus.failed,
                "error_code": ErrorCode.worker_lost,
                "error_message": (
                    f"{reason}. The job was tried {counted_attempts(job)} time(s), the most allowed (MAX_ATTEMPTS); "
                    "check the worker's log and resubmit."
                ),
            },
        )
    if outcome != "requeued":
        values["finished_at"] = utcnow()
    values["stalled_since"] = None
    conditions = [col(Job.id) == job_id, col(Job.status) == job.status]
    if outcome == "requeued":
        conditions.append(col(Job.cancel_requested_at).is_(None))
    result = session.execute(update(Job).where(*conditions).values(**values))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return "raced" if outcome == "requeued" else "nothing"
    # Checkpoints the lost trainer finished but never recorded: listed, downloadable, resumable.
    sync_records(session=session, job_id=job_id, checkpoints_dir=settings.checkpoints_dir(job_id))
    if outcome == "requeued":
        message = (
            f"{reason}; queued again (attempt {counted_attempts(job) + 1} of {settings.max_attempts}), "
            "resuming from its last checkpoint if it has one"
        )
        add_event(session=session, job_id=job_id, kind=EventKind.retried, message=message)
    else:
        add_event(session=session, job_id=job_id, kind=EventKind(outcome), message=str(values["error_message"]))
    session.commit()
    if outcome == "requeued":
        enqueue_job(job_id, attempt=job.attempts + 1, connection=connection)
    logger.warning("job %s: %s (%s)", job_id, outcome, reason)
    return outcome


def on_rq_failure(rq_job: RQJob, connection: Redis, exc_type: type, exc_value: BaseException, _tb: Any) -> None:
    """RQ's on_failure callback. The task itself turns training failures into a finished job,
    so what arrives here is a lost worker (AbandonedJobError) or a fault outside training."""
    parsed = parse_rq_job_id(rq_job.id)
    if parsed is None:
        return
    job_id, attempt = parsed
    if isinstance(exc_value, AbandonedJobError) or exc_type is AbandonedJobError:
        reason = "the worker running this job stopped (RQ reported it abandoned)"
    else:
        reason = f"the worker failed outside training: {exc_type.__name__}: {exc_value}"
    with session_scope() as session:
        recover_lost_job(session=session, job_id=job_id, reason=reason, connection=connection, attempt=attempt)


def reconcile(connection: Redis | None = None) -> dict[str, int]:
    """One pass; returns counts of what was done (for logs and tests)."""
    settings = get_settings()
    queue = get_queue(connection)
    counts = {"requeued_lost_queued": 0, "recovered_stale_running": 0}

    # RQ's own check: started jobs whose worker stopped heartbeating go through on_rq_failure.
    # A timer, not SIGALRM, bounds the callback: the API runs this pass off the main thread,
    # where signal-based timeouts raise and RQ would drop the report.
    StartedJobRegistry(queue=queue, death_penalty_class=TimerDeathPenalty).cleanup()

    now = utcnow()
    with session_scope() as session:
        stale = session.exec(
            select(Job.id).where(
                Job.status == JobStatus.running, col(Job.heartbeat_at) < now - timedelta(seconds=settings.stale_after_s)
            )
        ).all()
        for job_id in stale:
            assert job_id is not None
            seconds = int(settings.stale_after_s)
            outcome = recover_lost_job(
                session=session,
                job_id=job_id,
                connection=queue.connection,
                reason=f"its worker has not reported for over {seconds} s",
            )
            counts["recovered_stale_running"] += outcome != "nothing"

        # A job row younger than this may sit between its commit and its enqueue: leave it alone.
        grace = timedelta(seconds=settings.enqueue_grace_s)
        queued = session.exec(
            select(Job.id, Job.attempts).where(
                Job.status == JobStatus.queued, col(Job.created_at) < now - grace, col(Job.deleted_at).is_(None)
            )
        ).all()
        for job_id, attempts in queued:
            assert job_id is not None
            if _rq_has_live_job(rq_job_id(job_id, attempts + 1), queue):
                continue
            enqueue_job(job_id, attempt=attempts + 1, connection=queue.connection)
            add_event(
                session=session,
                job_id=job_id,
                kind=EventKind.requeued,
                message="the queue had lost this job (Redis restarted?); enqueued it again",
            )
            session.commit()
            counts["requeued_lost_queued"] += 1
    return counts


def _rq_has_live_job(rq_id: str, queue: Queue) -> bool:
    """Whether RQ will still run this job. A job whose hash says `queued` must also be on the
    queue's list: a worker that popped it just as Redis went away never ran it."""
    try:
        status = RQJob.fetch(rq_id, connection=queue.connection).get_status()
    except NoSuchJobError:
        return False
    if status == RQStatus.QUEUED:
        return queue.connection.lpos(queue.key, rq_id) is not None
    return status in LIVE_RQ_STATES
