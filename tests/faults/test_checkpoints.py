"""Crashes around a checkpoint save: a checkpoint appears only when complete, a resume takes the
newest complete one, and one completed just before a crash is recorded all the same.

The trainer is held at the exact moment by a failpoint (trainer/failpoints.py), then the test
kills the worker, its work horse and the trainer with SIGKILL."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import job_spec
from tests.faults.conftest import Cluster, kill

pytestmark = pytest.mark.slow


def test_crash_while_a_checkpoint_is_written_resumes_from_the_last_complete_one(
    cluster: Cluster, tiny_model: Path
) -> None:
    worker = cluster.start(FINETUNE_FAILPOINTS="checkpoint_writing@8=pause").workers[0]
    spec = job_spec(tiny_model, cluster.chat_dataset(), max_steps=12, logging_steps=1, save_steps=4)
    job_id = cluster.submit(spec)
    cluster.wait_for_failpoint(job_id, "checkpoint_writing")

    # checkpoint-8's weights are written, its optimizer state is not: nothing of it is visible.
    checkpoints = cluster.job_dir(job_id) / "checkpoints"
    assert folders(checkpoints) == [".partial-checkpoint-8", "checkpoint-4"]
    assert (checkpoints / ".partial-checkpoint-8" / "checkpoint-8" / "model.safetensors").is_file()
    kill(cluster.worker_tree(worker))

    cluster.start_worker()  # without the failpoint
    record = cluster.wait_for(job_id)
    assert record["status"] == "succeeded", record["error"]
    assert record["attempts"] == 2
    events = cluster.events(job_id)
    assert (
        "checkpoint_discarded",
        "removed .partial-checkpoint-8, a checkpoint an earlier attempt did not finish "
        "writing (" + events_bytes(events) + " bytes)",
    ) in events
    assert ("resumed", "resuming from checkpoint-4, the newest complete checkpoint") in events
    with cluster.http() as http:
        steps = [row["step"] for row in http.get(f"/jobs/{job_id}/logs").json()["items"]]
        names = [c["name"] for c in http.get(f"/jobs/{job_id}/checkpoints").json()["items"]]
    assert steps == list(range(1, 13))
    assert names == ["checkpoint-4", "checkpoint-8", "checkpoint-12", "final"]
    assert not any(p.name.startswith(".partial") for p in checkpoints.iterdir())


def folders(checkpoints: Path) -> list[str]:
    return sorted(p.name for p in checkpoints.iterdir() if p.is_dir())


def events_bytes(events: list[tuple[str, str]]) -> str:
    message = next(m for kind, m in events if kind == "checkpoint_discarded")
    return message.rsplit("(", 1)[1].split()[0]


def test_checkpoint_completed_just_before_a_crash_is_listed_and_downloadable(
    cluster: Cluster, tiny_model: Path
) -> None:
    """Renamed into place, but the trainer died before recording it: the reconciler that fails
    the job (no attempts left) records it, and a worker hashes it."""
    cluster.env["MAX_ATTEMPTS"] = "1"
    worker = cluster.start(FINETUNE_FAILPOINTS="checkpoint_published@8=pause").workers[0]
    spec = job_spec(tiny_model, cluster.chat_dataset(), max_steps=12, logging_steps=1, save_steps=4)
    job_id = cluster.submit(spec)
    cluster.wait_for_failpoint(job_id, "checkpoint_published")
    with cluster.http() as http:
        assert [c["name"] for c in http.get(f"/jobs/{job_id}/checkpoints").json()["items"]] == ["checkpoint-4"]
    kill(cluster.worker_tree(worker))

    record = cluster.wait_for(job_id, timeout_s=60)  # the API's reconciler: stale heartbeat, no attempts left
    assert (record["status"], record["error"]["code"]) == ("failed", "worker_lost")
    cluster.start_worker()  # hashes what the reconciler recorded

    def hashed() -> list[dict] | None:
        with cluster.http() as http:
            listed = http.get(f"/jobs/{job_id}/checkpoints").json()["items"]
        return listed if all(c["status"] == "ready" for c in listed) else None

    from tests.conftest import wait_until

    listed = wait_until(hashed, 60, "the recorded checkpoint to be hashed")
    assert [c["name"] for c in listed] == ["checkpoint-4", "checkpoint-8"]
    newest = listed[1]
    assert newest["step"] == 8
    with cluster.http() as http:
        for entry in newest["files"]:
            body = http.get(entry["url"]).content
            assert len(body) == entry["size"] and hashlib.sha256(body).hexdigest() == entry["sha256"]
    kinds = [(kind, message) for kind, message in cluster.events(job_id) if kind == "checkpoint"]
    assert kinds[-1][1].startswith("saved checkpoint-8 at step 8 (")
    assert kinds[-1][1].endswith("; found complete on disk after its trainer stopped")


def flip_16_bytes(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        chunk = handle.read(16)
        handle.seek(path.stat().st_size // 2)
        handle.write(bytes(b ^ 0xFF for b in chunk))


def test_a_corrupt_checkpoint_is_never_served_as_intact_nor_resumed_from(cluster: Cluster, tiny_model: Path) -> None:
    """16 bytes flipped in a checkpoint's weights: the file route stops sending the recorded
    X-Checksum-SHA256, the API's verifier marks the checkpoint corrupt with an event naming the
    file, and it is then refused (409). A second checkpoint damaged while nobody looks is caught by
    the resume itself (its file changed since it was hashed): the job resumes from the newest
    checkpoint that is intact, each step logged once."""
    from tests.conftest import wait_until

    cluster.env["CHECKPOINT_VERIFY_POLL_S"] = "0.2"
    worker = cluster.start(FINETUNE_FAILPOINTS="checkpoint_writing@8=pause").workers[0]
    spec = job_spec(tiny_model, cluster.chat_dataset(), max_steps=8, logging_steps=1, save_steps=2)
    job_id = cluster.submit(spec)
    cluster.wait_for_failpoint(job_id, "checkpoint_writing")
    http = cluster.http()

    def listed() -> dict[str, dict]:
        return {c["name"]: c for c in http.get(f"/jobs/{job_id}/checkpoints").json()["items"]}

    wait_until(lambda: [c["status"] for c in listed().values()] == ["ready"] * 3, 60, "checkpoints 2, 4, 6 hashed")
    checkpoints = cluster.job_dir(job_id) / "checkpoints"
    flip_16_bytes(checkpoints / "checkpoint-6" / "model.safetensors")

    url = f"/jobs/{job_id}/checkpoints/checkpoint-6/files/model.safetensors"
    served = http.get(url)
    assert served.status_code == 200
    assert served.headers.get("x-checksum-sha256") in (None, hashlib.sha256(served.content).hexdigest())
    wait_until(lambda: listed()["checkpoint-6"]["status"] == "corrupt", 60, "the API's verifier to find it")
    assert http.get(url).status_code == 409
    assert http.get(f"/jobs/{job_id}/checkpoints/checkpoint-6/archive").status_code == 409
    [corrupt] = [m for kind, m in cluster.events(job_id) if kind == "checkpoint_corrupt"]
    assert corrupt.startswith("checkpoint-6 is corrupt: model.safetensors does not match the sha256 it was saved with")

    flip_16_bytes(checkpoints / "checkpoint-4" / "model.safetensors")  # nobody downloads it: no one knows
    kill(cluster.worker_tree(worker))
    cluster.start_worker()  # without the failpoint
    record = cluster.wait_for(job_id)
    assert record["status"] == "succeeded", record["error"]
    events = cluster.events(job_id)
    passed_over = [m.split(":")[0] for kind, m in events if kind == "checkpoint_discarded" and "not resuming" in m]
    assert passed_over == ["not resuming from checkpoint-6", "not resuming from checkpoint-4"]
    assert ("resumed", "resuming from checkpoint-2, the newest complete checkpoint") in events
    steps = [row["step"] for row in http.get(f"/jobs/{job_id}/logs").json()["items"]]
    assert steps == list(range(1, 9))
    # Saved again as training passed those steps: intact records, served with their hashes.
    names = ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8", "final"]
    wait_until(lambda: {n: c["status"] for n, c in listed().items()} == dict.fromkeys(names, "ready"), 60, "hashes")
    again = http.get(url)
    assert again.headers["x-checksum-sha256"] == hashlib.sha256(again.content).hexdigest()
