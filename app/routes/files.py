"""/files: upload a dataset file (JSON Lines or Parquet), list, read, delete. Jobs name it by id."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response, status

from app import crud, idempotency
from app.access import set_audit_target
from app.db import SessionDep
from app.deps import IdentityDep, require_token
from app.errors import error_responses
from app.presenters import file_public
from app.schemas import FileList, FilePublic
from app.uploads import upload_body
from core.spec import MAX_DB_INT, UrlInt

router = APIRouter(
    prefix="/files", tags=["files"], dependencies=[Depends(require_token)], responses=error_responses(401, 503)
)

FileId = Annotated[UrlInt, Path(ge=1, le=MAX_DB_INT, description="the file's id")]
NOT_FOUND: dict[int | str, dict[str, Any]] = error_responses(404, 422)


UPLOAD_BODY = upload_body("a .jsonl, .json (JSON Lines or an array) or .parquet dataset")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=FilePublic,
    openapi_extra=UPLOAD_BODY,
    responses=error_responses(409, 413, 422, 507),
)
async def upload_file(
    request: Request,
    response: Response,
    session: SessionDep,
    identity: IdentityDep,
    idempotency_key: idempotency.KeyHeader = None,
) -> FilePublic:
    """Store a JSON Lines or Parquet dataset (multipart field `file`), streamed to disk as it
    arrives: every row is read and checked, and the record keeps its row format (`messages`,
    `prompt_completion`, `text`, or null when its columns need a job's `dataset.columns`), columns,
    row count, malformed rows with line numbers, and sha256. A job names it with
    `"dataset": {"file_id": <id>}` or `"validation": {"file_id": <id>}`."""
    uploaded, replayed = await crud.create_file(
        session=session, request=request, identity=identity, key=idempotency_key, route="POST /files"
    )
    if replayed:
        response.headers[idempotency.REPLAYED_HEADER] = "true"
    set_audit_target(request, f"file {uploaded.id}")
    return file_public(uploaded)


@router.get("", response_model=FileList)
def list_files(session: SessionDep, identity: IdentityDep) -> FileList:
    """Uploaded files, newest first (the token's project's; an admin's: every project's)."""
    return FileList(items=[file_public(f) for f in crud.list_files(session=session, identity=identity)])


@router.get("/{file_id}", response_model=FilePublic, responses=NOT_FOUND)
def read_file(file_id: FileId, session: SessionDep, identity: IdentityDep) -> FilePublic:
    return file_public(crud.get_file(session=session, file_id=file_id, identity=identity))


@router.delete(
    "/{file_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(404, 409, 422),
)
def delete_file(file_id: FileId, session: SessionDep, identity: IdentityDep) -> Response:
    """Remove the file and its record; refused while a queued or running job uses it."""
    crud.delete_file(session=session, file_id=file_id, identity=identity)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
