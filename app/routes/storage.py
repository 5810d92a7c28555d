"""/storage: the disk under DATA_DIR, by use, with the files no record names."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Depends

from app import storage
from app.db import SessionDep
from app.deps import require_token
from app.errors import error_responses
from app.schemas import StoragePublic

router = APIRouter(tags=["storage"], dependencies=[Depends(require_token)], responses=error_responses(401, 503))


@router.get("/storage", response_model=StoragePublic)
def read_storage(session: SessionDep) -> StoragePublic:
    """Free and total bytes of the disk under DATA_DIR, the bytes of job folders, uploads and
    compile caches, and the orphans: job folders, checkpoints and uploads that no record names
    (left by a crash or a restored database). Nothing is deleted; remove what you do not need."""
    return StoragePublic.model_validate(dataclasses.asdict(storage.scan(session)))
