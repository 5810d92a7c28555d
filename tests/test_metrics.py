"""GET /metrics, read with prometheus-client's own parser: what a Prometheus server would store."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Env, clear_caches, job_spec, run_to_end


def scrape(client: httpx.Client, **headers: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.mark.slow
def test_metrics_show_jobs_queue_steps_checkpoints_disk_and_requests(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    finished = run_to_end(client, job_spec(tiny_model, chat_dataset, max_steps=6, logging_steps=2, save_steps=3))
    assert finished["status"] == "succeeded"
    queued = client.post("/jobs", json=job_spec(tiny_model, chat_dataset)).json()

    checkpoints = client.get(f"/jobs/{finished['id']}/checkpoints").json()["items"]
    samples = scrape(client)
    assert samples["finetune_jobs"][(("status", "succeeded"),)] == 1
    assert samples["finetune_jobs"][(("status", "queued"),)] == 1
    assert samples["finetune_jobs"][(("status", "running"),)] == 0
    # Both jobs' entries wait in Redis: the first ran through run_to_end, which no RQ worker popped.
    assert samples["finetune_queue_depth"][()] == 2
    assert samples["finetune_oldest_queued_job_age_seconds"][()] >= 0
    assert samples["finetune_workers"][()] == 0  # this test runs the task itself, no RQ worker
    assert samples["finetune_redis_up"][()] == 1
    # Six steps, the first (which compiles) left out, as tokens/s leaves it out.
    assert samples["finetune_step_duration_seconds_count"][()] == 5
    assert samples["finetune_step_duration_seconds_bucket"][(("le", "+Inf"),)] == 5
    assert samples["finetune_step_duration_seconds_sum"][()] > 0
    assert samples["finetune_checkpoint_bytes"][()] == sum(c["size"] for c in checkpoints)
    assert 0 < samples["finetune_disk_free_bytes"][()] <= samples["finetune_disk_total_bytes"][()]
    requests = samples["finetune_http_request_duration_seconds_count"]
    assert requests[(("method", "POST"), ("route", "/jobs"), ("status", "201"))] >= 2
    assert requests[(("method", "GET"), ("route", "/jobs/{id}/checkpoints"), ("status", "200"))] >= 1
    assert queued["status"] == "queued"


def test_metrics_follow_api_tokens(client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_TOKENS", "s3cret")
    clear_caches()
    assert client.get("/metrics").status_code == 401
    samples = scrape(client, Authorization="Bearer s3cret")
    assert samples["finetune_jobs"][(("status", "queued"),)] == 0
