"""Full disks, on a small tmpfs: the job fails as `disk_full` with the figures (never
`trainer_crashed`, never `running` for as long as the disk is full), /healthz says the disk is
low, no half-written checkpoint is left, and freeing space later resumes nothing by surprise.
Skipped where the machine does not let the test mount a tmpfs. (`tmpfs` comes before `cluster` in
each test's arguments, so the cluster's processes are stopped before the tmpfs is unmounted.)"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import job_spec, trainer_pids, wait_until
from tests.faults.conftest import Cluster, fill

pytestmark = pytest.mark.slow

MIB = 1024**2


def test_full_disk_under_data_dir_with_the_database_fails_the_job_as_disk_full(
    tmpfs: Any, cluster: Cluster, tiny_model: Path
) -> None:
    cluster.data_dir = tmpfs(cluster.root / "data", "64m")
    cluster.env.update(
        DATA_DIR=str(cluster.data_dir), MIN_FREE_DISK_BYTES=str(8 * MIB), DISK_RESERVE_BYTES=str(2 * MIB)
    )
    cluster.start()
    spec = job_spec(
        tiny_model, cluster.chat_dataset(), max_steps=100_000, logging_steps=1, save_steps=5, save_total_limit=2
    )
    job_id = cluster.submit(spec)
    cluster.wait_for_step(job_id, 3)
    assert (cluster.data_dir / ".disk-reserve").stat().st_size == 2 * MIB

    filler = fill(cluster.data_dir)  # the database and the checkpoints share this disk
    record = cluster.wait_for(job_id, timeout_s=60)
    assert (record["status"], record["error"]["code"]) == ("failed", "disk_full"), record["error"]
    assert " free of 64.0 MiB on the disk holding " in record["error"]["message"]
    assert record["error"]["message"].endswith("then resubmit the job.")
    assert trainer_pids(cluster.data_dir) == []
    assert not (cluster.data_dir / ".disk-reserve").exists()  # given up so the database could record it

    health = httpx.get(f"{cluster.url}/healthz", timeout=10, verify=False)
    assert health.status_code == 503
    assert health.json()["status"] == "degraded" and health.json()["disk"].startswith("low: ")

    filler.unlink()  # space returns: the failed job stays failed, nothing resumes from a half-written folder
    time.sleep(6)  # past STALE_AFTER_S, a few reconcile passes
    after = cluster.job(job_id)
    assert (after["status"], after["attempts"]) == ("failed", 1)
    assert not list((cluster.job_dir(job_id) / "checkpoints").glob(".partial-*"))
    assert httpx.get(f"{cluster.url}/healthz", timeout=10, verify=False).status_code == 200


def test_checkpoint_disk_that_fills_during_a_save_is_disk_full_not_a_serialization_error(
    tmpfs: Any, cluster: Cluster, tiny_model: Path
) -> None:
    """Only the job folders' disk fills, in the middle of writing checkpoint-8 (PyTorch reports
    that as "file write failed", without the errno)."""
    jobs = tmpfs(cluster.data_dir / "jobs", "48m")
    cluster.env["MIN_FREE_DISK_BYTES"] = str(MIB)
    cluster.start(FINETUNE_FAILPOINTS="checkpoint_writing@8=pause")
    spec = job_spec(tiny_model, cluster.chat_dataset(), max_steps=12, logging_steps=1, save_steps=4)
    job_id = cluster.submit(spec)
    marker = cluster.wait_for_failpoint(job_id, "checkpoint_writing")
    fill(jobs)
    marker.unlink()  # the trainer goes on writing checkpoint-8's optimizer state, into a full disk

    record = cluster.wait_for(job_id, timeout_s=60)
    assert (record["status"], record["error"]["code"]) == ("failed", "disk_full"), record["error"]
    message = record["error"]["message"]
    assert message.startswith("The disk filled up while saving checkpoint-8, which needs about ")
    assert "The unfinished folder was removed; there is now " in message
    assert message.endswith("then resubmit the job.")
    checkpoints = cluster.job_dir(job_id) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["checkpoint-4"]
    with cluster.http() as http:
        assert [c["name"] for c in http.get(f"/jobs/{job_id}/checkpoints").json()["items"]] == ["checkpoint-4"]


def test_checkpoint_that_would_eat_into_the_reserved_space_is_not_started(
    tmpfs: Any, cluster: Cluster, tiny_model: Path
) -> None:
    tmpfs(cluster.data_dir / "jobs", "16m")
    cluster.env["MIN_FREE_DISK_BYTES"] = str(15 * MIB)
    cluster.start()
    # One checkpoint kept: the plan (bf16 weights, 8-bit optimizer states) fits the 1 MiB left and
    # the job starts; on the CPU the checkpoint is float32 with AdamW's states, 1.6 MB.
    spec = job_spec(tiny_model, cluster.chat_dataset(), max_steps=12, logging_steps=1, save_steps=4, save_total_limit=1)
    job_id = cluster.submit(spec)
    record = cluster.wait_for(job_id, timeout_s=120)
    assert (record["status"], record["error"]["code"]) == ("failed", "disk_full"), record["error"]
    message = record["error"]["message"]
    assert message.startswith("Not enough disk space to save checkpoint-4: it needs about ")
    assert " MiB free of 16.0 MiB on the disk holding " in message
    assert (
        "of which 15.0 MiB stays free for the job database and logs (MIN_FREE_DISK_BYTES); nothing was written"
        in message
    )
    assert [p for p in (cluster.job_dir(job_id) / "checkpoints").iterdir() if p.is_dir()] == []
    assert record["progress"]["step"] == 4


def test_job_whose_checkpoints_do_not_fit_waits_for_space_and_then_runs(
    tmpfs: Any, cluster: Cluster, tiny_model: Path
) -> None:
    """The worker does not start a job whose planned checkpoints do not fit the free disk: the
    job stays queued with the reason in an event, and starts by itself once space is freed."""
    cluster.data_dir = tmpfs(cluster.root / "data", "64m")
    cluster.env.update(
        DATA_DIR=str(cluster.data_dir),
        MIN_FREE_DISK_BYTES=str(8 * MIB),
        DISK_RESERVE_BYTES=str(MIB),
        DISK_WAIT_POLL_S="0.5",
    )
    cluster.start()
    filler = fill(cluster.data_dir)
    # 8 MiB and a little stay free: below MIN_FREE_DISK_BYTES plus the planned 1.8 MB of checkpoints.
    with open(filler, "r+b") as handle:
        handle.truncate(filler.stat().st_size - 8 * MIB - 256 * 1024)
    spec = job_spec(tiny_model, cluster.chat_dataset(), max_steps=12, logging_steps=1, save_steps=4)
    job_id = cluster.submit(spec)

    def waiting() -> str | None:
        return next((m for kind, m in cluster.events(job_id) if kind == "waiting_for_disk"), None)

    message = wait_until(waiting, 60, "the job to wait for disk space")
    assert message.startswith("waiting for disk space: its checkpoints need about ")
    assert "It starts by itself once space is freed" in message
    time.sleep(2)
    record = cluster.job(job_id)
    assert (record["status"], record["attempts"]) == ("queued", 0)

    filler.unlink()
    record = cluster.wait_for(job_id, timeout_s=120)
    assert record["status"] == "succeeded", record["error"]
    assert [m for kind, m in cluster.events(job_id) if kind == "waiting_for_disk"][-1] == "disk space freed"
