"""The `finetune` command against the running service (uvicorn, a worker, a trainer): submit from
YAML and follow to the end, list, logs, events, estimate, cancel, and a download cut halfway
that continues with an HTTP Range request and checks every file's sha256."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from client import cli
from client.cli import app
from tests.conftest import Env, Service, job_spec

pytestmark = pytest.mark.slow

runner = CliRunner()
# rich sizes its console from COLUMNS when the module is imported, and a test process's output
# is no terminal (80 columns): as wide as the COLUMNS the invocations below give, so that lines
# are not wrapped or cut where the tests read them.
cli.console.width = 160
TOKEN = "s3cret"


def finetune(service: Service, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, [*args, "--url", service.url], catch_exceptions=False, env={"COLUMNS": "160"})
    return result.exit_code, result.output


def test_submit_follow_list_logs_events_and_a_resumed_download(
    service: Service, env: Env, tiny_model: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(job_spec(tiny_model, chat_dataset)))
    code, output = finetune(service, "submit", str(spec_file), "--max-steps", "8", "--follow")
    assert code == 0, output
    assert "job 1 queued" in output and "job 1 succeeded" in output
    assert "8/8 steps" in output  # the progress bar's last frame

    code, output = finetune(service, "list")
    assert code == 0 and "succeeded" in output and "8/8" in output
    code, output = finetune(service, "logs", "1")
    assert code == 0 and all(f"\n│ {step} " in output for step in (2, 4, 6, 8)), output
    code, output = finetune(service, "events", "1")
    assert code == 0 and "queued" in output and "succeeded" in output

    dest = tmp_path / "final"
    code, output = finetune(service, "download", "1", "final", "--dest", str(dest))
    assert code == 0, output
    checkpoint = service.http().get("/jobs/1/checkpoints/final").json()
    for entry in checkpoint["files"]:
        assert hashlib.sha256((dest / entry["path"]).read_bytes()).hexdigest() == entry["sha256"]

    # A download cut halfway: the weights file's first half is all that arrived.
    weights = dest / "model.safetensors"
    whole = weights.read_bytes()
    weights.unlink()
    (dest / "model.safetensors.part").write_bytes(whole[: len(whole) // 2])
    code, output = finetune(service, "download", "1", "final", "--dest", str(dest))
    assert code == 0, output
    assert weights.read_bytes() == whole and not (dest / "model.safetensors.part").exists()
    access = (service.root / "api.log").read_text()
    assert '/jobs/1/checkpoints/final/files/model.safetensors HTTP/1.1" 206' in access

    # A corrupted partial file is caught by its sha256 and removed.
    weights.unlink()
    (dest / "model.safetensors.part").write_bytes(b"\0" * (len(whole) // 2))
    code, output = finetune(service, "download", "1", "final", "--dest", str(dest))
    assert code == 1 and "sha256 does not match" in output
    assert not (dest / "model.safetensors.part").exists()


def test_estimate_cancel_and_follow_of_a_cancelled_job(
    service: Service, env: Env, tiny_model: Path, chat_dataset: Path, tmp_path: Path
) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(__import__("json").dumps(job_spec(tiny_model, chat_dataset, max_steps=100_000)))
    code, output = finetune(service, "estimate", str(spec_file), "--gpu-memory-gib", "80")
    assert code == 0 and "GPU memory:" in output and "(fits)" in output, output
    assert " tokens/s" in output and "training: about " in output, output  # the planner's time (max_steps)

    code, output = finetune(service, "submit", str(spec_file))
    assert code == 0
    job_id = output.split()[1]
    service.wait_for_step(int(job_id), 2)
    code, output = finetune(service, "cancel", job_id)
    assert code == 0 and "(cancel requested)" in output
    code, output = finetune(service, "follow", job_id)
    assert code == 1 and f"job {job_id} cancelled" in output

    code, output = finetune(service, "cancel", job_id)
    assert code == 2 and "409" in output and "has already finished" in output


@pytest.fixture
def api_with_token(env: Env, tmp_path: Path) -> Iterator[Service]:
    """The API alone, with API_TOKENS set: no worker, so a job stays queued until cancelled."""
    running = Service(
        tmp_path / "api", data_dir=env.data_dir, redis_url=env.redis_url, settings={**env.vars, "API_TOKENS": TOKEN}
    )
    try:
        yield running.start(worker=False)
    finally:
        running.stop()


def finetune_with(service: Service, token: str | None, *args: str) -> tuple[int, str]:
    variables = {"COLUMNS": "160", "FINETUNE_TOKEN": token}
    result = runner.invoke(app, [*args, "--url", service.url], catch_exceptions=False, env=variables)
    return result.exit_code, result.output


def test_a_401_says_where_the_token_goes(api_with_token: Service, env: Env) -> None:
    code, output = finetune_with(api_with_token, None, "list")
    assert code == 2 and "401" in output, output
    assert (
        "(give one of the server's API_TOKENS, or a token an admin made, with --token or FINETUNE_TOKEN)"
        in " ".join(output.split())
    )
    code, output = finetune_with(api_with_token, "not-it", "list")
    said = " ".join(output.split())  # rich wraps the line where the console ends
    assert code == 2 and "(the token given with --token or FINETUNE_TOKEN is not one the server accepts)" in said


def test_relative_paths_are_sent_against_the_spec_files_folder_and_a_bar_without_total_shows_a_question_mark(
    api_with_token: Service,
    env: Env,
    tiny_model: Path,
    chat_dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = job_spec(tiny_model, chat_dataset)
    spec["model"] = os.path.relpath(tiny_model, tmp_path)
    spec["dataset"] = {"source": "./" + os.path.relpath(chat_dataset, tmp_path)}
    assert spec["model"].startswith("../"), spec
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    code, output = finetune_with(api_with_token, TOKEN, "submit", str(spec_file))  # from the repository's root
    assert code == 0, output
    http = api_with_token.http()
    http.headers["Authorization"] = f"Bearer {TOKEN}"
    stored = http.get("/jobs/1").json()["spec"]
    assert (stored["model"], stored["dataset"]["source"]) == (str(tiny_model.resolve()), str(chat_dataset.resolve()))

    monkeypatch.chdir(chat_dataset.parent)  # flags: against the working directory
    code, output = finetune_with(api_with_token, TOKEN, "submit", str(spec_file), "--dataset", f"./{chat_dataset.name}")
    assert code == 0, output
    assert http.get("/jobs/2").json()["spec"]["dataset"]["source"] == str(chat_dataset.resolve())

    # Cancelled while queued: no trainer ever counted its steps.
    code, output = finetune_with(api_with_token, TOKEN, "cancel", "1")
    code, output = finetune_with(api_with_token, TOKEN, "follow", "1")
    assert code == 1 and "job 1 cancelled" in output, output
    assert "0/? steps" in output and "None" not in output
