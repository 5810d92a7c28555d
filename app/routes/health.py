"""/healthz: is the API alive, and can it reach its database and Redis?"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.db import get_engine
from app.queue import get_redis
from app.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz() -> JSONResponse:
    """200 when both the database and Redis answer; 503 naming the one that does not."""
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
    ok = database == "ok" and redis == "ok"
    body = Health(status="ok" if ok else "degraded", database=database, redis=redis)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
