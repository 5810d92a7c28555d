"""The reconciler keeps the database (the source of truth) and Redis in step: a job Redis lost is
enqueued again, a job whose worker died is resumed or failed, never left `running` forever.

Real redis-server and SQLite; a dead worker is simulated the way rq's own test suite does it, by
planting an expired execution in the started-job registry and letting RQ's cleanup find it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from rq import Queue
from rq.executions import Execution
from rq.job import Job as RQJob
from rq.job import JobStatus as RQStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.utils import current_timestamp
from sqlalchemy import update
from sqlmodel import col

from tests.conftest import HUB_SPEC, Env, wait_until

# Hub ids are a valid spec without building a model (stubs in the tests' Hugging Face cache):
# nothing here trains.
SPEC = HUB_SPEC
NOTHING_DONE = {"requeued_lost_queued": 0, "recovered_stale_running": 0}
LOST_QUEUED_MESSAGE = "the queue had lost this job (Redis restarted?); enqueued it again"
# A Hub dataset is checked when the job starts, and its first event says so; the model is planned
# from its cached config.json (a tiny one).
QUEUED_MESSAGE = (
    "job accepted and queued; the dataset is read and checked when the job starts; "
    "planned peak GPU memory 1.0 GiB (GPU size unknown)"
)
ABANDONED = "the worker running this job stopped (RQ reported it abandoned)"
STALE = "its worker has not reported for over 5 s"
RESUMING = "resuming from its last checkpoint if it has one"


@pytest.fixture
def api(env: Env) -> Iterator[TestClient]:
    """The API without its lifespan: its background reconcile loop would race the passes these
    tests run themselves."""
    from app.main import create_app

    test_client = TestClient(create_app(), raise_server_exceptions=True)
    yield test_client
    test_client.close()


def submit(api: TestClient) -> int:
    response = api.post("/jobs", json=SPEC)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def queue_of(env: Env) -> Queue:
    return Queue(env.queue_name, connection=env.redis())


def set_job(job_id: int, **values: object) -> None:
    from core.db import session_scope
    from core.models import Job

    with session_scope() as session:
        session.execute(update(Job).where(col(Job.id) == job_id).values(**values))


def ago(seconds: float) -> datetime:
    from core.models import utcnow

    return utcnow() - timedelta(seconds=seconds)


def events(api: TestClient, job_id: int) -> list[tuple[str, str]]:
    return [(e["kind"], e["message"]) for e in api.get(f"/jobs/{job_id}/events").json()["items"]]


def worker_takes(env: Env, job_id: int, attempt: int) -> RQJob:
    """What a worker does before training: dequeue the RQ job and claim the database row."""
    from worker.tasks import claim

    queue = queue_of(env)
    rq_job = queue.fetch_job(f"job-{job_id}-{attempt}")
    assert rq_job is not None
    queue.remove(rq_job)
    assert claim(job_id) == attempt
    return rq_job


def worker_takes_from_db(job_id: int) -> None:
    """A worker claims the row while RQ knows nothing of the job (Redis lost it)."""
    from worker.tasks import claim

    assert claim(job_id) is not None


def worker_dies(env: Env, rq_job: RQJob) -> None:
    """What a killed worker leaves behind: the RQ job STARTED, and its execution in the
    started-job registry with a heartbeat deadline that has passed."""
    connection = env.redis()
    registry = StartedJobRegistry(env.queue_name, connection=connection)
    with connection.pipeline() as pipeline:
        rq_job.prepare_for_execution("dead-worker", pipeline)
        execution = Execution.create(rq_job, ttl=60, pipeline=pipeline)
        pipeline.execute()
    rq_job.set_status(RQStatus.STARTED)
    connection.zadd(registry.key, {execution.composite_key: current_timestamp() - 10})
    assert registry.get_expired_job_ids() == [rq_job.id]
    assert rq_job.get_status(refresh=True) == RQStatus.STARTED


def test_queued_job_lost_by_redis_is_enqueued_again(api: TestClient, env: Env) -> None:
    from core.config import get_settings
    from core.reconcile import reconcile

    job_id = submit(api)
    env.redis().flushdb()  # Redis restarted without persistence
    set_job(job_id, created_at=ago(get_settings().enqueue_grace_s + 5))

    assert reconcile() == {"requeued_lost_queued": 1, "recovered_stale_running": 0}
    assert queue_of(env).job_ids == [f"job-{job_id}-1"]
    rq_job = queue_of(env).fetch_job(f"job-{job_id}-1")
    assert rq_job is not None and rq_job.func_name == "worker.tasks.run_job" and rq_job.args == (job_id,)
    assert events(api, job_id) == [("queued", QUEUED_MESSAGE), ("requeued", LOST_QUEUED_MESSAGE)]
    assert api.get(f"/jobs/{job_id}").json()["status"] == "queued"

    # The job is on the queue again: a second pass has nothing to do.
    assert reconcile() == NOTHING_DONE
    assert queue_of(env).job_ids == [f"job-{job_id}-1"]
    assert [kind for kind, _ in events(api, job_id)] == ["queued", "requeued"]


def test_job_popped_from_the_queue_but_never_run_is_enqueued_again(api: TestClient, env: Env) -> None:
    """A worker took the job off the queue's list as Redis went away, before RQ marked it
    started: its hash still says `queued`, but nothing will ever run it."""
    from core.config import get_settings
    from core.reconcile import reconcile

    job_id = submit(api)
    queue = queue_of(env)
    env.redis().lrem(queue.key, 0, f"job-{job_id}-1")
    assert queue.fetch_job(f"job-{job_id}-1").get_status() == RQStatus.QUEUED  # type: ignore[union-attr]
    set_job(job_id, created_at=ago(get_settings().enqueue_grace_s + 5))

    assert reconcile() == {"requeued_lost_queued": 1, "recovered_stale_running": 0}
    assert queue.job_ids == [f"job-{job_id}-1"]
    assert reconcile() == NOTHING_DONE


def test_fresh_queued_job_missing_from_redis_is_left_alone(api: TestClient, env: Env) -> None:
    # Younger than ENQUEUE_GRACE_S: it may be between its commit and its enqueue.
    from core.reconcile import reconcile

    job_id = submit(api)
    env.redis().flushdb()

    assert reconcile() == NOTHING_DONE
    assert queue_of(env).job_ids == []
    assert events(api, job_id) == [("queued", QUEUED_MESSAGE)]


def test_job_rq_reports_abandoned_is_requeued_then_failed(api: TestClient, env: Env) -> None:
    from core.reconcile import reconcile

    job_id = submit(api)
    first = worker_takes(env, job_id, attempt=1)
    worker_dies(env, first)

    # RQ's cleanup calls core.reconcile.on_rq_failure, which resumes the job under a new RQ id.
    assert reconcile() == NOTHING_DONE
    record = api.get(f"/jobs/{job_id}").json()
    assert (record["status"], record["attempts"], record["error"]) == ("queued", 1, None)
    assert events(api, job_id)[-1] == ("retried", f"{ABANDONED}; queued again (attempt 2 of 2), {RESUMING}")
    assert queue_of(env).job_ids == [f"job-{job_id}-2"]
    assert first.get_status(refresh=True) == RQStatus.FAILED
    assert FailedJobRegistry(env.queue_name, connection=env.redis()).get_job_ids() == [first.id]
    assert StartedJobRegistry(env.queue_name, connection=env.redis()).get_job_ids() == []

    # The second worker dies too: no attempts left.
    second = worker_takes(env, job_id, attempt=2)
    worker_dies(env, second)
    assert reconcile() == NOTHING_DONE
    record = api.get(f"/jobs/{job_id}").json()
    message = (
        f"{ABANDONED}. The job was tried 2 time(s), the most allowed (MAX_ATTEMPTS); "
        "check the worker's log and resubmit."
    )
    assert record["status"] == "failed"
    assert record["error"] == {"code": "worker_lost", "message": message}
    assert record["finished_at"] is not None
    assert [kind for kind, _ in events(api, job_id)] == ["queued", "started", "retried", "started", "failed"]
    assert events(api, job_id)[-1] == ("failed", message)
    assert queue_of(env).job_ids == []

    # Finished is final: another pass changes nothing.
    assert reconcile() == NOTHING_DONE
    assert api.get(f"/jobs/{job_id}").json() == record


def test_running_job_with_stale_heartbeat_is_recovered(api: TestClient, env: Env) -> None:
    from core.reconcile import reconcile

    stale_id, fresh_id = submit(api), submit(api)
    env.redis().flushdb()  # RQ knows nothing of either job
    for job_id in (stale_id, fresh_id):
        worker_takes_from_db(job_id)
    set_job(stale_id, heartbeat_at=ago(6))  # STALE_AFTER_S is 5 in tests
    fresh_before = api.get(f"/jobs/{fresh_id}").json()

    assert reconcile() == {"requeued_lost_queued": 0, "recovered_stale_running": 1}
    record = api.get(f"/jobs/{stale_id}").json()
    assert (record["status"], record["attempts"], record["error"]) == ("queued", 1, None)
    assert events(api, stale_id)[-1] == ("retried", f"{STALE}; queued again (attempt 2 of 2), {RESUMING}")
    assert queue_of(env).job_ids == [f"job-{stale_id}-2"]
    assert api.get(f"/jobs/{fresh_id}").json() == fresh_before

    # Its second worker goes quiet as well: attempts are used up.
    queue_of(env).remove(f"job-{stale_id}-2")
    worker_takes_from_db(stale_id)
    set_job(stale_id, heartbeat_at=ago(6))
    assert reconcile() == {"requeued_lost_queued": 0, "recovered_stale_running": 1}
    record = api.get(f"/jobs/{stale_id}").json()
    message = (
        f"{STALE}. The job was tried 2 time(s), the most allowed (MAX_ATTEMPTS); check the worker's log and resubmit."
    )
    assert record["status"] == "failed"
    assert record["error"] == {"code": "worker_lost", "message": message}
    assert queue_of(env).job_ids == []
    assert api.get(f"/jobs/{fresh_id}").json() == fresh_before


def test_stale_running_job_with_cancel_requested_ends_cancelled(api: TestClient, env: Env) -> None:
    from core.reconcile import reconcile

    job_id = submit(api)
    env.redis().flushdb()
    worker_takes_from_db(job_id)
    response = api.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["cancel_requested"]) == ("running", True)
    set_job(job_id, heartbeat_at=ago(6))

    assert reconcile() == {"requeued_lost_queued": 0, "recovered_stale_running": 1}
    record = api.get(f"/jobs/{job_id}").json()
    message = f"cancelled; its worker stopped before confirming ({STALE})"
    assert record["status"] == "cancelled"
    assert record["error"] == {"code": "cancelled", "message": message}
    assert record["finished_at"] is not None
    assert events(api, job_id)[-1] == ("cancelled", message)
    assert queue_of(env).job_ids == []  # not requeued


def test_abandoned_job_is_recovered_when_reconcile_runs_off_the_main_thread(api: TestClient, env: Env) -> None:
    # The API's background loop reconciles in a worker thread, not the main one.
    from core.reconcile import reconcile

    job_id = submit(api)
    worker_dies(env, worker_takes(env, job_id, attempt=1))
    thread = threading.Thread(target=reconcile)
    thread.start()
    thread.join()

    assert api.get(f"/jobs/{job_id}").json()["status"] == "queued"
    assert events(api, job_id)[-1] == ("retried", f"{ABANDONED}; queued again (attempt 2 of 2), {RESUMING}")


def test_late_abandoned_report_about_a_superseded_attempt_changes_nothing(api: TestClient, env: Env) -> None:
    """Attempt 1's worker died and the stale heartbeat already requeued the job; attempt 2 runs.
    When RQ's own registry entry for attempt 1 expires later, its report must not touch attempt 2."""
    from core.reconcile import reconcile

    job_id = submit(api)
    first = worker_takes(env, job_id, attempt=1)
    set_job(job_id, heartbeat_at=ago(60))  # older than STALE_AFTER_S: the worker is gone
    assert reconcile()["recovered_stale_running"] == 1
    worker_takes(env, job_id, attempt=2)  # a new worker resumes it; its heartbeat is fresh
    before = api.get(f"/jobs/{job_id}").json()
    assert (before["status"], before["attempts"]) == ("running", 2)

    worker_dies(env, first)  # attempt 1's RQ entry expires only now
    assert reconcile() == NOTHING_DONE
    assert api.get(f"/jobs/{job_id}").json() == before
    assert first.get_status(refresh=True) == RQStatus.FAILED  # RQ's own bookkeeping still happens


def test_pauses_and_resumes_do_not_count_against_max_attempts(api: TestClient, env: Env) -> None:
    """Paused and resumed twice, then its worker is lost: the job goes back to the queue (one lost
    worker is within MAX_ATTEMPTS=2), although it has been started three times."""
    from core.contract import TrainerOutcome, TrainerResult
    from core.db import session_scope
    from core.reconcile import reconcile
    from worker.stops import record_pause

    job_id = submit(api)
    for attempt in (1, 2):
        worker_takes(env, job_id, attempt=attempt)
        with session_scope() as session:
            paused = TrainerResult(status=TrainerOutcome.paused, step=attempt, checkpoint=None)
            assert record_pause(session=session, job_id=job_id, result=paused) == "paused"
        assert api.post(f"/jobs/{job_id}/resume").json()["status"] == "queued"
    third = worker_takes(env, job_id, attempt=3)
    worker_dies(env, third)
    assert reconcile() == NOTHING_DONE  # RQ's cleanup reported it: on_rq_failure
    record = api.get(f"/jobs/{job_id}").json()
    assert (record["status"], record["attempts"], record["error"]) == ("queued", 3, None)
    assert events(api, job_id)[-1] == ("retried", f"{ABANDONED}; queued again (attempt 2 of 2), {RESUMING}")


def test_a_deleted_job_is_never_enqueued_again(api: TestClient, env: Env) -> None:
    """A tombstone left queued (by an older version's race of resume and delete) stays out of
    the queue: the reconciler skips deleted rows."""
    from core.reconcile import reconcile

    job_id = submit(api)
    env.redis().flushdb()
    set_job(job_id, created_at=ago(60), deleted_at=ago(1))
    assert reconcile() == NOTHING_DONE
    assert queue_of(env).job_ids == []


def heartbeat_of(job_id: int) -> datetime | None:
    from core.db import session_scope
    from core.models import Job

    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.heartbeat_at


def test_a_horse_held_up_outside_its_watch_loop_keeps_its_job(api: TestClient, env: Env) -> None:
    """Connecting to Ray or waiting for SQLite's lock held the watch loop up past STALE_AFTER_S and
    the job was taken from a live horse (seen on a loaded CI host: `worker_lost` twice). The
    heartbeat has a thread of its own: the job stays with its horse while the loop is held up."""
    from core.reconcile import reconcile
    from worker.heartbeat import Heartbeat

    job_id = submit(api)
    env.redis().flushdb()
    worker_takes_from_db(job_id)
    set_job(job_id, heartbeat_at=ago(60))  # what a held-up loop would have left
    with Heartbeat(job_id, interval_s=0.05):  # starting the trainer: no watch loop yet
        wait_until(lambda: (heartbeat_of(job_id) or ago(60)) > ago(1), 10, "the heartbeat thread to beat")
        assert reconcile() == NOTHING_DONE
    assert api.get(f"/jobs/{job_id}").json()["status"] == "running"


def test_a_hung_watch_loop_stops_the_heartbeat_and_its_job_is_recovered(api: TestClient, env: Env) -> None:
    """The thread beats only while the watch loop comes round: a horse hung in its loop loses its
    job to the reconciler, as a dead one does."""
    from core.reconcile import reconcile
    from worker.heartbeat import HUNG_AFTER_BEATS, Heartbeat

    job_id = submit(api)
    env.redis().flushdb()
    worker_takes_from_db(job_id)
    with Heartbeat(job_id, interval_s=0.05) as heartbeat:
        heartbeat.alive()  # the loop came round once, then hangs
        wait_until(lambda: not heartbeat.beating, HUNG_AFTER_BEATS * 0.05 + 5, "the heartbeat to give up")
        set_job(job_id, heartbeat_at=ago(60))
        time.sleep(0.3)  # six intervals: a beating thread would have written a fresh heartbeat
        assert heartbeat_of(job_id) < ago(30)  # type: ignore[operator]
        assert reconcile()["recovered_stale_running"] == 1
    assert api.get(f"/jobs/{job_id}").json()["status"] == "queued"
