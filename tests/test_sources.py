"""Where a job's model and data may come from, as the trainer sees it: a name shaped like a Hub id
only ever reaches the Hub (or its cache), never a local folder of that relative name; a local
path accepted at submit and gone by the time the job runs fails with the right code and the path.

Each test runs the real task (claim, trainer child process, finish) without an RQ worker."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.builders import chat_rows, write_jsonl
from tests.conftest import Env, clear_caches, job_spec, run_to_end

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("field", ["model", "dataset", "validation", "chat_template_from"])
def test_hub_shaped_names_never_read_a_relative_local_folder(
    field: str,
    client: httpx.Client,
    env: Env,
    tiny_model: Path,
    chat_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`x/m` passes the API as a Hub id (with the check of the Hub and its cache off, as where the
    workers see another cache). A folder `x/m` under the worker's working directory (here a copy of
    a model that trains, or of a dataset) must not be what the trainer loads."""
    monkeypatch.setenv("HUB_CHECK_AT_SUBMIT", "false")
    clear_caches()
    workdir = tmp_path / "worker-cwd"
    shutil.copytree(tiny_model, workdir / "x" / "m")
    write_jsonl(workdir / "x" / "d.jsonl", chat_rows(16))
    monkeypatch.chdir(workdir)  # the trainer would inherit it
    spec = job_spec(tiny_model, chat_dataset, max_steps=2, save_steps=100)
    expected = "model_not_found"
    if field == "model":
        spec["model"] = "x/m"
    elif field == "dataset":
        spec["dataset"] = {"source": "x/d.jsonl"}
        expected = "dataset_invalid"
    elif field == "validation":
        spec["validation"] = {"source": "x/d.jsonl"}
        expected = "dataset_invalid"
    else:
        spec["chat_template_from"] = "x/m"
    record = run_to_end(client, spec)
    assert record["status"] == "failed", "a relative folder named like a Hub id was trained on"
    assert record["error"]["code"] == expected, record["error"]
    assert client.get(f"/jobs/{record['id']}/logs").json()["items"] == []


def test_model_folder_deleted_while_queued_is_model_not_found_with_the_path(
    client: httpx.Client, env: Env, tiny_model: Path, models_root: Path, chat_dataset: Path
) -> None:
    from worker.tasks import run_job

    doomed = shutil.copytree(tiny_model, models_root / "deleted-while-queued")
    job_id = client.post("/jobs", json=job_spec(doomed, chat_dataset)).json()["id"]
    shutil.rmtree(doomed)
    run_job(job_id)
    record = client.get(f"/jobs/{job_id}").json()
    assert record["error"] == {
        "code": "model_not_found",
        "message": f"the model folder {doomed} no longer exists on this host: it was there when the job was "
        "submitted and has been moved or deleted since. Put it back, or give its new path, and "
        "resubmit the job.",
    }


def test_dataset_deleted_while_queued_is_dataset_invalid_with_the_path(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    from worker.tasks import run_job

    dataset = write_jsonl(env.datasets_dir / "deleted.jsonl", chat_rows(16))
    job_id = client.post("/jobs", json=job_spec(tiny_model, dataset)).json()["id"]
    dataset.unlink()
    run_job(job_id)
    record = client.get(f"/jobs/{job_id}").json()
    assert record["error"]["code"] == "dataset_invalid"
    assert record["error"]["message"].startswith(f"the dataset {dataset} no longer exists on this host")
