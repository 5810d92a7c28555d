"""Crashes around a checkpoint save: a checkpoint appears only when complete, a resume takes the
newest complete one, and one completed just before a crash is recorded all the same.

The trainer is held at the exact moment by a failpoint (trainer/failpoints.py), then the test
kills the worker, its work horse and the trainer with SIGKILL."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.conftest import job_spec, process_tree
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
    kill(process_tree(worker.pid))

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
    kill(process_tree(worker.pid))

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
