"""Datasets before and during a job: the check POST /jobs makes on local and uploaded files,
column mappings, loss options, validation sets and eval loss, packing, and the trainer's own
check of sources the API does not read (`datasets` folders, like Hub datasets)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.builders import MARKED_TEMPLATE, chat_rows, qa_rows, write_jsonl
from tests.conftest import HUB_DATASET, Env, job_spec, run_to_end

GOOD_CHAT = chat_rows(1)[0]


def refused(client: httpx.Client, spec: dict) -> str:
    response = client.post("/jobs", json=spec)
    assert response.status_code == 422, response.text
    assert client.get("/jobs").json()["items"] == []  # nothing stored, nothing queued
    return str(response.json()["detail"])


# ---- the check before queuing (no training) -----------------------------------------------


def test_unknown_columns_are_refused_before_queuing_with_a_hint(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    dataset = write_jsonl(env.datasets_dir / "qa.jsonl", qa_rows(4))
    response = client.post("/jobs", json=job_spec(tiny_model, dataset))
    assert response.status_code == 422
    assert response.json() == {
        "error": "InvalidDataset",
        "detail": (
            "the dataset: the rows have columns ['answer', 'question']; a row needs 'messages' (chat), 'prompt' and "
            "'completion', or 'text' (dataset.columns maps other names onto these, e.g. "
            '{"prompt": "question", "completion": "answer"})'
        ),
    }


def test_column_mapping_is_checked_and_reported_before_queuing(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    dataset = write_jsonl(env.datasets_dir / "qa.jsonl", qa_rows(6))
    spec = job_spec(tiny_model, dataset)
    spec["dataset"]["columns"] = {"prompt": "question", "completion": "answer"}  # type: ignore[index]
    response = client.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["data_report"] == {
        "checked_before_queuing": True,
        "rows": 6,
        "row_format": "prompt_completion",
        "bad_rows": 0,
        "bad_row_examples": [],
    }
    events = client.get(f"/jobs/{record['id']}/events").json()["items"]
    assert events[0]["message"].startswith(
        "job accepted and queued; dataset checked: 6 rows in 'prompt_completion' format; "
    )


def test_mapping_to_a_missing_column_is_refused(client: httpx.Client, env: Env, tiny_model: Path) -> None:
    dataset = write_jsonl(env.datasets_dir / "qa.jsonl", qa_rows(2))
    spec = job_spec(tiny_model, dataset)
    spec["dataset"]["columns"] = {"prompt": "query", "completion": "answer"}  # type: ignore[index]
    assert refused(client, spec) == (
        "the dataset: dataset.columns maps to ['query'], but the rows have columns ['answer', 'question']"
    )


def test_mapping_names_only_our_columns(client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path) -> None:
    spec = job_spec(tiny_model, chat_dataset)
    spec["dataset"]["columns"] = {"instruction": "question"}  # type: ignore[index]
    response = client.post("/jobs", json=spec)
    assert response.status_code == 422
    assert "columns: 'instruction' is not one of our column names" in response.text


def test_too_many_malformed_rows_are_refused_with_line_numbers(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    rows = [GOOD_CHAT] * 8 + [
        {"messages": [{"role": "narrator", "content": "x"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ]
    dataset = write_jsonl(env.datasets_dir / "bad.jsonl", rows)
    assert refused(client, job_spec(tiny_model, dataset)) == (
        "2 of the dataset's 10 rows (20.00%) are malformed, more than the 1.00% this server skips "
        "(MAX_BAD_ROW_FRACTION): line 9: unknown role 'narrator' (expected one of ['assistant', 'system', 'tool', "
        "'user']); line 10: no assistant turn to learn from"
    )


def test_a_few_malformed_rows_are_skipped_and_reported(
    client: httpx.Client, env: Env, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("MAX_BAD_ROW_FRACTION", "0.25")
    get_settings.cache_clear()
    path = env.datasets_dir / "some-bad.jsonl"
    write_jsonl(path, [GOOD_CHAT] * 7)
    with path.open("a") as handle:
        handle.write('{"messages": oops}\n')
    response = client.post("/jobs", json=job_spec(tiny_model, path))
    assert response.status_code == 201, response.text
    assert response.json()["data_report"]["bad_row_examples"] == ["line 8: not valid JSON (Expecting value)"]
    events = client.get(f"/jobs/{response.json()['id']}/events").json()["items"]
    assert "8 rows in 'messages' format, 1 malformed row(s) will be skipped" in events[0]["message"]


@pytest.mark.parametrize(
    ("rows", "hyperparameters", "detail"),
    [
        (
            [{"text": "plain words"}] * 4,
            {"assistant_only_loss": True},
            "hyperparameters.assistant_only_loss needs chat rows (messages, or prompt/completion as lists of "
            "messages); these rows are 'text'",
        ),
        (
            [{"prompt": "a", "completion": "b"}] * 4,
            {"assistant_only_loss": True},
            "hyperparameters.assistant_only_loss needs chat rows (messages, or prompt/completion as lists of "
            "messages); these rows are 'prompt_completion'",
        ),
        (
            [GOOD_CHAT] * 4,
            {"completion_only_loss": True},
            "hyperparameters.completion_only_loss needs prompt/completion rows; these rows are 'messages'; "
            "for chat rows use assistant_only_loss",
        ),
    ],
)
def test_loss_options_that_do_not_suit_the_rows_are_refused(
    client: httpx.Client, env: Env, tiny_model: Path, rows: list[dict], hyperparameters: dict, detail: str
) -> None:
    dataset = write_jsonl(env.datasets_dir / "rows.jsonl", rows)
    assert refused(client, job_spec(tiny_model, dataset, **hyperparameters)) == detail


@pytest.mark.parametrize(
    ("validation", "hyperparameters", "detail"),
    [
        (
            {"fraction": 0.1, "split": "test"},
            {},
            "validation takes a fraction of the training rows, or a split, source or file_id; not both",
        ),
        ({}, {}, "give validation.fraction, validation.split, validation.source or validation.file_id"),
        ({"fraction": 0.9}, {}, "less than or equal to 0.5"),
        (None, {"eval_steps": 2}, "hyperparameters.eval_steps and per_device_eval_batch_size need a validation set"),
    ],
)
def test_bad_validation_specs_are_422(
    client: httpx.Client,
    env: Env,
    tiny_model: Path,
    chat_dataset: Path,
    validation: dict | None,
    hyperparameters: dict,
    detail: str,
) -> None:
    spec = job_spec(tiny_model, chat_dataset, **hyperparameters)
    if validation is not None:
        spec["validation"] = validation
    response = client.post("/jobs", json=spec)
    assert response.status_code == 422
    assert detail in response.text


def test_validation_that_cannot_work_with_the_files_is_refused(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    tiny = write_jsonl(env.datasets_dir / "one.jsonl", [GOOD_CHAT])
    spec = job_spec(tiny_model, tiny)
    spec["validation"] = {"fraction": 0.5}
    assert refused(client, spec) == (
        "validation.fraction 0.5 of 1 good rows leaves 1 for validation and 0 for training; each needs one"
    )
    chat = write_jsonl(env.datasets_dir / "chat.jsonl", [GOOD_CHAT] * 4)
    spec = job_spec(tiny_model, chat)
    spec["validation"] = {"split": "test"}
    assert refused(client, spec).startswith(
        "validation.split 'test' names a split of dataset.source, but a file has no splits"
    )
    spec["validation"] = {"source": str(write_jsonl(env.datasets_dir / "text.jsonl", [{"text": "words"}]))}
    assert refused(client, spec) == (
        "the validation set's rows are 'text' but the dataset's are 'messages'; both need the same format"
    )


def test_a_local_validation_file_beside_a_hub_dataset_is_checked_before_queuing(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    validation = write_jsonl(env.datasets_dir / "qa.jsonl", qa_rows(3))
    spec = job_spec(tiny_model, Path("unused"))
    spec["dataset"] = {"source": HUB_DATASET}  # the API does not read Hub datasets
    spec["validation"] = {"source": str(validation)}
    assert refused(client, spec).startswith("the validation set: the rows have columns ['answer', 'question']")


def test_uploaded_file_as_validation_set_is_kept_while_the_job_waits(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    content = "".join(json.dumps(row) + "\n" for row in chat_rows(4, seed=3)).encode()
    file_id = client.post("/files", files={"file": ("val.jsonl", content)}).json()["id"]
    spec = job_spec(tiny_model, chat_dataset)
    spec["validation"] = {"file_id": file_id}
    response = client.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    assert response.json()["data_report"]["validation"]["rows"] == 4
    stored = response.json()["spec"]["validation"]
    assert (stored["file_id"], Path(stored["source"]).name) == (file_id, f"{file_id}.jsonl")
    conflict = client.delete(f"/files/{file_id}")
    assert conflict.status_code == 409
    assert f"file {file_id} is used by job(s) {response.json()['id']}" in conflict.text


def test_assistant_only_loss_on_an_uploaded_chat_file_is_accepted(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    content = "".join(json.dumps(row) + "\n" for row in chat_rows(8)).encode()
    file_id = client.post("/files", files={"file": ("chat.jsonl", content)}).json()["id"]
    spec = job_spec(tiny_model, Path("unused"), assistant_only_loss=True)
    spec["dataset"] = {"file_id": file_id}
    response = client.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    assert response.json()["data_report"]["rows"] == 8  # the upload's own check, reused


# ---- through the trainer ----------------------------------------------------------------------


@pytest.mark.slow
def test_mapped_prompt_completion_trains_on_completions_only(client: httpx.Client, env: Env, tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    dataset = write_jsonl(env.datasets_dir / "qa.jsonl", qa_rows(8))
    spec = job_spec(tiny_model, dataset, max_steps=2, save_steps=100)
    spec["dataset"]["columns"] = {"prompt": "question", "completion": "answer"}  # type: ignore[index]
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = qa_rows(8)
    full = [len(tokenizer(r["question"] + r["answer"] + tokenizer.eos_token)["input_ids"]) for r in rows]
    prompts = [len(tokenizer(r["question"])["input_ids"]) for r in rows]
    report = record["data_report"]
    assert report["rows"] == report["rows_used"] == 8
    assert report["tokens_per_epoch"] == sum(full)
    # TRL's default for prompt/completion rows: the loss covers the completion (and EOS) only.
    assert report["loss_tokens_per_epoch"] == sum(f - p for f, p in zip(full, prompts, strict=True))
    assert report["loss_tokens_prepared"] == report["loss_tokens_per_epoch"]  # TRL's labels agree


@pytest.mark.slow
def test_validation_fraction_is_evaluated_every_eval_steps(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    spec = job_spec(tiny_model, chat_dataset, max_steps=5, eval_steps=2, logging_steps=1, save_steps=100)
    spec["validation"] = {"fraction": 0.25}
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    logs = client.get(f"/jobs/{record['id']}/logs").json()["items"]
    evaluated = {row["step"]: row["eval_loss"] for row in logs if row["eval_loss"] is not None}
    # Steps 2 and 4 by eval_steps, and 5 because the final model is always evaluated.
    assert sorted(evaluated) == [2, 4, 5]
    assert all(loss > 0 for loss in evaluated.values())
    assert [row["step"] for row in logs] == [1, 2, 3, 4, 5]  # eval losses joined the step rows
    assert record["metrics"]["eval_loss"] == evaluated[5] and record["metrics"]["eval_step"] == 5
    assert record["metrics"]["loss"] is not None  # the training loss is kept beside it
    report = record["data_report"]
    assert report["validation"]["fraction"] == 0.25
    assert (report["rows_used"], report["validation"]["rows_used"]) == (48, 16)  # 64 rows, seed-fixed split
    events = [e["kind"] for e in client.get(f"/jobs/{record['id']}/events").json()["items"]]
    assert events.count("evaluated") == 3
    from core.db import session_scope
    from core.models import Job

    with session_scope() as session:
        job = session.get(Job, record["id"])
        assert job is not None and job.phase == "saving"  # the trainer's last phase was written
    assert record["phase"] is None  # and is shown only while the job runs


@pytest.mark.slow
def test_assistant_only_loss_with_a_marked_template(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    from transformers import AutoTokenizer

    marked = env.datasets_dir / "marked-tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = MARKED_TEMPLATE
    tokenizer.save_pretrained(marked)
    spec = job_spec(tiny_model, chat_dataset, max_steps=2, save_steps=100, assistant_only_loss=True)
    spec["chat_template_from"] = str(marked)
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    report = record["data_report"]
    masks = tokenizer.apply_chat_template(
        [r["messages"] for r in chat_rows(64)], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )["assistant_masks"]
    assert report["loss_tokens_per_epoch"] == sum(sum(mask[:64]) for mask in masks)
    assert 0 < report["loss_tokens_per_epoch"] < report["tokens_per_epoch"] / 2
    assert report["loss_tokens_prepared"] == report["loss_tokens_per_epoch"]  # TRL's labels agree


@pytest.mark.slow
def test_assistant_only_loss_with_a_template_trl_cannot_mark_fails_before_the_model(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    record = run_to_end(client, job_spec(tiny_model, chat_dataset, assistant_only_loss=True))
    assert record["status"] == "failed"
    assert record["error"]["code"] == "chat_template_unsuitable"
    assert record["error"]["message"].startswith(
        "assistant_only_loss needs a chat template that marks the assistant's tokens ({% generation %})"
    )
    assert record["vram"] == {} or record["vram"].get("allocated") is None
    assert client.get(f"/jobs/{record['id']}/logs").json()["items"] == []


@pytest.mark.slow
def test_packing_fills_sequences_and_the_report_takes_trls_count(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    dataset = write_jsonl(env.datasets_dir / "short.jsonl", [{"text": f"the cat runs {i}"} for i in range(40)])
    spec = job_spec(
        tiny_model,
        dataset,
        max_steps=None,
        num_train_epochs=1,
        packing=True,
        save_steps=100,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
    )
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    assert record["trainer"]["padding_free"] is True  # left to TRL with packing: its packed rows need it
    report = record["data_report"]
    assert report["sequences_estimated"] is False
    assert report["sequences_per_epoch"] < 40 / 4  # many short rows per 64-token sequence
    assert record["progress"]["total_steps"] == report["optimizer_steps"] == -(-report["sequences_per_epoch"] // 2)


def save_to_disk(env: Env, rows: list[dict]) -> Path:
    from datasets import Dataset

    folder = env.datasets_dir / "saved"
    Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


@pytest.mark.slow
def test_trainer_checks_every_row_of_a_datasets_folder(client: httpx.Client, env: Env, tiny_model: Path) -> None:
    rows = [GOOD_CHAT] * 3 + [{"messages": [{"role": "user", "content": "no answer"}]}]
    record = run_to_end(client, job_spec(tiny_model, save_to_disk(env, rows)))
    assert record["status"] == "failed"
    assert record["error"] == {
        "code": "dataset_invalid",
        "message": (
            "1 of the dataset's 4 rows (25.00%) are malformed, more than the 1.00% this server skips "
            "(MAX_BAD_ROW_FRACTION): row 3: no assistant turn to learn from. Fix the rows, or the job's dataset "
            "settings (source, split, columns, validation), then resubmit the job."
        ),
    }


def too_large(size: int, limit: int) -> str:
    return (
        f"the row is {size:,} bytes, more than the {limit:,} a row may have (MAX_ROW_BYTES); max_seq_length "
        "cuts a row that long to its first tokens anyway: split long documents into several rows"
    )


def test_rows_over_max_row_bytes_are_malformed_at_submit(
    client: httpx.Client, env: Env, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("MAX_ROW_BYTES", "2048")
    get_settings.cache_clear()
    huge = {"messages": [{"role": "user", "content": "q" * 5000}, {"role": "assistant", "content": "a"}]}
    huge_line = len(json.dumps(huge))
    alone = write_jsonl(env.datasets_dir / "alone.jsonl", [huge])
    assert refused(client, job_spec(tiny_model, alone)) == (
        f"every row of the dataset is malformed (1): line 1: {too_large(huge_line, 2048)}"
    )
    among_many = write_jsonl(env.datasets_dir / "many.jsonl", [GOOD_CHAT] * 150 + [huge])  # 0.66%: skipped
    response = client.post("/jobs", json=job_spec(tiny_model, among_many))
    assert response.status_code == 201, response.text
    assert response.json()["data_report"]["bad_row_examples"] == [f"line 151: {too_large(huge_line, 2048)}"]


@pytest.mark.slow
def test_trainer_names_a_row_of_a_datasets_folder_over_max_row_bytes_before_tokenizing(
    client: httpx.Client, env: Env, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `datasets` folder (like a Hub dataset) is checked by the trainer, from Arrow: the row's
    size is measured there, and the row is never made a Python object nor tokenized."""
    from core.config import get_settings

    monkeypatch.setenv("MAX_ROW_BYTES", "2048")
    get_settings.cache_clear()  # the worker hands its settings to the trainer
    huge = {"messages": [{"role": "user", "content": "q" * 5000}, {"role": "assistant", "content": "a"}]}
    record = run_to_end(client, job_spec(tiny_model, save_to_disk(env, [GOOD_CHAT] * 3 + [huge])))
    assert record["status"] == "failed"
    assert record["error"]["code"] == "dataset_invalid"
    size = len("user") + 5000 + len("assistant") + 1  # the text Arrow holds
    assert record["error"]["message"] == (
        "1 of the dataset's 4 rows (25.00%) are malformed, more than the 1.00% this server skips "
        f"(MAX_BAD_ROW_FRACTION): row 3: {too_large(size, 2048)}. Fix the rows, or the job's dataset settings "
        "(source, split, columns, validation), then resubmit the job."
    )


@pytest.mark.slow
def test_trainer_skips_a_few_bad_rows_and_reads_sharegpt_turns(
    client: httpx.Client, env: Env, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("MAX_BAD_ROW_FRACTION", "0.2")
    get_settings.cache_clear()  # the worker hands its settings to the trainer
    sharegpt = {"conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello"}]}
    rows = [sharegpt] * 9 + [{"conversations": [{"from": "narrator", "value": "x"}]}]
    spec = job_spec(tiny_model, save_to_disk(env, rows), max_steps=2, save_steps=100)
    spec["dataset"]["columns"] = {"messages": "conversations"}  # type: ignore[index]
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    report = record["data_report"]
    assert (report["rows"], report["bad_rows"], report["rows_used"]) == (10, 1, 9)
    assert report["bad_row_examples"] == [
        "row 9: unknown speaker 'narrator' (expected one of ['assistant', 'gpt', 'human', 'system', 'tool', 'user'])"
    ]


@pytest.mark.slow
def test_validation_split_of_a_datasets_folder_is_checked_and_evaluated(
    client: httpx.Client, env: Env, tiny_model: Path
) -> None:
    from datasets import Dataset, DatasetDict

    folder = env.datasets_dir / "with-splits"
    DatasetDict(
        {"train": Dataset.from_list(chat_rows(16)), "test": Dataset.from_list(chat_rows(6, seed=1))}
    ).save_to_disk(str(folder))
    spec = job_spec(tiny_model, folder, max_steps=2, eval_steps=2, save_steps=100)
    spec["validation"] = {"split": "test"}
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    assert record["data_report"]["validation"]["rows_used"] == 6
    assert record["metrics"]["eval_step"] == 2 and record["metrics"]["eval_loss"] > 0
    spec["validation"] = {"split": "dev"}
    failed = run_to_end(client, spec)
    assert failed["error"] == {
        "code": "dataset_invalid",
        "message": f"{folder.resolve()} has no split 'dev'; it has ['test', 'train']. Fix the "
        "rows, or the job's dataset settings (source, split, columns, validation), "
        "then resubmit the job.",
    }
