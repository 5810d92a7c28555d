"""POST/GET /jobs, validation, cancel of a queued job, pagination: the API against real Redis and SQLite."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from rq import Queue

from tests.conftest import HUB_DATASET, HUB_MODEL, Env, job_spec


def submit(client: httpx.Client, spec: dict) -> httpx.Response:
    return client.post("/jobs", json=spec)


def test_submit_stores_job_and_enqueues_it_after_commit(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    response = submit(client, job_spec(tiny_model, chat_dataset))
    assert response.status_code == 201
    record = response.json()
    assert record["status"] == "queued"
    assert record["spec"]["model"] == str(tiny_model)
    assert record["spec"]["hyperparameters"]["optim"] == "paged_adamw_8bit"  # the default is filled in
    assert record["spec"]["backend"] == "auto"
    assert record["progress"] == {
        "step": 0,
        "total_steps": None,
        "epoch": None,
        "percent": None,
        "eta_seconds": None,
        "stalled_since": None,
    }
    assert record["error"] is None
    assert record["links"]["logs"] == f"/jobs/{record['id']}/logs"
    assert record["created_at"].endswith("Z") or record["created_at"].endswith("+00:00")

    queue = Queue(env.queue_name, connection=env.redis())
    assert queue.job_ids == [f"job-{record['id']}-1"]
    rq_job = queue.fetch_job(f"job-{record['id']}-1")
    assert rq_job is not None
    assert rq_job.func_name == "worker.tasks.run_job" and rq_job.args == (record["id"],)
    assert rq_job.timeout == -1  # RQ's 180 s default would kill real training

    assert client.get(f"/jobs/{record['id']}").json() == record
    events = client.get(f"/jobs/{record['id']}/events").json()["items"]
    assert [e["kind"] for e in events] == ["queued"]


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (lambda s: s.pop("model"), "model", "Field required"),
        (
            lambda s: s["hyperparameters"].update(learning_rate=0),
            "hyperparameters.learning_rate",
            "Input should be greater than 0",
        ),
        (
            lambda s: s["hyperparameters"].update(per_device_train_batch_size="two"),
            "hyperparameters.per_device_train_batch_size",
            "Input should be a valid integer",
        ),
        (
            lambda s: s["hyperparameters"].update(lr=1e-5),
            "hyperparameters.lr",
            "unknown field (not part of the job spec)",
        ),
        (lambda s: s["hyperparameters"].update(optim="lion"), "hyperparameters.optim", "Input should be"),
        (lambda s: s.update(backend="vllm"), "backend", "Input should be 'auto', 'unsloth' or 'transformers'"),
        (lambda s: s.update(model="/etc/passwd"), "model", "is outside the allowed local roots"),
        (
            lambda s: s["dataset"].update(source="../../etc/shadow"),
            "dataset.source",
            "is outside the allowed local roots",
        ),
        (lambda s: s.update(model="not a hub id!"), "model", "is neither a Hugging Face Hub id"),
        (lambda s: s.update(chat_template_from="org/../x"), "chat_template_from", "is neither a Hugging Face"),
        (
            lambda s: s["hyperparameters"].update(warmup_ratio=1.5),
            "hyperparameters.warmup_ratio",
            "Input should be less than 1",
        ),
    ],
)
def test_bad_spec_is_422_naming_the_field(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, change, field: str, message: str
) -> None:  # type: ignore[no-untyped-def]
    spec = job_spec(tiny_model, chat_dataset)
    change(spec)
    response = submit(client, spec)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "ValidationError"
    assert [e["field"] for e in body["errors"]] == [field]
    assert message in body["errors"][0]["message"]
    assert field in body["detail"]
    assert client.get("/jobs").json()["items"] == []  # nothing stored


def test_local_path_that_does_not_exist_is_422(client: httpx.Client, env: Env, tiny_model: Path) -> None:
    spec = job_spec(tiny_model, env.datasets_dir / "missing.jsonl")
    body = submit(client, spec).json()
    assert body["errors"] == [
        {
            "field": "dataset.source",
            "message": f"dataset source {str(env.datasets_dir / 'missing.jsonl')!r} does not exist on the server",
        }
    ]


def test_symlink_out_of_allowed_root_is_422(client: httpx.Client, env: Env, tiny_model: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.jsonl"
    outside.write_text("{}\n")
    (env.datasets_dir / "link.jsonl").symlink_to(outside)
    body = submit(client, job_spec(tiny_model, env.datasets_dir / "link.jsonl")).json()
    assert body["errors"][0]["field"] == "dataset.source"
    assert "is outside the allowed local roots" in body["errors"][0]["message"]


def test_no_local_paths_when_no_roots_are_allowed(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("ALLOWED_LOCAL_ROOTS", "")
    get_settings.cache_clear()
    body = submit(client, job_spec(tiny_model, chat_dataset)).json()
    assert "this server accepts no local paths" in body["errors"][0]["message"]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"{not json", "the body is not valid JSON at character 1: "), (b"[1, 2]", "Input should be a valid dictionary")],
)
def test_body_that_is_not_a_spec_is_422(client: httpx.Client, env: Env, content: bytes, message: str) -> None:
    response = client.post("/jobs", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert message in response.json()["detail"]
    assert response.json()["errors"][0]["field"] == "body"


def test_hub_ids_are_accepted_without_a_local_path_check(client: httpx.Client, env: Env) -> None:
    # In the tests' Hugging Face cache: tests/test_hub.py has the ids that are not.
    spec = {"model": HUB_MODEL, "dataset": {"source": HUB_DATASET}, "chat_template_from": HUB_MODEL}
    response = submit(client, spec)
    assert response.status_code == 201
    assert response.json()["spec"]["hyperparameters"]["gradient_accumulation_steps"] == 64


def test_unknown_job_is_404_everywhere(client: httpx.Client, env: Env) -> None:
    for method, path in [
        ("GET", "/jobs/999"),
        ("POST", "/jobs/999/cancel"),
        ("GET", "/jobs/999/logs"),
        ("GET", "/jobs/999/events"),
        ("GET", "/jobs/999/checkpoints"),
        ("GET", "/jobs/999/checkpoints/final/archive"),
        ("GET", "/jobs/999/checkpoints/final/files/config.json"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, path
        assert response.json() == {"error": "NotFound", "detail": "job 999 not found"}, path


def test_job_id_that_is_not_a_number_is_422(client: httpx.Client, env: Env) -> None:
    response = client.get("/jobs/abc")
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "job_id"


def test_cancel_queued_job_means_it_never_starts(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    from worker.tasks import run_job

    job_id = submit(client, job_spec(tiny_model, chat_dataset)).json()["id"]
    response = client.post(f"/jobs/{job_id}/cancel")
    assert response.status_code == 200
    record = response.json()
    assert record["status"] == "cancelled"
    assert record["error"] == {"code": "cancelled", "message": "cancelled before it started"}
    assert record["started_at"] is None

    # The id may still sit on the queue: the task must find nothing to do.
    assert run_job(job_id) == "skipped"
    assert client.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
    assert not (env.data_dir / "jobs" / str(job_id) / "trainer.log").exists()

    conflict = client.post(f"/jobs/{job_id}/cancel")
    assert conflict.status_code == 409
    assert conflict.json()["detail"] == f"job {job_id} has already finished (cancelled); there is nothing to cancel"


def test_list_is_newest_first_with_status_filter_and_cursor(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    ids = [submit(client, job_spec(tiny_model, chat_dataset)).json()["id"] for _ in range(5)]
    client.post(f"/jobs/{ids[1]}/cancel")

    page = client.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["items"]] == [ids[4], ids[3]]
    page2 = client.get("/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in page2["items"]] == [ids[2], ids[1]]
    page3 = client.get("/jobs", params={"limit": 2, "cursor": page2["next_cursor"]}).json()
    assert [j["id"] for j in page3["items"]] == [ids[0]]
    assert page3["next_cursor"] is None

    cancelled = client.get("/jobs", params={"status": "cancelled"}).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[1]]
    bad = client.get("/jobs", params={"status": "done"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "status"


def test_enqueue_failure_keeps_the_job_and_says_so(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.queue import get_redis

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    get_redis.cache_clear()
    from core.config import get_settings

    get_settings.cache_clear()
    response = submit(client, job_spec(tiny_model, chat_dataset))
    assert response.status_code == 201
    events = client.get(f"/jobs/{response.json()['id']}/events").json()["items"]
    assert [e["kind"] for e in events] == ["queued", "enqueue_delayed"]
    health = client.get("/healthz")
    assert health.status_code == 503
    assert health.json()["database"] == "ok" and health.json()["redis"].startswith("error: ConnectionError")


def test_healthz_ok_with_database_and_redis(client: httpx.Client, env: Env) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert {k: body[k] for k in ("status", "database", "redis", "disk")} == {
        "status": "ok",
        "database": "ok",
        "redis": "ok",
        "disk": "ok",
    }
    assert 0 < body["disk_free_bytes"] <= body["disk_total_bytes"]


def test_api_tokens_guard_every_job_route(client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.config import get_settings

    monkeypatch.setenv("API_TOKENS", "s3cret,other")
    get_settings.cache_clear()
    missing = client.get("/jobs")
    assert missing.status_code == 401
    assert missing.json() == {
        "error": "Unauthorized",
        "detail": "this server needs 'Authorization: Bearer <token>' (one of API_TOKENS)",
    }
    assert client.get("/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/jobs", headers={"Authorization": "Bearer other"}).status_code == 200
    assert client.get("/healthz").status_code == 200  # liveness stays open for probes
