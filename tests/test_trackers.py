"""Experiment trackers (a spec's `integrations`): a job on the tiny model reports to TensorBoard
(event files kept with the job, downloaded and read back with TensorBoard's own reader), to a real
`mlflow server` process (read back with MLflow's client) and to Weights & Biases offline (the run
folder read); a tracker that fails is dropped with an event and the job succeeds; /v1's W&B
integration maps onto the spec, through the openai SDK."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from scripts.service_harness import unmeasured_environment
from tests.conftest import Env, clear_caches, free_port, job_spec, run_to_end, wait_until

MLFLOW_START_TIMEOUT_S = 180  # its first start creates its database (dozens of migrations)


@pytest.fixture
def env(env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    env.vars["TRACKER_ALLOWED_HOSTS"] = "127.0.0.1"
    monkeypatch.setenv("TRACKER_ALLOWED_HOSTS", "127.0.0.1")
    clear_caches()
    return env


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on a free port, its runs in SQLite, artifacts in a folder."""
    root = tmp_path / "mlflow"
    root.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "wb") as log:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                *("server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
                *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
                *("--default-artifact-root", str(root / "artifacts")),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=unmeasured_environment(),  # mlflow's code is not ours to measure
        )

    def healthy() -> bool:
        assert server.poll() is None, (root / "server.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/health", timeout=2, verify=False).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, MLFLOW_START_TIMEOUT_S, "mlflow server to answer", interval_s=0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of an offline W&B run's .wandb file: LevelDB's log format (32 KiB blocks of
    records, each with a 7-byte header: CRC, length, type) after W&B's 7-byte file header; each
    record a protobuf of wandb's own (run, config, history, summary, ...)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def values(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def events_of(client: httpx.Client, job_id: int) -> list[dict]:
    return list(client.get(f"/jobs/{job_id}/events").json()["items"])


@pytest.mark.slow
def test_a_job_reports_to_tensorboard_mlflow_and_wandb_offline(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, mlflow_server: str, tmp_path: Path
) -> None:
    spec = {
        **job_spec(tiny_model, chat_dataset),
        "validation": {"fraction": 0.1},
        "integrations": [
            {"type": "tensorboard"},
            {
                "type": "mlflow",
                "mlflow": {
                    "tracking_uri": mlflow_server,
                    "experiment_name": "finetune-tests",
                    "run_name": "tiny-run",
                    "tags": {"team": "nlp"},
                },
            },
            {"type": "wandb", "wandb": {"project": "finetune-tests", "tags": ["tiny"], "mode": "offline"}},
        ],
    }
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    job_id = record["id"]
    events = events_of(client, job_id)
    assert [e["kind"] for e in events if e["kind"] == "tracker_failed"] == [], events
    (started,) = [e["message"] for e in events if e["kind"] == "tracker"]
    assert started.startswith("reporting to tensorboard, mlflow, wandb (")
    logs = client.get(f"/jobs/{job_id}/logs").json()["items"]
    assert [row["step"] for row in logs] == [2, 4, 6]
    final = str(env.data_dir.resolve() / "jobs" / str(job_id) / "checkpoints" / "final")
    report = client.get(f"/jobs/{job_id}").json()["data_report"]

    # MLflow, read back from the server: the run, its hyperparameters, every step's loss, the data
    # report and where the final model is.
    import mlflow

    mlflow_client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = mlflow_client.get_experiment_by_name("finetune-tests")
    assert experiment is not None
    (run,) = mlflow_client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["max_steps"] == "6"
    assert run.data.tags["team"] == "nlp" and run.data.tags["final_model"] == final
    history = mlflow_client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(row["step"], pytest.approx(row["loss"])) for row in logs]
    assert [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "num_tokens")] == [2, 4, 6]
    assert mlflow_client.get_metric_history(run.info.run_id, "eval_loss")
    saved = Path(mlflow_client.download_artifacts(run.info.run_id, "data_report.json", str(tmp_path)))
    assert json.loads(saved.read_text())["rows"] == report["rows"]

    # TensorBoard: the event files, downloaded, read with TensorBoard's own reader.
    response = client.get(f"/jobs/{job_id}/integrations/tensorboard/archive")
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    unpacked = tmp_path / "tensorboard"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        archive.extractall(unpacked, filter="data")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events_file = EventAccumulator(str(unpacked / f"job-{job_id}-tensorboard"), size_guidance={"tensors": 0})
    events_file.Reload()
    scalars = {event.step: event.value for event in events_file.Scalars("train/loss")}
    assert scalars == {row["step"]: pytest.approx(row["loss"]) for row in logs}
    texts = set(events_file.Tags()["tensors"])
    assert {"args/text_summary", "data_report/text_summary", "final_model/text_summary"} <= texts

    # Weights & Biases, offline: the run folder under the job's, for `wandb sync`, read record by
    # record: the hyperparameters, each step's loss, and the data report and final model.
    (run_dir,) = (env.data_dir / "jobs" / str(job_id) / "wandb" / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    config, history, summary = {}, [], {}
    for entry in wandb_records(run_file):
        kind = entry.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = entry.run.config.update if kind == "run" else entry.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
        elif kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in entry.history.item}
            )
        elif kind == "summary":
            summary.update(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in entry.summary.update}
            )
    assert config["learning_rate"] == 0.001 and config["max_steps"] == 6
    losses = [(row["train/global_step"], row["train/loss"]) for row in history if "train/loss" in row]
    assert losses == [(row["step"], pytest.approx(row["loss"])) for row in logs]
    assert summary["final_model"] == final and summary["data_report"]["rows"] == report["rows"]
    archive_response = client.get(f"/jobs/{job_id}/integrations/wandb/archive")
    with tarfile.open(fileobj=io.BytesIO(archive_response.content)) as archive:
        assert any(name.endswith(".wandb") for name in archive.getnames())


@pytest.mark.slow
def test_a_tracker_that_fails_is_dropped_with_an_event_and_the_job_succeeds(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"  # no MLflow server listens there
    spec = {
        **job_spec(tiny_model, chat_dataset),
        "integrations": [{"type": "tensorboard"}, {"type": "mlflow", "mlflow": {"tracking_uri": nobody}}],
    }
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    failed = [e["message"] for e in events_of(client, record["id"]) if e["kind"] == "tracker_failed"]
    assert len(failed) == 1 and failed[0].startswith("mlflow: ") and "the job goes on without it" in failed[0]
    # The other tracker went on.
    assert client.get(f"/jobs/{record['id']}/integrations/tensorboard/archive").status_code == 200


def test_integrations_are_checked_at_submit(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    spec = job_spec(tiny_model, chat_dataset)
    elsewhere = {"type": "mlflow", "mlflow": {"tracking_uri": "http://169.254.169.254/mlflow"}}
    response = client.post("/jobs", json={**spec, "integrations": [elsewhere]})
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {
            "field": "integrations.0.mlflow.tracking_uri",
            "message": "this server does not report to 'http://169.254.169.254/mlflow': its host is not in the "
            "operator's TRACKER_ALLOWED_HOSTS",
        }
    ]
    twice = [{"type": "tensorboard"}, {"type": "tensorboard"}]
    response = client.post("/jobs", json={**spec, "integrations": twice})
    assert response.status_code == 422 and "tensorboard is given more than once" in response.text
    unknown = client.post("/jobs", json={**spec, "integrations": [{"type": "comet"}]})
    assert unknown.status_code == 422 and "integrations.0" in unknown.text
    # A job without the integration has no such files to download.
    job_id = client.post("/jobs", json=spec).json()["id"]
    missing = client.get(f"/jobs/{job_id}/integrations/tensorboard/archive")
    assert missing.status_code == 404 and missing.json()["detail"] == f"job {job_id} has no tensorboard integration"


def test_the_openai_wandb_integration_maps_onto_the_spec(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    uploaded = client.post("/files", files={"file": ("chat.jsonl", chat_dataset.read_bytes())}).json()
    with openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client) as sdk:
        job = sdk.fine_tuning.jobs.create(
            model=str(tiny_model),
            training_file=f"file-{uploaded['id']}",
            integrations=[{"type": "wandb", "wandb": {"project": "p", "name": "run", "entity": "e", "tags": ["a"]}}],
        )
        wandb = {"project": "p", "name": "run", "entity": "e", "tags": ["a"], "mode": "online"}
        assert [i.to_dict() for i in job.integrations or []] == [{"type": "wandb", "wandb": wandb}]
        assert client.get(f"/jobs/{job.id.removeprefix('ftjob-')}").json()["spec"]["integrations"] == [
            {"type": "wandb", "wandb": wandb}
        ]
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            sdk.fine_tuning.jobs.create(
                model=str(tiny_model),
                training_file=f"file-{uploaded['id']}",
                integrations=[{"type": "wandb", "wandb": {}}],  # type: ignore[typeddict-item]
            )
        assert refused.value.param == "integrations.0.wandb.project"
