"""Checkpoints held against the sha256 their files were saved with: a file changed since it was
hashed is never served with its recorded hash, and the API's verifier (run here as its loop runs
it) hashes it again and marks the checkpoint corrupt, naming the file; a requested verification
finds bytes that rotted in place; the schedule hashes each checkpoint again when it is due, and
nothing more often. Real SQLite through the migrations, files on disk."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from app.routes.checkpoints import verify_due_checkpoints as verify_due  # what the API's loop runs
from core import checkpoint_files
from core.checkpoint_files import hash_checkpoint
from core.checkpoint_store import record_checkpoint
from core.config import get_settings
from core.db import session_scope
from core.models import Checkpoint, Job, JobStatus, utcnow
from tests.conftest import Env, clear_caches

WEIGHTS = os.urandom(256 * 1024)
CONFIG = b'{"model_type": "llama"}'


@pytest.fixture
def saved(env: Env) -> tuple[int, Path]:
    """A succeeded job's `final` checkpoint, recorded and hashed as the worker does it."""
    with session_scope() as session:
        job = Job(
            spec={"model": "org/m", "dataset": {"source": "org/d"}}, status=JobStatus.succeeded, finished_at=utcnow()
        )
        session.add(job)
        session.flush()
        assert job.id is not None
        job_id = job.id
    folder = get_settings().checkpoints_dir(job_id) / "final"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(WEIGHTS)
    (folder / "config.json").write_bytes(CONFIG)
    with session_scope() as session:
        checkpoint_id = record_checkpoint(session=session, job_id=job_id, folder=folder, step=6).id
    assert checkpoint_id is not None
    hash_checkpoint(job_id, checkpoint_id)
    return job_id, folder


@pytest.fixture
def hashed_files(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the files the verifier hashes, as it hashes them."""
    names: list[str] = []
    original = checkpoint_files.sha256_file

    def counting(path: Path) -> str:
        names.append(path.name)
        return original(path)

    monkeypatch.setattr(checkpoint_files, "sha256_file", counting)
    yield names


def flip_bytes(path: Path, *, keep_mtime: bool = False) -> None:
    """16 bytes flipped in the middle of the file, as in the report."""
    before = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(len(WEIGHTS) // 2)
        chunk = handle.read(16)
        handle.seek(len(WEIGHTS) // 2)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    if keep_mtime:  # rot on the disk: nothing in the stat shows it
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


def checkpoint(client: httpx.Client, job_id: int) -> dict[str, Any]:
    response = client.get(f"/jobs/{job_id}/checkpoints/final")
    assert response.status_code == 200, response.text
    return dict(response.json())


def events(client: httpx.Client, job_id: int, kind: str) -> list[str]:
    return [e["message"] for e in client.get(f"/jobs/{job_id}/events").json()["items"] if e["kind"] == kind]


def test_a_file_changed_since_it_was_hashed_is_not_served_with_its_hash_and_is_found_corrupt(
    client: httpx.Client, saved: tuple[int, Path], hashed_files: list[str]
) -> None:
    job_id, folder = saved
    url = f"/jobs/{job_id}/checkpoints/final/files/model.safetensors"
    intact = client.get(url)
    assert (
        intact.headers["x-checksum-sha256"]
        == hashlib.sha256(WEIGHTS).hexdigest()
        == hashlib.sha256(intact.content).hexdigest()
    )

    flip_bytes(folder / "model.safetensors")
    served = client.get(url)
    assert served.status_code == 200
    assert "x-checksum-sha256" not in served.headers  # never a hash the bytes do not have
    assert client.get(url, headers={"range": "bytes=0-9"}).headers.get("x-checksum-sha256") is None
    assert checkpoint(client, job_id)["status"] == "ready"  # nothing is hashed on the request's path
    assert hashed_files == []

    assert verify_due() == 1  # the API's verifier loop
    assert hashed_files == ["model.safetensors"]  # the changed file only: config.json waits for the schedule
    record = checkpoint(client, job_id)
    assert record["status"] == "corrupt"
    assert {f["path"]: f["corrupt"] for f in record["files"]} == {"config.json": False, "model.safetensors": True}
    [message] = events(client, job_id, "checkpoint_corrupt")
    assert message.startswith("final is corrupt: model.safetensors does not match the sha256 it was saved with (")

    refused = client.get(url)
    assert refused.status_code == 409
    assert refused.json() == {
        "error": "Conflict",
        "detail": f"'model.safetensors' of checkpoint 'final' of job {job_id} no longer match the sha256 they were "
        f"saved with (a verification found it), and are not served: restore them and POST "
        f"/jobs/{job_id}/checkpoints/final/verify, or delete the checkpoint",
    }
    assert client.get(f"/jobs/{job_id}/checkpoints/final/archive").status_code == 409
    assert "finetune_checkpoints_corrupt 1.0" in client.get("/metrics").text.splitlines()
    config = client.get(f"/jobs/{job_id}/checkpoints/final/files/config.json")  # intact: served, with its hash
    assert config.content == CONFIG and config.headers["x-checksum-sha256"] == hashlib.sha256(CONFIG).hexdigest()
    assert verify_due() == 0  # nothing more to do until the schedule or a request


def test_a_requested_verification_finds_rot_the_stat_cannot_show_and_a_restored_file(
    client: httpx.Client, saved: tuple[int, Path], hashed_files: list[str]
) -> None:
    job_id, folder = saved
    flip_bytes(folder / "model.safetensors", keep_mtime=True)

    asked = client.post(f"/jobs/{job_id}/checkpoints/final/verify")
    assert asked.status_code == 202
    assert asked.json()["verify_requested_at"] is not None and asked.json()["status"] == "ready"
    assert hashed_files == []  # off the request's path
    assert verify_due() == 1
    assert sorted(hashed_files) == ["config.json", "model.safetensors"]  # a request hashes every file
    record = checkpoint(client, job_id)
    assert (record["status"], record["verify_requested_at"]) == ("corrupt", None)
    assert client.get(f"/jobs/{job_id}/checkpoints/final/files/model.safetensors").status_code == 409

    (folder / "model.safetensors").write_bytes(WEIGHTS)  # restored from a backup
    assert client.post(f"/jobs/{job_id}/checkpoints/final/verify").status_code == 202
    assert verify_due() == 1
    record = checkpoint(client, job_id)
    assert record["status"] == "ready" and not any(f["corrupt"] for f in record["files"])
    assert events(client, job_id, "checkpoint_verified") == [
        "final is intact again: its 2 files match the sha256 they were saved with"
    ]
    served = client.get(f"/jobs/{job_id}/checkpoints/final/files/model.safetensors")
    assert served.content == WEIGHTS and served.headers["x-checksum-sha256"] == hashlib.sha256(WEIGHTS).hexdigest()


def test_the_schedule_hashes_each_checkpoint_again_when_due_and_not_before(
    client: httpx.Client, env: Env, saved: tuple[int, Path], hashed_files: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id, folder = saved
    assert verify_due() == 0  # hashed a moment ago: not due for CHECKPOINT_VERIFY_INTERVAL_S (7 days)
    flip_bytes(folder / "model.safetensors", keep_mtime=True)
    with session_scope() as session:  # a week and a day later
        session.execute(
            update(Checkpoint)
            .where(Checkpoint.job_id == job_id)  # type: ignore[arg-type]
            .values(verified_at=utcnow() - timedelta(days=8))
        )
    monkeypatch.setenv("CHECKPOINT_VERIFY_INTERVAL_S", "0")  # 0: no schedule, only requests and changes
    clear_caches()
    assert verify_due() == 0
    monkeypatch.delenv("CHECKPOINT_VERIFY_INTERVAL_S")
    clear_caches()
    assert verify_due() == 1
    assert sorted(hashed_files) == ["config.json", "model.safetensors"]
    assert checkpoint(client, job_id)["status"] == "corrupt"
    assert [m.split(":")[0] for m in events(client, job_id, "checkpoint_corrupt")] == ["final is corrupt"]


def test_a_checkpoint_still_being_hashed_cannot_be_verified_yet(client: httpx.Client, env: Env) -> None:
    with session_scope() as session:
        job = Job(spec={"model": "org/m", "dataset": {"source": "org/d"}}, status=JobStatus.running)
        session.add(job)
        session.flush()
        assert job.id is not None
        job_id = job.id
        session.add(Checkpoint(job_id=job_id, name="checkpoint-2", step=2))
    response = client.post(f"/jobs/{job_id}/checkpoints/checkpoint-2/verify")
    assert response.status_code == 409
    assert "still being hashed" in response.json()["detail"]
    assert client.post(f"/jobs/{job_id}/checkpoints/checkpoint-9/verify").status_code == 404


@pytest.mark.slow  # it starts the API (uvicorn): the quick loop runs neither services nor trainers
def test_finetune_verify_and_download_say_so_against_the_running_api(
    env: Env, saved: tuple[int, Path], tmp_path: Path
) -> None:
    """`finetune verify` waits for the API's own verifier loop (uvicorn) and exits 1 on a corrupt
    checkpoint, which `finetune download` then refuses by name."""
    from typer.testing import CliRunner

    from client.cli import app
    from tests.conftest import Service

    job_id, folder = saved
    settings = {**env.vars, "CHECKPOINT_VERIFY_POLL_S": "0.1"}
    # No worker: the API's verifier is what is under test.
    service = Service(tmp_path / "service", data_dir=env.data_dir, redis_url=env.redis_url, settings=settings)
    service.start(worker=False)
    try:

        def finetune(*args: str) -> tuple[int, str]:
            result = CliRunner().invoke(app, [*args, "--url", service.url], env={"COLUMNS": "200"})
            return result.exit_code, result.output

        assert finetune("verify", str(job_id), "final") == (0, "final: 2 files match their sha256 (ready)\n")
        flip_bytes(folder / "model.safetensors", keep_mtime=True)
        code, output = finetune("verify", str(job_id), "final")
        assert (code, output) == (1, "final is corrupt: model.safetensors no longer match their sha256\n")
        code, output = finetune("download", str(job_id), "final", "--dest", str(tmp_path / "got"))
        assert code == 1 and "final is corrupt: model.safetensors no longer match" in output.replace("\n", " ")
        assert not (tmp_path / "got").exists()
    finally:
        service.stop()
