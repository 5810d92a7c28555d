"""GET /metrics: the service in Prometheus's text format (prometheus-client).

What the database and Redis know is read when Prometheus scrapes (a collector: nothing is kept
between scrapes, so several API processes all report the same figures): jobs by status, the
queue's depth and the age of its oldest job, live workers, each running job's step, tokens/s and
GPU memory (NVML's figures from its latest step log), each worker's GPU size, the cumulative
step-duration histogram the trainers keep in their jobs' metrics, checkpoint bytes and the free
disk. HTTP request durations are observed by this process as it answers (a middleware): with
several API processes each keeps its own, and a scrape sees the process that answers it (set
PROMETHEUS_MULTIPROC_DIR to sum them, as prometheus-client documents)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError
from rq import Worker
from sqlalchemy import func
from sqlalchemy import select as sa_select  # sqlmodel's select types at most four columns
from sqlmodel import Session, col, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.config import get_settings
from core.contract import STEP_SECONDS_BUCKETS, CheckpointStatus, JobStatus
from core.db import get_engine
from core.diskspace import disk_space
from core.models import Checkpoint, Job
from core.queue import get_queue, get_redis, gpu_key

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Path segments that are ids or file paths become placeholders: a bounded set of label values.
_IDS = re.compile(r"/\d+(?=/|$)")
_FILE_PATH = re.compile(r"/files/.+$")

HTTP_SECONDS = Histogram(
    "finetune_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response body, by method, route and status.",
    ("method", "route", "status"),
    buckets=HTTP_BUCKETS,
)


def route_of(path: str) -> str:
    return _FILE_PATH.sub("/files/{path}", _IDS.sub("/{id}", path))


class RequestTimer:
    """ASGI middleware, outermost: every HTTP request's duration into HTTP_SECONDS."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            HTTP_SECONDS.labels(scope["method"], route_of(scope["path"]), str(status)).observe(
                time.perf_counter() - started
            )


def _gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


class ServiceCollector(Collector):
    """The database's and Redis's view, read at each scrape."""

    def collect(self) -> Iterator[Any]:
        settings = get_settings()
        with Session(get_engine()) as session:
            yield from self._jobs(session)
            yield from self._checkpoints(session)
        try:
            yield from self._queue()
            redis_up = 1
        except RedisError:  # the rest still answers: a scrape must not fail with Redis
            redis_up = 0
        up = _gauge("finetune_redis_up", "Whether Redis answered this scrape.")
        up.add_metric([], redis_up)
        yield up
        space = disk_space(settings.data_dir)
        free = _gauge("finetune_disk_free_bytes", "Free bytes on the disk under DATA_DIR.")
        free.add_metric([], space.free_bytes)
        total = _gauge("finetune_disk_total_bytes", "Size of the disk under DATA_DIR.")
        total.add_metric([], space.total_bytes)
        yield from (free, total)

    def _jobs(self, session: Session) -> Iterator[Any]:
        counts = dict(
            session.exec(
                select(Job.status, func.count()).where(col(Job.deleted_at).is_(None)).group_by(Job.status)
            ).all()
        )
        by_status = _gauge("finetune_jobs", "Jobs by status (unknown: a status another version wrote).", ("status",))
        # A status this version does not know is read as its plain word: counted as unknown.
        counts[JobStatus.unknown] = sum(n for status, n in counts.items() if not isinstance(status, JobStatus))
        for status in JobStatus:
            by_status.add_metric([status.value], counts.get(status, 0))
        yield by_status

        oldest = session.exec(
            select(func.min(Job.created_at)).where(Job.status == JobStatus.queued, col(Job.deleted_at).is_(None))
        ).first()
        age = _gauge("finetune_oldest_queued_job_age_seconds", "Age of the oldest queued job (0 when none).")
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        age.add_metric([], (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else 0.0)
        yield age

        step = _gauge("finetune_job_step", "Optimizer step of each running job.", ("job_id",))
        total_steps = _gauge("finetune_job_total_steps", "Optimizer steps of each running job.", ("job_id",))
        tokens = _gauge("finetune_job_tokens_per_second", "Tokens/s at each running job's last log.", ("job_id",))
        stalled = _gauge(
            "finetune_job_stalled_seconds",
            "Seconds since a running job's last training step, once it has gone STALL_AFTER_S without one "
            "(0 while it steps).",
            ("job_id",),
        )
        now = datetime.now(UTC)
        used = _gauge(
            "finetune_gpu_memory_used_bytes",
            "Memory in use on a running job's GPU (NVML, all processes), at its last step log.",
            ("worker", "job_id"),
        )
        histogram: dict[str, Any] = {"buckets": [0] * (len(STEP_SECONDS_BUCKETS) + 1), "sum": 0.0, "count": 0}
        # Only the columns used: a scrape reads every job that has metrics, never its spec or report.
        columns = (
            Job.id,
            Job.status,
            Job.step,
            Job.total_steps,
            Job.metrics,
            Job.vram,
            Job.worker_name,
            Job.stalled_since,
        )
        rows = session.execute(
            sa_select(*map(col, columns)).where(col(Job.deleted_at).is_(None), col(Job.metrics).is_not(None))
        )
        for job in rows:
            steps = (job.metrics or {}).get("step_seconds")
            if steps:
                histogram["buckets"] = [a + b for a, b in zip(histogram["buckets"], steps["buckets"], strict=True)]
                histogram["sum"] += steps["sum"]
                histogram["count"] += steps["count"]
            if job.status != JobStatus.running:
                continue
            label = [str(job.id)]
            step.add_metric(label, job.step)
            total_steps.add_metric(label, job.total_steps or 0)
            tokens.add_metric(label, (job.metrics or {}).get("tokens_per_second") or 0.0)
            since = job.stalled_since
            if since is not None and since.tzinfo is None:  # SQLite keeps no zone (the column is UTC)
                since = since.replace(tzinfo=UTC)
            stalled.add_metric(label, (now - since).total_seconds() if since is not None else 0.0)
            vram = job.vram or {}
            if vram.get("device_used") is not None:
                used.add_metric([job.worker_name or "", str(job.id)], vram["device_used"])
        yield from (step, total_steps, tokens, stalled, used)

        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, STEP_SECONDS_BUCKETS), "+Inf"], histogram["buckets"], strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "finetune_step_duration_seconds",
            "Optimizer step durations of every job (each logging window's mean, once per step), "
            "compilation and evaluations left out.",
            buckets=buckets,
            sum_value=histogram["sum"],
        )

    def _checkpoints(self, session: Session) -> Iterator[Any]:
        total = session.exec(
            select(func.coalesce(func.sum(Checkpoint.size_bytes), 0)).where(
                Checkpoint.status != CheckpointStatus.removed
            )
        ).one()
        kept = _gauge("finetune_checkpoint_bytes", "Bytes of the checkpoints on disk (their records' sizes).")
        kept.add_metric([], int(total))
        yield kept
        corrupt = _gauge(
            "finetune_checkpoints_corrupt",
            "Checkpoints whose files no longer match the sha256 they were saved with (not served, not resumed from).",
        )
        corrupt.add_metric(
            [], session.exec(select(func.count()).where(Checkpoint.status == CheckpointStatus.corrupt)).one()
        )
        yield corrupt

    def _queue(self) -> Iterator[Any]:
        device = _gauge("finetune_gpu_memory_total_bytes", "Memory of each live worker's GPU.", ("worker",))
        for key in get_redis().scan_iter(gpu_key("*")):
            value = get_redis().get(key)
            if value is not None:
                device.add_metric([key.decode().rsplit(":", 1)[-1]], int(value))
        queue = get_queue()
        depth = _gauge("finetune_queue_depth", "Jobs waiting on the Redis queue.")
        depth.add_metric([], queue.count)
        workers = _gauge("finetune_workers", "Live RQ workers on the queue.")
        workers.add_metric([], Worker.count(queue=queue))
        yield from (device, depth, workers)


def render() -> tuple[bytes, str]:
    """The exposition: this process's request histogram (or every process's, with
    PROMETHEUS_MULTIPROC_DIR) and the service's figures."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(HTTP_SECONDS)
    registry.register(ServiceCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
