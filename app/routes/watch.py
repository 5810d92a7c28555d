"""/jobs/{id}/stream and /jobs/{id}/watch: follow a job live, as Server-Sent Events or as a web page."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlmodel import Session
from sse_starlette.event import ServerSentEvent
from sse_starlette.sse import EventSourceResponse

from app import crud, pages
from app.db import SessionDep, get_engine, limiter_of, run_db
from app.deps import require_token
from app.errors import NotFound, error_responses
from app.records import Record, get_record_cache, record_of
from app.routes.jobs import NOT_FOUND, JobId
from app.schemas import MAX_DB_INT, UrlInt

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs/{job_id}", tags=["watch"], dependencies=[Depends(require_token)],
                   responses=error_responses(401, 422, 503))

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
        # finished, everything written before the finish is in this snapshot too.
        job = crud.get_job(session=session, job_id=job_id)
        return _Snapshot(job=record_of(job), logs=pages.read_logs(session, job_id, after_step, BATCH_ROWS),
                         events=pages.read_events(session, job_id, after_event_id, BATCH_ROWS),
                         after_step=after_step, after_event_id=after_event_id)


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
            logger.info("stream of job %s: %d database reads in %.0f s for up to %d watchers", self.job_id,
                        self.reads, time.monotonic() - self.started, self.most_watchers)


# The feeds of this process, by event loop and job.
FEEDS: dict[tuple[asyncio.AbstractEventLoop, int], JobFeed] = {}


def feed_of(job_id: int) -> JobFeed:
    key = (asyncio.get_running_loop(), job_id)
    if key not in FEEDS:
        FEEDS[key] = JobFeed(job_id)
    return FEEDS[key]


def _events_of(snapshot: _Snapshot, after_step: int | None, after_event_id: int | None, sent_job: bytes | None
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
        task = asyncio.ensure_future(run_db(_read_snapshot, job_id, after_step, after_event_id,
                                            limiter=limiter_of("catch-ups", CATCH_UP_THREADS)))
        _CATCH_UPS[key] = task
        task.add_done_callback(lambda _task: _CATCH_UPS.pop(key, None))
    # shield: a watcher that disconnects must not cancel the read the others wait for
    return await asyncio.shield(task)


def _behind(cursor: int | None, start: int | None) -> bool:
    """Whether a watcher at `cursor` misses rows a snapshot read after `start` does not hold."""
    return start is not None and (cursor is None or cursor < start)


async def _job_events(job_id: int, after_step: int | None, after_event_id: int | None
                      ) -> AsyncIterator[bytes]:
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
                out, after_step, after_event_id, sent_job = _events_of(snapshot, after_step, after_event_id,
                                                                       sent_job)
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
                out, after_step, after_event_id, sent_job = _events_of(shared, after_step, after_event_id,
                                                                       sent_job)
                if out:
                    yield out
                if shared.finished and shared.caught_up:
                    return
            else:
                return  # the feed ended (the job was deleted) or dropped this slow watcher
    finally:
        feed.leave(queue)


@router.get(
    "/stream", response_class=EventSourceResponse,
    responses={**NOT_FOUND, 200: {"description": "a text/event-stream, open until the job ends",
                                  "content": {"text/event-stream": {}}}},
)
async def stream_job(
    job_id: JobId,
    after_step: Annotated[UrlInt | None, Query(ge=0, le=MAX_DB_INT,
                                               description="only step logs after this step")] = None,
    after_event_id: Annotated[UrlInt | None, Query(ge=0, le=MAX_DB_INT,
                                                   description="only events after this id")] = None,
) -> EventSourceResponse:
    """Server-Sent Events: `job` (the job record, whenever it changes), `log` (each new step-log
    row) and `event` (each new event). The stream ends after the job's final `job` event; to
    resume after a dropped connection, pass the last step and event id seen."""
    if await get_record_cache().get(job_id) is None:
        raise NotFound(f"job {job_id} not found")
    return EventSourceResponse(_job_events(job_id, after_step, after_event_id), ping=PING_INTERVAL_S)


@router.get("/watch", response_class=HTMLResponse, include_in_schema=False)
def watch_page(job_id: JobId, session: SessionDep) -> HTMLResponse:
    """A page to open in a browser: progress, metrics, loss and VRAM charts, events, checkpoints."""
    crud.get_job(session=session, job_id=job_id)
    return HTMLResponse(WATCH_PAGE_HTML.replace("{{JOB_ID}}", str(int(job_id))))


# Self-contained (no CDN: the server may be offline). Relative URLs ("stream", "checkpoints")
# resolve against /jobs/<id>/watch, so the page works behind a path prefix too.
# EventSource and a plain page load cannot send an Authorization header: where API_TOKENS is
# set, open the page through a proxy that adds the header, or it answers 401.
WATCH_PAGE_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>Job {{JOB_ID}}</title><link rel="icon" href="data:,">
<style>
body{font:14px system-ui,sans-serif;color:#222;max-width:960px;margin:1.5em auto;padding:0 1em}
h1{font-size:1.4em;margin:0} h2{font-size:1.05em;margin:1.4em 0 .4em} .muted{color:#777}
.bar{background:#eee;border-radius:4px;height:14px;overflow:hidden;margin:.8em 0 .3em}
.bar div{background:#3b82f6;height:100%;width:0;transition:width .5s}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(165px,1fr));gap:.5em;margin-top:1em}
.grid div{background:#f4f4f5;border-radius:4px;padding:.4em .6em} .grid b{display:block;font-size:1.15em}
svg{width:100%;height:auto;background:#fafafa;border:1px solid #ddd;border-radius:4px}
svg text{font-size:11px;fill:#666}
ul{padding-left:1.2em} #events{max-height:280px;overflow:auto;font:12px monospace}
.succeeded{color:#15803d} .failed{color:#b91c1c} .cancelled{color:#a16207} .running{color:#1d4ed8}
</style></head><body>
<h1>Job {{JOB_ID}} <span id="status" class="muted">connecting…</span></h1>
<div id="model" class="muted"></div>
<div class="bar"><div id="bar"></div></div><div id="progress" class="muted"></div>
<div id="error" class="failed"></div>
<div class="grid">
  <div>loss<b id="loss">–</b></div><div>eval loss<b id="eval">–</b></div>
  <div>learning rate<b id="lr">–</b></div>
  <div>grad norm<b id="gn">–</b></div><div>tokens/s<b id="tps">–</b></div>
  <div>VRAM allocated<b id="alloc">–</b></div><div>VRAM peak<b id="peak">–</b></div>
  <div>device used / total<b id="device">– / –</b></div>
</div>
<h2>Loss</h2><svg id="loss-chart" viewBox="0 0 600 180"></svg>
<h2>VRAM (GiB)</h2><svg id="vram-chart" viewBox="0 0 600 180"></svg>
<h2>Checkpoints</h2><ul id="checkpoints"><li class="muted">none yet</li></ul>
<h2>Events</h2><ul id="events"></ul>
<script>
"use strict";
const JOB_ID = {{JOB_ID}}, NS = "http://www.w3.org/2000/svg", FINISHED = ["succeeded", "failed", "cancelled"];
const $ = (id) => document.getElementById(id);
const logs = [];
let lastStep = null, lastEventId = null, finished = false, drawPending = false;

function num(v) {
  if (v == null) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : String(+v.toPrecision(4));
}
const gib = (v) => (v == null ? "–" : v.toFixed(1) + " GiB");
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  for (; n >= 1024 && i < units.length - 1; i++) n /= 1024;
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function duration(s) {
  s = Math.round(s);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return d ? `${d} d ${h} h` : h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}
function node(tag, attrs, text, ns) {
  const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
  if (text != null) e.textContent = text;
  return e;
}
const svgNode = (tag, attrs, text) => node(tag, attrs, text, NS);

function showJob(job) {
  const p = job.progress, m = job.metrics, v = job.vram;
  const cancelling = job.cancel_requested && job.status === "running";
  const phase = job.phase && job.phase !== "training" ? `: ${job.phase.replace("_", " ")}` : "";
  $("status").textContent = job.status + phase + (cancelling ? " (cancelling)" : "");
  $("status").className = job.status;
  $("model").textContent = `${job.spec.model} on ${job.spec.dataset.source}`
    + (job.backend ? ` · ${job.backend}` : "");
  $("bar").style.width = (p.percent || 0) + "%";
  const parts = [`step ${p.step}` + (p.total_steps ? ` / ${p.total_steps}` : "")];
  if (p.percent != null) parts.push(p.percent.toFixed(1) + " %");
  if (p.epoch != null) parts.push(`epoch ${p.epoch.toFixed(2)}`);
  if (p.eta_seconds != null && job.status === "running") parts.push(`ETA ${duration(p.eta_seconds)}`);
  $("progress").textContent = parts.join(" · ");
  $("error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("loss").textContent = num(m.loss);
  $("eval").textContent = m.eval_loss == null ? "–" : `${num(m.eval_loss)} (step ${m.eval_step})`;
  $("lr").textContent = num(m.learning_rate);
  $("gn").textContent = num(m.grad_norm);
  $("tps").textContent = m.tokens_per_second == null ? "–" : Math.round(m.tokens_per_second);
  $("alloc").textContent = gib(v.allocated_gib);
  $("peak").textContent = gib(v.peak_allocated_gib);
  $("device").textContent = `${gib(v.device_used_gib)} / ${gib(v.device_total_gib)}`;
  if (FINISHED.includes(job.status) && !finished) {
    finished = true;  // the server ends the stream itself, after this poll's logs and events
    loadCheckpoints();
    scheduleDraw();  // empty charts now say "no data", not "yet"
  }
}

// series: [{label, color, dots?, points: [[step, value], ...]}]; draws axes, min/max labels, polylines.
function chart(svg, series, fromZero, emptyText) {
  const W = 600, H = 180, L = 52, R = 10, T = 10, B = 22;
  svg.replaceChildren();
  const pts = series.flatMap((s) => s.points);
  const middle = {x: W / 2, y: H / 2, "text-anchor": "middle"};
  if (!pts.length) return svg.append(svgNode("text", middle, emptyText));
  const lo = (i) => pts.reduce((a, p) => Math.min(a, p[i]), Infinity);
  const hi = (i) => pts.reduce((a, p) => Math.max(a, p[i]), -Infinity);
  const x0 = lo(0), x1 = Math.max(hi(0), x0 + 1);
  let y0 = fromZero ? 0 : lo(1), y1 = hi(1);
  if (y1 - y0 < 1e-12) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  const axes = `${L},${T} ${L},${H - B} ${W - R},${H - B}`;
  svg.append(svgNode("polyline", {points: axes, fill: "none", stroke: "#aaa"}));
  svg.append(svgNode("text", {x: L - 4, y: T + 8, "text-anchor": "end"}, num(y1)));
  svg.append(svgNode("text", {x: L - 4, y: H - B, "text-anchor": "end"}, num(y0)));
  svg.append(svgNode("text", {x: L, y: H - 6}, `step ${x0}`));
  svg.append(svgNode("text", {x: W - R, y: H - 6, "text-anchor": "end"}, `step ${hi(0)}`));
  series.forEach((s, i) => {
    const line = s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    svg.append(svgNode("polyline", {points: line, fill: "none", stroke: s.color, "stroke-width": 1.5}));
    // Sparse series (an evaluation every few hundred steps) also get a dot per point.
    if (s.dots) s.points.forEach((p) => svg.append(svgNode("circle", {cx: sx(p[0]).toFixed(1),
      cy: sy(p[1]).toFixed(1), r: 3, fill: s.color})));
    const legend = {x: W - R - 4, y: T + 10 + 14 * i, "text-anchor": "end", style: `fill:${s.color}`};
    svg.append(svgNode("text", legend, s.label));
  });
}
function pointsOf(pick) {
  return logs.filter((r) => pick(r) != null).map((r) => [r.step, pick(r)]);
}
function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => {
    drawPending = false;
    const empty = finished ? "no data" : "no data yet";
    chart($("loss-chart"), [
      {label: "loss", color: "#3b82f6", points: pointsOf((r) => r.loss)},
      {label: "eval loss", color: "#f59e0b", dots: true, points: pointsOf((r) => r.eval_loss)},
    ], false, empty);
    // Step logs without memory figures come from a run on the CPU: say so, not "yet".
    chart($("vram-chart"), [
      {label: "device used (NVML)", color: "#dc2626", points: pointsOf((r) => r.vram.device_used_gib)},
      {label: "allocated (torch)", color: "#16a34a", points: pointsOf((r) => r.vram.allocated_gib)},
    ], true, logs.length ? "no GPU memory figures: this job trains on the CPU" : empty);
  });
}

function addEvent(ev) {
  const li = node("li", {}, `${new Date(ev.created_at).toLocaleString()}  ${ev.kind}: ${ev.message}`);
  $("events").prepend(li);
}
async function loadCheckpoints() {
  const r = await fetch("checkpoints");
  if (!r.ok) return;
  const items = (await r.json()).map((cp) => {
    const li = node("li", {}, `${cp.name} (step ${cp.step}, ${bytes(cp.size)}, ${cp.status}) `);
    li.append(node("a", {href: cp.archive_url}, "download .tar"));
    const files = node("details");
    files.append(node("summary", {}, `files (${cp.files.length})`));
    for (const f of cp.files) {
      const row = node("div");
      row.append(node("a", {href: f.url}, f.path), ` ${bytes(f.size)}`);
      files.append(row);
    }
    li.append(files);
    return li;
  });
  $("checkpoints").replaceChildren(...(items.length ? items : [node("li", {class: "muted"}, "none yet")]));
}

// Reconnects itself with after_step / after_event_id, so nothing is shown twice.
function connect() {
  const q = new URLSearchParams();
  if (lastStep != null) q.set("after_step", lastStep);
  if (lastEventId != null) q.set("after_event_id", lastEventId);
  const source = new EventSource("stream" + (q.toString() ? "?" + q : ""));
  source.addEventListener("job", (e) => showJob(JSON.parse(e.data)));
  source.addEventListener("log", (e) => {
    const row = JSON.parse(e.data);
    lastStep = row.step;
    logs.push(row);
    scheduleDraw();
  });
  source.addEventListener("event", (e) => {
    const ev = JSON.parse(e.data);
    lastEventId = ev.id;
    addEvent(ev);
    if (ev.kind.startsWith("checkpoint")) loadCheckpoints();
  });
  source.onerror = () => {
    source.close();  // the browser would otherwise reconnect by itself and replay everything
    if (!finished) setTimeout(connect, 3000);
  };
}
scheduleDraw();
loadCheckpoints();
connect();
</script>
</body></html>
"""
