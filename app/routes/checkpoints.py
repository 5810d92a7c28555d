"""/jobs/{id}/checkpoints: list, one file (with HTTP Range), or the whole folder as a tar."""

from __future__ import annotations

import os
import pathlib
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import FileResponse, StreamingResponse
from sqlmodel import Session
from starlette.responses import MalformedRangeHeader
from starlette.responses import RangeNotSatisfiable as StarletteRangeNotSatisfiable

from app import crud, lifecycle, pages
from app.db import SessionDep, run_db
from app.deps import SettingsDep, require_token
from app.downloads import CheckpointFileResponse, resolve_inside, stream_tar, tar_length, tar_members
from app.errors import BadRange, NotFound, RangeNotSatisfiable, error_responses
from app.presenters import checkpoint_public
from app.schemas import CheckpointList, CheckpointPublic, DeletedPublic
from core.config import get_settings
from core.db import get_engine
from core.models import CheckpointStatus, Job, JobStatus
from core.spec import MAX_DB_INT, UrlInt

router = APIRouter(
    prefix="/jobs/{job_id}/checkpoints",
    tags=["checkpoints"],
    dependencies=[Depends(require_token)],
    responses=error_responses(401, 404, 422, 503),
)

JobId = Annotated[UrlInt, Path(ge=1, le=MAX_DB_INT)]
Name = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,128}$", description="e.g. checkpoint-500 or final")]


@router.get("", response_model=CheckpointList)
def list_checkpoints(job_id: JobId, session: SessionDep) -> CheckpointList:
    """Each kept checkpoint (`final` included) with its files, sizes and sha256 (null while still
    being hashed), oldest step first; `{items}` like every list of the API."""
    return CheckpointList(items=[checkpoint_public(c) for c in crud.list_checkpoints(session=session, job_id=job_id)])


@router.get("/{name}", response_model=CheckpointPublic)
def read_checkpoint(job_id: JobId, name: Name, session: SessionDep) -> CheckpointPublic:
    return checkpoint_public(crud.get_checkpoint(session=session, job_id=job_id, name=name))


@router.delete("/{name}", response_model=DeletedPublic, responses=error_responses(409))
def delete_checkpoint(job_id: JobId, name: Name, session: SessionDep) -> DeletedPublic:
    """Remove a checkpoint (`final` included) from the disk and the list, with an event saying
    how many bytes it freed. A running job's newest checkpoint is kept (409): it is what the job
    resumes from."""
    deleted = lifecycle.delete_checkpoint(session=session, job_id=job_id, name=name)
    _FILES.pop((get_settings().sqlalchemy_url, job_id, name), None)
    pages.get_page_cache().forget(job_id)
    return DeletedPublic(freed_bytes=deleted.freed_bytes, files=deleted.files)


@router.get(
    "/{name}/archive", response_class=StreamingResponse, responses={200: {"content": {"application/x-tar": {}}}}
)
def download_archive(job_id: JobId, name: Name, session: SessionDep, settings: SettingsDep) -> StreamingResponse:
    """The checkpoint folder as one tar, streamed as it is read (nothing is built on disk)."""
    checkpoint = crud.get_checkpoint(session=session, job_id=job_id, name=name)
    folder = settings.checkpoints_dir(job_id) / checkpoint.name
    if not folder.is_dir():
        raise NotFound(f"checkpoint {name!r} of job {job_id} is recorded but its folder is gone from disk")
    members = tar_members(folder, checkpoint.name, [f["path"] for f in checkpoint.files])
    return StreamingResponse(
        stream_tar(members),
        media_type="application/x-tar",
        headers={
            "Content-Length": str(tar_length(members)),
            "Content-Disposition": f'attachment; filename="job-{job_id}-{checkpoint.name}.tar"',
        },
    )


# Where a finished job's ready checkpoint keeps each file and its sha256: neither changes any
# more, and a download should not start with a database read (it is most of a small Range's time).
_FILES: dict[tuple[str, int, str], dict[str, str | None]] = {}
FILES_KEPT = 1024


def _checkpoint_files(job_id: int, name: str) -> dict[str, str | None]:
    """{relative path: sha256 or None} of a checkpoint (blocking). 404 for no such job or
    checkpoint, or one rotated away."""
    key = (get_settings().sqlalchemy_url, job_id, name)
    files = _FILES.get(key)
    if files is not None:
        return files
    with Session(get_engine()) as session:
        checkpoint = crud.get_checkpoint(session=session, job_id=job_id, name=name)
        job = session.get(Job, job_id)
        files = {f["path"]: f.get("sha256") for f in checkpoint.files}
        if job is not None and JobStatus(job.status).finished and checkpoint.status == CheckpointStatus.ready:
            if len(_FILES) >= FILES_KEPT:
                _FILES.clear()
            _FILES[key] = files
    return files


def _locate(job_id: int, name: str, path: str) -> tuple[pathlib.Path, os.stat_result, str | None]:
    """The file's real path, its stat and its sha256 (blocking: one thread hop for all of it)."""
    files = _checkpoint_files(job_id, name)
    if path not in files:
        raise NotFound(f"checkpoint {name!r} of job {job_id} has no file {path!r}")
    try:
        real = resolve_inside(get_settings().checkpoints_dir(job_id) / name, path)
        return real, real.stat(), files[path]
    except FileNotFoundError:  # deleted through another API process, whose deletion this one's copy predates
        _FILES.pop((get_settings().sqlalchemy_url, job_id, name), None)
        raise NotFound(f"checkpoint {name!r} of job {job_id} has been deleted") from None


@router.get(
    "/{name}/files/{path:path}",
    response_class=FileResponse,
    responses={
        206: {"description": "the requested Range of the file", "content": {"application/octet-stream": {}}},
        200: {"content": {"application/octet-stream": {}}},
        **error_responses(400, 416),
    },
)
async def download_file(job_id: JobId, name: Name, path: str, request: Request) -> FileResponse:
    """One file of the checkpoint; supports `Range: bytes=...` for resumable downloads."""
    real, stat, sha = await run_db(_locate, job_id, name, path)
    headers = {"X-Checksum-SHA256": sha} if sha else None
    check_range(request, stat.st_size)
    return CheckpointFileResponse(
        real, filename=real.name, headers=headers, media_type="application/octet-stream", stat_result=stat
    )


def check_range(request: Request, size: int) -> None:
    """Judge a Range header before FileResponse does, so a bad one gets our JSON error body
    (FileResponse answers 400 and 416 with plain text or nothing). With If-Range, FileResponse
    may ignore the range, so it decides."""
    http_range = request.headers.get("range")
    if http_range is None or "if-range" in request.headers:
        return
    try:
        # FileResponse's own parser (private, pinned with starlette): the same rules it applies.
        FileResponse._parse_range_header(http_range, size)
    except MalformedRangeHeader as exc:
        raise BadRange(f"malformed Range header {http_range!r}: {exc.content}") from None
    except StarletteRangeNotSatisfiable:
        raise RangeNotSatisfiable(
            f"Range {http_range!r} starts past the end of the file ({size} bytes)",
            headers={"Content-Range": f"bytes */{size}"},
        ) from None
