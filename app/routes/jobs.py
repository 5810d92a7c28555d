"""/jobs: submit, list, read, cancel; step logs and events."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, status
from starlette.convertors import Convertor, register_url_convertor

from app import crud
from app.db import SessionDep
from app.deps import SettingsDep, require_token
from app.errors import CannotPlan, error_responses
from app.models import JobStatus
from app.planner import GIB, PlanError
from app.presenters import event_public, job_public, step_log_public
from app.schemas import (
    JOB_SPEC_EXAMPLE,
    MAX_DB_INT,
    DiskEstimate,
    Estimate,
    EstimateRequest,
    EventPage,
    JobPage,
    JobPublic,
    JobSpec,
    MemoryEstimate,
    StepLogPage,
    UrlInt,
)

# Every route here may answer these: no token, a parameter that does not validate, a database
# that cannot answer.
router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[Depends(require_token)],
                   responses=error_responses(401, 422, 503))

JobId = Annotated[UrlInt, Path(ge=1, le=MAX_DB_INT, description="the job's id")]
NOT_FOUND: dict[int | str, dict[str, Any]] = error_responses(404)


def submit_description() -> str:
    # The example lives in the text, not as an OpenAPI `example`: schemathesis 4.32's coverage
    # phase takes an example's keys for required properties and reports false failures.
    return ("Validate a job spec, store it and queue it. 422 names every bad field, or shows the figures when "
            "the job cannot fit the GPU or the disk (see POST /jobs/estimate). The standard recipe:\n\n"
            f"```json\n{json.dumps(JOB_SPEC_EXAMPLE, indent=2)}\n```")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic,
             description=submit_description())
def submit_job(job_in: JobSpec, session: SessionDep) -> JobPublic:
    return job_public(crud.create_job(session=session, job_in=job_in))


@router.post("/estimate", response_model=Estimate)
def estimate_job(request: EstimateRequest) -> Estimate:
    """Expected peak GPU memory (as nvidia-smi shows it) and disk for a spec, from the model's
    config.json alone, with a verdict for the GPU and the largest micro-batch and sequence
    length that fit. Nothing is stored or queued."""
    job_in = JobSpec.model_validate(request.model_dump(exclude={"gpu_memory_bytes"}))
    try:
        memory, disk = crud.estimate(job_in=job_in, gpu_memory_bytes=request.gpu_memory_bytes)
    except PlanError as exc:
        raise CannotPlan(str(exc)) from exc
    return Estimate(
        memory=MemoryEstimate(total_bytes=memory.total_bytes, total_gib=round(memory.total_bytes / GIB, 2),
                              parts=memory.parts, optimizer_paged=memory.optimizer_paged,
                              parameters=memory.parameters, gpu_memory_bytes=memory.gpu_memory_bytes,
                              verdict=memory.verdict, max_micro_batch=memory.max_micro_batch,
                              max_seq_length=memory.max_seq_length),
        disk=DiskEstimate(**dataclasses.asdict(disk)),
    )


@router.get("", response_model=JobPage)
def list_jobs(
    session: SessionDep,
    settings: SettingsDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    cursor: Annotated[UrlInt | None, Query(ge=1, le=MAX_DB_INT, description="next_cursor of the previous page")] = None,
    limit: Annotated[UrlInt, Query(ge=1, le=500)] = 50,
) -> JobPage:
    """Jobs, newest first."""
    jobs, next_cursor = crud.list_jobs(
        session=session, status=status_, cursor=cursor, limit=min(limit, settings.page_size_max)
    )
    return JobPage(items=[job_public(j) for j in jobs], next_cursor=next_cursor)


class JobIdConvertor(Convertor[str]):
    """Any path segment but `estimate`, so that GET /jobs/estimate is a 405 (it takes POST) and
    not a job id that fails to parse; a segment that is not a number is still a 422 naming job_id."""

    regex = "(?!estimate$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return str(value)


register_url_convertor("job_id", JobIdConvertor())


@router.get("/{job_id:job_id}", response_model=JobPublic, responses=NOT_FOUND)
def read_job(job_id: JobId, session: SessionDep) -> JobPublic:
    return job_public(crud.get_job(session=session, job_id=job_id))


@router.post(
    "/{job_id}/cancel", response_model=JobPublic,
    responses=error_responses(404, 409),
)
def cancel_job(job_id: JobId, session: SessionDep) -> JobPublic:
    """A queued job never starts; a running one stops at its next step (watch `status`)."""
    return job_public(crud.cancel_job(session=session, job_id=job_id))


@router.get("/{job_id}/logs", response_model=StepLogPage, responses=NOT_FOUND)
def read_logs(
    job_id: JobId,
    session: SessionDep,
    after_step: Annotated[UrlInt | None, Query(ge=0, le=MAX_DB_INT, description="only steps after this one")] = None,
    limit: Annotated[UrlInt, Query(ge=1, le=5000)] = 1000,
) -> StepLogPage:
    """Step logs, oldest first. Page on with `after_step=next_after_step`."""
    rows = crud.list_logs(session=session, job_id=job_id, after_step=after_step, limit=limit)
    return StepLogPage(items=[step_log_public(r) for r in rows],
                       next_after_step=rows[-1].step if len(rows) == limit else None)


@router.get("/{job_id}/events", response_model=EventPage, responses=NOT_FOUND)
def read_events(
    job_id: JobId,
    session: SessionDep,
    after_id: Annotated[UrlInt | None, Query(ge=0, le=MAX_DB_INT, description="only events after this id")] = None,
    limit: Annotated[UrlInt, Query(ge=1, le=5000)] = 1000,
) -> EventPage:
    """State changes and messages, oldest first."""
    rows = crud.list_events(session=session, job_id=job_id, after_id=after_id, limit=limit)
    return EventPage(items=[event_public(r) for r in rows],
                     next_after_id=rows[-1].id if len(rows) == limit else None)
