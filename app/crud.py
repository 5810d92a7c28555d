"""Service functions over the job store. These functions commit; routes and tasks call them."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from app import datacheck, idempotency, quotas, uploads
from app.auth import Identity
from app.errors import Conflict, DoesNotFit, NotFound, StorageUnavailable
from app.schemas import LearnedEstimate, MeasurementUsed, TimeEstimate
from app.sources import checked_sources
from core import checkpoint_verify, shared_store
from core.config import get_settings
from core.contract import CheckpointStatus, ErrorCode, EventKind, understood
from core.events import add_event
from core.gpu_leases import host_sizes
from core.measurements import learn, planned_tokens_per_second
from core.methods import METHOD_OPTIONS, SFT_OPTIONS
from core.models import Checkpoint, Job, JobEvent, JobStatus, StepLog, UploadedFile, utcnow
from core.planner import (
    GIB,
    DiskPlan,
    MemoryPlan,
    PlanError,
    auto_micro_batches,
    estimate_seconds,
    gib,
    gpus_needed,
    plan_disk,
    plan_memory,
    read_config,
    refusal,
    resolved_strategy,
    shape_from_config,
    with_micro_batch,
)
from core.queue import enqueue_job, get_redis, smallest_worker_gpu, worker_fp8_support
from core.ray_capacity import read_capacity
from core.shared_store import get_store
from core.spec import JobSpec
from core.transitions import move_job

logger = logging.getLogger(__name__)
# Spec options added after the first release, left out of the stored spec at their defaults so
# that specs stored before and after them look alike.
LATER_OPTION_DEFAULTS: dict[str, object] = {
    "drop_optimizer_state_on_success": False,
    "webhooks": [],
    "integrations": [],
    "gpus": 1,
    "strategy": "auto",
    "priority": 0,
    "method": "sft",
    "grader": None,
    "precision": "auto",  # specs stored while bf16 was the default say so (migration 0017)
    "fp8_recipe": None,
}


def estimate(
    *,
    job_in: JobSpec,
    gpu_memory_bytes: int | None = None,
    allow_network: bool = True,
    training_rows: int | None = None,
    row_format: str | None = None,
) -> tuple[MemoryPlan, DiskPlan]:
    """Plan a spec's GPU memory and disk. The GPU: the one asked for, else the operator's
    GPU_MEMORY_BYTES, else the smallest a live worker reported. `training_rows`, when the data
    was counted, bounds the number of checkpoints."""
    settings = get_settings()
    shape = shape_from_config(read_config(job_in.model, allow_network=allow_network))
    if gpu_memory_bytes is None:
        gpu_memory_bytes = settings.gpu_memory_bytes
    if gpu_memory_bytes is None:
        try:
            gpu_memory_bytes = smallest_worker_gpu()
        except Exception as exc:  # Redis away: plan without a card
            logger.warning("no worker GPU sizes (%s)", exc)
    hp = job_in.hyperparameters
    candidates: tuple[int, ...] | None = None
    if hp.per_device_train_batch_size == "auto":  # planned at the largest micro-batch the trainer may choose
        candidates = tuple(auto_micro_batches(shape, hp, gpu_memory_bytes, job_in.method))
        hp = with_micro_batch(hp, candidates[0])
        job_in = job_in.model_copy(update={"hyperparameters": hp})
    strategy = resolved_strategy(job_in, shape, gpu_memory_bytes)
    backend = job_in.backend
    method = job_in.method
    memory = plan_memory(
        shape, hp, gpu_memory_bytes, gpus=job_in.gpus, strategy=strategy, backend=backend, method=method
    )
    if gpu_memory_bytes:
        memory = dataclasses.replace(memory, gpus_needed=gpus_needed(shape, hp, gpu_memory_bytes, backend, method))
    if candidates is not None:
        memory = dataclasses.replace(memory, auto_micro_batches=candidates)
    disk = plan_disk(shape, hp, settings.data_dir, rows=training_rows, method=method, row_format=row_format)
    return memory, disk


def learned_estimate(
    *, session: Session, job_in: JobSpec, memory: MemoryPlan
) -> tuple[TimeEstimate, LearnedEstimate | None]:
    """The planner's training time, and the estimate as the closest finished jobs correct it."""
    settings = get_settings()
    shape = shape_from_config(read_config(job_in.model, allow_network=False))
    hp = job_in.hyperparameters
    time_estimate = TimeEstimate(
        tokens_per_second=round(planned_tokens_per_second(shape, job_in.gpus, settings.gpu_train_flops), 1),
        seconds=estimate_seconds(shape, hp, gpus=job_in.gpus, rows=None, gpu_train_flops=settings.gpu_train_flops),
    )
    learned = learn(session, shape=shape, spec=job_in, plan=memory)
    if learned is None:
        return time_estimate, None
    return time_estimate, LearnedEstimate(
        total_bytes=learned.total_bytes,
        total_gib=round(learned.total_bytes / GIB, 2) if learned.total_bytes is not None else None,
        verdict=learned.verdict,
        tokens_per_second=learned.tokens_per_second,
        seconds=learned.seconds,
        measurements=[
            MeasurementUsed.model_validate({**used.row.model_dump(), "distance": round(used.distance, 4)})
            for used in learned.used
        ],
    )


def gpus_refusal(job_in: JobSpec) -> str | None:
    """The 422 message for a job asking for more GPUs than any live worker's host has (with Ray,
    more ranks than the whole cluster could place), or None (also when no worker has said yet:
    the job then waits for one)."""
    if job_in.gpus == 1:
        return None
    try:
        connection = get_redis()
        cluster = read_capacity(connection)
        sizes = host_sizes(connection) if cluster is None else {}
    except Exception as exc:  # Redis away: the worker that takes the job refuses it if it must
        logger.warning("no host GPU inventories (%s)", exc)
        return None
    if cluster is not None:
        if job_in.gpus <= cluster.most_ranks:
            return None
        most = cluster.most_ranks
        return f"gpus: the job asks for {job_in.gpus} ranks and {cluster.describe()}; ask for at most {most}"
    if not sizes or job_in.gpus <= max(sizes.values()):
        return None
    hosts = ", ".join(f"{host} has {count}" for host, count in sorted(sizes.items()))
    return (
        f"gpus: the job asks for {job_in.gpus} GPUs of one host and the largest host has {max(sizes.values())} "
        f"({hosts}); ask for at most that many"
    )


def fp8_refusal(job_in: JobSpec) -> str | None:
    """The 422 message for a precision fp8 job that no live worker can run (no card of compute
    capability 8.9 or newer, or no torchao), or None (also when no worker has said yet: the trainer
    then refuses it, with the same words)."""
    if job_in.precision != "fp8":
        return None
    try:
        support = worker_fp8_support()
    except Exception as exc:  # Redis away: the trainer refuses the job if it must
        logger.warning("no worker FP8 support known (%s)", exc)
        return None
    if not support or any(reason == "" for reason in support.values()):
        return None
    reasons = "; ".join(f"{worker}: {reason}" for worker, reason in sorted(support.items()))
    return (
        "precision fp8 needs a GPU with FP8 matmuls (compute capability 8.9 or newer: L4, L40S, H100, H200, B200) "
        f"and torchao on its worker, and no live worker has both ({reasons}); submit the job with precision bf16"
    )


def create_job(*, session: Session, job_in: JobSpec, identity: Identity, claim: idempotency.Claim | None = None) -> Job:
    """Check a spec (its sources, data, plan, and the identity's role and project quotas), store it
    for the identity's project and queue it. With a claim, its Idempotency-Key is kept with the job
    in the same commit (idempotency.Raced when another request with the key committed first)."""
    quotas.check_priority(job_in, identity)
    too_many = gpus_refusal(job_in) or fp8_refusal(job_in)
    if too_many:
        raise DoesNotFit(too_many)
    project = quotas.project_of(session, identity.project_id)
    quotas.check_gpus(project, job_in.gpus)
    quotas.check_queued(session, project)
    job_in = checked_sources(job_in, session=session, check_hub=True, project_id=identity.project_id)
    data_check = datacheck.check_before_queuing(session=session, job_in=job_in)
    try:
        memory, disk = estimate(
            job_in=job_in,
            allow_network=False,
            training_rows=data_check.training_rows,
            row_format=data_check.report.row_format if data_check.report else None,
        )
    except PlanError as exc:
        plan_note = f"not planned before queuing: {exc}"
    else:
        reason = refusal(job_in, memory, disk)
        if reason:
            raise DoesNotFit(reason)
        quotas.check_checkpoint_budget(session, project, disk.required_bytes)
        plan_note = f"planned peak GPU memory {gib(memory.total_bytes)}" + (
            f" of {gib(memory.gpu_memory_bytes)} ({memory.verdict})" if memory.verdict else " (GPU size unknown)"
        )
    spec = job_in.model_dump(mode="json")
    if spec["dataset"]["file_id"] is None:  # specs that name no uploaded file are stored as before
        del spec["dataset"]["file_id"]
    for later_option, default in LATER_OPTION_DEFAULTS.items():  # likewise, at their defaults
        if spec[later_option] == default:
            del spec[later_option]
    for option in METHOD_OPTIONS:  # another method's hyperparameters, which are null
        if spec["hyperparameters"].get(option, 0) is None and option not in SFT_OPTIONS:
            del spec["hyperparameters"][option]
    job = Job(
        spec=spec,
        data_report=data_check.report.model_dump() if data_check.report else None,
        project_id=identity.project_id,
        submitted_by=identity.name if identity.token_prefix else None,
    )
    session.add(job)
    session.flush()
    assert job.id is not None
    add_event(
        session=session,
        job_id=job.id,
        kind=EventKind.queued,
        message=f"job accepted and queued; {data_check.note}; {plan_note}",
    )
    if claim is not None:
        idempotency.record(session, claim, job.id)
    commit_claimed(session, claim)
    # Only after the commit: a worker that picks the id up must find the row. If Redis is
    # down now, the row stays queued and the reconciler enqueues it once Redis is back.
    try:
        enqueue_job(job.id, attempt=1)
    except Exception as exc:  # redis.ConnectionError and friends
        logger.warning("job %s stored but not enqueued yet: %s", job.id, exc)
        add_event(
            session=session,
            job_id=job.id,
            kind=EventKind.enqueue_delayed,
            message=f"the queue could not be reached ({exc}); the job will be enqueued when it is back",
        )
        session.commit()
    return job


def create_or_replay_job(
    *, session: Session, job_in: JobSpec, identity: Identity, claim: idempotency.Claim | None
) -> tuple[Job, bool]:
    """(a new job, False), or (the job the request's Idempotency-Key made, True)."""
    made = idempotency.find(session, claim) if claim is not None else None
    if made is None:
        try:
            return create_job(session=session, job_in=job_in, identity=identity, claim=claim), False
        except idempotency.Raced:
            assert claim is not None
            made = idempotency.replayed(session, claim)
    return get_job(session=session, job_id=made, identity=identity), True


def commit_claimed(session: Session, claim: idempotency.Claim | None) -> None:
    """Commit; a unique-key failure of a claimed create means its key was taken meanwhile (Raced)."""
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        if claim is None:
            raise
        raise idempotency.Raced(claim.key) from None


def get_job(*, session: Session, job_id: int, identity: Identity) -> Job:
    """The job, if the identity may see it; another project's job is a 404 as if there were none."""
    job = session.get(Job, job_id)
    if job is None or not identity.sees(job.project_id):
        raise NotFound(f"job {job_id} not found")
    if job.deleted_at is not None:
        raise NotFound(f"job {job_id} was deleted")
    return job


def known_status(job: Job) -> JobStatus:
    """The job's status, for a change of it; 409 when another version of the service wrote a
    status this one does not know: such a job is left to the version that knows it."""
    status, raw = understood(JobStatus, job.status)
    if raw is not None or status is None:
        raise Conflict(
            f"job {job.id} has the status {raw!r}, which this version of the service does not know (another "
            "version wrote it); it is left as it is: change it through a version that knows that status"
        )
    return status


def cancel_job(*, session: Session, job_id: int, identity: Identity) -> Job:
    """A queued or paused job ends here and now; a running one is asked to stop (its worker ends it
    within CANCEL_GRACE_S). Each move is a conditional update and the job is read again when one
    loses a race (a worker pausing or claiming the job at this very moment), so an accepted cancel
    is never dropped: a job ends cancelled whatever it was doing."""
    for _ in range(5):  # each lost race means the job moved on; it cannot move far
        job = get_job(session=session, job_id=job_id, identity=identity)
        if known_status(job).finished:
            raise Conflict(f"job {job_id} has already finished ({job.status}); there is nothing to cancel")
        now = utcnow()
        if job.status == JobStatus.running:
            if job.cancel_requested_at is not None:
                return job
            if move_job(session, job_id, JobStatus.running, cancel_requested_at=now):
                add_event(
                    session=session,
                    job_id=job_id,
                    kind=EventKind.cancel_requested,
                    message="cancel requested; training stops at its next micro-batch",
                )
                session.commit()
                session.refresh(job)
                return job
        else:
            message = "cancelled while paused" if job.status == JobStatus.paused else "cancelled before it started"
            if move_job(
                session,
                job_id,
                job.status,
                status=JobStatus.cancelled,
                finished_at=now,
                cancel_requested_at=now,
                error_code=ErrorCode.cancelled,
                error_message=message,
            ):
                add_event(session=session, job_id=job_id, kind=EventKind.cancelled, message=message)
                session.commit()
                session.refresh(job)
                return job
        session.rollback()
    raise Conflict(f"job {job_id} kept changing while it was being cancelled; read it and try again")


def list_logs(
    *, session: Session, job_id: int, after_step: int | None, limit: int, identity: Identity
) -> Sequence[StepLog]:
    get_job(session=session, job_id=job_id, identity=identity)
    query = select(StepLog).where(StepLog.job_id == job_id).order_by(col(StepLog.step), col(StepLog.id))
    if after_step is not None:
        query = query.where(col(StepLog.step) > after_step)
    return session.exec(query.limit(limit)).all()


def list_events(
    *, session: Session, job_id: int, after_id: int | None, limit: int, identity: Identity
) -> Sequence[JobEvent]:
    get_job(session=session, job_id=job_id, identity=identity)
    query = select(JobEvent).where(JobEvent.job_id == job_id).order_by(col(JobEvent.id))
    if after_id is not None:
        query = query.where(col(JobEvent.id) > after_id)
    return session.exec(query.limit(limit)).all()


def list_checkpoints(
    *, session: Session, job_id: int, identity: Identity, include_removed: bool = False
) -> Sequence[Checkpoint]:
    get_job(session=session, job_id=job_id, identity=identity)
    query = select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(col(Checkpoint.step), col(Checkpoint.id))
    checkpoints = session.exec(query).all()
    return [c for c in checkpoints if include_removed or c.status != "removed"]


def get_checkpoint(*, session: Session, job_id: int, name: str, identity: Identity) -> Checkpoint:
    get_job(session=session, job_id=job_id, identity=identity)
    checkpoint = session.exec(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.name == name)).first()
    if checkpoint is None:
        raise NotFound(f"job {job_id} has no checkpoint named {name!r}")
    if checkpoint.status == "removed":
        raise NotFound(f"checkpoint {name!r} of job {job_id} was removed (rotated away by save_total_limit)")
    return checkpoint


def request_verification(*, session: Session, job_id: int, name: str, identity: Identity) -> Checkpoint:
    """Ask the API's verifier to hash every file of the checkpoint again (core/checkpoint_verify.py)."""
    checkpoint = get_checkpoint(session=session, job_id=job_id, name=name, identity=identity)
    status, raw = understood(CheckpointStatus, checkpoint.status)
    if raw is not None:
        raise Conflict(
            f"checkpoint {name!r} of job {job_id} has the status {raw!r}, which this version of the service does "
            "not know (another version wrote it); it is left as it is"
        )
    if status == CheckpointStatus.hashing:
        raise Conflict(
            f"checkpoint {name!r} of job {job_id} is still being hashed; its files are verified against those "
            "hashes once they are recorded (its status becomes ready)"
        )
    checkpoint_verify.request_verification(session, checkpoint)
    session.commit()
    session.refresh(checkpoint)
    return checkpoint


FormCheck = Callable[[dict[str, str], bool], None]


async def create_file(
    *,
    session: Session,
    request: Request,
    identity: Identity,
    check_form: FormCheck | None = None,
    key: str | None = None,
    route: str = "POST /files",
) -> tuple[UploadedFile, bool]:
    """Store an upload under DATA_DIR/files: streamed to a temporary name with its sha256 (the
    size limit enforced as bytes arrive), every row checked, then renamed. Anything that fails,
    a client that goes away included, leaves neither a file nor a row. `check_form(fields,
    complete)`, when given, judges the body's other form fields (raising to refuse the upload):
    once as the file part begins, with the fields sent before it, and once the body is complete.
    With an Idempotency-Key, an upload of the same name, bytes and fields as the key's first one
    is not stored again: (the file the key made, True); otherwise (the new file, False)."""
    settings = get_settings()
    files_dir = settings.files_dir()
    files_dir.mkdir(parents=True, exist_ok=True)
    incoming: list[Path] = []
    fields: dict[str, str] | None = None if check_form is None else {}

    def temporary(filename: str) -> Path:
        if check_form is not None and fields is not None:
            check_form(fields, False)  # before a byte of the file is written
        incoming.append(files_dir / f"{uploads.INCOMING_PREFIX}{uuid.uuid4().hex}.{uploads.extension(filename)}")
        return incoming[-1]

    try:
        name, path, size, sha256 = await uploads.receive(
            request,
            temporary,
            limit=settings.max_upload_bytes,
            fields=fields,
            folder=files_dir,
            keep_free=settings.min_free_disk_bytes,
        )
        if check_form is not None and fields is not None:
            check_form(fields, True)
        body = json.dumps({"filename": name, "sha256": sha256, "fields": fields or {}}, sort_keys=True)
        claim = idempotency.Claim.of(key, identity, route, "file", body)
        # Reading every row and the database work are blocking: off the event loop.
        return await run_in_threadpool(
            _store_or_replay,
            session=session,
            identity=identity,
            claim=claim,
            path=path,
            name=name,
            size=size,
            sha256=sha256,
        )
    finally:
        for path in incoming:
            path.unlink(missing_ok=True)  # gone already when stored: renamed


def _store_or_replay(
    *,
    session: Session,
    identity: Identity,
    claim: idempotency.Claim | None,
    path: Path,
    name: str,
    size: int,
    sha256: str,
) -> tuple[UploadedFile, bool]:
    made = idempotency.find(session, claim) if claim is not None else None
    if made is None:
        try:
            stored = _store_file(
                session=session,
                path=path,
                name=name,
                size=size,
                sha256=sha256,
                project_id=identity.project_id,
                claim=claim,
            )
            return stored, False
        except idempotency.Raced:
            assert claim is not None
            made = idempotency.replayed(session, claim)
    return get_file(session=session, file_id=made, identity=identity), True


def _store_file(
    *,
    session: Session,
    path: Path,
    name: str,
    size: int,
    sha256: str,
    project_id: int,
    claim: idempotency.Claim | None = None,
) -> UploadedFile:
    check = uploads.inspect(path, name)
    ext = path.suffix.lstrip(".")
    final = None
    try:
        uploaded = UploadedFile(
            project_id=project_id,
            filename=name,
            path=f"files/{path.name}",
            size_bytes=size,
            sha256=sha256,
            row_format=check.row_format,
            columns=check.columns,
            rows=check.rows,
            bad_rows=check.bad_rows,
            bad_row_examples=check.problems,
        )
        session.add(uploaded)
        session.flush()
        uploaded.path = f"files/{uploaded.id}.{ext}"
        final = path.parent / f"{uploaded.id}.{ext}"
        if claim is not None:
            assert uploaded.id is not None
            idempotency.record(session, claim, uploaded.id)
        os.replace(path, final)
        publish_upload(final)
        commit_claimed(session, claim)
    except BaseException:
        session.rollback()
        if final is not None:
            final.unlink(missing_ok=True)
        raise
    return uploaded


def publish_upload(path: Path) -> None:
    """With a shared store, an upload lands there too, before its row is committed: the host that
    trains on it may be another (core/shared_store.py)."""
    store = get_store()
    if store is None:
        return
    try:
        store.put_upload(path)
    except shared_store.StorageUnavailable as exc:
        raise StorageUnavailable(f"the upload could not be stored: {exc}; nothing was kept, try again") from exc


def get_file(*, session: Session, file_id: int, identity: Identity) -> UploadedFile:
    """The file, if the identity may see it; another project's file is a 404 as if there were none."""
    uploaded = session.get(UploadedFile, file_id)
    if uploaded is None or not identity.sees(uploaded.project_id):
        raise NotFound(f"file {file_id} not found")
    return uploaded


def list_files(*, session: Session, identity: Identity) -> Sequence[UploadedFile]:
    query = select(UploadedFile).order_by(col(UploadedFile.id).desc())
    if identity.scope is not None:
        query = query.where(col(UploadedFile.project_id) == identity.scope)
    return session.exec(query).all()


def delete_file(*, session: Session, file_id: int, identity: Identity) -> None:
    """Remove an uploaded file and its row; refused while a queued, running or paused job uses it."""
    uploaded = get_file(session=session, file_id=file_id, identity=identity)
    active = session.exec(
        select(Job)
        .where(col(Job.status).in_([JobStatus.queued, JobStatus.running, JobStatus.paused]))
        .order_by(col(Job.id))
    ).all()
    users = [
        str(job.id)
        for job in active
        if file_id in {(job.spec.get(part) or {}).get("file_id") for part in ("dataset", "validation")}
    ]
    if users:
        raise Conflict(f"file {file_id} is used by job(s) {', '.join(users)} which are queued, running or paused")
    session.delete(uploaded)
    idempotency.forget_resource(session, "file", file_id)
    session.commit()
    # After the commit: a failed commit leaves the row and its file as they were.
    (get_settings().data_dir.resolve() / uploaded.path).unlink(missing_ok=True)
    store = get_store()
    if store is not None:
        try:
            store.remove_upload(Path(uploaded.path).name)
        except shared_store.StorageUnavailable as exc:  # the row is gone: GET /storage lists what is left
            logger.warning("file %s: its copy in the shared store could not be removed: %s", file_id, exc)
