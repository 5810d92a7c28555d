"""DELETE /jobs/{id} and DELETE /jobs/{id}/checkpoints/{name}: what a disk of 30 GB checkpoints
needs. A deleted job's logs, events, checkpoints and folder are gone, its id is never reused,
and a running or queued job cannot be deleted."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.auth import ANONYMOUS
from tests.conftest import Env, job_spec, run_to_end


@pytest.mark.slow
def test_deleting_a_finished_job_removes_its_record_logs_checkpoints_and_folder(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    record = run_to_end(client, job_spec(tiny_model, chat_dataset))
    job_id = record["id"]
    assert record["status"] == "succeeded"
    job_dir = env.data_dir / "jobs" / str(job_id)
    on_disk = sum(p.stat().st_size for p in job_dir.rglob("*") if p.is_file())

    deleted = client.delete(f"/jobs/{job_id}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["freed_bytes"] == on_disk > 0
    assert not job_dir.exists()
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/logs", f"/jobs/{job_id}/events", f"/jobs/{job_id}/checkpoints"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["detail"] == f"job {job_id} was deleted" or "not found" in response.json()["detail"]
    assert job_id not in [job["id"] for job in client.get("/jobs").json()["items"]]
    assert client.delete(f"/jobs/{job_id}").status_code == 404

    # SQLite gives a new row the largest rowid + 1: the tombstone keeps the id from coming back.
    again = client.post("/jobs", json=job_spec(tiny_model, chat_dataset)).json()["id"]
    assert again > job_id


def test_a_queued_job_cannot_be_deleted(client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path) -> None:
    job_id = client.post("/jobs", json=job_spec(tiny_model, chat_dataset)).json()["id"]
    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"job {job_id} is queued; cancel or pause it first (POST /jobs/{job_id}/cancel), "
        "then delete it once it has stopped"
    )
    assert client.get(f"/jobs/{job_id}").status_code == 200


@pytest.mark.slow
def test_deleting_a_checkpoint_frees_its_bytes_and_takes_it_off_the_list(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    record = run_to_end(client, job_spec(tiny_model, chat_dataset, max_steps=6, save_steps=3))
    job_id = record["id"]
    listed = {c["name"]: c for c in client.get(f"/jobs/{job_id}/checkpoints").json()["items"]}
    assert sorted(listed) == ["checkpoint-3", "checkpoint-6", "final"]
    folder = env.data_dir / "jobs" / str(job_id) / "checkpoints" / "checkpoint-3"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    a_file = listed["checkpoint-3"]["files"][0]["path"]
    assert client.get(f"/jobs/{job_id}/checkpoints/checkpoint-3/files/{a_file}").status_code == 200

    for name in ("checkpoint-3", "checkpoint-6", "final"):
        response = client.delete(f"/jobs/{job_id}/checkpoints/{name}")
        assert response.status_code == 200, response.text
    assert response.json()["files"] > 0
    assert client.get(f"/jobs/{job_id}/checkpoints").json()["items"] == []
    assert not folder.exists()
    assert client.get(f"/jobs/{job_id}/checkpoints/checkpoint-3/files/{a_file}").status_code == 404
    assert client.delete(f"/jobs/{job_id}/checkpoints/final").status_code == 404
    messages = [e["message"] for e in client.get(f"/jobs/{job_id}/events").json()["items"]]
    assert any(m.startswith("checkpoint-3 deleted by request (") and f"{size} bytes freed" in m for m in messages)


@pytest.mark.slow
def test_optimizer_state_is_dropped_from_intermediate_checkpoints_once_the_job_succeeds(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    spec = {**job_spec(tiny_model, chat_dataset, max_steps=6, save_steps=3), "drop_optimizer_state_on_success": True}
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    assert record["spec"]["drop_optimizer_state_on_success"] is True
    checkpoints_dir = env.data_dir / "jobs" / str(record["id"]) / "checkpoints"
    listed = {c["name"]: c for c in client.get(f"/jobs/{record['id']}/checkpoints").json()["items"]}
    assert sorted(listed) == ["checkpoint-3", "checkpoint-6", "final"]
    for name in ("checkpoint-3", "checkpoint-6"):
        assert not (checkpoints_dir / name / "optimizer.pt").exists()
        paths = [f["path"] for f in listed[name]["files"]]
        assert "optimizer.pt" not in paths and "model.safetensors" in paths
        on_disk = sum(p.stat().st_size for p in (checkpoints_dir / name).rglob("*") if p.is_file())
        assert listed[name]["size"] == on_disk
        weights = client.get(f"/jobs/{record['id']}/checkpoints/{name}/files/model.safetensors")
        assert weights.status_code == 200
    events = client.get(f"/jobs/{record['id']}/events").json()["items"]
    dropped = [e["message"] for e in events if e["kind"] == "optimizer_state_dropped"]
    assert len(dropped) == 1 and dropped[0].startswith("dropped the optimizer state of checkpoint-3, checkpoint-6: ")


@pytest.mark.slow
def test_optimizer_state_is_kept_by_default(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    record = run_to_end(client, job_spec(tiny_model, chat_dataset, max_steps=6, save_steps=3))
    assert "drop_optimizer_state_on_success" not in record["spec"]
    assert (env.data_dir / "jobs" / str(record["id"]) / "checkpoints" / "checkpoint-3" / "optimizer.pt").exists()


@pytest.mark.slow
def test_storage_reports_the_disk_and_the_files_no_record_names(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    record = run_to_end(client, job_spec(tiny_model, chat_dataset, max_steps=6, save_steps=3))
    jobs_dir = env.data_dir / "jobs"
    # What crashes and restored backups leave: a job folder the database does not know, a
    # checkpoint folder without a record, an upload without a row.
    (jobs_dir / "999" / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (jobs_dir / "999" / "checkpoints" / "checkpoint-5" / "model.safetensors").write_bytes(b"\0" * 1000)
    stray = jobs_dir / str(record["id"]) / "checkpoints" / "checkpoint-9"
    stray.mkdir()
    (stray / "config.json").write_text("{}")
    files_dir = env.data_dir / "files"
    files_dir.mkdir(exist_ok=True)
    (files_dir / "77.jsonl").write_text('{"text": "x"}\n')

    response = client.get("/storage")
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["free_bytes"] > 0 and report["total_bytes"] >= report["free_bytes"]
    assert report["jobs_bytes"] > 1000 and report["files_bytes"] == 14
    assert report["orphans"] == [
        {
            "path": f"jobs/{record['id']}/checkpoints/checkpoint-9",
            "bytes": 2,
            "reason": "a checkpoint folder with no record (deleted or rotated away while its trainer ran?)",
        },
        {"path": "jobs/999", "bytes": 1000, "reason": "no job of this id in the database"},
        {"path": "files/77.jsonl", "bytes": 14, "reason": "an uploaded file with no record"},
    ]
    assert client.delete(f"/jobs/{record['id']}").status_code == 200
    assert [o["path"] for o in client.get("/storage").json()["orphans"]] == ["jobs/999", "files/77.jsonl"]


@pytest.mark.slow
def test_another_api_process_forgets_a_deleted_job_within_the_finished_records_max_age(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, monkeypatch
) -> None:
    """This process's copy of a finished record is read again after FINISHED_RECORD_MAX_AGE_S, so a
    deletion made through another API process (here: straight in the database) shows."""
    import time

    from app import lifecycle
    from core.db import session_scope
    from tests.conftest import clear_caches

    monkeypatch.setenv("FINISHED_RECORD_MAX_AGE_S", "0.2")
    clear_caches()
    record = run_to_end(client, job_spec(tiny_model, chat_dataset))
    job_id = record["id"]
    assert client.get(f"/jobs/{job_id}").status_code == 200  # now in this process's memory
    assert client.get(f"/jobs/{job_id}/events").status_code == 200
    with session_scope() as session:
        lifecycle.delete_job(session=session, job_id=job_id, identity=ANONYMOUS)
    time.sleep(0.3)
    assert client.get(f"/jobs/{job_id}").status_code == 404
    assert client.get(f"/jobs/{job_id}/events").status_code == 404


def paused_job(client: httpx.Client, tiny_model: Path, chat_dataset: Path) -> int:
    job_id = int(client.post("/jobs", json=job_spec(tiny_model, chat_dataset)).json()["id"])
    assert client.post(f"/jobs/{job_id}/pause").json()["status"] == "paused"
    return job_id


def test_a_resume_that_lands_while_a_delete_runs_makes_the_delete_fail(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race as it happens: DELETE has read the job as paused, a resume commits, then DELETE
    writes. One of the two must lose; never a job both queued and deleted."""
    from app import lifecycle
    from core.db import session_scope

    job_id = paused_job(client, tiny_model, chat_dataset)

    def resume_meanwhile(job_dir: Path) -> bool:
        with session_scope() as session:
            lifecycle.resume_job(session=session, job_id=job_id, identity=ANONYMOUS)
        return False  # no trainer runs

    monkeypatch.setattr(lifecycle, "trainer_running", resume_meanwhile)
    deleted = client.delete(f"/jobs/{job_id}")
    assert deleted.status_code == 409, deleted.text
    assert (
        deleted.json()["detail"] == f"job {job_id} changed while it was being deleted (resumed?); read it and try again"
    )
    record = client.get(f"/jobs/{job_id}")
    assert record.status_code == 200 and record.json()["status"] == "queued"


def test_a_delete_that_lands_while_a_resume_runs_makes_the_resume_fail(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import lifecycle
    from core.db import session_scope
    from core.models import Job

    job_id = paused_job(client, tiny_model, chat_dataset)
    real_move = lifecycle.move_job

    def delete_first(*args: object, **kwargs: object) -> bool:
        monkeypatch.setattr(lifecycle, "move_job", real_move)  # the delete moves the job with the real one
        with session_scope() as session:
            lifecycle.delete_job(session=session, job_id=job_id, identity=ANONYMOUS)
        return real_move(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lifecycle, "move_job", delete_first)
    resumed = client.post(f"/jobs/{job_id}/resume")
    assert resumed.status_code == 409, resumed.text
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.deleted_at is not None and job.status == "paused"
    assert env.redis().llen(f"rq:queue:{env.queue_name}") == 1  # only the submit's entry: nothing enqueued again
