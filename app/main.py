"""The API process: `uvicorn app.main:app`. OpenAPI docs at /docs."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from sqlalchemy.exc import SQLAlchemyError

from app import audit, docs_pages, tcp_nodelay, uploads
from app.access import GUARDED_PREFIXES, Access
from app.auth import get_registry
from app.errors import OpenAIErrorBody, error_responses, install_error_handlers, is_openai_path
from app.guard import RequestGuard
from app.hotpath import HotReads
from app.metrics import RequestTimer
from app.routes import admin, checkpoints, files, health, jobs, openai_v1, storage, watch
from app.routes import metrics as metrics_routes
from core.checkpoint_store import sweep_finished_jobs
from core.config import get_settings
from core.db import session_scope
from core.diskspace import Reserve
from core.reconcile import reconcile
from core.webhooks import deliver_due

logger = logging.getLogger(__name__)
tcp_nodelay.install()  # before uvicorn accepts a connection in this process

# A thread that gives the GIL up (every database call does) waits up to this long to get it back
# from a busy event loop. Python's 5 ms made one record read take 100-300 ms with 1,000 pollers
# on one core (convoys: a read makes a dozen calls), and pollers waited for it; at 0.5 ms it takes
# about 2 ms (bench/load, docs/benchmarks.md#the-api-under-load).
GIL_SWITCH_INTERVAL_S = 0.0005

# Below the summary (create_app), which /docs and /redoc show above it: not repeated here.
DESCRIPTION = """The `/v1` routes are an OpenAI-compatible view of the same jobs and files, for the official
`openai` SDK (`base_url="<this server>/v1"`, `api_key=` one of the tokens).

When the server has tokens (`API_TOKENS`, or tokens an admin made with `finetune admin tokens create`),
every `/jobs`, `/files`, `/storage`, `/metrics`, `/v1`, `/admin`, `/audit` and `/me` call needs
`Authorization: Bearer <token>`: press **Authorize** and give one of the tokens, and every
call made from this page sends it. A token acts for one project: another project's jobs and files
read as not found (404); admins see every project's. This page, `/redoc`, `/openapi.json` and
`/healthz` stay open without a token: they show what the API is, not what it holds."""


def show_own_logs() -> None:
    """uvicorn sets up its own loggers only: without this, what the API says at INFO (reconcile
    passes, sweeps, stream statistics) would go nowhere."""
    own = logging.getLogger("app")
    if not own.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        own.addHandler(handler)
        own.setLevel(logging.INFO)


def sweep_leftovers() -> None:
    """What stopped processes left behind: unfinished uploads, unfinished checkpoint folders of
    jobs that have ended."""
    settings = get_settings()
    uploads.sweep_unfinished(settings.files_dir())
    with session_scope() as session:
        for job_id, name, size in sweep_finished_jobs(session=session, jobs_dir=settings.data_dir.resolve() / "jobs"):
            logger.warning(
                "job %s: removed %s, an unfinished checkpoint its stopped trainer left (%d bytes)", job_id, name, size
            )


async def _maintain_forever(interval_s: float) -> None:
    # The API reconciles too, so jobs of a host whose only worker died still end; and it sweeps
    # what a killed API process left (another API process may have been killed mid-upload).
    while True:
        try:
            counts = await asyncio.to_thread(reconcile)
            if any(counts.values()):
                logger.info("reconcile: %s", counts)
        except Exception as exc:  # Redis or the database away: report and try again later
            logger.warning("reconcile failed: %s", exc)
        try:
            await asyncio.to_thread(uploads.sweep_unfinished, get_settings().files_dir())
            await asyncio.to_thread(Reserve.for_settings().ensure)
        except Exception as exc:
            logger.warning("sweeping unfinished uploads failed: %s", exc)
        try:
            removed = await asyncio.to_thread(audit.sweep_expired)
            if removed:
                logger.info("audit: %d entries older than AUDIT_RETENTION_DAYS removed", removed)
        except Exception as exc:  # the database away: next time
            logger.warning("sweeping the audit failed: %s", exc)
        await asyncio.sleep(interval_s)


async def _send_webhooks_forever(interval_s: float = 1.0) -> None:
    """Jobs' webhook deliveries, sent and retried from the API (core/webhooks.py), never from the
    processes that train."""
    while True:
        try:
            while await asyncio.to_thread(deliver_due):
                pass
        except Exception as exc:  # the database away: try again later
            logger.warning("sending webhooks failed: %s", exc)
        await asyncio.sleep(interval_s)


async def _verify_checkpoints_forever(poll_s: float) -> None:
    """Checkpoints hashed again on their schedule, on request, and where a download saw a file
    changed (core/checkpoint_verify.py): on a thread of its own, never on a request's path."""
    while True:
        try:
            while await asyncio.to_thread(checkpoints.verify_due_checkpoints):
                pass
        except Exception as exc:  # the database away: try again later
            logger.warning("verifying checkpoints failed: %s", exc)
        await asyncio.sleep(poll_s)


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    show_own_logs()
    # Blocking work (database calls, routes that are not async) runs on these threads, each
    # with a pooled connection of its own (app/db.py sizes the pool to match).
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    try:
        await asyncio.to_thread(sweep_leftovers)
    except Exception as exc:  # the database may not be migrated yet, or away: the loop sweeps uploads later
        logger.warning("sweeping leftovers at start-up failed: %s", exc)
    task = asyncio.create_task(_maintain_forever(settings.reconcile_interval_s))
    sender = asyncio.create_task(_send_webhooks_forever())
    verifier = asyncio.create_task(_verify_checkpoints_forever(settings.checkpoint_verify_poll_s))
    # What start-up made (modules, routes, schemas: most of the process's objects) lives as long as
    # the process: out of the collector's sight, a full collection under 1,000 pollers takes about
    # 12 ms instead of 80 (measured with gc.callbacks; docs/benchmarks.md#the-api-under-load).
    gc.freeze()
    try:
        yield
    finally:
        for running in (task, sender, verifier):
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        gc.unfreeze()  # a process that starts the app again (the tests do) collects the old one


BEARER_SCHEME = {
    "type": "http",
    "scheme": "bearer",
    "description": "one of the server's API_TOKENS, or a token an admin made (needed once the server has any)",
}
# What every guarded route may answer once the server has tokens: no valid token, a role that does
# not allow the request, a token over its rate.
TOKEN_RESPONSES = error_responses(401, 403, 429)


def server_has_tokens() -> bool:
    registry = get_registry()
    closed = registry.closed()
    if closed is None:
        try:
            registry.load_now()  # /openapi.json is rare: one small read
        except SQLAlchemyError as exc:
            # No database yet (not migrated, or away): the document still answers, from the
            # settings alone, as the server would judge a request without the database.
            logger.warning("could not read the tokens for the OpenAPI document: %s", exc)
            return bool(get_settings().api_tokens)
        closed = bool(registry.closed())
    return closed


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document as this server behaves: the bearer scheme (and the 401, 403 and 429 of
    tokens) is declared only when the server has tokens (without them no route asks for one)."""
    with_tokens = server_has_tokens()
    cached: dict[bool, dict[str, Any]] = app.state.openapi_documents
    if with_tokens not in cached:
        document = get_openapi(
            title=app.title, version=app.version, summary=app.summary, description=app.description, routes=app.routes
        )
        for path, operations in document.get("paths", {}).items():
            for operation in operations.values():
                if with_tokens and path.startswith(GUARDED_PREFIXES):
                    operation["security"] = [{"bearer": []}]
                    responses = operation.setdefault("responses", {})
                    for code, response in TOKEN_RESPONSES.items():
                        if str(code) not in responses:
                            model = OpenAIErrorBody if is_openai_path(path) else response["model"]
                            responses[str(code)] = {
                                "description": response["description"],
                                "content": {
                                    "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
                                },
                            }
                else:
                    operation.get("responses", {}).pop("401", None)
        if with_tokens:
            document.setdefault("components", {})["securitySchemes"] = {"bearer": BEARER_SCHEME}
        cached[with_tokens] = document
    return cached[with_tokens]


def create_app() -> FastAPI:
    app = FastAPI(
        title="Fine-tuning job service",
        version="1",
        summary="Queue, run and watch full fine-tuning jobs (Unsloth + TRL) on your own GPU hosts.",
        description=DESCRIPTION,
        lifespan=lifespan,
        # Swagger UI keeps the token across page reloads, so a person authorizes once.
        swagger_ui_parameters={"persistAuthorization": True},
        docs_url=None,  # app/docs_pages.py serves /docs and /redoc without a CDN
        redoc_url=None,
    )
    docs_pages.install(app)
    app.add_middleware(RequestGuard)  # a body's size, before FastAPI reads it
    app.add_middleware(HotReads)
    app.add_middleware(Access)  # the token, the role, the rate and the audit, before anything reads the request
    app.add_middleware(RequestTimer)  # outermost: the hot reads are timed too
    app.state.openapi_documents = {}
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(checkpoints.router)
    app.include_router(files.router)
    app.include_router(storage.router)
    app.include_router(metrics_routes.router)
    app.include_router(watch.router)
    app.include_router(watch.home_router)  # /watch: the jobs dashboard
    app.include_router(openai_v1.router)  # the OpenAI-compatible view of the same jobs and files
    app.include_router(admin.router)  # projects, tokens, the audit, and who a token is
    # The watch page's CSS and JavaScript; open without a token, like /docs (not in the OpenAPI document).
    app.mount(watch.STATIC_URL, watch.static_assets(), name="static")
    return app


app = create_app()
