"""/v1: OpenAI-compatible fine-tuning and files, for the official `openai` SDK pointed at this
server (base_url=<server>/v1, api_key=<one of API_TOKENS>). A second view of the same jobs, files
and checkpoints as the native routes, through the same code (app/crud.py, app/lifecycle.py, the
record cache); app/openai_compat.py translates. Errors come in OpenAI's shape (app/errors.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import FileResponse
from sqlmodel import Session

from app import crud, idempotency, lifecycle, records
from app.access import set_audit_target
from app.auth import Identity
from app.db import SessionDep, run_db
from app.deps import IdentityDep, require_token
from app.errors import AppError, BadRequest, InvalidDataset, InvalidFields, NotFound, openai_error_responses
from app.openai_compat import (
    CHECKPOINT_PREFIX,
    FILE_PREFIX,
    FILE_PURPOSE,
    FINISHED_STATUSES,
    JOB_PREFIX,
    NATIVE_ID_RE,
    RESULT_FILE_RE,
    CheckpointPage,
    CreateFineTuningJob,
    EventList,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    JobList,
    check_files,
    check_purpose,
    checkpoint_object,
    file_object,
    job_object,
    job_spec,
    jobs_with_metadata,
    list_events,
    metadata_filters,
    native_id,
    read_extras,
    request_param,
    result_csv,
    result_file_object,
)
from app.presenters import job_public
from app.uploads import upload_body
from core.config import get_settings
from core.db import get_engine
from core.models import Job, OpenAIJob
from core.spec import MAX_DB_INT

router = APIRouter(
    prefix="/v1",
    tags=["openai-compatible"],
    dependencies=[Depends(require_token)],
    responses=openai_error_responses(401, 422, 503),
)

JobIdPath = Annotated[str, Path(max_length=100, description="ftjob-<id> (a native id alone works too)")]
FileIdPath = Annotated[str, Path(max_length=100, description="file-<id> (a native id alone works too)")]
After = Annotated[str | None, Query(max_length=100, description="the last id of the previous page")]
NOT_FOUND = openai_error_responses(404)


def cursor(after: str | None, prefix: str) -> int | None:
    """`after`'s native id; a 400 naming `after` when it is not an id of this kind."""
    if after is None:
        return None
    digits = after.removeprefix(prefix)
    if NATIVE_ID_RE.match(digits) and 1 <= int(digits) <= MAX_DB_INT:
        return int(digits)
    raise BadRequest(f"after {after!r} is not an id like {prefix}1", param="after")


# ---- files ----------------------------------------------------------------------------------------

UPLOAD_BODY = upload_body(
    "a JSON Lines dataset (.jsonl; .json and .parquet are read too)",
    purpose={"type": "string", "enum": [FILE_PURPOSE]},
)


@router.post(
    "/files",
    response_model=FileObject,
    openapi_extra=UPLOAD_BODY,
    responses=openai_error_responses(400, 409, 413, 507),
)
async def create_file(
    request: Request,
    response: Response,
    session: SessionDep,
    identity: IdentityDep,
    idempotency_key: idempotency.KeyHeader = None,
) -> FileObject:
    """Upload a dataset for fine-tuning (`purpose=fine-tune`): POST /files, with every row read and
    checked; the answer is OpenAI's file object, id `file-<native id>`."""
    uploaded, replayed = await crud.create_file(
        session=session,
        request=request,
        identity=identity,
        check_form=check_purpose,
        key=idempotency_key,
        route="POST /v1/files",
    )
    if replayed:
        response.headers[idempotency.REPLAYED_HEADER] = "true"
    set_audit_target(request, f"file {uploaded.id}")
    return file_object(uploaded)


@router.get("/files", response_model=FileList, responses=openai_error_responses(400))
def list_files(
    session: SessionDep,
    identity: IdentityDep,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    purpose: Annotated[str | None, Query(max_length=100)] = None,
) -> FileList:
    """Uploaded files (every one is a fine-tune file), newest first unless `order=asc`."""
    after_id = cursor(after, FILE_PREFIX)
    files = list(crud.list_files(session=session, identity=identity)) if purpose in (None, FILE_PURPOSE) else []
    if order == "asc":
        files.reverse()
    if after_id is not None:
        files = [f for f in files if f.id is not None and (f.id > after_id if order == "asc" else f.id < after_id)]
    page = [file_object(f) for f in files[:limit]]
    return FileList.of(page, has_more=len(files) > limit)


def result_file(session: Session, file_id: str, identity: Identity) -> tuple[FileObject, bytes] | None:
    """A finished job's result file (file-results-ftjob-<id>), made from its step logs; None when
    the id is not one of those."""
    match = RESULT_FILE_RE.match(file_id)
    if match is None:
        return None
    job_id = int(match.group(1))
    missing = NotFound(f"no file {file_id}: job {JOB_PREFIX}{job_id} has no result file (it has not finished)")
    if not 1 <= job_id <= MAX_DB_INT:
        raise missing
    try:
        job = crud.get_job(session=session, job_id=job_id, identity=identity)
    except NotFound:
        raise missing from None
    if job.status not in FINISHED_STATUSES or job.started_at is None or job.finished_at is None:
        raise missing
    content = result_csv(session, job_id)
    return result_file_object(job_id, int(job.finished_at.timestamp()), content), content


@router.get("/files/{file_id}", response_model=FileObject, responses=NOT_FOUND)
def read_file(file_id: FileIdPath, session: SessionDep, identity: IdentityDep) -> FileObject:
    """A file's object; a finished job's result file (its `result_files`) too."""
    results = result_file(session, file_id, identity)
    if results is not None:
        return results[0]
    return file_object(
        crud.get_file(session=session, file_id=native_id(file_id, FILE_PREFIX, "file"), identity=identity)
    )


@router.delete("/files/{file_id}", response_model=FileDeleted, responses=openai_error_responses(404, 409))
def delete_file(file_id: FileIdPath, session: SessionDep, identity: IdentityDep) -> FileDeleted:
    """Delete the file (DELETE /files/{id}); 409 while a queued, running or paused job uses it."""
    native = native_id(file_id, FILE_PREFIX, "file")
    crud.delete_file(session=session, file_id=native, identity=identity)
    return FileDeleted(id=f"{FILE_PREFIX}{native}", deleted=True)


@router.get(
    "/files/{file_id}/content",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}, "text/csv": {}}}, **NOT_FOUND},
)
def read_file_content(file_id: FileIdPath, session: SessionDep, identity: IdentityDep) -> Response:
    """The file's bytes, as uploaded; a result file's CSV."""
    results = result_file(session, file_id, identity)
    if results is not None:
        return Response(
            results[1],
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{results[0].filename}"'},
        )
    uploaded = crud.get_file(session=session, file_id=native_id(file_id, FILE_PREFIX, "file"), identity=identity)
    path = get_settings().data_dir.resolve() / uploaded.path
    if not path.is_file():
        raise NotFound(f"file {FILE_PREFIX}{uploaded.id} is recorded but gone from the disk")
    return FileResponse(path, media_type="application/octet-stream", filename=uploaded.filename)


# ---- fine-tuning jobs -----------------------------------------------------------------------------


@contextlib.contextmanager
def named_as_openai(job_id: int) -> Iterator[None]:
    """The native "job 7 not found" as the request named the job: ftjob-7."""
    try:
        yield
    except NotFound as exc:
        if not exc.detail.startswith(f"job {job_id} "):
            raise
        gone = " (it was deleted)" if "deleted" in exc.detail else ""
        raise NotFound(f"fine-tuning job {JOB_PREFIX}{job_id} not found{gone}") from None


def _extras(job_ids: list[int]) -> dict[int, OpenAIJob]:
    with Session(get_engine()) as session:
        return read_extras(session, job_ids)


def _shown(session: Session, job: Job) -> FineTuningJob:
    assert job.id is not None
    return job_object(job_public(job).model_dump(mode="json"), session.get(OpenAIJob, job.id), time.time())


@router.post("/fine_tuning/jobs", response_model=FineTuningJob, responses=openai_error_responses(400, 409, 413, 429))
def create_job(
    request: CreateFineTuningJob,
    session: SessionDep,
    identity: IdentityDep,
    http: Request,
    response: Response,
    idempotency_key: idempotency.KeyHeader = None,
) -> FineTuningJob:
    """Create a fine-tuning job: the request becomes a native job spec (README, "OpenAI-compatible
    API", for the mapping) and is submitted as POST /jobs submits one, with the same checks. The
    `openai` SDK sends an Idempotency-Key with `extra_headers={"Idempotency-Key": ...}`."""
    claim = idempotency.Claim.of(
        idempotency_key, identity, "POST /v1/fine_tuning/jobs", "job", request.model_dump_json()
    )
    made = idempotency.find(session, claim) if claim is not None else None
    if made is not None:
        response.headers[idempotency.REPLAYED_HEADER] = "true"
        with named_as_openai(made):
            return _shown(session, crud.get_job(session=session, job_id=made, identity=identity))
    spec = job_spec(request)
    check_files(session, spec, identity.scope)
    try:
        job, replayed = crud.create_or_replay_job(session=session, job_in=spec, identity=identity, claim=claim)
    except AppError as exc:  # name the request's own fields
        if isinstance(exc, InvalidFields) and exc.errors:
            exc.param = request_param(exc.errors[0]["field"].split("."))
        elif isinstance(exc, InvalidDataset):
            exc.param = "training_file"
        raise
    assert job.id is not None
    set_audit_target(http, f"job {job.id}")
    if replayed:  # another request with the key made it a moment ago, and keeps its extras
        response.headers[idempotency.REPLAYED_HEADER] = "true"
    elif request.suffix is not None or request.metadata is not None:
        session.add(OpenAIJob(job_id=job.id, suffix=request.suffix, job_metadata=request.metadata))
        session.commit()
    records.get_record_cache().forget()
    return _shown(session, job)


def _with_metadata(
    wanted: dict[str, str], project_id: int | None, after: int | None, limit: int
) -> tuple[list[int], bool]:
    with Session(get_engine()) as session:
        return jobs_with_metadata(session, wanted, project_id, after, limit)


@router.get("/fine_tuning/jobs", response_model=JobList, responses=openai_error_responses(400))
async def list_jobs(
    request: Request,
    identity: IdentityDep,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    metadata: Annotated[
        str | None,
        Query(
            max_length=100,
            description="`null`: only jobs without metadata; filter by pairs with `metadata[key]=value` (each "
            "given pair must match; the SDK's `metadata={...}`)",
        ),
    ] = None,
) -> JobList:
    """Jobs, newest first (the token's project's, those submitted at POST /jobs too; an admin's: every
    project's); page on with `after=<the last id>`; `metadata[key]=value` keeps jobs created at
    /v1 with that metadata."""
    after_id = cursor(after, JOB_PREFIX)
    wanted = metadata_filters(request.query_params.multi_items())
    cache = records.get_record_cache()
    if wanted is None:
        ids, next_cursor = await cache.job_ids(None, after_id, limit, identity.scope)
        has_more = next_cursor is not None
    else:
        ids, has_more = await run_db(_with_metadata, wanted, identity.scope, after_id, limit)
    found = await cache.get_many(ids)
    extras = await run_db(_extras, ids)
    now = time.time()
    return JobList(
        data=[job_object(records.as_dict(found[i].body), extras.get(i), now) for i in ids if i in found],
        has_more=has_more,
    )


@router.get("/fine_tuning/jobs/{fine_tuning_job_id}", response_model=FineTuningJob, responses=NOT_FOUND)
async def read_job(fine_tuning_job_id: JobIdPath, identity: IdentityDep) -> FineTuningJob:
    job_id = native_id(fine_tuning_job_id, JOB_PREFIX, "fine-tuning job")
    record = await records.get_record_cache().get(job_id)
    if record is None or not identity.sees(record.project_id):
        raise NotFound(f"fine-tuning job {JOB_PREFIX}{job_id} not found")
    extras = await run_db(_extras, [job_id])
    return job_object(records.as_dict(record.body), extras.get(job_id), time.time())


CHANGES = openai_error_responses(404, 409)


@router.post("/fine_tuning/jobs/{fine_tuning_job_id}/cancel", response_model=FineTuningJob, responses=CHANGES)
def cancel_job(fine_tuning_job_id: JobIdPath, session: SessionDep, identity: IdentityDep) -> FineTuningJob:
    """POST /jobs/{id}/cancel: a queued or paused job is cancelled at once, a running one stops at
    its next step (its status is `running` until then); 409 once it has finished."""
    job_id = native_id(fine_tuning_job_id, JOB_PREFIX, "fine-tuning job")
    with named_as_openai(job_id):
        job = crud.cancel_job(session=session, job_id=job_id, identity=identity)
    records.get_record_cache().forget(job_id)
    return _shown(session, job)


@router.post("/fine_tuning/jobs/{fine_tuning_job_id}/pause", response_model=FineTuningJob, responses=CHANGES)
def pause_job(fine_tuning_job_id: JobIdPath, session: SessionDep, identity: IdentityDep) -> FineTuningJob:
    """POST /jobs/{id}/pause: a queued job stays out of the queue; a running one saves a checkpoint
    at its next step and its status becomes `paused`."""
    job_id = native_id(fine_tuning_job_id, JOB_PREFIX, "fine-tuning job")
    with named_as_openai(job_id):
        job = lifecycle.pause_job(session=session, job_id=job_id, identity=identity)
    records.get_record_cache().forget(job_id)
    return _shown(session, job)


@router.post(
    "/fine_tuning/jobs/{fine_tuning_job_id}/resume",
    response_model=FineTuningJob,
    responses=openai_error_responses(404, 409, 429),
)
def resume_job(fine_tuning_job_id: JobIdPath, session: SessionDep, identity: IdentityDep) -> FineTuningJob:
    """POST /jobs/{id}/resume: a paused job is queued again and continues from its checkpoint."""
    job_id = native_id(fine_tuning_job_id, JOB_PREFIX, "fine-tuning job")
    with named_as_openai(job_id):
        job = lifecycle.resume_job(session=session, job_id=job_id, identity=identity)
    records.get_record_cache().forget(job_id)
    return _shown(session, job)


@router.get(
    "/fine_tuning/jobs/{fine_tuning_job_id}/events",
    response_model=EventList,
    responses=openai_error_responses(400, 404),
)
def read_events(
    fine_tuning_job_id: JobIdPath,
    session: SessionDep,
    identity: IdentityDep,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> EventList:
    """The job's native events (`type: message`) and step logs (`type: metrics`, with loss,
    validation loss, learning rate and tokens/s in `data`), newest first; page on with
    `after=<the last id>`."""
    job_id = native_id(fine_tuning_job_id, JOB_PREFIX, "fine-tuning job")
    with named_as_openai(job_id):
        job = crud.get_job(session=session, job_id=job_id, identity=identity)
    assert job.id is not None
    items, has_more = list_events(session, job_id=job.id, total_steps=job.total_steps, after=after, limit=limit)
    return EventList(data=items, has_more=has_more)


@router.get(
    "/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
    response_model=CheckpointPage,
    responses=openai_error_responses(400, 404),
)
def read_checkpoints(
    fine_tuning_job_id: JobIdPath,
    session: SessionDep,
    identity: IdentityDep,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> CheckpointPage:
    """Every kept checkpoint, `final` included, newest first, with the step log's loss at its step;
    `download_url` is the native route that streams it as a tar."""
    job_id = native_id(fine_tuning_job_id, JOB_PREFIX, "fine-tuning job")
    with named_as_openai(job_id):
        checkpoints = list(reversed(crud.list_checkpoints(session=session, job_id=job_id, identity=identity)))
    after_id = cursor(after, CHECKPOINT_PREFIX)
    if after_id is not None:
        ids = [c.id for c in checkpoints]
        if after_id not in ids:
            raise BadRequest(f"after {after!r} is not a checkpoint of {JOB_PREFIX}{job_id}", param="after")
        checkpoints = checkpoints[ids.index(after_id) + 1 :]
    page = [checkpoint_object(session, c) for c in checkpoints[:limit]]
    return CheckpointPage.of(page, has_more=len(checkpoints) > limit)
