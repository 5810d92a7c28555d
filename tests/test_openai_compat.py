"""The OpenAI-compatible view (/v1) through the official `openai` SDK, changed only in base_url and
api_key, against the running service (uvicorn, a worker, a trainer on the tiny model): upload, a
job followed through its events to `succeeded`, its checkpoints, the final model fetched from the
native download route the job names, pause, resume and cancel, paging, and the SDK's typed errors.
One service and one trained job for all of it: the refusals are tried while the job trains."""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.builders import (
    chat_prompt_rows,
    chat_rows,
    openai_preference_rows,
    reachable_answer_rows,
    write_jsonl,
)
from tests.conftest import Env, Service, clear_caches, trainer_pids, wait_until

TOKEN = "openai-compat-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FINISHED = {"succeeded", "failed", "cancelled"}


@pytest.fixture
def env(env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    """The shared settings, with a bearer token required (the SDK's api_key)."""
    env.vars["API_TOKENS"] = TOKEN
    monkeypatch.setenv("API_TOKENS", TOKEN)
    clear_caches()
    return env


@pytest.fixture
def sdk(service: Service) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{service.url}/v1", api_key=TOKEN) as client:
        yield client


@pytest.mark.slow
def test_a_job_through_the_openai_sdk(
    service: Service, sdk: openai.OpenAI, env: Env, tiny_model: Path, tmp_path: Path
) -> None:
    training = write_jsonl(tmp_path / "train.jsonl", chat_rows(64))
    validation = write_jsonl(tmp_path / "valid.jsonl", chat_rows(8, seed=1))
    with training.open("rb") as handle:
        uploaded = sdk.files.create(file=handle, purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.object == "file" and uploaded.purpose == "fine-tune"
    assert (uploaded.filename, uploaded.bytes, uploaded.status) == ("train.jsonl", training.stat().st_size, "processed")
    assert uploaded.rows == 64 and uploaded.row_format == "messages"  # type: ignore[attr-defined]
    assert sdk.files.retrieve(uploaded.id).sha256 == hashlib.sha256(training.read_bytes()).hexdigest()  # type: ignore[attr-defined]
    assert sdk.files.content(uploaded.id).read() == training.read_bytes()
    with validation.open("rb") as handle:
        held_out = sdk.files.create(file=handle, purpose="fine-tune")
    assert [f.id for f in sdk.files.list()] == [held_out.id, uploaded.id]

    # The trainer is held at its last checkpoint (step 6, logged by then) until the SDK has read an
    # estimate there: the tiny model's 6 steps are over in about a second, which a poll on a loaded
    # machine can miss whole.
    service.stop_workers()
    service.start_worker(FINETUNE_FAILPOINTS="checkpoint_writing@6=pause")
    job = sdk.fine_tuning.jobs.create(
        model=str(tiny_model),
        training_file=uploaded.id,
        validation_file=held_out.id,
        hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 200},
        suffix="tiny",
        seed=7,
        metadata={"team": "nlp", "run": "a"},
        # This server's own knobs, over what OpenAI's fields give: a short run with a step log every
        # 2 steps and a checkpoint every 3.
        extra_body={
            "native_hyperparameters": {"max_steps": 6, "max_seq_length": 64, "logging_steps": 2, "save_steps": 3}
        },
    )
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job" and job.status == "queued"
    estimates = watch_estimates(service, job.id)
    assert (job.model, job.training_file, job.validation_file, job.seed) == (
        str(tiny_model),
        uploaded.id,
        held_out.id,
        7,
    )
    assert job.hyperparameters.model_dump() == {"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": 200}
    assert job.method is not None and job.method.type == "supervised"
    assert job.suffix == "tiny" and job.fine_tuned_model is None  # type: ignore[attr-defined]
    # The same job, natively: OpenAI's fields mapped onto the spec (README's table).
    http = service.http()
    http.headers.update(AUTH)
    native = http.get(job.job_url).json()  # type: ignore[attr-defined]
    assert native["spec"]["dataset"]["file_id"] == int(uploaded.id.removeprefix("file-"))
    hyperparameters = native["spec"]["hyperparameters"]
    assert (hyperparameters["per_device_train_batch_size"], hyperparameters["gradient_accumulation_steps"]) == (2, 2)
    assert hyperparameters["learning_rate"] == pytest.approx(1e-3)
    assert (hyperparameters["num_train_epochs"], hyperparameters["seed"], hyperparameters["max_steps"]) == (1, 7, 6)

    # A second job waits behind the first on the one worker: pause, resume and cancel it there. It
    # asks for two GPUs, which the native spec gets.
    other = sdk.fine_tuning.jobs.create(
        model=str(tiny_model), training_file=uploaded.id, extra_body={"gpus": 2, "strategy": "ddp"}
    )
    assert sdk.fine_tuning.jobs.pause(other.id).status == "paused"
    assert {k: http.get(other.job_url).json()["spec"][k] for k in ("gpus", "strategy")} == {  # type: ignore[attr-defined]
        "gpus": 2,
        "strategy": "ddp",
    }
    assert sdk.fine_tuning.jobs.retrieve(other.id).status == "paused"
    assert sdk.fine_tuning.jobs.resume(other.id).status == "queued"
    cancelled = sdk.fine_tuning.jobs.cancel(other.id)
    assert cancelled.status == "cancelled" and cancelled.error is None and cancelled.finished_at is not None
    with pytest.raises(openai.ConflictError, match="has already finished"):
        sdk.fine_tuning.jobs.cancel(other.id)

    # Paging: newest first, `after` the last id of a page, has_more until the end.
    first = sdk.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in first.data] == [other.id] and first.has_more
    second = sdk.fine_tuning.jobs.list(limit=1, after=other.id)
    assert [j.id for j in second.data] == [job.id] and not second.has_more
    assert [j.id for j in sdk.fine_tuning.jobs.list(limit=1)] == [other.id, job.id]  # the SDK pages on itself
    # metadata[key]=value filters (the SDK's metadata={...}): every pair must match; metadata=null
    # keeps the jobs without metadata.
    assert [j.id for j in sdk.fine_tuning.jobs.list(metadata={"team": "nlp"})] == [job.id]
    assert [j.id for j in sdk.fine_tuning.jobs.list(metadata={"team": "nlp", "run": "a"})] == [job.id]
    assert [j.id for j in sdk.fine_tuning.jobs.list(metadata={"team": "nlp", "run": "b"})] == []
    assert [j.id for j in sdk.fine_tuning.jobs.list(extra_query={"metadata": "null"})] == [other.id]
    with pytest.raises(openai.BadRequestError, match="metadata=null for jobs without") as bad_filter:
        sdk.fine_tuning.jobs.list(extra_query={"metadata": "team"})
    assert bad_filter.value.param == "metadata"

    # While it trains: what the SDK makes of refusals.
    refusals_are_the_sdks_typed_errors(service, sdk, tmp_path, tiny_model)

    held = service.wait_for_failpoint(int(job.id.removeprefix("ftjob-")), "checkpoint_writing")
    wait_until(lambda: [step for step, _ in estimates.seen if step == 6], 60, "an estimate read at step 6")
    held.unlink()

    # Follow the job through its newest events until one says it has ended.
    def ended() -> str | None:
        newest = sdk.fine_tuning.jobs.list_events(job.id, limit=10).data
        kinds = [e.data["kind"] for e in newest if e.type == "message"]  # type: ignore[index]
        return next((kind for kind in kinds if kind in FINISHED), None)

    assert wait_until(ended, 180, f"{job.id} to end", interval_s=0.5) == "succeeded", service.logs()
    done = sdk.fine_tuning.jobs.retrieve(job.id)
    native_id = job.id.removeprefix("ftjob-")
    assert done.status == "succeeded" and done.error is None and done.finished_at is not None
    assert done.fine_tuned_model == f"jobs/{native_id}/checkpoints/final"
    assert done.download_url == f"/jobs/{native_id}/checkpoints/final/archive"  # type: ignore[attr-defined]
    # estimated_finish, as read while it trained, against when it did finish: the last estimate
    # (made after the last logged step; the final evaluation and save follow it) is within seconds.
    assert done.estimated_finish is None and done.finished_at is not None
    seen = estimates.stop()
    assert seen, "no estimated_finish was seen while the job ran"
    last_step, last_estimate = seen[-1]
    assert last_step >= 2 and abs(done.finished_at - last_estimate) <= 10, (seen, done.finished_at)

    # trained_tokens: the tokens the trainer counted, set as the job ended (one attempt here: the
    # last step log's count).
    logs = http.get(f"/jobs/{native_id}/logs").json()["items"]
    assert done.trained_tokens == logs[-1]["num_tokens"] and done.trained_tokens > 0
    assert http.get(f"/jobs/{native_id}").json()["metrics"]["trained_tokens"] == done.trained_tokens
    # result_files: the step logs as OpenAI's CSV, which the SDK reads as any file.
    assert done.result_files == [f"file-results-ftjob-{native_id}"]
    result = sdk.files.retrieve(done.result_files[0])
    assert (result.purpose, result.filename) == ("fine-tune-results", f"ftjob-{native_id}-results.csv")
    rows = list(csv.DictReader(io.StringIO(sdk.files.content(result.id).text)))
    assert list(rows[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [int(r["step"]) for r in rows] == [log["step"] for log in logs] == [2, 4, 6]
    assert [float(r["train_loss"]) for r in rows] == [log["loss"] for log in logs]
    assert float(rows[-1]["valid_loss"]) == logs[-1]["eval_loss"] and 0 <= float(rows[-1]["train_accuracy"]) <= 1
    assert result.bytes == len(sdk.files.content(result.id).content)
    with pytest.raises(openai.NotFoundError, match="has no result file"):
        sdk.files.content(f"file-results-ftjob-{other.id.removeprefix('ftjob-')}")  # cancelled before it started

    events = list(sdk.fine_tuning.jobs.list_events(job.id, limit=4))  # every page, newest first
    assert len({e.id for e in events}) == len(events)
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    kinds = [e.data["kind"] for e in events if e.type == "message"]  # type: ignore[index]
    assert {"queued", "started", "checkpoint", "succeeded"} <= set(kinds) and kinds[-1] == "queued"
    assert [kind for kind in kinds if kind in FINISHED] == ["succeeded"]
    steps = {e.data["step"]: e for e in events if e.type == "metrics"}  # type: ignore[index]
    assert sorted(steps) == [2, 4, 6] and steps[6].message.startswith("Step 6/6: training loss=")
    assert steps[6].data["valid_loss"] is not None  # type: ignore[index]

    checkpoints = sdk.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [(c.name, c.step_number) for c in checkpoints] == [  # type: ignore[attr-defined]
        ("final", 6),
        ("checkpoint-6", 6),
        ("checkpoint-3", 3),
    ]
    final = checkpoints[0]
    assert final.fine_tuned_model_checkpoint == done.fine_tuned_model and final.fine_tuning_job_id == job.id
    assert final.metrics.step == 6 and final.metrics.train_loss is not None and final.metrics.valid_loss is not None
    assert checkpoints[2].metrics.step == 2  # no step log at 3: the latest before it
    page = sdk.fine_tuning.jobs.checkpoints.list(job.id, limit=1, after=final.id)
    assert [c.id for c in page.data] == [checkpoints[1].id] and page.has_more

    # The fine-tuned model's files, from the native route the job names, match their sha256.
    record = wait_until(
        lambda: (r := http.get(final.files_url).json())["status"] == "ready" and r,  # type: ignore[attr-defined]
        60,
        "the final checkpoint's hashes",
    )
    response = http.get(done.download_url)  # type: ignore[attr-defined]
    assert response.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        contents = {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert b'"LlamaForCausalLM"' in contents["final/config.json"]
    assert {f["path"]: f["sha256"] for f in record["files"]} == {
        name.removeprefix("final/"): hashlib.sha256(data).hexdigest() for name, data in contents.items()
    }

    # Files in use by no queued job can go.
    deleted = sdk.files.delete(held_out.id)
    assert (deleted.id, deleted.deleted) == (held_out.id, True)
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(held_out.id)


class Estimates:
    """(step, estimated_finish) of a job as the SDK reads it while the job runs, polled in a thread
    (a step of the tiny model takes a fraction of a second): the newest estimate read at each step."""

    def __init__(self, url: str, job_id: str) -> None:
        self.seen: list[tuple[int, int]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, args=(url, job_id), daemon=True)
        self.thread.start()

    def _poll(self, url: str, job_id: str) -> None:
        with openai.OpenAI(base_url=url, api_key=TOKEN) as sdk:
            while not self.done.wait(0.05):
                current = sdk.fine_tuning.jobs.retrieve(job_id)
                if current.status in FINISHED:
                    return
                step = current.to_dict()["progress"]["step"]
                if current.estimated_finish is None:
                    continue
                if self.seen and self.seen[-1][0] == step:
                    self.seen[-1] = (step, current.estimated_finish)
                else:
                    self.seen.append((step, current.estimated_finish))

    def stop(self) -> list[tuple[int, int]]:
        self.done.set()
        self.thread.join(10)
        return self.seen


def watch_estimates(service: Service, job_id: str) -> Estimates:
    return Estimates(f"{service.url}/v1", job_id)


def refusals_are_the_sdks_typed_errors(service: Service, sdk: openai.OpenAI, tmp_path: Path, model: Path) -> None:
    """Bad inputs get the SDK's typed errors with readable messages, none retried."""
    started = time.monotonic()
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.fine_tuning.jobs.retrieve("ftjob-999")
    assert missing.value.body == {
        "message": "fine-tuning job ftjob-999 not found",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }
    with pytest.raises(openai.NotFoundError, match="ids look like ftjob-<number>"):
        sdk.fine_tuning.jobs.cancel("job-7")
    with pytest.raises(openai.NotFoundError, match="no route GET /v1/models"):
        sdk.models.list()

    dataset = write_jsonl(tmp_path / "chat.jsonl", chat_rows(8))
    with dataset.open("rb") as handle:
        uploaded = sdk.files.create(file=handle, purpose="fine-tune")
    files = [f.id for f in sdk.files.list()]
    with pytest.raises(openai.BadRequestError, match="Hugging Face Hub id") as named:
        sdk.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=uploaded.id)
    assert (named.value.param, named.value.code) == ("model", "model_not_supported")
    with pytest.raises(openai.UnprocessableEntityError, match="a preference row needs 'prompt'") as method:
        sdk.fine_tuning.jobs.create(model=str(model), training_file=uploaded.id, method={"type": "dpo"})
    assert method.value.param == "training_file"  # chat rows, not pairs
    with pytest.raises(openai.BadRequestError, match="file-999 does not exist") as unknown:
        sdk.fine_tuning.jobs.create(model="org/model", training_file="file-999")
    assert unknown.value.param == "training_file"
    with pytest.raises(openai.UnprocessableEntityError, match="greater than or equal to 1") as invalid:
        sdk.fine_tuning.jobs.create(model="org/model", training_file=uploaded.id, hyperparameters={"n_epochs": 0})
    assert (invalid.value.param, invalid.value.code) == ("hyperparameters.n_epochs", "validation_error")
    with dataset.open("rb") as handle, pytest.raises(openai.BadRequestError, match="purpose 'assistants'") as purpose:
        sdk.files.create(file=handle, purpose="assistants")
    assert purpose.value.param == "purpose"
    assert [f.id for f in sdk.files.list()] == files  # the refused upload left nothing
    sdk.files.delete(uploaded.id)

    stranger = openai.OpenAI(base_url=f"{service.url}/v1", api_key="not-a-token")
    with stranger, pytest.raises(openai.AuthenticationError, match="not one this server accepts") as refused:
        stranger.fine_tuning.jobs.list()
    assert refused.value.code == "invalid_api_key"
    assert time.monotonic() - started < 20  # no client error was retried

    # The native routes keep their own error bodies; /docs lists the /v1 routes, behind the token.
    http = service.http()
    http.headers.update(AUTH)
    assert http.get("/jobs/999").json() == {"error": "NotFound", "detail": "job 999 not found"}
    document = http.get("/openapi.json").json()
    assert document["paths"]["/v1/fine_tuning/jobs"]["post"]["security"] == [{"bearer": []}]
    assert {"/v1/files", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"} <= set(document["paths"])


EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}


@pytest.mark.slow
def test_dpo_and_reinforcement_jobs_through_the_openai_sdk(
    service: Service, sdk: openai.OpenAI, env: Env, tiny_model: Path, tmp_path: Path
) -> None:
    """OpenAI's DPO JSONL and `method: dpo` train a native DPO job whose events and checkpoints
    carry its rewards; `method: reinforcement` with a grader becomes a GRPO job, which is cancelled
    while it generates and trains; what OpenAI's reinforcement has and this server does not is a
    typed refusal."""
    http = service.http()
    http.headers.update(AUTH)
    pairs = write_jsonl(tmp_path / "dpo.jsonl", openai_preference_rows(32))
    with pairs.open("rb") as handle:
        training = sdk.files.create(file=handle, purpose="fine-tune")
    assert training.row_format == "openai_preference"  # type: ignore[attr-defined]
    job = sdk.fine_tuning.jobs.create(
        model=str(tiny_model),
        training_file=training.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 4, "n_epochs": 1}}},
        extra_body={"native_hyperparameters": {"max_steps": 4, "max_seq_length": 64, "logging_steps": 2}},
    )
    assert job.method is not None and job.method.type == "dpo" and job.method.dpo is not None
    assert job.method.dpo.hyperparameters is not None
    assert (job.method.dpo.hyperparameters.beta, job.method.dpo.hyperparameters.batch_size) == (0.2, 4)
    native = http.get(job.job_url).json()  # type: ignore[attr-defined]
    assert native["spec"]["method"] == "dpo" and native["spec"]["hyperparameters"]["beta"] == 0.2
    assert native["data_report"]["pairs"] == 32

    prompts = write_jsonl(tmp_path / "rft.jsonl", chat_prompt_rows(reachable_answer_rows(tiny_model, 8)))
    with prompts.open("rb") as handle:
        questions = sdk.files.create(file=handle, purpose="fine-tune")
    with pytest.raises(openai.BadRequestError, match="compute_multiplier is not available here") as refused:
        sdk.fine_tuning.jobs.create(
            model=str(tiny_model),
            training_file=questions.id,
            method={
                "type": "reinforcement",
                "reinforcement": {"grader": {**EXACT, "operation": "eq"}, "hyperparameters": {"compute_multiplier": 2}},
            },
        )
    assert refused.value.param == "method.reinforcement.hyperparameters.compute_multiplier"
    with pytest.raises(openai.UnprocessableEntityError, match="runs the code in the spec"):
        sdk.fine_tuning.jobs.create(
            model=str(tiny_model),
            training_file=questions.id,
            method={
                "type": "reinforcement",
                "reinforcement": {"grader": {"type": "python", "name": "mine", "source": "def grade(s, i): return 1"}},
            },
        )
    rft = sdk.fine_tuning.jobs.create(
        model=str(tiny_model),
        training_file=questions.id,
        method={
            "type": "reinforcement",
            "reinforcement": {"grader": {**EXACT, "operation": "eq"}, "hyperparameters": {"batch_size": 1}},
        },
        extra_body={
            "native_hyperparameters": {
                "max_steps": 500,
                "max_seq_length": 64,
                "logging_steps": 1,
                "num_generations": 4,
                "max_completion_length": 2,
            }
        },
    )
    assert rft.method is not None and rft.method.type == "reinforcement" and rft.method.reinforcement is not None
    assert rft.method.reinforcement.grader.type == "string_check"
    assert rft.hyperparameters.batch_size == 1  # a prompt per step, with its 4 completions
    spec = http.get(rft.job_url).json()["spec"]  # type: ignore[attr-defined]
    assert (spec["method"], spec["grader"]["name"], spec["hyperparameters"]["gradient_accumulation_steps"]) == (
        "grpo",
        "exact",
        2,
    )

    def ended(job_id: str) -> str | None:
        newest = sdk.fine_tuning.jobs.list_events(job_id, limit=10).data
        kinds = [e.data["kind"] for e in newest if e.type == "message"]  # type: ignore[index]
        return next((kind for kind in kinds if kind in FINISHED), None)

    assert wait_until(lambda: ended(job.id), 180, f"{job.id} to end", interval_s=0.5) == "succeeded", service.logs()
    metrics = [e for e in sdk.fine_tuning.jobs.list_events(job.id, limit=50) if e.type == "metrics"]
    assert metrics and all("rewards/margins" in e.data for e in metrics)  # type: ignore[operator]
    assert "rewards/margins=" in metrics[0].message
    final = sdk.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    assert final.metrics.method_metrics is not None  # type: ignore[attr-defined]
    assert "rewards/accuracies" in final.metrics.method_metrics  # type: ignore[attr-defined]

    # The reinforcement job runs next: cancelled once it has logged a reward.
    native_id = int(rft.id.removeprefix("ftjob-"))
    wait_until(lambda: http.get(f"/jobs/{native_id}/logs").json()["items"], 180, "a GRPO step log", interval_s=0.5)
    row = http.get(f"/jobs/{native_id}/logs").json()["items"][0]
    assert {"reward", "reward_std", "completions/mean_length"} <= set(row["method_metrics"])
    cancelled = sdk.fine_tuning.jobs.cancel(rft.id)
    assert cancelled.status in ("running", "cancelled")
    assert wait_until(lambda: ended(rft.id), 60, f"{rft.id} to be cancelled", interval_s=0.5) == "cancelled"
    wait_until(lambda: trainer_pids(env.data_dir, native_id) == [], 30, "the GRPO trainer to end")
    assert sdk.fine_tuning.jobs.retrieve(rft.id).status == "cancelled"
