"""/jobs/{id}/stream and /jobs/{id}/watch: follow a job live, as Server-Sent Events or as a web page
(app/templates/watch.html, its CSS and JavaScript served from app/static/watch/ under /static)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlmodel import Session
from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.staticfiles import PathLike, StaticFiles
from starlette.types import Scope

from app import crud, pages
from app.db import SessionDep, limiter_of, run_db
from app.deps import IdentityDep, require_token
from app.errors import MethodNotAllowed, NotFound, error_responses
from app.records import Record, get_record_cache, record_of
from app.routes.jobs import NOT_FOUND, JobId
from core.db import get_engine
from core.models import Job
from core.spec import MAX_DB_INT, UrlInt

logger = logging.getLogger(__name__)

router = APIRouter(
    prefix="/jobs/{job_id}",
    tags=["watch"],
    dependencies=[Depends(require_token)],
    responses=error_responses(401, 422, 503),
)

POLL_INTERVAL_S = 1.0
PING_INTERVAL_S = 15
# Rows read per poll: a stream opened on a long job catches up in slices, without pausing between them.
BATCH_ROWS = 1000
# Snapshots a watcher may have unread before its stream is ended (it reconnects with its cursors).
WATCHER_QUEUE = 64


@dataclass
class _Snapshot:
    job: Record
    logs: list[dict[str, Any]]
    events: list[dict[str, Any]]
    # The cursors it was read after: a watcher behind them has rows to read on its own first.
    after_step: int | None = None
    after_event_id: int | None = None

    @property
    def caught_up(self) -> bool:
        return len(self.logs) < BATCH_ROWS and len(self.events) < BATCH_ROWS

    @property
    def finished(self) -> bool:
        return self.job.finished

    @cached_property
    def job_sse(self) -> bytes:
        return ServerSentEvent(data=self.job.body.decode(), event="job").encode()

    @cached_property
    def rows_sse(self) -> bytes:
        """Every row of the snapshot as SSE, encoded once for all the watchers that get it whole."""
        return b"".join([*(_log_sse(log) for log in self.logs), *(_event_sse(event) for event in self.events)])


def _log_sse(log: dict[str, Any]) -> bytes:
    return ServerSentEvent(data=pages.dumps(log).decode(), event="log").encode()


def _event_sse(event: dict[str, Any]) -> bytes:
    return ServerSentEvent(data=pages.dumps(event).decode(), event="event").encode()


def _read_snapshot(job_id: int, after_step: int | None, after_event_id: int | None) -> _Snapshot:
    # A fresh session per poll: the stream lives for hours, and a session held that long would
    # pin one connection (and, on SQLite, an old read snapshot that stops WAL checkpoints).
    with Session(get_engine()) as session:
        # The job first: logs and events read after it are at least as new, so once it reads
        # finished, everything written before the finish is in this snapshot too. (Whether the
        # watcher may see the job was judged when its stream opened; the feed serves them all.)
        job = session.get(Job, job_id)
        if job is None or job.deleted_at is not None:
            raise NotFound(f"job {job_id} not found")
        return _Snapshot(
            job=record_of(job),
            logs=pages.read_logs(session, job_id, after_step, BATCH_ROWS),
            events=pages.read_events(session, job_id, after_event_id, BATCH_ROWS),
            after_step=after_step,
            after_event_id=after_event_id,
        )


def _tail(job_id: int) -> tuple[int | None, int | None]:
    """The job's newest step and event id: where a feed starts."""
    with Session(get_engine()) as session:
        step = session.execute(select(func.max(pages.LOGS.c.step)).where(pages.LOGS.c.job_id == job_id)).scalar()
        event = session.execute(select(func.max(pages.EVENTS.c.id)).where(pages.EVENTS.c.job_id == job_id)).scalar()
        return step, event


class JobFeed:
    """One reader per watched job in this process: a snapshot of what is new is read once per
    POLL_INTERVAL_S and handed to every watcher of the job, so a thousand watchers cost the
    database what one does. A watcher catches up alone first (its own cursors), then follows."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.watchers: set[asyncio.Queue[_Snapshot | None]] = set()
        self.most_watchers = 0
        self.reads = 0
        self.started = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    def join(self) -> asyncio.Queue[_Snapshot | None]:
        queue: asyncio.Queue[_Snapshot | None] = asyncio.Queue(maxsize=WATCHER_QUEUE)
        self.watchers.add(queue)
        self.most_watchers = max(self.most_watchers, len(self.watchers))
        if self.task is None:
            self.task = asyncio.create_task(self._follow())
        return queue

    def leave(self, queue: asyncio.Queue[_Snapshot | None]) -> None:
        self.watchers.discard(queue)
        if not self.watchers and self.task is not None:
            self.task.cancel()

    def _hand_out(self, snapshot: _Snapshot | None) -> None:
        for queue in list(self.watchers):
            try:
                queue.put_nowait(snapshot)
            except asyncio.QueueFull:  # a watcher that stopped reading: end its stream, it reconnects
                self.watchers.discard(queue)
                queue.get_nowait()
                queue.put_nowait(None)

    async def _follow(self) -> None:
        try:
            after_step, after_event_id = await run_db(_tail, self.job_id)
            while self.watchers:
                try:
                    snapshot = await run_db(_read_snapshot, self.job_id, after_step, after_event_id)
                except OperationalError as exc:  # database restarting or locked: try again
                    logger.warning("stream of job %s: database read failed, retrying: %s", self.job_id, exc)
                    await asyncio.sleep(POLL_INTERVAL_S)
                    continue
                self.reads += 1
                self._hand_out(snapshot)
                after_step = snapshot.logs[-1]["step"] if snapshot.logs else after_step
                after_event_id = snapshot.events[-1]["id"] if snapshot.events else after_event_id
                if snapshot.caught_up:
                    if snapshot.finished:
                        break
                    await asyncio.sleep(POLL_INTERVAL_S)
        except NotFound:  # the job was deleted while someone watched it
            pass
        finally:
            self._hand_out(None)
            FEEDS.pop((asyncio.get_running_loop(), self.job_id), None)
            logger.info(
                "stream of job %s: %d database reads in %.0f s for up to %d watchers",
                self.job_id,
                self.reads,
                time.monotonic() - self.started,
                self.most_watchers,
            )


# The feeds of this process, by event loop and job.
FEEDS: dict[tuple[asyncio.AbstractEventLoop, int], JobFeed] = {}


def feed_of(job_id: int) -> JobFeed:
    key = (asyncio.get_running_loop(), job_id)
    if key not in FEEDS:
        FEEDS[key] = JobFeed(job_id)
    return FEEDS[key]


def _events_of(
    snapshot: _Snapshot, after_step: int | None, after_event_id: int | None, sent_job: bytes | None
) -> tuple[bytes, int | None, int | None, bytes | None]:
    """What this watcher has not seen of a snapshot, as SSE bytes, and its cursors after it. A
    watcher exactly at the snapshot's cursors (every follower of the feed) gets the bytes the
    snapshot encoded once for all."""
    out = []
    if snapshot.job.body != sent_job:
        sent_job = snapshot.job.body
        out.append(snapshot.job_sse)
    if (after_step, after_event_id) == (snapshot.after_step, snapshot.after_event_id):
        out.append(snapshot.rows_sse)
        after_step = snapshot.logs[-1]["step"] if snapshot.logs else after_step
        after_event_id = snapshot.events[-1]["id"] if snapshot.events else after_event_id
    else:
        for log in snapshot.logs:
            if after_step is None or log["step"] > after_step:
                out.append(_log_sse(log))
                after_step = log["step"]
        for event in snapshot.events:
            if after_event_id is None or event["id"] > after_event_id:
                out.append(_event_sse(event))
                after_event_id = event["id"]
    return b"".join(out), after_step, after_event_id, sent_job


# Watchers catching up at once (a dashboard opened by many) with the same cursors share one read;
# and catching up never takes more than this many of the API's threads, so pollers and the feeds
# keep theirs.
CATCH_UP_THREADS = 4
_CATCH_UPS: dict[tuple[object, int, int | None, int | None], asyncio.Task[_Snapshot]] = {}


async def _catch_up(job_id: int, after_step: int | None, after_event_id: int | None) -> _Snapshot:
    key = (asyncio.get_running_loop(), job_id, after_step, after_event_id)
    task = _CATCH_UPS.get(key)
    if task is None:
        task = asyncio.ensure_future(
            run_db(
                _read_snapshot, job_id, after_step, after_event_id, limiter=limiter_of("catch-ups", CATCH_UP_THREADS)
            )
        )
        _CATCH_UPS[key] = task
        task.add_done_callback(lambda _task: _CATCH_UPS.pop(key, None))
    # shield: a watcher that disconnects must not cancel the read the others wait for
    return await asyncio.shield(task)


def _behind(cursor: int | None, start: int | None) -> bool:
    """Whether a watcher at `cursor` misses rows a snapshot read after `start` does not hold."""
    return start is not None and (cursor is None or cursor < start)


async def _job_events(job_id: int, after_step: int | None, after_event_id: int | None) -> AsyncIterator[bytes]:
    feed = feed_of(job_id)
    queue = feed.join()  # before catching up: what the feed reads meanwhile is queued, not lost
    sent_job: bytes | None = None
    try:
        while True:
            # Catch up alone, from this watcher's own cursors: when it starts, and whenever the
            # feed's next snapshot begins past them (the feed started from the job's tail, or
            # read while this watcher was catching up).
            while True:
                try:
                    snapshot = await _catch_up(job_id, after_step, after_event_id)
                except OperationalError as exc:  # database restarting or locked: keep the client, try again
                    logger.warning("stream of job %s: database read failed, retrying: %s", job_id, exc)
                    await asyncio.sleep(POLL_INTERVAL_S)
                    continue
                except NotFound:  # the job was deleted while someone watched it
                    return
                out, after_step, after_event_id, sent_job = _events_of(snapshot, after_step, after_event_id, sent_job)
                if out:
                    yield out
                if snapshot.caught_up:
                    if snapshot.finished:
                        return
                    break
            # Then follow the job's feed, with the rest of its watchers.
            while (shared := await queue.get()) is not None:
                if _behind(after_step, shared.after_step) or _behind(after_event_id, shared.after_event_id):
                    break  # rows between this watcher and the snapshot: read them alone first
                out, after_step, after_event_id, sent_job = _events_of(shared, after_step, after_event_id, sent_job)
                if out:
                    yield out
                if shared.finished and shared.caught_up:
                    return
            else:
                return  # the feed ended (the job was deleted) or dropped this slow watcher
    finally:
        feed.leave(queue)


@router.get(
    "/stream",
    response_class=EventSourceResponse,
    responses={
        **NOT_FOUND,
        200: {"description": "a text/event-stream, open until the job ends", "content": {"text/event-stream": {}}},
    },
)
async def stream_job(
    job_id: JobId,
    identity: IdentityDep,
    after_step: Annotated[
        UrlInt | None, Query(ge=0, le=MAX_DB_INT, description="only step logs after this step")
    ] = None,
    after_event_id: Annotated[
        UrlInt | None, Query(ge=0, le=MAX_DB_INT, description="only events after this id")
    ] = None,
) -> EventSourceResponse:
    """Server-Sent Events: `job` (the job record, whenever it changes), `log` (each new step-log
    row) and `event` (each new event). The stream ends after the job's final `job` event; to
    resume after a dropped connection, pass the last step and event id seen."""
    record = await get_record_cache().get(job_id)
    if record is None or not identity.sees(record.project_id):
        raise NotFound(f"job {job_id} not found")
    return EventSourceResponse(_job_events(job_id, after_step, after_event_id), ping=PING_INTERVAL_S)


@router.get("/watch", response_class=HTMLResponse, include_in_schema=False)
def watch_page(job_id: JobId, session: SessionDep, identity: IdentityDep) -> HTMLResponse:
    """A page to open in a browser: progress, metrics, loss and VRAM charts, events, checkpoints."""
    crud.get_job(session=session, job_id=job_id, identity=identity)
    return HTMLResponse(WATCH_PAGE_HTML.replace("{{JOB_ID}}", str(int(job_id))))


home_router = APIRouter(tags=["watch"], dependencies=[Depends(require_token)], responses=error_responses(401, 422))
DASHBOARD_HTML_NAME = "dashboard.html"


@home_router.get("/watch", response_class=HTMLResponse, include_in_schema=False)
def dashboard_page(
    status: Annotated[str | None, Query(max_length=20, description="the status filter's first value")] = None,
    project: Annotated[str | None, Query(max_length=200, description="only this project's jobs")] = None,
    text: Annotated[str | None, Query(max_length=200, description="jobs whose model or owner contain it")] = None,
    compare: Annotated[
        str | None, Query(pattern=r"^\d{1,19}(,\d{1,19}){1,19}$", description="job ids whose curves to compare")
    ] = None,
) -> HTMLResponse:
    """The jobs dashboard (the watch pages' home): every job the token sees with its status,
    progress, loss sparkline, tokens/s, GPUs and owner, filters, and a compare view of two or more
    jobs' loss and eval-loss curves on one chart (app/templates/dashboard.html, its script in
    app/static/dashboard/). The filters are read by the page's script from its own URL."""
    return HTMLResponse(DASHBOARD_PAGE_HTML)


# The page is app/templates/watch.html, with the job id filled in; its CSS and JavaScript are
# app/static/watch/, served under STATIC_URL (app.main mounts static_assets() there) and
# referenced by the page with relative URLs ("../../static/watch/watch.js" from
# /jobs/<id>/watch), as are "stream" and "checkpoints" by the script: the page works behind a
# path prefix too. Self-contained (no CDN: the server may be offline).
# EventSource and a plain page load cannot send an Authorization header: where API_TOKENS is
# set, open the page through a proxy that adds the header, or it answers 401. The static files
# need no token (like /docs, they show what the API is, not what it holds).
APP_DIR = Path(__file__).resolve().parent.parent
STATIC_DIR = APP_DIR / "static"
STATIC_URL = "/static"
WATCH_PAGE_HTML = (APP_DIR / "templates" / "watch.html").read_text(encoding="utf-8")
DASHBOARD_PAGE_HTML = (APP_DIR / "templates" / DASHBOARD_HTML_NAME).read_text(encoding="utf-8")
# Whatever the host's mimetypes table says (older ones call .js application/javascript, without
# a charset; the script holds non-ASCII text).
STATIC_MEDIA_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


class StaticAssets(StaticFiles):
    """StaticFiles (ETag and Last-Modified, a 304 for a browser that has the file, nothing outside
    its directory) that answers `Cache-Control: no-cache`: a browser keeps the files and asks
    whether they changed before using them, so a page served by an upgraded server never runs
    the old script, and an unchanged file costs a 304. Errors in the API's own words: the 405
    handler would list every method for a mount, which matches them all."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if scope["method"] not in ("GET", "HEAD"):
            raise MethodNotAllowed(
                f"{scope['path']} does not take {scope['method']}; it takes GET, HEAD", headers={"Allow": "GET, HEAD"}
            )
        try:
            return await super().get_response(path, scope)
        except HTTPException as exc:
            if exc.status_code == 404:
                raise NotFound(f"no static file {scope['path']}") from None
            raise

    def file_response(
        self, full_path: PathLike, stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        media_type = STATIC_MEDIA_TYPES.get(os.path.splitext(full_path)[1])
        if media_type is not None and response.status_code != 304:
            response.headers["Content-Type"] = media_type
        return response


def static_assets() -> StaticAssets:
    return StaticAssets(directory=STATIC_DIR)
