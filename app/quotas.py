"""A project's quotas and a job's priority, judged when a job is submitted or resumed.

- `max_gpus`: the most GPUs the project's jobs hold at once. A job asking for more can never run:
  422. Jobs within it wait in the GPU line while the project's running jobs hold the rest
  (core/gpu_leases.py holds them to it, atomically with the leases).
- `max_queued_jobs`: the most of its jobs queued at once: one more is a 429 until one starts,
  is cancelled or paused.
- `max_checkpoint_bytes`: what its jobs' checkpoints may take. A job whose planned checkpoints
  alone exceed it is a 422; one that does not fit beside what the project's checkpoints already
  take is a 429 until some are deleted.
- `priority`: members up to MEMBER_MAX_PRIORITY, admins up to 100, anyone down to -100 (422).

Every refusal names the quota, its value and the usage."""

from __future__ import annotations

from sqlalchemy import func
from sqlmodel import Session, col, select

from app.auth import Identity
from app.errors import InvalidFields, TooManyRequests
from core.config import get_settings
from core.models import Checkpoint, CheckpointStatus, Job, JobStatus, Project
from core.planner import gib
from core.spec import MAX_PRIORITY, JobSpec


class QuotaExceeded(InvalidFields):
    """A job that can never run within its project's quota (422, naming the quota)."""


def project_of(session: Session, project_id: int) -> Project:
    project = session.get(Project, project_id)
    assert project is not None, f"project {project_id} is gone"  # projects are never deleted
    return project


def check_priority(job_in: JobSpec, identity: Identity) -> None:
    highest = MAX_PRIORITY if identity.is_admin else get_settings().member_max_priority
    if job_in.priority > highest:
        raise InvalidFields(
            [
                {
                    "field": "priority",
                    "message": f"{job_in.priority} is above what a {identity.role} may ask for: at most {highest} "
                    f"(MEMBER_MAX_PRIORITY for members; admins up to {MAX_PRIORITY})",
                }
            ]
        )


def check_gpus(project: Project, gpus: int) -> None:
    if project.max_gpus is not None and gpus > project.max_gpus:
        raise QuotaExceeded(
            [
                {
                    "field": "gpus",
                    "message": f"quota max_gpus: the job asks for {gpus} GPUs and project {project.name} may hold "
                    f"{project.max_gpus} at once",
                }
            ]
        )


def queued_jobs(session: Session, project_id: int) -> int:
    query = (
        select(func.count())
        .select_from(Job)
        .where(col(Job.project_id) == project_id, col(Job.status) == JobStatus.queued, col(Job.deleted_at).is_(None))
    )
    return int(session.exec(query).one())


def check_queued(session: Session, project: Project) -> None:
    if project.max_queued_jobs is None:
        return
    assert project.id is not None
    queued = queued_jobs(session, project.id)
    if queued >= project.max_queued_jobs:
        raise TooManyRequests(
            f"quota max_queued_jobs: project {project.name} has {queued} jobs queued of the {project.max_queued_jobs} "
            "it may have; submit again once one has started, or cancel or pause one"
        )


def checkpoint_bytes(session: Session, project_id: int) -> int:
    """What the project's jobs' checkpoints take, as recorded (removed ones and deleted jobs' aside)."""
    query = (
        select(func.coalesce(func.sum(Checkpoint.size_bytes), 0))
        .join(Job, col(Job.id) == col(Checkpoint.job_id))
        .where(
            col(Job.project_id) == project_id,
            col(Job.deleted_at).is_(None),
            col(Checkpoint.status) != CheckpointStatus.removed,
        )
    )
    return int(session.exec(query).one())


def gpus_in_use(session: Session, project_id: int) -> int:
    """GPUs the project's running jobs hold, as their records say."""
    running = session.exec(
        select(Job.spec).where(col(Job.project_id) == project_id, col(Job.status) == JobStatus.running)
    ).all()
    return sum(int((spec or {}).get("gpus", 1)) for spec in running)


def check_checkpoint_budget(session: Session, project: Project, planned_bytes: int | None) -> None:
    budget = project.max_checkpoint_bytes
    if budget is None:
        return
    assert project.id is not None
    if planned_bytes is not None and planned_bytes > budget:
        raise QuotaExceeded(
            [
                {
                    "field": "hyperparameters.save_total_limit",
                    "message": f"quota max_checkpoint_bytes: the job's checkpoints are planned at {gib(planned_bytes)} "
                    f"and project {project.name} may keep {gib(budget)} of them; keep fewer (save_total_limit) "
                    "or save less often (save_steps)",
                }
            ]
        )
    used = checkpoint_bytes(session, project.id)
    wanted = used + (planned_bytes or 0)
    if wanted > budget:
        planned = f" and this job's are planned at {gib(planned_bytes)}" if planned_bytes else ""
        raise TooManyRequests(
            f"quota max_checkpoint_bytes: project {project.name}'s checkpoints take {gib(used)}{planned}, over its "
            f"{gib(budget)}; delete jobs or checkpoints it no longer needs (DELETE /jobs/{{id}}, DELETE "
            "/jobs/{id}/checkpoints/{name})"
        )
