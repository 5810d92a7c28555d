"""/files: upload a dataset file (JSON Lines or Parquet), list, read, delete. Jobs name it by id."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response, UploadFile, status

from app import crud
from app.db import SessionDep
from app.deps import require_token
from app.presenters import file_public
from app.schemas import FileList, FilePublic

router = APIRouter(prefix="/files", tags=["files"], dependencies=[Depends(require_token)])

FileId = Annotated[int, Path(ge=1, description="the file's id")]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no such file"}}


@router.post("", status_code=status.HTTP_201_CREATED, response_model=FilePublic,
             responses={413: {"description": "larger than MAX_UPLOAD_BYTES"},
                        422: {"description": "not a .jsonl/.json/.parquet file, a line that is not JSON, "
                                             "or rows in no known format"}})
def upload_file(file: UploadFile, session: SessionDep) -> FilePublic:
    """Store a JSON Lines or Parquet dataset (multipart field `file`): its row format
    (`messages`, `prompt_completion` or `text`), row count and sha256 are checked and kept.
    A job names it with `"dataset": {"file_id": <id>}`."""
    return file_public(crud.create_file(session=session, upload=file.file, filename=file.filename))


@router.get("", response_model=FileList)
def list_files(session: SessionDep) -> FileList:
    """Uploaded files, newest first."""
    return FileList(items=[file_public(f) for f in crud.list_files(session=session)])


@router.get("/{file_id}", response_model=FilePublic, responses=NOT_FOUND)
def read_file(file_id: FileId, session: SessionDep) -> FilePublic:
    return file_public(crud.get_file(session=session, file_id=file_id))


@router.delete("/{file_id}", status_code=status.HTTP_204_NO_CONTENT, response_class=Response,
               responses={**NOT_FOUND, 409: {"description": "a queued or running job uses it"}})
def delete_file(file_id: FileId, session: SessionDep) -> Response:
    """Remove the file and its record; refused while a queued or running job uses it."""
    crud.delete_file(session=session, file_id=file_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
