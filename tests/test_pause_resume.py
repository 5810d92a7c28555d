"""Pause and resume through the real service (uvicorn, a worker, a trainer child): a paused job
frees its trainer, continues from the checkpoint its pause saved, and trains exactly as a job
that was never paused: the same losses at every step, each step logged once."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest

from core.stop_requests import REQUEST_FILE
from tests.conftest import Env, Service, job_spec, run_to_end, trainer_pids, wait_for_status, wait_until

STEPS = 12
PAUSED_AT = 5
FINISHED = {"succeeded", "failed", "cancelled"}


def losses(http: httpx.Client, job_id: int) -> dict[int, tuple[float, float]]:
    rows = http.get(f"/jobs/{job_id}/logs", params={"limit": 5000}).json()["items"]
    steps = [row["step"] for row in rows]
    assert steps == sorted(set(steps)), f"a step was logged twice: {steps}"
    return {row["step"]: (row["loss"], row["learning_rate"]) for row in rows}


@pytest.mark.slow
def test_paused_and_resumed_job_trains_exactly_as_an_uninterrupted_one(
    service: Service, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    http = service.http()
    spec = job_spec(tiny_model, chat_dataset, max_steps=STEPS, logging_steps=1, save_steps=100, seed=7)

    reference = http.post("/jobs", json=spec).json()["id"]
    assert wait_for_status(http, reference, FINISHED)["status"] == "succeeded"

    # The pause lands mid-run: the trainer is held in a step (a failpoint) until it is asked for.
    service.stop_workers()
    service.start_worker(FINETUNE_FAILPOINTS=f"training_step@{PAUSED_AT}=pause")
    job_id = http.post("/jobs", json={**spec, "hyperparameters": {**spec["hyperparameters"]}}).json()["id"]
    held = service.wait_for_failpoint(job_id, "training_step")
    asked = http.post(f"/jobs/{job_id}/pause")
    assert asked.status_code == 200, asked.text
    # Let go once the worker has passed the request on (its request file, which the trainer reads at
    # every step's end), or the trainer could finish its few steps first.
    wait_until((service.job_dir(job_id) / REQUEST_FILE).exists, 60, "the worker to pass the pause on")
    held.unlink()
    paused = wait_for_status(http, job_id, {"paused", *FINISHED}, timeout_s=60)
    assert paused["status"] == "paused", paused["error"]
    paused_at = paused["progress"]["step"]
    assert PAUSED_AT <= paused_at < STEPS
    assert trainer_pids(env.data_dir, job_id) == []  # the trainer ended: its GPU memory is returned
    names = [c["name"] for c in http.get(f"/jobs/{job_id}/checkpoints").json()["items"]]
    assert names == [f"checkpoint-{paused_at}"]
    events = http.get(f"/jobs/{job_id}/events").json()["items"]
    assert [e["message"] for e in events if e["kind"] == "paused"] == [
        f"paused at step {paused_at}; it continues from checkpoint-{paused_at}; the GPU is free. "
        f"POST /jobs/{job_id}/resume queues it again"
    ]

    assert http.post(f"/jobs/{job_id}/pause").json()["status"] == "paused"  # pausing again changes nothing
    resumed = http.post(f"/jobs/{job_id}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued", resumed.text
    record = wait_for_status(http, job_id, FINISHED)
    assert record["status"] == "succeeded", record["error"]
    kinds = [e["kind"] for e in http.get(f"/jobs/{job_id}/events").json()["items"]]
    assert kinds.count("pause_requested") == 1 and kinds.count("resume_requested") == 1
    assert "resumed" in kinds

    # trained_tokens adds up the attempts: the paused one's steps and the resumed one's, which
    # start after its checkpoint, are the uninterrupted job's steps, so the same count.
    trained = http.get(f"/jobs/{reference}").json()["metrics"]["trained_tokens"]
    assert trained == http.get(f"/jobs/{reference}/logs").json()["items"][-1]["num_tokens"] > 0
    assert record["metrics"]["trained_tokens"] == trained

    expected, got = losses(http, reference), losses(http, job_id)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step, (loss, learning_rate) in expected.items():
        assert math.isclose(got[step][0], loss, rel_tol=1e-5), (step, got[step], loss)
        assert math.isclose(got[step][1], learning_rate, rel_tol=1e-9), (step, got[step], learning_rate)


@pytest.mark.slow
def test_pause_of_a_queued_job_keeps_it_out_of_the_queue_until_resumed(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    from worker.tasks import run_job

    job_id = client.post("/jobs", json=job_spec(tiny_model, chat_dataset)).json()["id"]
    paused = client.post(f"/jobs/{job_id}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert run_job(job_id) == "skipped"  # a worker that pops it leaves it alone
    assert client.get(f"/jobs/{job_id}").json()["status"] == "paused"

    assert client.post(f"/jobs/{job_id}/resume").json()["status"] == "queued"
    run_job(job_id)
    assert client.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
    again = client.post(f"/jobs/{job_id}/resume")
    assert again.status_code == 409
    assert again.json()["detail"] == f"job {job_id} is succeeded, not paused; only a paused job can be resumed"
    assert client.post(f"/jobs/{job_id}/pause").status_code == 409


def test_paused_job_can_be_cancelled_and_then_deleted(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    job_id = client.post("/jobs", json=job_spec(tiny_model, chat_dataset)).json()["id"]
    client.post(f"/jobs/{job_id}/pause")
    cancelled = client.post(f"/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["error"]["message"] == "cancelled while paused"
    assert client.delete(f"/jobs/{job_id}").status_code == 200


@pytest.mark.slow
def test_out_of_memory_halves_the_micro_batch_until_it_fits_and_succeeds(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, monkeypatch
) -> None:
    """The failpoint raises CUDA's OutOfMemoryError for any micro-batch above 2: a job at 8 runs
    at 8, 4 and 2, with the accumulation raised to keep 16 sequences per optimizer step."""
    from worker.tasks import run_job

    monkeypatch.setenv("FINETUNE_FAILPOINTS", "training_step=oom>2")
    spec = job_spec(tiny_model, chat_dataset, per_device_train_batch_size=8, gradient_accumulation_steps=2)
    job_id = client.post("/jobs", json=spec).json()["id"]
    outcomes = []
    while client.get(f"/jobs/{job_id}").json()["status"] == "queued" and len(outcomes) < 5:
        outcomes.append(run_job(job_id))
    record = client.get(f"/jobs/{job_id}").json()
    assert outcomes == ["requeued", "requeued", "succeeded"]
    assert record["status"] == "succeeded", record["error"]
    hp = record["spec"]["hyperparameters"]
    assert (hp["per_device_train_batch_size"], hp["gradient_accumulation_steps"]) == (2, 8)
    assert record["progress"]["step"] == 6  # the same optimizer steps
    halved = [e["message"] for e in client.get(f"/jobs/{job_id}/events").json()["items"] if e["kind"] == "batch_halved"]
    assert len(halved) == 2
    assert "per_device_train_batch_size 8 -> 4 and gradient_accumulation_steps 2 -> 4" in halved[0]
    assert "per_device_train_batch_size 4 -> 2 and gradient_accumulation_steps 4 -> 8" in halved[1]
    assert "CUDA out of memory" in halved[0]


@pytest.mark.slow
def test_out_of_memory_at_micro_batch_one_fails_with_the_figures(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, monkeypatch
) -> None:
    monkeypatch.setenv("FINETUNE_FAILPOINTS", "training_step=oom>0")
    spec = job_spec(tiny_model, chat_dataset, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    record = run_to_end(client, spec)
    assert record["status"] == "queued"  # 2 -> 1 first
    from worker.tasks import run_job

    run_job(record["id"])
    record = client.get(f"/jobs/{record['id']}").json()
    assert record["status"] == "failed"
    assert record["error"]["code"] == "cuda_oom"
    assert "CUDA out of memory" in record["error"]["message"]
    assert record["spec"]["hyperparameters"]["per_device_train_batch_size"] == 1
