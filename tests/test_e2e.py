"""The whole service as a user runs it: uvicorn, a worker process, a trainer child, redis-server."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests.conftest import HUB_SPEC, Env, Service, job_spec, wait_for_status, wait_until

pytestmark = pytest.mark.slow


def test_submit_train_watch_and_download_final_checkpoint(
    service: Service, env: Env, tiny_model: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    http = service.http()
    spec = job_spec(tiny_model, chat_dataset, save_total_limit=1)
    created = http.post("/jobs", json=spec)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert created.json()["status"] == "queued"

    record = wait_for_status(http, job_id, {"succeeded", "failed", "cancelled"})
    assert record["status"] == "succeeded", record["error"]
    assert record["backend"] == "transformers"
    # padding_free null: padded batches (trainer/methods/sft.py), as TRL's config says it ran
    assert record["trainer"]["padding_free"] is False and record["spec"]["hyperparameters"]["padding_free"] is None
    assert record["versions"]["trl"] == "1.14.2"
    assert record["versions"]["transformers"] == "5.17.0"
    assert record["progress"] == {
        "step": 6,
        "total_steps": 6,
        "epoch": record["progress"]["epoch"],
        "percent": 100.0,
        "eta_seconds": 0.0,
        "stalled_since": None,
    }
    assert record["metrics"]["loss"] > 0
    assert record["metrics"]["tokens_per_second"] > 0 and record["metrics"]["tokens_per_second_mean"] > 0
    assert record["error"] is None and record["finished_at"] is not None

    logs = http.get(f"/jobs/{job_id}/logs").json()["items"]
    assert [row["step"] for row in logs] == [2, 4, 6]
    for row in logs:
        assert row["loss"] > 0 and row["learning_rate"] > 0 and row["grad_norm"] > 0
        assert row["tokens_per_second"] > 0 and row["num_tokens"] > 0
    assert http.get(f"/jobs/{job_id}/logs", params={"after_step": 4}).json()["items"][0]["step"] == 6

    events = http.get(f"/jobs/{job_id}/events").json()["items"]
    kinds = [e["kind"] for e in events]
    assert kinds[:2] == ["queued", "started"]
    [first_step] = [e["message"] for e in events if e["kind"] == "first_step"]
    assert first_step.startswith("step 1, the first of this run, took "), first_step
    assert "compil" in first_step  # how much of it torch.compile took (nothing, on this CPU job)
    [startup] = [e["message"] for e in events if e["kind"] == "startup"]
    assert "; precision auto: fp32 (no CUDA GPU: a CPU trains in float32)" in startup
    assert "optimizer_replaced" in kinds  # paged_adamw_8bit needs a GPU
    assert kinds.count("checkpoint") == 3  # checkpoint-3, checkpoint-6, final
    assert "checkpoint_removed" in kinds  # save_total_limit=1 rotated checkpoint-3 away
    assert kinds[-1] == "succeeded"

    checkpoints = {c["name"]: c for c in http.get(f"/jobs/{job_id}/checkpoints").json()["items"]}
    assert set(checkpoints) == {"checkpoint-6", "final"}
    final = checkpoints["final"]
    assert final["status"] == "ready" and final["step"] == 6
    names = {f["path"] for f in final["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    assert all(len(f["sha256"]) == 64 for f in final["files"])
    assert any(f["path"] == "optimizer.pt" for f in checkpoints["checkpoint-6"]["files"])
    assert http.get(f"/jobs/{job_id}/checkpoints/checkpoint-3/archive").status_code == 404

    archive = http.get(final["archive_url"])
    assert archive.status_code == 200
    assert int(archive.headers["content-length"]) == len(archive.content)
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(tmp_path / "download", filter="data")
    folder = tmp_path / "download" / "final"

    import hashlib

    for entry in final["files"]:
        assert hashlib.sha256((folder / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "the cat"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert output.shape[1] == prompt["input_ids"].shape[1] + 5

    # One file with a Range request, as a resumable download would ask for it.
    config_url = next(f["url"] for f in final["files"] if f["path"] == "config.json")
    whole = http.get(config_url).content
    part = http.get(config_url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206
    assert part.content == whole[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(whole)}"


def test_cancel_running_job_stops_at_next_step(
    service: Service, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    http = service.http()
    spec = job_spec(tiny_model, chat_dataset, max_steps=100_000, logging_steps=1, save_steps=100_000)
    job_id = http.post("/jobs", json=spec).json()["id"]

    wait_until(lambda: http.get(f"/jobs/{job_id}").json()["progress"]["step"] >= 2, 120, "training to start")
    cancelled = http.post(f"/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["cancel_requested"] is True

    record = wait_for_status(http, job_id, {"succeeded", "failed", "cancelled"}, timeout_s=60)
    assert record["status"] == "cancelled"
    assert record["error"]["code"] == "cancelled"
    assert record["error"]["message"].startswith("cancelled by request at step ")
    assert record["progress"]["step"] < 100_000
    assert record["error"]["message"] == f"cancelled by request at step {record['progress']['step']}"
    assert http.get(f"/jobs/{job_id}/checkpoints").json()["items"] == []  # a cancelled run saves no final model

    again = http.post(f"/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert again.json() == {
        "error": "Conflict",
        "detail": f"job {job_id} has already finished (cancelled); there is nothing to cancel",
    }


def test_the_worker_log_says_a_failed_job_failed_where_rq_said_job_ok(service: Service, env: Env) -> None:
    """RQ logs "Job OK" for any task that returns, and the task returns after recording a failure."""
    http = service.http()
    job_id = http.post("/jobs", json=HUB_SPEC).json()["id"]  # a stub in the Hugging Face cache: it cannot load
    assert wait_for_status(http, job_id, {"succeeded", "failed", "cancelled"})["status"] == "failed"
    log = service.root / "worker.log"
    rq_id = f"job-{job_id}-1"

    def rq_lines() -> list[str]:
        lines = [line for line in log.read_text().splitlines() if "rq.worker" in line and rq_id in line]
        return lines if any(f"({rq_id})" in line for line in lines) else []

    lines = "\n".join(wait_until(rq_lines, 60, "RQ's line for the job"))
    assert f": job {job_id} failed ({rq_id})" in lines, lines
    assert "Job OK" not in lines and "Successfully completed" not in log.read_text()
    assert f"job {job_id} failed after 0:" in log.read_text()


def test_a_busy_worker_keeps_telling_the_api_what_its_gpus_can_do(
    service: Service, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    """RQ runs its maintenance, where the worker registered its GPU's size and FP8 support (the
    API's estimates and 422s read them), only between jobs: during a job longer than their few
    minutes of life the API planned without the worker (seen on an H100: an estimate with no card,
    which no measurement could match). Its heartbeats during a job register them too."""
    service.stop_workers()
    service.start_worker(FINETUNE_FAILPOINTS="training_step@2=pause")
    http = service.http()
    job_id = http.post("/jobs", json=job_spec(tiny_model, chat_dataset)).json()["id"]
    held = service.wait_for_failpoint(job_id, "training_step")
    redis = env.redis()
    registered = f"{env.queue_name}:fp8:*"
    assert list(redis.scan_iter(registered)), "the worker registered nothing at its start"
    redis.delete(*redis.scan_iter(registered))  # as if they had expired during a long job
    wait_until(lambda: list(redis.scan_iter(registered)), 30, "the busy worker to register again")
    assert http.get(f"/jobs/{job_id}").json()["status"] == "running" and held.exists()
    held.unlink()
    assert service.wait_for(job_id)["status"] == "succeeded"
