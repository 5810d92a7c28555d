"""The job spec checks shapes only; whether its local paths may be used on this server is
checked once, at submit (app/sources.py). So the trainer reads a stored spec as it is, on its
own host, whatever that host's settings, and a client learns of every unusable path at once."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import HUB_DATASET, HUB_MODEL, Env


def test_a_spec_validates_without_reading_settings_or_the_filesystem() -> None:
    import app.schemas
    from core.spec import JobSpec

    # Nothing of the settings module within the spec's reach, and paths that exist nowhere pass.
    assert not [name for name, value in vars(app.schemas).items() if getattr(value, "__module__", "") == "core.config"]
    spec = JobSpec.model_validate(
        {
            "model": "/nowhere/model",
            "chat_template_from": "~nosuchuser/tok",
            "dataset": {"source": "/srv/data/files/3.jsonl", "file_id": 3},  # a stored spec holds both
            "validation": {"source": "./relative.jsonl"},
        }
    )
    assert spec.model == "/nowhere/model" and spec.dataset.file_id == 3


def test_submit_names_every_unusable_path_at_once(client: httpx.Client, env: Env, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    response = client.post(
        "/jobs",
        json={
            "model": str(outside),
            "chat_template_from": "~nosuchuser/tokenizer",
            "dataset": {"source": "/nowhere/at/all.jsonl"},
        },
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "ValidationError"
    assert [e["field"] for e in body["errors"]] == ["model", "chat_template_from", "dataset.source"]
    messages = " | ".join(e["message"] for e in body["errors"])
    assert "outside the allowed local roots" in messages and "home folder that does not exist" in messages
    assert body["detail"].startswith("model: ")


def test_a_source_and_a_file_id_together_are_refused_at_submit(client: httpx.Client, env: Env) -> None:
    response = client.post("/jobs", json={"model": HUB_MODEL, "dataset": {"source": HUB_DATASET, "file_id": 1}})
    assert response.status_code == 422, response.text
    assert response.json()["errors"] == [
        {"field": "dataset", "message": "give either dataset.source or dataset.file_id, not both"}
    ]


def test_estimate_checks_the_model_path_the_same_way(client: httpx.Client, env: Env, tmp_path: Path) -> None:
    response = client.post("/jobs/estimate", json={"model": str(tmp_path), "dataset": {"source": "org/data"}})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "model"
    assert "outside the allowed local roots" in response.json()["errors"][0]["message"]
