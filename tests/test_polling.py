"""What pollers get: records served from memory but never staler than RECORD_MAX_AGE_S for a
running job, one database read however many poll at once, ETags and 304s, only the fields
asked for, and pages built without ORM objects that match the declared schemas exactly."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import col, select

from tests.conftest import HUB_SPEC, Env

SPEC = HUB_SPEC  # Hub ids in the tests' Hugging Face cache


def submit(client: httpx.Client) -> int:
    response = client.post("/jobs", json=SPEC)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def set_job(job_id: int, **values: Any) -> None:
    from core.db import session_scope
    from core.models import Job

    with session_scope() as session:
        session.execute(update(Job).where(col(Job.id) == job_id).values(**values))


def max_age(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    from core.config import get_settings

    monkeypatch.setenv("RECORD_MAX_AGE_S", str(seconds))
    get_settings.cache_clear()


def test_a_running_jobs_record_is_served_from_memory_for_at_most_the_max_age(
    client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    max_age(monkeypatch, 0.3)
    job_id = submit(client)
    set_job(job_id, status="running", step=1)
    assert client.get(f"/jobs/{job_id}").json()["progress"]["step"] == 1
    set_job(job_id, step=2)  # what the trainer's callback does at a logging step
    assert client.get(f"/jobs/{job_id}").json()["progress"]["step"] == 1  # the copy in memory
    assert client.get(f"/jobs/{job_id}", headers={"Cache-Control": "no-cache"}).json()["progress"]["step"] == 2
    set_job(job_id, step=3)
    import time

    time.sleep(0.35)
    assert client.get(f"/jobs/{job_id}").json()["progress"]["step"] == 3  # older than the max age: read again


def test_a_finished_jobs_record_is_read_once(client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.records import get_record_cache

    max_age(monkeypatch, 0)
    job_id = submit(client)
    set_job(job_id, status="succeeded")
    client.get(f"/jobs/{job_id}")
    reads = get_record_cache().database_reads
    for _ in range(5):
        assert client.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
    assert get_record_cache().database_reads == reads


def test_a_cancel_through_this_api_shows_at_once(
    client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    max_age(monkeypatch, 60)
    job_id = submit(client)
    set_job(job_id, status="running")
    assert client.get(f"/jobs/{job_id}", headers={"Cache-Control": "no-cache"}).json()["cancel_requested"] is False
    assert client.post(f"/jobs/{job_id}/cancel").json()["cancel_requested"] is True
    assert client.get(f"/jobs/{job_id}").json()["cancel_requested"] is True


def test_pollers_at_once_share_one_database_read(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.records import get_record_cache

    max_age(monkeypatch, 0)
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as setup:
        job_id = submit(setup)
    cache = get_record_cache()

    async def poll_together() -> list[int]:
        before = cache.database_reads
        records = await asyncio.gather(*(cache.get(job_id) for _ in range(200)))
        assert all(r is not None and r.job_id == job_id for r in records)
        return [cache.database_reads - before]

    assert asyncio.run(poll_together()) == [1]


def test_a_poller_that_goes_away_does_not_cancel_the_read_others_wait_for(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request starts the shared read, then its client disconnects (the request's
    task is cancelled): the requests waiting for the same read still get the record."""
    import threading

    import app.records as records
    from app.records import get_record_cache

    max_age(monkeypatch, 0)
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as setup:
        job_id = submit(setup)
    cache = get_record_cache()
    release = threading.Event()
    real_read = records.read_records

    def slow_read(job_ids: Any) -> Any:
        release.wait(5)
        return real_read(job_ids)

    monkeypatch.setattr(records, "read_records", slow_read)

    async def scenario() -> tuple[bool, list[Any], Any]:
        first = asyncio.create_task(cache.get(job_id))
        await asyncio.sleep(0.05)  # the first request's read is under way in a thread
        others = [asyncio.create_task(cache.get(job_id)) for _ in range(3)]
        await asyncio.sleep(0.05)
        first.cancel()
        await asyncio.sleep(0.05)
        release.set()
        got = await asyncio.gather(*others)
        with pytest.raises(asyncio.CancelledError):
            await first
        return first.cancelled(), got, await cache.job_ids(None, None, 10)

    cancelled, got, listed = asyncio.run(scenario())
    assert cancelled
    assert [record is not None and record.job_id for record in got] == [job_id] * 3
    assert listed[0] == [job_id]


def test_an_aging_copy_is_read_again_while_it_is_still_served(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past half its max age, a running job's copy is still the answer, and a read starts in the
    background; the next poll after that read finishes gets the new record, no poll waited."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.records import get_record_cache

    max_age(monkeypatch, 0.4)
    with TestClient(create_app()) as setup:
        job_id = submit(setup)
    set_job(job_id, status="running", step=1)
    cache = get_record_cache()

    async def scenario() -> list[Any]:
        first = await cache.get(job_id)
        reads = cache.database_reads
        set_job(job_id, step=2)
        young = cache.peek(job_id)  # age < 0.2 s: served, nothing read
        await asyncio.sleep(0.25)
        aging = cache.peek(job_id)  # age > 0.2 s: served, and read again meanwhile
        for _ in range(100):
            await asyncio.sleep(0.01)
            if (now := cache.peek(job_id)) is not None and now is not aging:
                break
        assert first is not None and young is first and aging is first
        # one read in the background, however many polls saw the aging copy
        return [cache.database_reads - reads, orjson.loads(now.body)["progress"]["step"] if now else None]

    import orjson

    assert asyncio.run(scenario()) == [1, 2]


def test_a_cancel_is_not_undone_by_a_read_that_began_before_it(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import app.records as records
    from core.models import utcnow

    max_age(monkeypatch, 60)
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app()) as setup:
        job_id = submit(setup)
    set_job(job_id, status="running")
    cache = records.get_record_cache()
    read_done, release = threading.Event(), threading.Event()
    real_read = records.read_records

    def read_then_wait(job_ids: Any) -> Any:
        found = real_read(job_ids)  # read before the cancel below
        read_done.set()
        release.wait(5)
        return found

    monkeypatch.setattr(records, "read_records", read_then_wait)

    async def scenario() -> bool:
        old_read = asyncio.create_task(cache.get(job_id, fresh=True))
        while not read_done.is_set():
            await asyncio.sleep(0.01)
        set_job(job_id, cancel_requested_at=utcnow())  # what POST /jobs/{id}/cancel does, then forget()
        cache.forget(job_id)
        release.set()
        await old_read
        monkeypatch.setattr(records, "read_records", real_read)
        record = await cache.get(job_id)
        assert record is not None
        return bool(orjson.loads(record.body)["cancel_requested"])

    import orjson

    assert asyncio.run(scenario()) is True


def test_etag_and_if_none_match(client: httpx.Client, env: Env) -> None:
    job_id = submit(client)
    first = client.get(f"/jobs/{job_id}")
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "no-cache"
    again = client.get(f"/jobs/{job_id}", headers={"If-None-Match": etag})
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    set_job(job_id, step=7)
    changed = client.get(f"/jobs/{job_id}", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["progress"]["step"] == 7
    listed = client.get("/jobs")
    assert client.get("/jobs", headers={"If-None-Match": listed.headers["etag"]}).status_code == 304


def test_fields_select_what_a_poller_shows(client: httpx.Client, env: Env) -> None:
    job_id = submit(client)
    whole = client.get(f"/jobs/{job_id}").json()
    some = client.get(f"/jobs/{job_id}", params={"fields": "status,progress"})
    assert some.json() == {"status": whole["status"], "progress": whole["progress"]}
    assert len(some.content) < len(client.get(f"/jobs/{job_id}").content) / 5
    assert client.get("/jobs", params={"fields": "id,status"}).json()["items"] == [{"id": job_id, "status": "queued"}]
    bad = client.get(f"/jobs/{job_id}", params={"fields": "status,nope"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "fields"
    assert bad.json()["errors"][0]["message"].startswith("unknown field(s) nope; a record has id, status, ")


def test_the_list_matches_the_records(client: httpx.Client, env: Env) -> None:
    ids = [submit(client) for _ in range(3)]
    set_job(ids[1], status="failed")
    page = client.get("/jobs", params={"limit": 2}).json()
    assert [item["id"] for item in page["items"]] == [ids[2], ids[1]]
    assert page["next_cursor"] == ids[1]
    assert page["items"][1] == client.get(f"/jobs/{ids[1]}").json()
    assert [i["id"] for i in client.get("/jobs", params={"status": "failed"}).json()["items"]] == [ids[1]]


def test_log_and_event_pages_match_the_declared_schemas(client: httpx.Client, env: Env) -> None:
    """The pages are built from SQL rows with orjson; they must be what the pydantic models
    (StepLogPublic, EventPublic) would have produced, value for value and in the same shape."""
    from app.presenters import event_public, step_log_public
    from app.schemas import EventPage, StepLogPage
    from core.db import session_scope
    from core.models import JobEvent, StepLog, utcnow

    job_id = submit(client)
    rng = random.Random(7)
    rows = []
    with session_scope() as session:
        for step in range(1, 41):
            maybe = lambda v: v if rng.random() > 0.2 else None  # noqa: E731
            row = StepLog(
                job_id=job_id,
                step=step,
                epoch=maybe(step / 13),
                loss=maybe(rng.random() * 5),
                learning_rate=maybe(rng.random() * 1e-4),
                grad_norm=maybe(rng.random()),
                tokens_per_second=maybe(rng.random() * 1e4),
                num_tokens=maybe(step * 4096),
                eval_loss=maybe(rng.random()),
                vram_allocated=maybe(rng.randrange(2**36)),
                vram_reserved=maybe(rng.randrange(2**36)),
                vram_peak_allocated=maybe(rng.randrange(2**36)),
                device_used=maybe(rng.randrange(2**37)),
                device_total=maybe(85899345920),
                created_at=(utcnow() - timedelta(seconds=step)).replace(microsecond=0 if step % 5 == 0 else step),
            )  # whole seconds print shorter
            session.add(row)
            session.add(JobEvent(job_id=job_id, kind="checkpoint", message=f"saved checkpoint-{step} \u2713"))
            rows.append(row)
    with session_scope() as session:
        expected_logs = StepLogPage(
            items=[
                step_log_public(r)
                for r in session.exec(
                    select(StepLog).where(StepLog.job_id == job_id).order_by(col(StepLog.step)).limit(25)
                )
            ],
            next_after_step=25,
        )
        events = session.exec(select(JobEvent).where(JobEvent.job_id == job_id).order_by(col(JobEvent.id))).all()
        expected_events = EventPage(items=[event_public(e) for e in events], next_after_id=None)
    assert client.get(f"/jobs/{job_id}/logs", params={"limit": 25}).content == expected_logs.model_dump_json().encode()
    assert client.get(f"/jobs/{job_id}/events").content == expected_events.model_dump_json().encode()


def test_a_finished_jobs_pages_come_from_memory_and_a_running_jobs_do_not(client: httpx.Client, env: Env) -> None:
    from core.db import session_scope
    from core.models import StepLog

    job_id = submit(client)
    set_job(job_id, status="running")
    with session_scope() as session:
        session.add(StepLog(job_id=job_id, step=1))
    assert len(client.get(f"/jobs/{job_id}/logs").json()["items"]) == 1
    with session_scope() as session:
        session.add(StepLog(job_id=job_id, step=2))
    assert len(client.get(f"/jobs/{job_id}/logs").json()["items"]) == 2  # running: read every time
    set_job(job_id, status="succeeded")
    finished = client.get(f"/jobs/{job_id}/logs")
    assert len(finished.json()["items"]) == 2
    assert client.get(f"/jobs/{job_id}/logs", headers={"If-None-Match": finished.headers["etag"]}).status_code == 304
    assert client.get("/jobs/999/logs").status_code == 404
