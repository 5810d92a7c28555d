"""Jobs that fail end `failed` with a stable error code and a message a person can act on.

Each test runs the real task (claim, trainer child process, finish) without an RQ worker."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.builders import write_jsonl
from tests.conftest import Env, clear_caches, job_spec, run_to_end

pytestmark = pytest.mark.slow


def test_model_that_cannot_be_loaded_is_model_not_found(
    client: httpx.Client, env: Env, chat_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The API refuses a Hub id it can neither find cached nor download (tests/test_hub.py); with that
    # check off, as where the workers see another cache, the trainer is the one to find out.
    monkeypatch.setenv("HUB_CHECK_AT_SUBMIT", "false")
    clear_caches()
    spec = job_spec(Path("x"), chat_dataset)
    spec["model"] = "no-such-org/no-such-model"  # the hub is unreachable (offline) in tests
    record = run_to_end(client, spec)
    assert record["status"] == "failed"
    assert record["error"]["code"] == "model_not_found"
    assert record["error"]["message"].startswith("Could not load the model or tokenizer: ")
    assert "HF_TOKEN" in record["error"]["message"]
    assert record["finished_at"] is not None
    log = (env.data_dir / "jobs" / str(record["id"]) / "trainer.log").read_text()
    assert "Traceback" in log  # the full output is kept


def test_unsloth_backend_without_gpu_fails_and_never_falls_back(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    spec = job_spec(tiny_model, chat_dataset)
    spec["backend"] = "unsloth"
    record = run_to_end(client, spec)
    assert record["status"] == "failed"
    assert record["error"]["code"] == "gpu_unavailable"
    assert "backend 'unsloth' needs a CUDA GPU" in record["error"]["message"]
    assert record["backend"] is None  # nothing trained on another backend
    assert client.get(f"/jobs/{record['id']}/logs").json()["items"] == []


def test_text_and_prompt_completion_datasets_train(client: httpx.Client, env: Env, tiny_model: Path) -> None:
    text = write_jsonl(env.datasets_dir / "text.jsonl", [{"text": "the cat runs over the tree"}] * 16)
    pc = write_jsonl(env.datasets_dir / "pc.jsonl", [{"prompt": "the cat", "completion": " runs"}] * 16)
    for dataset in (text, pc):
        record = run_to_end(client, job_spec(tiny_model, dataset, max_steps=2, save_steps=100))
        assert record["status"] == "succeeded", record["error"]
        events = client.get(f"/jobs/{record['id']}/events").json()["items"]
        loaded = next(e["message"] for e in events if e["kind"] == "dataset_loaded")
        kind = "'text'" if dataset == text else "'prompt_completion'"
        assert loaded.startswith(f"16 rows in {kind} format; tokens per row median ")
        # The rows were read and checked by the API before the job was queued, then by the trainer.
        assert record["data_report"]["bad_rows"] == 0
        assert record["data_report"]["rows"] == 16 and record["data_report"]["optimizer_steps"] == 2


def test_data_report_counts_tokens_truncation_and_steps(client: httpx.Client, env: Env, tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [" ".join(["cat"] * words) for words in (3, 3, 10, 200)]
    lengths = [len(tokenizer(t + tokenizer.eos_token)["input_ids"]) for t in texts]  # TRL appends EOS
    assert lengths[3] > 64 > lengths[2]  # the last row is longer than max_seq_length
    dataset = write_jsonl(env.datasets_dir / "lengths.jsonl", [{"text": t} for t in texts])
    # 4 rows, micro-batch 2, accumulation 1: 2 optimizer steps an epoch, 3 epochs.
    spec = job_spec(
        tiny_model,
        dataset,
        max_steps=None,
        num_train_epochs=3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_seq_length=64,
        save_steps=100,
    )
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    trained = [min(n, 64) for n in lengths]
    assert record["data_report"] == {
        "rows": 4,
        "row_format": "text",
        "bad_rows": 0,
        "bad_row_examples": [],
        "rows_used": 4,
        "tokens_per_row": {
            "min": lengths[0],
            "median": (lengths[1] + lengths[2]) // 2,
            "p95": int(lengths[2] + 0.85 * (lengths[3] - lengths[2])),
            "max": lengths[3],
        },
        "rows_truncated": 1,
        "tokens_cut_by_truncation": lengths[3] - 64,
        "tokens_per_epoch": sum(trained),
        "loss_tokens_per_epoch": sum(trained),  # plain text: every token is in the loss
        "sequences_per_epoch": 4,
        "sequences_estimated": False,
        "loss_tokens_prepared": sum(trained),  # what TRL's prepared labels hold: the report is what trains
        "optimizer_steps": 6,
        "tokens_to_train": 3 * sum(trained),
    }
    assert record["progress"]["total_steps"] == 6  # the Trainer agrees with the report


@pytest.fixture(scope="session")
def model_without_template(models_root: Path) -> Path:
    from tests.builders import build_llama

    path = build_llama(models_root / "tiny-llama-base", seed=1)
    (path / "chat_template.jinja").unlink()  # like a base model: no chat template
    return path


def test_chat_rows_on_a_model_without_template_say_how_to_fix_it(
    client: httpx.Client, env: Env, model_without_template: Path, chat_dataset: Path
) -> None:
    record = run_to_end(client, job_spec(model_without_template, chat_dataset))
    assert record["error"] == {
        "code": "chat_template_missing",
        "message": "The dataset holds chat messages but the model's tokenizer has no chat template. Set "
        "chat_template_from to a tokenizer that has one (e.g. the model's instruct version), then "
        "resubmit the job.",
    }


def test_chat_template_from_another_tokenizer_is_used_and_saved(
    client: httpx.Client, env: Env, model_without_template: Path, tiny_model: Path, chat_dataset: Path
) -> None:
    spec = job_spec(model_without_template, chat_dataset, max_steps=2, save_steps=100)
    spec["chat_template_from"] = str(tiny_model)
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    final = env.data_dir / "jobs" / str(record["id"]) / "checkpoints" / "final"
    assert (final / "chat_template.jinja").read_text() == (tiny_model / "chat_template.jinja").read_text()
