"""The Redis side: which queue, and how a job id goes onto it.

The API enqueues by dotted name, so it never imports the worker's training code."""

from __future__ import annotations

from functools import lru_cache

from redis import Redis
from rq import Callback, Queue

from core.config import get_settings

RUN_JOB_TASK = "worker.tasks.run_job"
ON_FAILURE_CALLBACK = "core.reconcile.on_rq_failure"
# Keep a finished RQ entry a day for debugging; the database keeps the job for good.
RESULT_TTL_S = 24 * 3600


def rq_job_id(job_id: int, attempt: int) -> str:
    # One RQ id per attempt: a retried job must not share its id with the failed entry that
    # RQ's registry cleanup is still writing.
    return f"job-{job_id}-{attempt}"


def parse_rq_job_id(rq_id: str) -> tuple[int, int] | None:
    """(job id, attempt) from an id made by rq_job_id, else None."""
    parts = rq_id.split("-")
    if len(parts) == 3 and parts[0] == "job" and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]), int(parts[2])
    return None


@lru_cache
def get_redis() -> Redis:
    return Redis.from_url(get_settings().redis_url, socket_connect_timeout=5, socket_timeout=30)


def get_queue(connection: Redis | None = None) -> Queue:
    return Queue(get_settings().queue_name, connection=connection or get_redis())


def enqueue_job(job_id: int, attempt: int, connection: Redis | None = None) -> None:
    """Put a committed job on the queue. Running it twice is harmless: the task claims the job
    in the database first and returns when somebody else already has."""
    queue = get_queue(connection)
    queue.enqueue(
        RUN_JOB_TASK,
        job_id,
        job_id=rq_job_id(job_id, attempt),
        # RQ's default of 180 s would kill every real training run.
        job_timeout=-1,
        result_ttl=RESULT_TTL_S,
        failure_ttl=7 * RESULT_TTL_S,
        description=f"fine-tuning job {job_id}",
        # An abandoned job (its worker died) is reported through this callback by RQ's own
        # registry cleanup; core.reconcile decides between resuming and failing it.
        on_failure=Callback(ON_FAILURE_CALLBACK),
    )


def gpu_key(worker_name: str) -> str:
    return f"{get_settings().queue_name}:gpu-memory:{worker_name}"


def register_gpu_memory(connection: Redis, worker_name: str, total_bytes: int, ttl_s: int) -> None:
    """A worker says how much memory its GPU has, so the API can plan jobs for it."""
    connection.set(gpu_key(worker_name), total_bytes, ex=ttl_s)


def fp8_key(worker_name: str) -> str:
    return f"{get_settings().queue_name}:fp8:{worker_name}"


def register_fp8_support(connection: Redis, worker_name: str, problem: str, ttl_s: int) -> None:
    """A worker says whether it can train precision fp8: "" when it can, else why not."""
    connection.set(fp8_key(worker_name), problem, ex=ttl_s)


def worker_fp8_support(connection: Redis | None = None) -> dict[str, str]:
    """Each live worker's answer: "" when it can train fp8, else why not."""
    connection = connection or get_redis()
    prefix = fp8_key("")
    found: dict[str, str] = {}
    for key in connection.scan_iter(fp8_key("*")):
        value = connection.get(key)
        if value is not None:
            name = key.decode() if isinstance(key, bytes) else str(key)
            found[name.removeprefix(prefix)] = value.decode() if isinstance(value, bytes) else str(value)
    return found


def smallest_worker_gpu(connection: Redis | None = None) -> int | None:
    connection = connection or get_redis()
    values = [connection.get(key) for key in connection.scan_iter(gpu_key("*"))]
    sizes = [int(v) for v in values if v is not None]
    return min(sizes) if sizes else None
