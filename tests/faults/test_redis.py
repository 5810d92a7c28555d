"""Redis goes away and comes back empty (it keeps nothing on disk here), with the worker idle,
busy skipping cancelled jobs, or running a job. The worker rides it out and goes on; the job
database, not Redis, decides what still has to run."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import job_spec, wait_until
from tests.faults.conftest import Cluster

pytestmark = pytest.mark.slow

OUTAGE_S = 2.0


def restart_redis(cluster: Cluster) -> None:
    cluster.kill_redis()
    time.sleep(OUTAGE_S)
    cluster.start_redis()


def waiting_for_jobs(cluster: Cluster) -> bool:
    """The worker is blocked in its dequeue (BLPOP) on the cluster's Redis: it waits for jobs."""
    import redis

    with redis.Redis(port=cluster.redis_port) as connection:
        return any("b" in client["flags"] for client in connection.client_list())


def back_or_gone(cluster: Cluster) -> bool:
    """The worker waits for jobs on the restarted Redis, or it quit: either way the outage is over
    for it, and the assertions after this can tell which."""
    return cluster.workers[0].poll() is not None or waiting_for_jobs(cluster)


def assert_worker_alive(cluster: Cluster) -> None:
    worker = cluster.workers[0]
    assert worker.poll() is None, f"the worker quit (exit code {worker.returncode})"
    log = (cluster.root / "worker.log").read_text(errors="replace")
    assert "unhandled exception, quitting" not in log


def a_short_job_succeeds(cluster: Cluster, tiny_model: Path) -> None:
    job_id = cluster.submit(job_spec(tiny_model, cluster.chat_dataset(), max_steps=2, save_steps=100))
    record = cluster.wait_for(job_id, timeout_s=180)
    assert record["status"] == "succeeded", record["error"]


def test_idle_worker_rides_out_a_redis_restart(cluster: Cluster, tiny_model: Path) -> None:
    cluster.start()
    wait_until(lambda: waiting_for_jobs(cluster), 30, "the worker to wait for jobs")
    restart_redis(cluster)
    wait_until(lambda: back_or_gone(cluster), 60, "the worker to wait for jobs again, or quit")
    assert_worker_alive(cluster)
    a_short_job_succeeds(cluster, tiny_model)
    assert_worker_alive(cluster)


def test_worker_stops_on_sigterm_while_redis_is_away(cluster: Cluster) -> None:
    """Riding out an outage must not mean ignoring a stop: SIGTERM ends an idle worker whose
    Redis is gone (RQ cannot even register its death)."""
    worker = cluster.start().workers[0]
    cluster.kill_redis()
    log = cluster.root / "worker.log"
    # The worker is waiting for Redis, with backoff.
    wait_until(lambda: "could not connect to Redis instance" in log.read_text(errors="replace"), 30, "the retries")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(20) == 0


def test_worker_skipping_cancelled_jobs_rides_out_redis_restarts(cluster: Cluster, tiny_model: Path) -> None:
    """What made RQ quit for good: Redis dropping while the worker runs through queued jobs
    (here cancelled ones, which it dequeues, forks for and skips)."""
    cluster.start_redis()
    cluster.migrate()
    cluster.start_api()
    dataset = cluster.chat_dataset()
    with cluster.http() as http:
        for _ in range(60):
            job_id = cluster.submit(job_spec(tiny_model, dataset))
            assert http.post(f"/jobs/{job_id}/cancel").status_code == 200
    cluster.start_worker()
    queue = "rq:queue:faults"

    def queue_length() -> int:
        import redis

        return int(redis.Redis(port=cluster.redis_port).llen(queue))

    for dequeued in (5, 25, 45):  # three outages, at different points of the run
        wait_until(lambda d=dequeued: queue_length() <= 60 - d, 60, f"{dequeued} jobs dequeued", interval_s=0.05)
        restart_redis(cluster)
        wait_until(lambda: back_or_gone(cluster), 60, "the worker to wait for jobs again, or quit")
        assert_worker_alive(cluster)
    a_short_job_succeeds(cluster, tiny_model)
    assert_worker_alive(cluster)


def test_worker_running_a_job_rides_out_a_redis_restart(cluster: Cluster, tiny_model: Path) -> None:
    cluster.start()
    spec = job_spec(tiny_model, cluster.chat_dataset(), max_steps=30, logging_steps=1, save_steps=100)
    job_id = cluster.submit(spec)
    cluster.wait_for_step(job_id, 2)
    restart_redis(cluster)
    record = cluster.wait_for(job_id, timeout_s=180)
    assert record["status"] == "succeeded", record["error"]
    assert record["attempts"] == 1  # the same trainer went on; nothing was retried
    with cluster.http() as http:
        steps = [row["step"] for row in http.get(f"/jobs/{job_id}/logs").json()["items"]]
    assert steps == list(range(1, 31))
    assert_worker_alive(cluster)
    a_short_job_succeeds(cluster, tiny_model)
