"""The shared store (STORAGE_URL, core/shared_store.py) against a real S3 API server process
(tests/s3server.py) and a shared folder: checkpoints committed by a manifest written last,
resumed and served from the store by a host that never had them, uploads published there, and a
store that stops answering at a save."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from core.shared_store import SharedStore, StorageUnavailable
from core.stop_requests import read_request
from tests.conftest import Env, clear_caches, job_spec, wait_until
from tests.s3server import S3Server, start_s3_server

FILES = {"config.json": b'{"a": 1}', "model.safetensors": bytes(range(256)) * 4000, "sub/tokenizer.json": b"{}"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


def s3_settings(server: S3Server, bucket: str, **extra: str) -> dict[str, str]:
    return {
        **server.env,
        "STORAGE_URL": f"s3://{bucket}/cluster",
        "STORAGE_RETRIES": "2",
        "STORAGE_RETRY_WAIT_S": "0.1",
        **extra,
    }


@pytest.fixture
def store_env(env: Env, s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    """The test's settings with STORAGE_URL naming a bucket of its own on the S3 server."""
    bucket = s3.create_bucket(f"b-{tmp_path.name.lower().replace('_', '-')[-40:]}")
    for key, value in s3_settings(s3, bucket).items():
        monkeypatch.setenv(key, value)
        env.vars[key] = value
    clear_caches()
    return env


@pytest.fixture(params=["folder", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SharedStore:
    if request.param == "folder":
        return SharedStore(str(tmp_path / "shared"), retries=2, retry_wait_s=0.01)
    server: S3Server = request.getfixturevalue("s3")
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    bucket = server.create_bucket(f"u-{tmp_path.name.lower().replace('_', '-')[-40:]}")
    return SharedStore(f"s3://{bucket}/prefix", retries=2, retry_wait_s=0.01)


def checkpoint_folder(root: Path, name: str = "checkpoint-3") -> Path:
    folder = root / name
    for path, data in FILES.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return folder


def test_a_published_checkpoint_is_committed_by_its_manifest_and_downloads_checked(
    store: SharedStore, tmp_path: Path
) -> None:
    folder = checkpoint_folder(tmp_path / "host-a")
    manifest = store.publish_checkpoint(7, folder, 3)

    assert store.committed(7) == ["checkpoint-3"]
    assert store.manifest(7, "checkpoint-3") == manifest
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest.files} == {
        path: (len(data), hashlib.sha256(data).hexdigest()) for path, data in FILES.items()
    }
    fetched = store.fetch_checkpoint(7, "checkpoint-3", tmp_path / "host-b")
    assert fetched == tmp_path / "host-b" / "checkpoint-3"
    assert {p: (fetched / p).read_bytes() for p in FILES} == FILES
    assert list((tmp_path / "host-b").iterdir()) == [fetched]  # no download folder left behind
    assert store.fetch_checkpoint(7, "checkpoint-9", tmp_path / "host-b") is None


def test_a_publish_cut_short_commits_nothing_and_uncommits_the_copy_it_replaces(
    store: SharedStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = checkpoint_folder(tmp_path / "host-a")
    store.publish_checkpoint(7, folder, 3)
    copy_up = store._copy_up
    copied: list[str] = []

    def fails_on_the_second_file(source: Path, key: str) -> tuple[int, str]:
        copied.append(key)
        if len(copied) % 3 == 2:
            raise ConnectionError("the store went away")
        return copy_up(source, key)

    monkeypatch.setattr(store, "_copy_up", fails_on_the_second_file)
    with pytest.raises(StorageUnavailable) as raised:
        store.publish_checkpoint(7, folder, 3)  # the same step saved again (a resumed attempt)
    assert raised.value.attempts == 2
    assert "could not publish checkpoint-3 of job 7: 2 attempts over" in str(raised.value)
    assert "ConnectionError: the store went away" in str(raised.value)
    # The old manifest went before a byte of the new copy: no half-replaced checkpoint is committed.
    assert store.committed(7) == []
    assert store.fetch_checkpoint(7, "checkpoint-3", tmp_path / "host-b") is None


def test_keep_newest_removes_the_oldest_intermediate_checkpoints(store: SharedStore, tmp_path: Path) -> None:
    for step in (3, 6, 9):
        store.publish_checkpoint(7, checkpoint_folder(tmp_path, f"checkpoint-{step}"), step)
    store.publish_checkpoint(7, checkpoint_folder(tmp_path, "final"), 9)
    assert store.keep_newest(7, 2) == ["checkpoint-3"]
    assert store.committed(7) == ["checkpoint-6", "checkpoint-9", "final"]
    assert not store.fs.exists(store.checkpoint_key(7, "checkpoint-3"))
    store.remove_job(7)
    assert store.committed(7) == []


def test_an_unreachable_store_is_retried_then_named_with_the_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    from scripts.service_harness import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store = SharedStore("s3://nowhere/x", retries=2, retry_wait_s=0.01)
    with pytest.raises(StorageUnavailable) as raised:
        store.committed(1)
    assert raised.value.attempts == 2
    assert str(raised.value).startswith("the shared store s3://nowhere/x could not list the checkpoints of job 1: 2 ")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_a_job_resumes_from_the_store_on_a_host_without_its_files_and_the_api_serves_it_from_there(
    store_env: Env, client: httpx.Client, tiny_model: Path, chat_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.shared_store import get_store
    from worker.tasks import run_job

    env, store = store_env, get_store()
    assert store is not None
    uploaded = client.post("/files", files={"file": ("chat.jsonl", chat_dataset.read_bytes(), "text/plain")})
    assert uploaded.status_code == 201, uploaded.text
    file_id = uploaded.json()["id"]
    assert store.fs.exists(store.upload_key(f"{file_id}.jsonl"))

    spec = job_spec(tiny_model, chat_dataset, max_steps=9, save_steps=3, logging_steps=1)
    spec["dataset"] = {"file_id": file_id}
    monkeypatch.setenv("FINETUNE_FAILPOINTS", "checkpoint_published@3=pause")
    job_id = client.post("/jobs", json=spec).json()["id"]
    job_dir = env.data_dir / "jobs" / str(job_id)
    first = threading.Thread(target=run_job, args=(job_id,))
    first.start()
    marker = job_dir / "failpoint-checkpoint_published"
    wait_until(marker.exists, 240, "the first checkpoint to be published on disk")
    assert store.committed(job_id) == []  # on disk, not yet in the store
    assert client.post(f"/jobs/{job_id}/pause").status_code == 200
    wait_until(lambda: read_request(job_dir) == "paused", 30, "the worker to carry the pause to the trainer")
    monkeypatch.delenv("FINETUNE_FAILPOINTS")
    marker.unlink()
    first.join(240)
    record = client.get(f"/jobs/{job_id}").json()
    assert record["status"] == "paused", record["error"]
    paused_at = record["progress"]["step"]
    saved = {f"checkpoint-{step}" for step in (*range(3, paused_at, 3), paused_at)}
    assert 3 < paused_at < 9 and set(store.committed(job_id)) == saved

    # Another host: none of the job's files, nor the upload, in its DATA_DIR.
    shutil.rmtree(job_dir)
    (env.data_dir / "files" / f"{file_id}.jsonl").unlink()
    assert client.post(f"/jobs/{job_id}/resume").status_code == 200
    run_job(job_id)
    record = client.get(f"/jobs/{job_id}").json()
    assert record["status"] == "succeeded", record["error"]
    messages = [e["message"] for e in client.get(f"/jobs/{job_id}/events").json()["items"]]
    assert f"resuming from checkpoint-{paused_at}, the newest complete checkpoint" in messages
    steps = [row["step"] for row in client.get(f"/jobs/{job_id}/logs", params={"limit": 100}).json()["items"]]
    assert steps == list(range(1, 10))  # each step once, across the two hosts

    # The API on a third host: it has no folder of the job, and serves every checkpoint from the store.
    shutil.rmtree(job_dir)
    checkpoints = {c["name"]: c for c in client.get(f"/jobs/{job_id}/checkpoints").json()["items"]}
    assert set(checkpoints) == {"checkpoint-3", f"checkpoint-{paused_at}", "checkpoint-6", "checkpoint-9", "final"}
    final = checkpoints["final"]
    assert final["status"] == "ready"
    manifest = store.manifest(job_id, "final")
    assert manifest is not None
    assert {f["path"]: f["sha256"] for f in final["files"]} == {f["path"]: f["sha256"] for f in manifest.files}
    weights = next(f for f in final["files"] if f["path"] == "model.safetensors")
    whole = client.get(f"/jobs/{job_id}/checkpoints/final/files/model.safetensors")
    assert whole.status_code == 200 and sha256(whole.content) == weights["sha256"]
    assert whole.headers["x-checksum-sha256"] == weights["sha256"]
    part = client.get(f"/jobs/{job_id}/checkpoints/final/files/model.safetensors", headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == whole.content[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{weights['size']}"
    archive = client.get(f"/jobs/{job_id}/checkpoints/final/archive")
    assert archive.status_code == 200 and int(archive.headers["content-length"]) == len(archive.content)
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        got = {m.name: sha256(tar.extractfile(m).read()) for m in tar.getmembers()}  # type: ignore[union-attr]
    assert got == {f"final/{f['path']}": f["sha256"] for f in final["files"]}


@pytest.mark.slow
def test_a_store_unreachable_at_a_save_fails_the_job_as_storage_unavailable_after_its_retries(
    client: httpx.Client,
    env: Env,
    tmp_path: Path,
    tiny_model: Path,
    chat_dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.tasks import run_job

    server = start_s3_server(tmp_path)  # this test's own: it is killed
    try:
        for key, value in s3_settings(server, server.create_bucket("doomed")).items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("FINETUNE_FAILPOINTS", "checkpoint_published@3=pause")
        clear_caches()
        job_id = client.post("/jobs", json=job_spec(tiny_model, chat_dataset)).json()["id"]
        runner = threading.Thread(target=run_job, args=(job_id,))
        runner.start()
        marker = env.data_dir / "jobs" / str(job_id) / "failpoint-checkpoint_published"
        wait_until(marker.exists, 240, "the first checkpoint to be published on disk")
        server.stop()
        marker.unlink()
        runner.join(240)
    finally:
        server.stop()
    record = client.get(f"/jobs/{job_id}").json()
    assert record["status"] == "failed"
    assert record["error"]["code"] == "storage_unavailable"
    message = record["error"]["message"]
    assert message.startswith("The shared store s3://doomed/cluster could not publish checkpoint-3 of job ")
    assert ": 2 attempts over " in message
    assert "The checkpoint is complete in this host's DATA_DIR but not committed to the shared store" in message
    assert message.endswith("then resubmit the job.")
