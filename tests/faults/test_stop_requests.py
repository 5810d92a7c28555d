"""Cancel, pause and the worker's stop, carried to trainers that are not ready for them, that never
get their signal, or that ignore it; and the transitions that race them (a cancel after a pause,
a resume against a delete). An accepted cancel always ends the job, within CANCEL_GRACE_S, on
every start path; a pause never kills a trainer; a job whose cancel was accepted never comes back."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scripts.service_harness import Service
from tests.conftest import Env, clear_caches, job_spec, trainer_pid, trainer_pids, wait_until

pytestmark = pytest.mark.slow

LONG = {"max_steps": 100_000, "logging_steps": 1, "save_steps": 100_000}


def start_job_in_thread(client: httpx.Client, spec: dict[str, Any]) -> tuple[int, threading.Thread]:
    """Submit, then run the worker's task for it in a thread of this process (claim, trainer child,
    watch, finish), as a work horse does."""
    from worker.tasks import run_job

    response = client.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    runner = threading.Thread(target=run_job, args=(job_id,), daemon=True)
    runner.start()
    return job_id, runner


def finished(client: httpx.Client, job_id: int, runner: threading.Thread, timeout_s: float = 120) -> dict[str, Any]:
    runner.join(timeout_s)
    assert not runner.is_alive(), f"job {job_id}'s task did not end"
    return dict(client.get(f"/jobs/{job_id}").json())


def kinds(client: httpx.Client, job_id: int) -> list[str]:
    return [event["kind"] for event in client.get(f"/jobs/{job_id}/events").json()["items"]]


@pytest.fixture
def settings(env: Env, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """set(NAME=value, ...): settings for the task run in this process and the trainers it starts."""

    def apply(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)
        clear_caches()

    yield apply
    clear_caches()


# ---- cancel -------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["fresh", "standby", "ranks"])
def test_a_cancel_whose_signal_never_arrives_still_ends_the_job(
    start: str, env: Env, tmp_path: Path, tiny_model: Path, chat_dataset: Path
) -> None:
    """The trainer ignores SIGUSR1 (as when the signal went to another handler): the request file
    carries the cancel, on each way a trainer starts. Ended by the trainer itself (not killed:
    CANCEL_GRACE_S is far away), at the step it reached."""
    settings = {**env.vars, "FINETUNE_FAILPOINTS": "stop_signals=ignore", "CANCEL_GRACE_S": "600"}
    if start == "standby":
        settings.update(TRAINER_STANDBY="1")
    spec: dict[str, Any] = job_spec(tiny_model, chat_dataset, **LONG)
    if start == "ranks":
        spec.update(gpus=2, strategy="ddp")
    service = Service(tmp_path / "service", data_dir=env.data_dir, redis_url=env.redis_url, settings=settings)
    try:
        service.start(**({"WORKER_GPUS": "0,1"} if start == "ranks" else {}))
        job_id = service.submit(spec)
        service.wait_for_step(job_id, 2)
        with service.http() as http:
            assert http.post(f"/jobs/{job_id}/cancel").status_code == 200
        record = service.wait_for(job_id, timeout_s=120)
        assert record["status"] == "cancelled", record["error"]
        assert record["error"]["message"] == f"cancelled by request at step {record['progress']['step']}"
        log = (service.job_dir(job_id) / "trainer.log").read_text()
        if start == "standby":
            assert f"takes job {job_id}" in log  # it ran in the standby trainer
        if start == "ranks":
            assert record["placement"]["world_size"] == 2
        wait_until(lambda: trainer_pids(env.data_dir, job_id) == [], 30, "every trainer process to end")
    finally:
        service.stop()
        print(service.logs())


def test_a_trainer_that_does_not_end_within_the_cancel_grace_is_killed(
    client: httpx.Client, env: Env, settings: Any, tiny_model: Path, chat_dataset: Path
) -> None:
    # Held mid-step, then frozen there: stopped at a random moment, a trainer may hold SQLite's
    # write lock (it writes its step logs), and nobody could even record the cancel.
    settings(CANCEL_GRACE_S="2", FINETUNE_FAILPOINTS="training_step@3=pause")
    job_id, runner = start_job_in_thread(client, job_spec(tiny_model, chat_dataset, **LONG))
    marker = env.data_dir / "jobs" / str(job_id) / "failpoint-training_step"
    wait_until(lambda: marker.exists() and marker.read_text().strip(), 120, "the trainer to reach step 3")
    pid = int(marker.read_text())
    assert pid == trainer_pid(job_id, env.data_dir)
    os.kill(pid, signal.SIGSTOP)  # frozen: it can neither read its request file nor take a signal
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
    record = finished(client, job_id, runner, timeout_s=60)
    assert (record["status"], record["error"]["code"]) == ("cancelled", "cancelled")
    assert record["error"]["message"] == "cancelled; the trainer did not stop in time and was killed"
    assert trainer_pids(env.data_dir, job_id) == []


# ---- pause --------------------------------------------------------------------------------------


def test_a_pause_in_the_first_second_of_a_job_pauses_it(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    """Asked for while the trainer process is still starting (its signal handlers do not exist
    yet): the worker holds the signal back, and the trainer finds the request as it starts."""
    job_id, runner = start_job_in_thread(client, job_spec(tiny_model, chat_dataset, **LONG))
    wait_until(lambda: client.get(f"/jobs/{job_id}").json()["status"] == "running", 60, "the job to be claimed")
    assert client.post(f"/jobs/{job_id}/pause").status_code == 200
    record = finished(client, job_id, runner)
    assert record["status"] == "paused", record["error"]
    assert trainer_pids(env.data_dir, job_id) == []


def test_a_cancel_after_a_pause_wins(
    client: httpx.Client, env: Env, settings: Any, tiny_model: Path, chat_dataset: Path
) -> None:
    """The trainer is held while it writes the pause's checkpoint; the cancel comes then. The
    stronger, later request wins: the job ends cancelled, not paused."""
    settings(FINETUNE_FAILPOINTS="checkpoint_writing=pause")
    job_id, runner = start_job_in_thread(client, job_spec(tiny_model, chat_dataset, **LONG))
    wait_until(lambda: client.get(f"/jobs/{job_id}").json()["progress"]["step"] >= 2, 120, "training to start")
    assert client.post(f"/jobs/{job_id}/pause").status_code == 200
    from trainer.failpoints import marker

    held = marker(env.data_dir.resolve() / "jobs" / str(job_id), "checkpoint_writing")
    wait_until(held.exists, 60, "the trainer to write the pause's checkpoint")
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
    held.unlink()  # let the trainer finish the checkpoint
    record = finished(client, job_id, runner)
    assert (record["status"], record["error"]["code"]) == ("cancelled", "cancelled"), record["error"]
    assert "paused" not in kinds(client, job_id)
    assert client.post(f"/jobs/{job_id}/resume").status_code == 409


def test_a_cancel_accepted_while_the_worker_stops_is_never_requeued(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    """The trainer reports `interrupted` (its worker was stopped), but a cancel was accepted first:
    the job ends cancelled, it does not go back to the queue."""
    from core.contract import TrainerOutcome, TrainerResult
    from worker.tasks import TrainerWatch

    job_id = client.post("/jobs", json=job_spec(tiny_model, chat_dataset)).json()["id"]
    from worker.tasks import claim

    assert claim(job_id) == 1
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
    watch = TrainerWatch(job_id)
    watch.stop_asked_at = 0.0  # the worker's SIGTERM came
    (watch.job_dir).mkdir(parents=True, exist_ok=True)
    (watch.job_dir / "result.json").write_text(
        TrainerResult(status=TrainerOutcome.interrupted, error_message="stopped", step=3).model_dump_json()
    )
    assert watch.finish(0) == "cancelled"
    record = client.get(f"/jobs/{job_id}").json()
    assert (record["status"], record["error"]["message"]) == ("cancelled", "cancelled by request at step 3")
    assert "requeued" not in kinds(client, job_id)
