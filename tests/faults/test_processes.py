"""Processes killed at the worst moment: the trainer, the worker with its horse and trainer,
every process of the service at once, and a worker told to stop twice. A job is never lost,
never left `running` without a live trainer, and never trained by two trainers at once."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from core.stop_requests import REQUEST_FILE
from tests.conftest import Env, Service, job_spec, trainer_pid, trainer_pids, wait_for_status, wait_until
from tests.faults.conftest import Cluster, kill

pytestmark = pytest.mark.slow


def test_killed_trainer_fails_the_job_as_trainer_crashed_not_running(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    from worker.tasks import run_job

    spec = job_spec(tiny_model, chat_dataset, max_steps=100_000, logging_steps=1, save_steps=100_000)
    job_id = client.post("/jobs", json=spec).json()["id"]
    runner = threading.Thread(target=run_job, args=(job_id,))
    runner.start()
    wait_until(lambda: client.get(f"/jobs/{job_id}").json()["progress"]["step"] >= 1, 120, "training to start")
    os.kill(trainer_pid(job_id, env.data_dir), signal.SIGKILL)  # what the kernel's OOM killer does
    runner.join(60)
    assert not runner.is_alive(), "the task did not notice its trainer died"
    record = client.get(f"/jobs/{job_id}").json()
    assert record["status"] == "failed"
    assert record["error"]["code"] == "trainer_crashed"
    message = record["error"]["message"]
    assert message.startswith(
        "The trainer process was killed by SIGKILL (often the kernel's out-of-memory killer: "
        "the host ran out of RAM). Last lines of trainer.log:\n"
    )
    assert message.endswith(
        "\nLower per_device_train_batch_size or max_seq_length, or give the host more RAM, then resubmit the job."
    )


def test_job_of_a_worker_killed_mid_training_resumes_on_a_new_worker(
    service: Service, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    http = service.http()
    spec = job_spec(tiny_model, chat_dataset, max_steps=60, logging_steps=1, save_steps=5, save_total_limit=2)
    job_id = http.post("/jobs", json=spec).json()["id"]
    wait_until(lambda: http.get(f"/jobs/{job_id}").json()["progress"]["step"] >= 7, 120, "a checkpoint and more")

    # The host loses the worker: the RQ worker, its work horse and the trainer, all at once.
    kill(service.worker_tree(service.worker))
    service.worker.wait(10)
    stopped_at = http.get(f"/jobs/{job_id}").json()
    assert stopped_at["status"] == "running"  # nobody has noticed yet

    service.start_worker()  # its first maintenance pass finds the stale heartbeat (STALE_AFTER_S=5)
    record = wait_for_status(http, job_id, {"succeeded", "failed", "cancelled"}, timeout_s=240)
    assert record["status"] == "succeeded", record["error"]
    assert record["attempts"] == 2
    kinds = [e["kind"] for e in http.get(f"/jobs/{job_id}/events").json()["items"]]
    assert kinds.count("started") == 2
    assert "retried" in kinds and "resumed" in kinds
    steps = [row["step"] for row in http.get(f"/jobs/{job_id}/logs", params={"limit": 5000}).json()["items"]]
    assert steps == list(range(1, 61))  # the lost attempt's logs past the checkpoint were replaced
    assert record["progress"]["step"] == 60


def test_every_process_killed_at_once_then_restarted_resumes_the_job(cluster: Cluster, tiny_model: Path) -> None:
    """A power cut, as far as processes go: Redis (which keeps nothing), the API, the worker, its
    horse and the trainer die together. Started again, the service finds the job in the database
    and resumes it from its checkpoint."""
    cluster.start()
    spec = job_spec(tiny_model, cluster.chat_dataset(), max_steps=40, logging_steps=1, save_steps=5)
    job_id = cluster.submit(spec)
    cluster.wait_for_step(job_id, 7)

    kill(cluster.everything())
    time.sleep(0.5)
    assert trainer_pids(cluster.data_dir) == []

    cluster.start()  # Redis empty, the job `running` in the database with a stale heartbeat
    record = cluster.wait_for(job_id)
    assert record["status"] == "succeeded", record["error"]
    assert record["attempts"] == 2
    kinds = [kind for kind, _message in cluster.events(job_id)]
    assert "retried" in kinds
    resumed = [message for kind, message in cluster.events(job_id) if kind == "resumed"]
    assert len(resumed) == 1 and resumed[0].startswith("resuming from checkpoint-")
    with cluster.http() as http:
        steps = [row["step"] for row in http.get(f"/jobs/{job_id}/logs", params={"limit": 5000}).json()["items"]]
    assert steps == list(range(1, 41))


def test_sigterm_twice_stops_the_worker_and_its_trainer_and_the_job_resumes(cluster: Cluster, tiny_model: Path) -> None:
    """The first SIGTERM asks RQ for a warm shutdown (finish the job), the second for a cold one:
    RQ kills the work horse. The trainer must not train on as an orphan: the kernel tells it its
    parent died, it stops at the next step, and the job is queued again and resumed."""
    worker = cluster.start().workers[0]
    spec = job_spec(tiny_model, cluster.chat_dataset(), max_steps=2000, logging_steps=1, save_steps=5)
    job_id = cluster.submit(spec)
    cluster.wait_for_step(job_id, 7)
    trainer = trainer_pid(job_id, cluster.data_dir)

    worker.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # RQ ignores a second signal within a second of the first
    worker.send_signal(signal.SIGTERM)
    worker.wait(30)
    wait_until(
        lambda: (
            not Path(f"/proc/{trainer}").exists()
            or Path(f"/proc/{trainer}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        ),
        30,
        "the orphaned trainer to stop",
    )
    assert trainer_pids(cluster.data_dir) == []
    # Not ended by the signals: `running` until the API's reconciler notices the stale heartbeat
    # (STALE_AFTER_S), then `queued` again (on a loaded machine that can come first).
    assert cluster.job(job_id)["status"] in ("running", "queued")

    stopped_at = cluster.job(job_id)["progress"]["step"]
    cluster.start_worker()

    def resumed() -> str | None:
        return next((message for kind, message in cluster.events(job_id) if kind == "resumed"), None)

    message = wait_until(resumed, 120, "the job to be resumed by the new worker")
    newest = max(int(p.name.split("-")[1]) for p in (cluster.job_dir(job_id) / "checkpoints").glob("checkpoint-*"))
    assert message == f"resuming from checkpoint-{newest}, the newest complete checkpoint"
    cluster.wait_for_step(job_id, stopped_at + 5)  # training again
    assert len(trainer_pids(cluster.data_dir, job_id)) == 1
    with cluster.http() as http:
        assert http.post(f"/jobs/{job_id}/cancel").status_code == 200
    record = cluster.wait_for(job_id)
    assert (record["status"], record["attempts"]) == ("cancelled", 2)


def test_one_sigterm_saves_a_checkpoint_and_queues_the_job_to_continue_elsewhere(
    cluster: Cluster, tiny_model: Path
) -> None:
    """`docker compose down`: the worker's first SIGTERM lets the running step finish, the trainer
    saves a checkpoint there and ends, the job goes back to the queue (not counted as a lost
    attempt) and the worker exits. The next worker continues from that very step."""
    # Held in a step (a failpoint) until the stop has reached the trainer, which then saves at the
    # end of that step: a job of a few steps cannot end before the stop does.
    worker = cluster.start(FINETUNE_FAILPOINTS="training_step@5=pause").workers[0]
    steps = 12
    spec = job_spec(tiny_model, cluster.chat_dataset(), max_steps=steps, logging_steps=1, save_steps=100_000)
    job_id = cluster.submit(spec)
    held = cluster.wait_for_failpoint(job_id, "training_step")

    worker.send_signal(signal.SIGTERM)
    wait_until((cluster.job_dir(job_id) / REQUEST_FILE).exists, 60, "the worker to pass its stop on")
    held.unlink()
    assert worker.wait(60) == 0
    assert trainer_pids(cluster.data_dir) == []
    record = cluster.job(job_id)
    stopped_at = record["progress"]["step"]
    assert record["status"] == "queued" and 5 <= stopped_at < steps
    events = cluster.events(job_id)
    assert (
        "stopping",
        "the worker is stopping: the trainer saves a checkpoint at its next step, then the job "
        "is queued again to continue from it",
    ) in events
    assert (
        "requeued",
        f"its worker was stopped; the trainer stopped at step {stopped_at}; it continues from "
        f"checkpoint-{stopped_at}. Queued again",
    ) in events

    cluster.start_worker()
    record = cluster.wait_for(job_id)
    assert record["status"] == "succeeded", record["error"]
    assert record["attempts"] == 2
    resumed = [message for kind, message in cluster.events(job_id) if kind == "resumed"]
    assert resumed == [f"resuming from checkpoint-{stopped_at}, the newest complete checkpoint"]
    with cluster.http() as http:
        logged = [row["step"] for row in http.get(f"/jobs/{job_id}/logs", params={"limit": 5000}).json()["items"]]
    assert logged == list(range(1, steps + 1))
