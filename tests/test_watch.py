"""The live views of a job: the Server-Sent Events stream and the watch page, over real SQLite."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, SQLModel

from app.config import get_settings
from app.db import get_engine
from app.main import app
from app.models import Job, JobEvent, JobStatus, StepLog, utcnow
from app.routes import watch

GIB = 1024**3
SPEC = {"model": "org/tiny-llama", "dataset": {"source": "org/tiny-data", "split": "train"}}


@pytest.fixture
def client(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", "")
    monkeypatch.setenv("API_TOKENS", "")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")  # never reached: nothing here enqueues
    get_settings.cache_clear()
    get_engine.cache_clear()
    SQLModel.metadata.create_all(get_engine())
    # Not `with TestClient(app)`: that would run the lifespan, whose reconcile loop wants Redis.
    yield TestClient(app)
    get_engine().dispose()
    get_settings.cache_clear()
    get_engine.cache_clear()


def add_job(status: JobStatus, *, logs: int = 0, events: int = 0) -> int:
    with Session(get_engine()) as session:
        job = Job(spec=SPEC, status=status, step=logs * 10, total_steps=100, eta_seconds=90.0,
                  metrics={"loss": 2.5}, vram={"allocated": 2 * GIB, "device_total": 80 * GIB})
        session.add(job)
        session.commit()
        assert job.id is not None
        for i in range(1, logs + 1):
            session.add(StepLog(job_id=job.id, step=10 * i, loss=3.0 - i / 10, vram_allocated=2 * GIB,
                                device_used=5 * GIB, device_total=80 * GIB))
        for i in range(events):
            session.add(JobEvent(job_id=job.id, kind="started", message=f"message {i}"))
        session.commit()
        return job.id


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) for each event of an SSE body; comments (pings) are skipped."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if fields:
            events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_stream_of_finished_job_sends_job_logs_events_then_ends(client: TestClient) -> None:
    job_id = add_job(JobStatus.succeeded, logs=2, events=1)

    response = client.get(f"/jobs/{job_id}/stream")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert [name for name, _ in events] == ["job", "log", "log", "event"]
    assert [data["step"] for name, data in events if name == "log"] == [10, 20]
    assert events[1][1]["vram"]["device_used_gib"] == 5.0
    assert events[3][1]["message"] == "message 0"
    final_job = [data for name, data in events if name == "job"][-1]
    assert final_job["id"] == job_id
    assert final_job["status"] == "succeeded"
    assert final_job["progress"]["percent"] == 20.0


def test_stream_resumes_after_step_and_event_id(client: TestClient) -> None:
    job_id = add_job(JobStatus.failed, logs=2, events=2)
    everything = parse_sse(client.get(f"/jobs/{job_id}/stream").text)
    first_event_id = next(data["id"] for name, data in everything if name == "event")

    after_step = parse_sse(client.get(f"/jobs/{job_id}/stream", params={"after_step": 10}).text)
    after_event = parse_sse(
        client.get(f"/jobs/{job_id}/stream", params={"after_step": 20, "after_event_id": first_event_id}).text
    )

    assert [name for name, _ in after_step] == ["job", "log", "event", "event"]
    assert after_step[1][1]["step"] == 20
    assert [name for name, _ in after_event] == ["job", "event"]
    assert after_event[1][1]["message"] == "message 1"


def test_stream_follows_a_running_job_until_it_finishes(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = add_job(JobStatus.running, logs=1)
    monkeypatch.setattr(watch, "POLL_INTERVAL_S", 0.02)
    polled = threading.Event()
    read_snapshot = watch._read_snapshot

    def spy(*args: Any) -> Any:
        snapshot = read_snapshot(*args)
        polled.set()
        return snapshot

    monkeypatch.setattr(watch, "_read_snapshot", spy)

    def finish_job() -> None:  # what the trainer and worker do, once the stream has looked
        polled.wait(timeout=10)
        with Session(get_engine()) as session:
            session.add(StepLog(job_id=job_id, step=20, loss=1.5))
            job = session.get(Job, job_id)
            assert job is not None
            job.status, job.step, job.finished_at = JobStatus.succeeded, 20, utcnow()
            session.add(JobEvent(job_id=job_id, kind="succeeded", message="training finished"))
            session.commit()

    writer = threading.Thread(target=finish_job)
    writer.start()
    response = client.get(f"/jobs/{job_id}/stream")
    writer.join()

    events = parse_sse(response.text)
    # Each row once, the record first and last; a row may come just before the record that counts
    # it (the snapshot reads the record first, then what is new).
    assert events[0][0] == "job" and events[1] == ("log", events[1][1])
    assert [data["status"] for name, data in events if name == "job"] == ["running", "succeeded"]
    assert [data["step"] for name, data in events if name == "log"] == [10, 20]
    assert [data["kind"] for name, data in events if name == "event"] == ["succeeded"]


@pytest.mark.parametrize("path", ["stream", "watch"])
def test_unknown_job_is_404_before_anything_streams(client: TestClient, path: str) -> None:
    response = client.get(f"/jobs/999/{path}")

    assert response.status_code == 404
    assert response.json() == {"error": "NotFound", "detail": "job 999 not found"}


def test_watch_page_is_html_that_opens_the_stream(client: TestClient) -> None:
    job_id = add_job(JobStatus.queued)

    response = client.get(f"/jobs/{job_id}/watch")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert f"<title>Job {job_id}</title>" in response.text
    assert f"const JOB_ID = {job_id}," in response.text
    assert "new EventSource(" in response.text
    assert "{{JOB_ID}}" not in response.text


def test_stream_and_page_need_the_token_when_tokens_are_configured(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = add_job(JobStatus.succeeded)
    monkeypatch.setenv("API_TOKENS", "s3cret")
    get_settings.cache_clear()

    assert client.get(f"/jobs/{job_id}/stream").status_code == 401
    assert client.get(f"/jobs/{job_id}/watch").status_code == 401
    authorized = client.get(f"/jobs/{job_id}/stream", headers={"Authorization": "Bearer s3cret"})
    assert [name for name, _ in parse_sse(authorized.text)] == ["job"]


def test_many_watchers_of_a_running_job_share_one_read_per_interval(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 watchers: they catch up together (one read, as their cursors are the same), then all
    follow one reader that reads the database once per interval, and every watcher gets every
    new row and the finish."""
    job_id = add_job(JobStatus.running, logs=3)
    monkeypatch.setattr(watch, "POLL_INTERVAL_S", 0.05)
    reads: list[float] = []
    read_snapshot = watch._read_snapshot

    def counted(*args: Any) -> Any:
        reads.append(time.monotonic())
        return read_snapshot(*args)

    monkeypatch.setattr(watch, "_read_snapshot", counted)

    def write(step: int, finish: bool = False) -> None:
        with Session(get_engine()) as session:
            session.add(StepLog(job_id=job_id, step=step, loss=1.0))
            if finish:
                job = session.get(Job, job_id)
                assert job is not None
                job.status, job.finished_at = JobStatus.succeeded, utcnow()
            session.commit()

    async def watcher() -> list[tuple[str, Any]]:
        body = b"".join([chunk async for chunk in watch._job_events(job_id, None, None)])
        return [(name, data.get("step") if name == "log" else data.get("status"))
                for name, data in parse_sse(body.decode())]

    async def scenario() -> tuple[list[list[tuple[str, Any]]], int]:
        tasks = [asyncio.create_task(watcher()) for _ in range(50)]
        await asyncio.sleep(0.3)  # all caught up, following the feed
        assert len(reads) < 50  # the catch-ups were shared (and the feed has begun)
        following_from = len(reads)
        started = time.monotonic()
        for step in (40, 50):
            await asyncio.to_thread(write, step)
            await asyncio.sleep(0.2)
        await asyncio.to_thread(write, 60, True)
        results = await asyncio.gather(*tasks)
        intervals = (time.monotonic() - started) / watch.POLL_INTERVAL_S
        feed_reads = len(reads) - following_from
        assert feed_reads <= intervals + 3, (feed_reads, intervals)  # about one a poll, not fifty
        return results, feed_reads

    results, feed_reads = asyncio.run(scenario())
    assert feed_reads >= 3
    for seen in results:
        assert [step for event, step in seen if event == "log"] == [10, 20, 30, 40, 50, 60]
        assert [status for event, status in seen if event == "job"][-1] == "succeeded"
    assert not watch.FEEDS  # the feed stopped with the job
