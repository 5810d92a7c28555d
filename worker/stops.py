"""How a job that stopped on request is recorded: paused (POST /jobs/{id}/pause) or put back in
the queue because its worker was asked to stop (SIGTERM) or its micro-batch did not fit. None is
a failure, so none counts against MAX_ATTEMPTS (each adds one to `requested_restarts`, which
recover_lost_job subtracts); all continue from the checkpoint the trainer saved as it stopped. A
job whose cancel was accepted meanwhile is neither paused nor queued again: the worker records
it cancelled instead."""

from __future__ import annotations

import logging

from redis.exceptions import RedisError
from sqlmodel import Session

from core.checkpoint_store import sync_records
from core.config import get_settings
from core.contract import EventKind, TrainerResult
from core.events import add_event
from core.methods import facts
from core.models import Job, JobStatus
from core.queue import enqueue_job
from core.spec import AUTO_BASE_MICRO_BATCH
from core.transitions import move_job

logger = logging.getLogger(__name__)


def _saved(result: TrainerResult) -> str:
    return f"; it continues from {result.checkpoint}" if result.checkpoint else ""


def _stop_running(session: Session, job_id: int, status: JobStatus, result: TrainerResult) -> Job | None:
    """running -> status, conditionally (a reconciler may have judged the job lost meanwhile, or a
    cancel may have been accepted)."""
    cleared = {"heartbeat_at": None, "worker_name": None, "phase": None, "pause_requested_at": None}
    if not move_job(
        session,
        job_id,
        JobStatus.running,
        unless_cancelled=True,
        status=status,
        requested_restarts=Job.requested_restarts + 1,
        stalled_since=None,
        **cleared,
    ):
        session.rollback()
        return None
    job = session.get(Job, job_id)
    assert job is not None
    job.step = max(job.step, result.step or 0)
    session.add(job)
    sync_records(session=session, job_id=job_id, checkpoints_dir=get_settings().checkpoints_dir(job_id))
    return job


def record_pause(*, session: Session, job_id: int, result: TrainerResult) -> str:
    job = _stop_running(session, job_id, JobStatus.paused, result)
    if job is None:
        return "nothing"
    add_event(
        session=session,
        job_id=job_id,
        kind=EventKind.paused,
        message=f"paused at step {job.step}{_saved(result)}; the GPU is free. POST /jobs/{job_id}/resume "
        "queues it again",
    )
    session.commit()
    return "paused"


def requeue_after_stop(*, session: Session, job_id: int, result: TrainerResult) -> str:
    job = _stop_running(session, job_id, JobStatus.queued, result)
    if job is None:
        return "nothing"
    add_event(
        session=session,
        job_id=job_id,
        kind=EventKind.requeued,
        message=f"its worker was stopped; the trainer stopped at step {job.step}{_saved(result)}. Queued again",
    )
    session.commit()
    try:
        enqueue_job(job_id, attempt=job.attempts + 1)
    except RedisError as exc:  # the reconciler enqueues queued jobs the queue does not hold
        logger.warning("job %s: could not enqueue it again now (%s); the reconciler will", job_id, exc)
    return "requeued"


def smaller_micro_batch(micro_batch: int) -> int | None:
    """The largest divisor of micro_batch at most half of it (None at 1): the effective batch
    stays exact when the accumulation grows by micro_batch // the result."""
    return next((size for size in range(micro_batch // 2, 0, -1) if micro_batch % size == 0), None)


def retry_with_smaller_batch(*, session: Session, job_id: int, result: TrainerResult) -> str | None:
    """A job out of GPU memory runs again with half the micro-batch and twice the gradient
    accumulation: the same sequences per optimizer step, so the same steps, learning-rate
    schedule and data order; it resumes from its newest checkpoint. None at micro-batch 1 (the
    job fails, with the figures). Not counted against MAX_ATTEMPTS: each retry halves the batch,
    so there are at most log2(micro-batch) of them."""
    job = session.get(Job, job_id)
    if job is None or job.status != JobStatus.running or job.cancel_requested_at is not None:
        return None
    hp = dict(job.spec.get("hyperparameters") or {})
    method = str(job.spec.get("method") or "sft")
    raw = hp.get("per_device_train_batch_size") or 1
    # "auto" that out-of-memory caught before the trainer chose: halve the recipe's micro-batch.
    micro_batch = int(raw) if raw != "auto" else AUTO_BASE_MICRO_BATCH
    smaller = smaller_micro_batch(micro_batch)
    # KTO's KL term needs two rows in a micro-batch: it fails at 2, as other methods do at 1.
    least = facts(method).min_micro_batch if hp.get("loss_type", "kto") == "kto" else 1
    if smaller is None or smaller < least:
        return None
    factor = micro_batch // smaller
    accumulation = int(hp.get("gradient_accumulation_steps") or 1) * factor
    hp.update(per_device_train_batch_size=smaller, gradient_accumulation_steps=accumulation)
    if hp.get("steps_per_generation"):  # GRPO: the same completions generated at once
        hp["steps_per_generation"] = int(hp["steps_per_generation"]) * factor
    eval_batch = hp.get("per_device_eval_batch_size")
    if eval_batch and int(eval_batch) > smaller and method != "grpo":  # GRPO's is a multiple of num_generations
        hp["per_device_eval_batch_size"] = smaller
    spec = {**job.spec, "hyperparameters": hp}
    if not move_job(
        session,
        job_id,
        JobStatus.running,
        unless_cancelled=True,
        status=JobStatus.queued,
        spec=spec,
        heartbeat_at=None,
        worker_name=None,
        phase=None,
        stalled_since=None,
        requested_restarts=Job.requested_restarts + 1,
    ):
        session.rollback()
        return None
    sync_records(session=session, job_id=job_id, checkpoints_dir=get_settings().checkpoints_dir(job_id))
    add_event(
        session=session,
        job_id=job_id,
        kind=EventKind.batch_halved,
        message=f"out of GPU memory ({result.error_message}); queued again with per_device_train_batch_size "
        f"{micro_batch} -> {smaller} and gradient_accumulation_steps {accumulation // factor} -> {accumulation}: "
        "the same effective batch, steps and learning-rate schedule, continuing from its newest checkpoint",
    )
    session.commit()
    try:
        enqueue_job(job_id, attempt=job.attempts + 1)
    except RedisError as exc:
        logger.warning("job %s: could not enqueue it again now (%s); the reconciler will", job_id, exc)
    return "requeued"
