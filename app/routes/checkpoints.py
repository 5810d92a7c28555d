"""/jobs/{id}/checkpoints: list, one file (with HTTP Range), or the whole folder as a tar."""

from __future__ import annotations

import os
import pathlib
import posixpath
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import FileResponse, StreamingResponse
from sqlmodel import Session
from starlette.responses import MalformedRangeHeader
from starlette.responses import RangeNotSatisfiable as StarletteRangeNotSatisfiable

from app import crud, lifecycle, pages
from app.auth import Identity
from app.db import SessionDep, run_db
from app.deps import IdentityDep, SettingsDep, require_token
from app.downloads import (
    CheckpointFileResponse,
    StoreFileResponse,
    resolve_inside,
    store_tar_members,
    stored_stat,
    stream_tar,
    tar_length,
    tar_members,
)
from app.errors import BadRange, Conflict, NotFound, RangeNotSatisfiable, StorageUnavailable, error_responses
from app.presenters import checkpoint_public
from app.schemas import CheckpointList, CheckpointPublic, DeletedPublic
from core import shared_store
from core.checkpoint_files import unchanged_since_hashed
from core.checkpoint_verify import changed_since_hashed, note_changed, verify_due
from core.config import get_settings
from core.contract import understood
from core.db import get_engine, session_scope
from core.models import CheckpointStatus, Job, JobStatus
from core.shared_store import Manifest, SharedStore, get_store
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
def list_checkpoints(job_id: JobId, session: SessionDep, identity: IdentityDep) -> CheckpointList:
    """Each kept checkpoint (`final` included) with its files, sizes and sha256 (null while still
    being hashed), oldest step first; `{items}` like every list of the API."""
    return CheckpointList(
        items=[checkpoint_public(c) for c in crud.list_checkpoints(session=session, job_id=job_id, identity=identity)]
    )


@router.get("/{name}", response_model=CheckpointPublic)
def read_checkpoint(job_id: JobId, name: Name, session: SessionDep, identity: IdentityDep) -> CheckpointPublic:
    return checkpoint_public(crud.get_checkpoint(session=session, job_id=job_id, name=name, identity=identity))


@router.delete("/{name}", response_model=DeletedPublic, responses=error_responses(409))
def delete_checkpoint(job_id: JobId, name: Name, session: SessionDep, identity: IdentityDep) -> DeletedPublic:
    """Remove a checkpoint (`final` included) from the disk and the list, with an event saying
    how many bytes it freed. A running job's newest checkpoint is kept (409): it is what the job
    resumes from."""
    deleted = lifecycle.delete_checkpoint(session=session, job_id=job_id, name=name, identity=identity)
    _FILES.pop((get_settings().sqlalchemy_url, job_id, name), None)
    pages.get_page_cache().forget(job_id)
    return DeletedPublic(freed_bytes=deleted.freed_bytes, files=deleted.files)


@router.post("/{name}/verify", status_code=202, response_model=CheckpointPublic, responses=error_responses(409))
def verify_checkpoint(job_id: JobId, name: Name, session: SessionDep, identity: IdentityDep) -> CheckpointPublic:
    """Hash every file of the checkpoint again and hold it against the sha256 it was saved with, off
    the request (the API's verifier starts within CHECKPOINT_VERIFY_POLL_S): 202 at once, with
    `verify_requested_at` set until it has run; then `verified_at` and `status` say what it found
    (`ready`, or `corrupt` with a `checkpoint_corrupt` event naming the files, which are then not
    served and not resumed from). A corrupt checkpoint whose files were restored becomes ready again.
    409 while it is still being hashed."""
    checkpoint = crud.request_verification(session=session, job_id=job_id, name=name, identity=identity)
    _FILES.pop((get_settings().sqlalchemy_url, job_id, name), None)
    return checkpoint_public(checkpoint)


def _corrupt_refusal(job_id: int, name: str, paths: list[str]) -> Conflict:
    return Conflict(
        f"{', '.join(repr(p) for p in paths)} of checkpoint {name!r} of job {job_id} no longer match the sha256 "
        f"they were saved with (a verification found it), and are not served: restore them and POST "
        f"/jobs/{job_id}/checkpoints/{name}/verify, or delete the checkpoint"
    )


@router.get(
    "/{name}/archive",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}, **error_responses(409)},
)
def download_archive(
    job_id: JobId, name: Name, session: SessionDep, settings: SettingsDep, identity: IdentityDep
) -> StreamingResponse:
    """The checkpoint folder as one tar, streamed as it is read (nothing is built on disk). 409 for a
    corrupt checkpoint (its intact files are still served one by one)."""
    checkpoint = crud.get_checkpoint(session=session, job_id=job_id, name=name, identity=identity)
    folder = settings.checkpoints_dir(job_id) / checkpoint.name
    corrupt = [f["path"] for f in checkpoint.files if f.get("corrupt")]
    if corrupt:
        raise _corrupt_refusal(job_id, name, corrupt)
    if folder.is_dir():
        members = tar_members(folder, checkpoint.name, [f["path"] for f in checkpoint.files])
    else:  # trained on another host: from the shared store, when there is one
        store, manifest = _published(job_id, checkpoint.name)
        members = store_tar_members(store, manifest, checkpoint.name)
    if (
        folder.is_dir()
        and checkpoint.id is not None
        and checkpoint.status == CheckpointStatus.ready
        and checkpoint.changed_seen_at is None
        and changed_since_hashed(folder, checkpoint.files)
    ):
        note_changed(session, checkpoint.id)  # a file changed since it was hashed: the verifier looks
        session.commit()
    return StreamingResponse(
        stream_tar(members),
        media_type="application/x-tar",
        headers={
            "Content-Length": str(tar_length(members)),
            "Content-Disposition": f'attachment; filename="job-{job_id}-{checkpoint.name}.tar"',
        },
    )


@dataclass(frozen=True)
class _Files:
    """What the file route needs of a checkpoint's record: each file's entry (sha256, and size and
    mtime when hashed), whether its sha256 may be sent, and whether a change was already noted."""

    checkpoint_id: int
    project_id: int  # the job's: another project's identity is told there is no such checkpoint
    entries: dict[str, dict[str, Any]]
    vouched: bool  # ready, or corrupt (its files that verified are vouched for, one by one)
    change_noted: bool
    read_at: float


# A finished job's hashed checkpoint, as read at most FINISHED_RECORD_MAX_AGE_S ago: its record
# changes only when it is verified or deleted, and a download should not start with a database
# read (it is most of a small Range's time).
_FILES: dict[tuple[str, int, str], _Files] = {}
FILES_KEPT = 1024


def _checkpoint_files(job_id: int, name: str, identity: Identity) -> _Files:
    """The checkpoint's files (blocking). 404 for no such job or checkpoint, or one rotated away,
    or another project's."""
    settings = get_settings()
    key = (settings.sqlalchemy_url, job_id, name)
    files = _FILES.get(key)
    if files is not None and time.monotonic() - files.read_at <= settings.finished_record_max_age_s:
        if not identity.sees(files.project_id):
            raise NotFound(f"job {job_id} not found")
        return files
    with Session(get_engine()) as session:
        checkpoint = crud.get_checkpoint(session=session, job_id=job_id, name=name, identity=identity)
        job = session.get(Job, job_id)
        assert checkpoint.id is not None and job is not None
        status = understood(CheckpointStatus, checkpoint.status)[0]
        files = _Files(
            checkpoint.id,
            job.project_id,
            {f["path"]: f for f in checkpoint.files},
            status in (CheckpointStatus.ready, CheckpointStatus.corrupt),
            checkpoint.changed_seen_at is not None,
            time.monotonic(),
        )
        finished = isinstance(job.status, JobStatus) and job.status.finished
        if finished and files.vouched:
            if len(_FILES) >= FILES_KEPT:
                _FILES.clear()
            _FILES[key] = files
    return files


def verify_due_checkpoints() -> int:
    """The verifier's pass (core/checkpoint_verify.py), for the API's loop; what this process kept
    of the records it changed goes (other API processes see them within
    FINISHED_RECORD_MAX_AGE_S). Blocking."""
    verified = verify_due()
    if verified:
        _FILES.clear()
    return verified


@dataclass(frozen=True)
class Stored:
    """A file in the shared store: the store and its key."""

    store: SharedStore
    key: str


def _published(job_id: int, name: str) -> tuple[SharedStore, Manifest]:
    """The store and manifest of a checkpoint this host has no folder of (blocking). 404 when the
    store has no such checkpoint (or there is no store); 503 when it does not answer."""
    store = get_store()
    try:
        manifest = store.manifest(job_id, name) if store is not None else None
    except shared_store.StorageUnavailable as exc:
        raise StorageUnavailable(f"checkpoint {name!r} of job {job_id} cannot be read: {exc}") from exc
    if store is None or manifest is None:
        raise NotFound(f"checkpoint {name!r} of job {job_id} is recorded but its folder is gone from disk")
    return store, manifest


def _locate(
    job_id: int, name: str, path: str, identity: Identity
) -> tuple[pathlib.Path | Stored, os.stat_result, str | None]:
    """The file's real path, its stat, and the sha256 to send with it: only one its bytes have,
    as far as can be known without reading them (blocking: one thread hop for all of it). 409 for
    a file found corrupt."""
    files = _checkpoint_files(job_id, name, identity)
    entry = files.entries.get(path)
    if entry is None:
        raise NotFound(f"checkpoint {name!r} of job {job_id} has no file {path!r}")
    if entry.get("corrupt"):
        raise _corrupt_refusal(job_id, name, [path])
    key = (get_settings().sqlalchemy_url, job_id, name)
    sha = entry.get("sha256") if files.vouched else None
    folder = get_settings().checkpoints_dir(job_id) / name
    if not folder.is_dir() and get_store() is not None:  # trained on another host: from the shared store
        store, manifest = _published(job_id, name)
        published = manifest.entry(path)
        if published is None:
            raise NotFound(f"checkpoint {name!r} of job {job_id} has no file {path!r} in the shared store")
        mtime = datetime.fromisoformat(manifest.published_at).timestamp()
        stat = stored_stat(int(published["size"]), mtime)
        return Stored(store, store.file_key(job_id, name, path)), stat, sha if sha == published["sha256"] else None
    try:
        real = resolve_inside(folder, path)
        stat = real.stat()
    except FileNotFoundError:  # deleted through another API process, whose deletion this one's copy predates
        _FILES.pop(key, None)
        raise NotFound(f"checkpoint {name!r} of job {job_id} has been deleted") from None
    if sha and not unchanged_since_hashed(entry, stat):
        # Its size or mtime is not what it was when it was hashed: the recorded sha256 is not
        # vouched for. The verifier hashes it again (noted once; off this request).
        sha = None
        if not files.change_noted:
            with session_scope() as session:
                note_changed(session, files.checkpoint_id)
            _FILES.pop(key, None)
    return real, stat, sha


@router.get(
    "/{name}/files/{path:path}",
    response_class=FileResponse,
    responses={
        206: {"description": "the requested Range of the file", "content": {"application/octet-stream": {}}},
        200: {"content": {"application/octet-stream": {}}},
        **error_responses(400, 409, 416),
    },
)
async def download_file(job_id: JobId, name: Name, path: str, request: Request, identity: IdentityDep) -> FileResponse:
    """One file of the checkpoint; supports `Range: bytes=...` for resumable downloads.
    `X-Checksum-SHA256` is the file's sha256 when its size and mtime are still those it was hashed
    with; a file changed since is sent without it (and verified); one found corrupt is a 409."""
    real, stat, sha = await run_db(_locate, job_id, name, path, identity)
    headers = {"X-Checksum-SHA256": sha} if sha else None
    check_range(request, stat.st_size)
    if isinstance(real, Stored):
        return StoreFileResponse(
            real.store,
            real.key,
            filename=posixpath.basename(path),
            headers=headers,
            media_type="application/octet-stream",
            stat_result=stat,
        )
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
