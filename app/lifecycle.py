"""Pause, resume and delete: what a team needs once jobs outlive a week. Each is a conditional
update, so a worker that claims or finishes the job at the same moment wins cleanly."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete
from sqlmodel import Session, col, select

from app import quotas
from app.auth import Identity
from app.crud import get_job, known_status
from app.errors import Conflict, NotFound
from core.checkpoint_store import trainer_running
from core.config import get_settings
from core.contract import CheckpointStatus, EventKind
from core.events import add_event
from core.folders import folder_files
from core.models import Checkpoint, Job, JobEvent, JobStatus, StepLog, utcnow
from core.queue import enqueue_job
from core.shared_store import SharedStore, StorageUnavailable, get_store
from core.transitions import move_job

logger = logging.getLogger(__name__)


def pause_job(*, session: Session, job_id: int, identity: Identity) -> Job:
    """A queued job leaves the queue until resumed; a running one saves a checkpoint at its next
    step and its trainer ends (the GPU is freed). Pausing a paused job changes nothing."""
    job = get_job(session=session, job_id=job_id, identity=identity)
    if known_status(job).finished:
        raise Conflict(f"job {job_id} has already finished ({job.status}); there is nothing to pause")
    if job.status == JobStatus.queued and move_job(session, job_id, JobStatus.queued, status=JobStatus.paused):
        add_event(
            session=session,
            job_id=job_id,
            kind=EventKind.paused,
            message=f"paused before it started; POST /jobs/{job_id}/resume queues it again",
        )
        session.commit()
        session.refresh(job)
        return job
    session.refresh(job)
    if job.status == JobStatus.running:
        if job.cancel_requested_at is not None:
            raise Conflict(f"job {job_id} is being cancelled; it cannot be paused")
        if job.pause_requested_at is None:
            # Conditional: a job that ended, or whose cancel was accepted, since it was read is not
            # marked as pausing.
            if not move_job(session, job_id, JobStatus.running, unless_cancelled=True, pause_requested_at=utcnow()):
                session.rollback()
                raise Conflict(f"job {job_id} changed while it was being paused; read it and try again")
            add_event(
                session=session,
                job_id=job_id,
                kind=EventKind.pause_requested,
                message="pause requested; the trainer saves a checkpoint at the next step and ends",
            )
            session.commit()
            session.refresh(job)
    return job


def resume_job(*, session: Session, job_id: int, identity: Identity) -> Job:
    """A paused job goes back to the queue; it continues from the checkpoint its pause saved."""
    job = get_job(session=session, job_id=job_id, identity=identity)
    if known_status(job) != JobStatus.paused:
        pausing = " (it is still pausing: resume it once its status is paused)" if job.pause_requested_at else ""
        raise Conflict(f"job {job_id} is {job.status}, not paused{pausing}; only a paused job can be resumed")
    quotas.check_queued(session, quotas.project_of(session, job.project_id))
    if not move_job(session, job_id, JobStatus.paused, status=JobStatus.queued, pause_requested_at=None):
        session.rollback()
        raise Conflict(f"job {job_id} changed while it was being resumed; read it and try again")
    add_event(
        session=session,
        job_id=job_id,
        kind=EventKind.resume_requested,
        message="resumed: queued again; it continues from its newest checkpoint"
        if job.step
        else "resumed: queued again",
    )
    session.commit()
    session.refresh(job)
    try:
        enqueue_job(job_id, attempt=job.attempts + 1)
    except Exception as exc:  # Redis away: the reconciler enqueues queued jobs the queue lacks
        logger.warning("job %s resumed but not enqueued yet: %s", job_id, exc)
    return job


@dataclass(frozen=True)
class Deleted:
    freed_bytes: int
    files: int


def _folder_size(folder: Path) -> tuple[int, int]:
    """(bytes, files) under `folder`; (0, 0) when it is not there."""
    sizes = [size for _path, size in folder_files(folder)]
    return sum(sizes), len(sizes)


def delete_job(*, session: Session, job_id: int, identity: Identity) -> Deleted:
    """A finished or paused job: its logs, events, checkpoints and folder go; its row stays as a
    tombstone (the id is never reused, and every API process learns the job is gone)."""
    job = get_job(session=session, job_id=job_id, identity=identity)
    if not (known_status(job).finished or job.status == JobStatus.paused):
        raise Conflict(
            f"job {job_id} is {job.status}; cancel or pause it first (POST /jobs/{job_id}/cancel), "
            "then delete it once it has stopped"
        )
    job_dir = get_settings().job_dir(job_id)
    if trainer_running(job_dir):
        raise Conflict(f"a trainer of job {job_id} is still running; try again once it has stopped")
    # Conditional on the status it was read with: a resume (paused -> queued) racing this delete
    # makes one of the two lose with a 409, never a queued job that is also deleted.
    if not move_job(
        session,
        job_id,
        job.status,
        deleted_at=utcnow(),
        spec={},
        data_report=None,
        metrics=None,
        vram=None,
        versions=None,
        error_message=None,
    ):
        session.rollback()
        raise Conflict(f"job {job_id} changed while it was being deleted (resumed?); read it and try again")
    for table in (StepLog, JobEvent, Checkpoint):
        session.execute(delete(table).where(col(table.job_id) == job_id))
    session.commit()
    freed, files = _folder_size(job_dir)
    shutil.rmtree(job_dir, ignore_errors=True)
    _in_store(f"job {job_id}'s folder", lambda store: store.remove_job(job_id))
    logger.info("job %s deleted: %d file(s), %d bytes freed", job_id, files, freed)
    return Deleted(freed, files)


def delete_checkpoint(*, session: Session, job_id: int, name: str, identity: Identity) -> Deleted:
    """Any checkpoint, `final` included, leaves the list and the disk. A running job's newest
    checkpoint stays: its trainer may be reading it to resume."""
    job = get_job(session=session, job_id=job_id, identity=identity)
    checkpoint = session.exec(
        select(Checkpoint).where(
            Checkpoint.job_id == job_id, Checkpoint.name == name, Checkpoint.status != CheckpointStatus.removed
        )
    ).first()
    if checkpoint is None:
        raise NotFound(f"job {job_id} has no checkpoint named {name!r}")
    if job.status == JobStatus.running:
        newest = session.exec(
            select(Checkpoint.name)
            .where(Checkpoint.job_id == job_id, Checkpoint.status != CheckpointStatus.removed)
            .order_by(col(Checkpoint.step).desc(), col(Checkpoint.id).desc())
        ).first()
        if newest == name:
            raise Conflict(f"{name} is the newest checkpoint of running job {job_id}; it may be resumed from")
    folder = get_settings().checkpoints_dir(job_id) / checkpoint.name
    freed, files = _folder_size(folder)
    checkpoint.status, checkpoint.removed_at = CheckpointStatus.removed, utcnow()
    session.add(checkpoint)
    add_event(
        session=session,
        job_id=job_id,
        kind=EventKind.checkpoint_deleted,
        message=f"{name} deleted by request ({files} file(s), {freed} bytes freed)",
    )
    session.commit()
    shutil.rmtree(folder, ignore_errors=True)
    _in_store(f"{name} of job {job_id}", lambda store: store.remove_checkpoint(job_id, name))
    return Deleted(freed, files)


def _in_store(what: str, operation: Callable[[SharedStore], None]) -> None:
    """Remove what the shared store holds of a deleted job or checkpoint. The records are gone
    already, so nothing serves or resumes from what a store that fails here keeps: logged, for
    the operator."""
    store = get_store()
    if store is None:
        return
    try:
        operation(store)
    except StorageUnavailable as exc:
        logger.warning("%s stays in the shared store: %s", what, exc)
