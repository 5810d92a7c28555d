"""The API process: `uvicorn app.main:app`. OpenAPI docs at /docs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from app.config import get_settings
from app.errors import install_error_handlers
from app.reconcile import reconcile
from app.routes import checkpoints, files, health, jobs, watch

logger = logging.getLogger(__name__)


async def _reconcile_forever(interval_s: float) -> None:
    # The API reconciles too, so jobs of a host whose only worker died still end.
    while True:
        try:
            counts = await asyncio.to_thread(reconcile)
            if any(counts.values()):
                logger.info("reconcile: %s", counts)
        except Exception as exc:  # Redis or the database away: report and try again later
            logger.warning("reconcile failed: %s", exc)
        await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    task = asyncio.create_task(_reconcile_forever(settings.reconcile_interval_s))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_app() -> FastAPI:
    app = FastAPI(
        title="Fine-tuning job service",
        version="1",
        summary="Queue, run and watch full fine-tuning jobs (Unsloth + TRL) on your own GPU hosts.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(checkpoints.router)
    app.include_router(files.router)
    app.include_router(watch.router)
    return app


app = create_app()
