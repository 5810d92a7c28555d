"""/healthz: is the API alive, can it reach its database and Redis, and is there room on disk?"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.deps import query_guard
from app.schemas import Health
from core.config import get_settings
from core.db import get_engine
from core.diskspace import disk_space, gib
from core.queue import get_redis

router = APIRouter(tags=["health"], dependencies=[Depends(query_guard)])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": "degraded"}})
def healthz() -> JSONResponse:
    """200 when the database and Redis answer and the disk under DATA_DIR has at least
    MIN_FREE_DISK_BYTES free; 503 naming what is wrong otherwise."""
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        database = "ok"
    except Exception as exc:
        database = f"error: {exc.__class__.__name__}: {exc}"[:300]
    try:
        get_redis().ping()
        redis = "ok"
    except Exception as exc:
        redis = f"error: {exc.__class__.__name__}: {exc}"[:300]
    settings = get_settings()
    space = disk_space(settings.data_dir)
    if space.free_bytes < settings.min_free_disk_bytes:
        disk = f"low: {space.describe()}, under MIN_FREE_DISK_BYTES ({gib(settings.min_free_disk_bytes)})"
    else:
        disk = "ok"
    ok = database == "ok" and redis == "ok" and disk == "ok"
    body = Health(
        status="ok" if ok else "degraded",
        database=database,
        redis=redis,
        disk=disk,
        disk_free_bytes=space.free_bytes,
        disk_total_bytes=space.total_bytes,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
