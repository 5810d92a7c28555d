"""Rows written by another version of the service (a rolling upgrade, or a rollback): a status,
phase, error code, event kind or checkpoint status this version does not know. Every list and
page still answers, showing such a value as `unknown` with the stored word beside it (`*_raw`),
in the shape the OpenAPI document declares; nothing is changed on such a job."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import Session

from app.openai_compat import FineTuningJob, FineTuningJobCheckpoint, FineTuningJobEvent
from app.routes import watch
from app.schemas import CheckpointPublic, EventPublic, JobPublic
from core.db import get_engine, session_scope
from core.models import Checkpoint, CheckpointStatus, Job, JobEvent, JobStatus, StepLog, utcnow
from tests.conftest import Env
from tests.test_watch import parse_sse

SPEC = {"model": "org/tiny-llama", "dataset": {"source": "org/tiny-data", "split": "train"}}


def add_job(status: JobStatus, **values: Any) -> int:
    with session_scope() as session:
        job = Job(spec=SPEC, status=status, step=4, total_steps=8, **values)
        session.add(job)
        session.flush()
        assert job.id is not None
        session.add(StepLog(job_id=job.id, step=4, loss=1.5))
        session.add(JobEvent(job_id=job.id, kind="started", message="started on worker w"))
        return job.id


def raw_sql(env: Env, statement: str, *parameters: object) -> None:
    """What another version of the service writes: plain SQL on the same SQLite file."""
    with sqlite3.connect(env.data_dir / "jobs.db") as connection:
        assert connection.execute(statement, parameters).rowcount == 1


@pytest.fixture
def written_by_a_newer_version(env: Env, client: httpx.Client) -> dict[str, int]:
    ids = {
        "status": add_job(JobStatus.running),
        "phase": add_job(JobStatus.running, phase="training", started_at=utcnow()),
        "error": add_job(JobStatus.failed, error_code="cuda_oom", error_message="out of memory", finished_at=utcnow()),
        "rows": add_job(JobStatus.succeeded, finished_at=utcnow()),
        "known": add_job(JobStatus.queued),
    }
    with session_scope() as session:
        session.add(Checkpoint(job_id=ids["rows"], name="final", step=8, status=CheckpointStatus.ready))
        session.add(JobEvent(job_id=ids["rows"], kind="succeeded", message="training finished"))
    raw_sql(env, "UPDATE job SET status = 'frozen' WHERE id = ?", ids["status"])
    raw_sql(env, "UPDATE job SET phase = 'compiling_kernels' WHERE id = ?", ids["phase"])
    raw_sql(env, "UPDATE job SET error_code = 'gpu_on_fire' WHERE id = ?", ids["error"])
    raw_sql(env, "UPDATE checkpoint SET status = 'quarantined' WHERE job_id = ?", ids["rows"])
    raw_sql(env, "UPDATE job_event SET kind = 'thawed' WHERE job_id = ? AND kind = 'started'", ids["rows"])
    return ids


def ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def test_native_lists_and_records_show_unknown_values_with_the_raw_word(
    client: httpx.Client, written_by_a_newer_version: dict[str, int]
) -> None:
    ids = written_by_a_newer_version
    listed = {item["id"]: item for item in ok(client.get("/jobs"))["items"]}
    assert set(listed) == set(ids.values())
    for item in listed.values():
        JobPublic.model_validate(item)  # the shape the OpenAPI document declares
        assert item == ok(client.get(f"/jobs/{item['id']}"))

    assert (listed[ids["status"]]["status"], listed[ids["status"]]["status_raw"]) == ("unknown", "frozen")
    assert listed[ids["phase"]]["status"] == "running" and "status_raw" not in listed[ids["phase"]]
    assert (listed[ids["phase"]]["phase"], listed[ids["phase"]]["phase_raw"]) == ("unknown", "compiling_kernels")
    assert listed[ids["error"]]["error"] == {"code": "unknown", "code_raw": "gpu_on_fire", "message": "out of memory"}
    assert not [key for key in listed[ids["known"]] if key.endswith("_raw")]  # absent where the word is known

    assert ok(client.get(f"/jobs/{ids['status']}", params={"fields": "status,status_raw"})) == {
        "status": "unknown",
        "status_raw": "frozen",
    }
    assert ok(client.get(f"/jobs/{ids['known']}", params={"fields": "status_raw"})) == {"status_raw": None}

    # ?status=unknown lists the rows whose status this version does not know, and only those.
    assert [item["id"] for item in ok(client.get("/jobs", params={"status": "unknown"}))["items"]] == [ids["status"]]
    assert [item["id"] for item in ok(client.get("/jobs", params={"status": "running"}))["items"]] == [ids["phase"]]

    events = ok(client.get(f"/jobs/{ids['rows']}/events"))["items"]
    for event in events:
        EventPublic.model_validate(event)
    assert [(e["kind"], e.get("kind_raw")) for e in events] == [("unknown", "thawed"), ("succeeded", None)]

    checkpoints = ok(client.get(f"/jobs/{ids['rows']}/checkpoints"))["items"]
    assert [(c["status"], c["status_raw"]) for c in checkpoints] == [("unknown", "quarantined")]
    CheckpointPublic.model_validate(checkpoints[0])
    assert ok(client.get(f"/jobs/{ids['rows']}/checkpoints/final")) == checkpoints[0]
    assert ok(client.get(f"/jobs/{ids['rows']}/logs"))["items"][0]["step"] == 4


def test_storage_reads_the_folders_of_such_jobs(
    client: httpx.Client, env: Env, written_by_a_newer_version: dict[str, int]
) -> None:
    left = env.data_dir / "jobs" / str(written_by_a_newer_version["status"]) / "checkpoints" / ".partial-checkpoint-2"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"x" * 10)
    assert ok(client.get("/storage"))["jobs_bytes"] == 10


def test_a_job_whose_status_is_unknown_is_left_alone_with_a_409_naming_it(
    client: httpx.Client, written_by_a_newer_version: dict[str, int]
) -> None:
    job_id = written_by_a_newer_version["status"]
    for method, path in [
        ("POST", "cancel"),
        ("POST", "pause"),
        ("POST", "resume"),
        ("DELETE", ""),
        ("POST", "/v1/fine_tuning/jobs/{}/cancel"),
    ]:
        url = path.format(job_id) if path.startswith("/v1") else f"/jobs/{job_id}/{path}".rstrip("/")
        response = client.request(method, url)
        assert response.status_code == 409, (url, response.text)
        assert "'frozen'" in response.text and "another version" in response.text, response.text
    with Session(get_engine()) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status == "frozen" and job.cancel_requested_at is None


def test_metrics_count_unknown_statuses(client: httpx.Client, written_by_a_newer_version: dict[str, int]) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    lines = response.text.splitlines()
    assert 'finetune_jobs{status="unknown"} 1.0' in lines
    assert 'finetune_jobs{status="running"} 1.0' in lines
    assert 'finetune_jobs{status="failed"} 1.0' in lines


def test_the_openai_view_lists_and_reads_them_too(
    client: httpx.Client, written_by_a_newer_version: dict[str, int]
) -> None:
    ids = written_by_a_newer_version
    listed = {item["id"]: item for item in ok(client.get("/v1/fine_tuning/jobs"))["data"]}
    assert len(listed) == len(ids)
    for item in listed.values():
        FineTuningJob.model_validate(item)
        assert item == ok(client.get(f"/v1/fine_tuning/jobs/{item['id']}"))
    assert listed[f"ftjob-{ids['status']}"]["status"] == "unknown"
    assert listed[f"ftjob-{ids['error']}"]["error"]["code"] == "unknown"

    events = ok(client.get(f"/v1/fine_tuning/jobs/ftjob-{ids['rows']}/events"))["data"]
    for event in events:
        FineTuningJobEvent.model_validate(event)
    assert {event["data"].get("kind") for event in events if event["type"] == "message"} == {"unknown", "succeeded"}
    checkpoints = ok(client.get(f"/v1/fine_tuning/jobs/ftjob-{ids['rows']}/checkpoints"))["data"]
    assert [FineTuningJobCheckpoint.model_validate(c).status for c in checkpoints] == ["unknown"]


def test_the_stream_and_the_watch_page_show_them(
    client: httpx.Client, env: Env, written_by_a_newer_version: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = written_by_a_newer_version
    for job_id in ids.values():
        page = client.get(f"/jobs/{job_id}/watch")
        assert page.status_code == 200 and "<html" in page.text.lower()

    finished = parse_sse(client.get(f"/jobs/{ids['rows']}/stream").text)
    assert [data.get("kind_raw") for name, data in finished if name == "event"] == ["thawed", None]
    failed = parse_sse(client.get(f"/jobs/{ids['error']}/stream").text)
    assert [data["error"]["code_raw"] for name, data in failed if name == "job"] == ["gpu_on_fire"]

    # A job of unknown status never reads as finished: its stream follows it until another
    # version ends it (here, after the stream's first look).
    monkeypatch.setattr(watch, "POLL_INTERVAL_S", 0.02)
    polled = threading.Event()
    read_snapshot = watch._read_snapshot

    def spy(*args: Any) -> Any:
        snapshot = read_snapshot(*args)
        polled.set()
        return snapshot

    monkeypatch.setattr(watch, "_read_snapshot", spy)

    def end_it() -> None:
        polled.wait(timeout=30)
        with Session(get_engine()) as session:
            statement = update(Job).where(Job.id == ids["status"]).values(status=JobStatus.succeeded)  # type: ignore[arg-type]
            session.execute(statement)
            session.commit()

    writer = threading.Thread(target=end_it)
    writer.start()
    followed = parse_sse(client.get(f"/jobs/{ids['status']}/stream").text)
    writer.join()
    statuses = [(data["status"], data.get("status_raw")) for name, data in followed if name == "job"]
    assert statuses[0] == ("unknown", "frozen") and statuses[-1] == ("succeeded", None)


def test_a_read_of_the_unknown_rows_never_breaks_the_schema_fuzzed_routes(tmp_path: Path) -> None:
    """The enums of the OpenAPI document name `unknown` (so a client can branch on it)."""
    from app.main import create_app

    schemas = create_app().openapi()["components"]["schemas"]
    for name in ("JobStatus", "Phase", "ErrorCode", "EventKind", "CheckpointStatus"):
        assert "unknown" in schemas[name]["enum"], name
    for model, field in [
        ("JobPublic", "status_raw"),
        ("JobPublic", "phase_raw"),
        ("JobError", "code_raw"),
        ("EventPublic", "kind_raw"),
        ("CheckpointPublic", "status_raw"),
    ]:
        assert field in schemas[model]["properties"], (model, field)
