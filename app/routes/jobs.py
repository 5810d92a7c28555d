"""/jobs: submit, list, read, cancel; step logs and events."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from sqlmodel import col, select
from starlette.convertors import Convertor, register_url_convertor

from app import crud, idempotency, lifecycle, pages, records
from app.access import set_audit_target
from app.auth import Identity
from app.db import SessionDep, run_db
from app.deps import IdentityDep, require_token
from app.downloads import stream_tar, tar_length, tar_members
from app.errors import CannotPlan, NotFound, error_responses
from app.presenters import job_public
from app.schemas import (
    AutoMicroBatch,
    DeletedPublic,
    DiskEstimate,
    Estimate,
    EstimateRequest,
    EventPage,
    JobPage,
    JobPublic,
    MemoryEstimate,
    StepLogPage,
    WebhookDeliveryList,
    WebhookDeliveryPublic,
)
from app.sources import checked_sources
from core.config import get_settings
from core.models import JobStatus, WebhookDelivery
from core.planner import GIB, PlanError, with_micro_batch
from core.spec import JOB_SPEC_EXAMPLE, MAX_DB_INT, JobSpec, UrlInt

# Every route here may answer these: no token, a parameter that does not validate, a database
# that cannot answer.
router = APIRouter(
    prefix="/jobs", tags=["jobs"], dependencies=[Depends(require_token)], responses=error_responses(401, 422, 503)
)

JobId = Annotated[UrlInt, Path(ge=1, le=MAX_DB_INT, description="the job's id")]
NOT_FOUND: dict[int | str, dict[str, Any]] = error_responses(404)


def submit_description() -> str:
    # The example lives in the text, not as an OpenAPI `example`: schemathesis 4.32's coverage
    # phase takes an example's keys for required properties and reports false failures.
    return (
        "Validate a job spec, store it and queue it. 422 names every bad field, or shows the figures when "
        "the job cannot fit the GPU or the disk (see POST /jobs/estimate). The standard recipe:\n\n"
        f"```json\n{json.dumps(JOB_SPEC_EXAMPLE, indent=2)}\n```"
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    description=submit_description(),
    responses=error_responses(409, 413, 429),
)
def submit_job(
    job_in: JobSpec,
    session: SessionDep,
    identity: IdentityDep,
    request: Request,
    response: Response,
    idempotency_key: idempotency.KeyHeader = None,
) -> JobPublic:
    claim = idempotency.Claim.of(idempotency_key, identity, "POST /jobs", "job", job_in.model_dump_json())
    job, replayed = crud.create_or_replay_job(session=session, job_in=job_in, identity=identity, claim=claim)
    if replayed:
        response.headers[idempotency.REPLAYED_HEADER] = "true"
    set_audit_target(request, f"job {job.id}")
    records.get_record_cache().forget()  # lists read before it would miss it
    return job_public(job)


@router.post("/estimate", response_model=Estimate, responses=error_responses(413))
def estimate_job(request: EstimateRequest, session: SessionDep) -> Estimate:
    """Expected peak GPU memory (as nvidia-smi shows it), disk and training time for a spec, from the
    model's config.json alone, with a verdict for the GPU and the largest micro-batch and sequence
    length that fit; and `learned`: the same corrected by the closest jobs of that shape that
    finished here, which it names (docs/planner.md). Nothing is stored or queued."""
    job_in = checked_sources(JobSpec.model_validate(request.model_dump(exclude={"gpu_memory_bytes"})))
    try:
        memory, disk = crud.estimate(job_in=job_in, gpu_memory_bytes=request.gpu_memory_bytes)
        if memory.auto_micro_batches:  # the time and what was learned, at the micro-batch planned
            planned_hp = with_micro_batch(job_in.hyperparameters, memory.auto_micro_batches[0])
            job_in = job_in.model_copy(update={"hyperparameters": planned_hp})
        time_estimate, learned = crud.learned_estimate(session=session, job_in=job_in, memory=memory)
    except PlanError as exc:
        raise CannotPlan(str(exc)) from exc
    return Estimate(
        memory=MemoryEstimate(
            total_bytes=memory.total_bytes,
            total_gib=round(memory.total_bytes / GIB, 2),
            parts=memory.parts,
            optimizer_paged=memory.optimizer_paged,
            parameters=memory.parameters,
            gpu_memory_bytes=memory.gpu_memory_bytes,
            verdict=memory.verdict,
            max_micro_batch=memory.max_micro_batch,
            max_seq_length=memory.max_seq_length,
            gpus=memory.gpus,
            strategy=memory.strategy,  # type: ignore[arg-type]
            gpus_needed=memory.gpus_needed,
            fsdp_layout=memory.fsdp_layout,  # type: ignore[arg-type]
        ),
        disk=DiskEstimate(**dataclasses.asdict(disk)),
        time=time_estimate,
        learned=learned,
        auto_micro_batch=AutoMicroBatch(
            candidates=list(memory.auto_micro_batches),
            sequences_per_step=job_in.hyperparameters.sequences_per_step,
        )
        if memory.auto_micro_batches
        else None,
    )


FieldsQuery = Annotated[
    str | None,
    Query(
        description="only these top-level fields of each record, comma-separated (e.g. status,progress,metrics)",
        pattern=r"^[a-z_]+(,[a-z_]+)*$",
        max_length=400,
    ),
]
CONDITIONAL: dict[int | str, dict[str, Any]] = {304: {"description": "unchanged since the ETag in If-None-Match"}}
# The request headers these routes read, for the OpenAPI document. They are read from the
# request rather than declared as parameters: FastAPI's per-parameter work is a large share of
# a poller's request once the record comes from memory.
IF_NONE_MATCH = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "an ETag from an earlier answer: 304 with no body when nothing changed",
}
CACHE_CONTROL = {
    "name": "Cache-Control",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "`no-cache`: read the database, not this process's copy in memory",
}


def field_names(fields: str | None) -> list[str] | None:
    if not fields:
        return None
    names = fields.split(",")
    unknown = records.unknown_fields(names)
    if unknown:
        raise RequestValidationError(
            [
                {
                    "type": "unknown_field",
                    "loc": ("query", "fields"),
                    "input": fields,
                    "msg": f"unknown field(s) {', '.join(unknown)}; a record has {', '.join(records.RECORD_FIELDS)}",
                }
            ]
        )
    return names


def conditional(body: bytes, etag: str, request: Request) -> Response:
    return records.conditional(body, etag, request.headers.get("if-none-match"))


@router.get(
    "", response_model=JobPage, responses=CONDITIONAL, openapi_extra={"parameters": [IF_NONE_MATCH, CACHE_CONTROL]}
)
async def list_jobs(
    request: Request,
    identity: IdentityDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    cursor: Annotated[UrlInt | None, Query(ge=1, le=MAX_DB_INT, description="next_cursor of the previous page")] = None,
    limit: Annotated[UrlInt, Query(ge=1, le=500)] = 50,
    fields: FieldsQuery = None,
) -> Response:
    """Jobs, newest first (the token's project's; an admin's: every project's). Records of finished
    jobs come from memory; those of queued and running jobs are at most RECORD_MAX_AGE_S old."""
    names = field_names(fields)
    fresh = records.wants_fresh(request.headers.get("cache-control"))
    cache = records.get_record_cache()
    limit = min(limit, get_settings().page_size_max)
    ids, next_cursor = await cache.job_ids(status_, cursor, limit, identity.scope, fresh=fresh)
    found = await cache.get_many(ids, fresh=fresh)
    body, etag = records.job_list(ids, next_cursor, found, names)
    return conditional(body, etag, request)


class JobIdConvertor(Convertor[str]):
    """Any path segment but `estimate`, so that GET /jobs/estimate is a 405 (it takes POST) and
    not a job id that fails to parse; a segment that is not a number is still a 422 naming job_id."""

    regex = "(?!estimate$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return str(value)


register_url_convertor("job_id", JobIdConvertor())


@router.get(
    "/{job_id:job_id}",
    response_model=JobPublic,
    responses={**NOT_FOUND, **CONDITIONAL},
    openapi_extra={"parameters": [IF_NONE_MATCH, CACHE_CONTROL]},
)
async def read_job(request: Request, job_id: JobId, identity: IdentityDep, fields: FieldsQuery = None) -> Response:
    """The job record. A queued or running job's is at most RECORD_MAX_AGE_S old (0.5 s);
    send `If-None-Match` with the last ETag to get a 304 when nothing changed, and `fields`
    to get only what you show."""
    names = field_names(fields)
    fresh = records.wants_fresh(request.headers.get("cache-control"))
    record = await visible_record(job_id, identity, fresh=fresh)
    body, etag = records.projection(record, names)
    return conditional(body, etag, request)


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    responses=error_responses(404, 409),
)
def cancel_job(job_id: JobId, session: SessionDep, identity: IdentityDep) -> JobPublic:
    """A queued job never starts; a running one stops at its next step (watch `status`)."""
    job = crud.cancel_job(session=session, job_id=job_id, identity=identity)
    records.get_record_cache().forget(job_id)  # this process's next read shows the cancel
    return job_public(job)


@router.post("/{job_id}/pause", response_model=JobPublic, responses=error_responses(404, 409))
def pause_job(job_id: JobId, session: SessionDep, identity: IdentityDep) -> JobPublic:
    """A queued job stays out of the queue until resumed. A running job saves a checkpoint at its
    next step and its trainer ends, which frees the GPU; its status becomes `paused` then (watch
    `status`). Resume, cancel or delete a paused job."""
    job = lifecycle.pause_job(session=session, job_id=job_id, identity=identity)
    records.get_record_cache().forget(job_id)
    return job_public(job)


@router.post("/{job_id}/resume", response_model=JobPublic, responses=error_responses(404, 409, 429))
def resume_job(job_id: JobId, session: SessionDep, identity: IdentityDep) -> JobPublic:
    """Queue a paused job again. It continues from the checkpoint its pause saved: the same step,
    learning rate and data order, and no step logged twice."""
    job = lifecycle.resume_job(session=session, job_id=job_id, identity=identity)
    records.get_record_cache().forget(job_id)
    return job_public(job)


@router.delete("/{job_id:job_id}", response_model=DeletedPublic, responses={**NOT_FOUND, **error_responses(409)})
def delete_job(job_id: JobId, session: SessionDep, identity: IdentityDep) -> DeletedPublic:
    """A finished or paused job: its record, logs, events, checkpoints and folder. 409 while it is
    queued or running (cancel or pause it first). Other API processes answer 404 for it within
    FINISHED_RECORD_MAX_AGE_S."""
    deleted = lifecycle.delete_job(session=session, job_id=job_id, identity=identity)
    records.get_record_cache().forget(job_id)
    pages.get_page_cache().forget(job_id)
    return DeletedPublic(freed_bytes=deleted.freed_bytes, files=deleted.files)


@router.get("/{job_id}/webhooks", response_model=WebhookDeliveryList, responses=NOT_FOUND)
def read_webhook_deliveries(job_id: JobId, session: SessionDep, identity: IdentityDep) -> WebhookDeliveryList:
    """Each delivery of the job's events to its webhooks: status, attempts, the receiver's last
    answer."""
    crud.get_job(session=session, job_id=job_id, identity=identity)
    rows = session.exec(
        select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(col(WebhookDelivery.id))
    ).all()
    return WebhookDeliveryList(items=[WebhookDeliveryPublic.model_validate(row, from_attributes=True) for row in rows])


# The trackers whose files a job keeps in its folder (trainer/trackers.py): TensorBoard's event
# files, and an offline W&B run (for `wandb sync`).
TRACKER_FOLDERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


@router.get(
    "/{job_id}/integrations/{tracker}/archive",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}, **NOT_FOUND},
)
def download_tracker_files(
    job_id: JobId,
    tracker: Annotated[Literal["tensorboard", "wandb"], Path(description="tensorboard, or wandb (an offline run)")],
    session: SessionDep,
    identity: IdentityDep,
) -> StreamingResponse:
    """The files a tracker of the job's `integrations` keeps in the job's folder, as one tar:
    TensorBoard's event files (`tensorboard --logdir` the unpacked folder), or an offline W&B run
    (`wandb sync` it). A running job's files are sent as they are at the request."""
    job = crud.get_job(session=session, job_id=job_id, identity=identity)
    if not any(integration.get("type") == tracker for integration in job.spec.get("integrations") or []):
        raise NotFound(f"job {job_id} has no {tracker} integration")
    folder = get_settings().job_dir(job_id) / TRACKER_FOLDERS[tracker]
    files = (
        sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file() and not path.is_symlink())
        if folder.is_dir()
        else []
    )
    if not files:
        raise NotFound(f"job {job_id} has no {tracker} files yet (they appear once training starts)")
    members = tar_members(folder, f"job-{job_id}-{tracker}", files)
    return StreamingResponse(
        stream_tar(members),
        media_type="application/x-tar",
        headers={
            "Content-Length": str(tar_length(members)),
            "Content-Disposition": f'attachment; filename="job-{job_id}-{tracker}.tar"',
        },
    )


async def visible_record(job_id: int, identity: Identity, *, fresh: bool = False) -> records.Record:
    """The job's record, if the identity may see it; 404 as for no such job otherwise."""
    record = await records.get_record_cache().get(job_id, fresh=fresh)
    if record is None or not identity.sees(record.project_id):
        raise NotFound(f"job {job_id} not found")
    return record


async def job_page(job_id: int, identity: Identity, key: tuple[Any, ...], build: Any, *args: Any) -> tuple[bytes, str]:
    """A page of the job's logs or events: from memory when the job has finished (it cannot
    change any more), else read now. 404 when there is no such job (or it is another project's)."""
    record = await visible_record(job_id, identity)
    cache = pages.get_page_cache()
    if record.finished and (page := cache.get(key)) is not None:
        return page
    body: bytes = await run_db(build, job_id, *args)
    return cache.put(key, body) if record.finished else (body, records.etag_of(body))


@router.get(
    "/{job_id}/logs",
    response_model=StepLogPage,
    responses={**NOT_FOUND, **CONDITIONAL},
    openapi_extra={"parameters": [IF_NONE_MATCH]},
)
async def read_logs(
    request: Request,
    job_id: JobId,
    identity: IdentityDep,
    after_step: Annotated[UrlInt | None, Query(ge=0, le=MAX_DB_INT, description="only steps after this one")] = None,
    limit: Annotated[UrlInt, Query(ge=1, le=5000)] = 1000,
) -> Response:
    """Step logs, oldest first. Page on with `after_step=next_after_step`; a poller of a running
    job passes the last step it has and gets only the new rows."""
    key = ("logs", job_id, after_step, limit)
    body, etag = await job_page(job_id, identity, key, pages.log_page, after_step, limit)
    return conditional(body, etag, request)


@router.get(
    "/{job_id}/events",
    response_model=EventPage,
    responses={**NOT_FOUND, **CONDITIONAL},
    openapi_extra={"parameters": [IF_NONE_MATCH]},
)
async def read_events(
    request: Request,
    job_id: JobId,
    identity: IdentityDep,
    after_id: Annotated[UrlInt | None, Query(ge=0, le=MAX_DB_INT, description="only events after this id")] = None,
    limit: Annotated[UrlInt, Query(ge=1, le=5000)] = 1000,
) -> Response:
    """State changes and messages, oldest first. Page on (or poll) with `after_id=next_after_id`."""
    key = ("events", job_id, after_id, limit)
    body, etag = await job_page(job_id, identity, key, pages.event_page, after_id, limit)
    return conditional(body, etag, request)
