"""/metrics: Prometheus's text format (app/metrics.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from app import metrics
from app.db import run_db
from app.deps import require_token
from app.errors import error_responses

router = APIRouter(tags=["metrics"], dependencies=[Depends(require_token)], responses=error_responses(401, 503))


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def read_metrics() -> Response:
    """Jobs by status, queue depth and the oldest queued job's age, live workers, each running
    job's step, tokens/s and GPU memory, each worker's GPU size, step-duration and HTTP
    request-duration histograms, checkpoint bytes and free disk. Behind API_TOKENS like the
    other routes: give Prometheus the token as `authorization: {credentials: ...}` (README)."""
    body, content_type = await run_db(metrics.render)
    return Response(body, media_type=content_type)
