"""Loading a job's dataset and bringing its rows into one of the shapes TRL's SFTTrainer takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from worker.failures import JobFailure

# Which columns a row format needs, in the order they are recognised.
FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
ROLES = {"system", "user", "assistant", "tool"}
# Rows checked for shape before training; the rest are checked by TRL as it tokenizes.
CHECK_ROWS = 1000


def load_rows(source: str, split: str) -> Dataset:
    path = Path(source)
    if path.is_absolute():
        return _load_local(path, split)
    loaded = load_dataset(source, split=split)
    assert isinstance(loaded, Dataset)
    return loaded


def _load_local(path: Path, split: str) -> Dataset:
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise JobFailure(
                "dataset_invalid",
                f"{path} is a folder but not one saved by `datasets` (save_to_disk); give a .jsonl, .json "
                "or .parquet file, or such a folder",
            )
        loaded = load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise JobFailure("dataset_invalid", f"{path} has no split {split!r}; it has {sorted(loaded)}")
            return loaded[split]
        return loaded
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise JobFailure(
            "dataset_invalid", f"{path.name}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet"
        )
    loaded = load_dataset(builder, data_files=str(path), split="train")
    assert isinstance(loaded, Dataset)
    return loaded


def detect_format(dataset: Dataset) -> str:
    columns = set(dataset.column_names)
    for name, needed in FORMATS.items():
        if set(needed) <= columns:
            return name
    raise JobFailure(
        "dataset_invalid",
        f"the dataset's rows have columns {sorted(columns)}; a row needs 'messages' (chat), "
        "'prompt' and 'completion', or 'text'",
    )


def _check_row(row: dict[str, Any], row_format: str) -> str | None:
    if row_format == "messages":
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty list"
        for turn in messages:
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                return "each message needs 'role' and 'content'"
            if turn["role"] not in ROLES:
                return f"unknown role {turn['role']!r} (expected one of {sorted(ROLES)})"
        if not any(turn["role"] == "assistant" for turn in messages):
            return "no assistant turn to learn from"
        return None
    for column in FORMATS[row_format]:
        value = row[column]
        if not isinstance(value, (str, list)) or not value:
            return f"{column!r} must be a non-empty string"
    return None


def prepare_dataset(dataset: Dataset, *, has_chat_template: bool) -> tuple[Dataset, str]:
    """Keep only the columns TRL needs, after checking the first rows' shape."""
    if len(dataset) == 0:
        raise JobFailure("dataset_invalid", "the dataset has no rows")
    row_format = detect_format(dataset)
    problems = []
    for index, row in enumerate(dataset.select(range(min(CHECK_ROWS, len(dataset))))):
        problem = _check_row(row, row_format)
        if problem:
            problems.append(f"row {index}: {problem}")
    if problems:
        shown = "; ".join(problems[:5])
        raise JobFailure("dataset_invalid", f"{len(problems)} malformed row(s) among the first checked: {shown}")
    is_chat = row_format == "messages" or (
        row_format == "prompt_completion" and isinstance(dataset[0]["prompt"], list)
    )
    if is_chat and not has_chat_template:
        raise JobFailure(
            "chat_template_missing",
            "the dataset holds chat messages but the model's tokenizer has no chat template; set "
            "chat_template_from to a tokenizer that has one (e.g. the model's instruct version)",
        )
    keep = set(FORMATS[row_format])
    dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
    return dataset, row_format


def _token_counts(batch: dict[str, list[Any]], *, row_format: str, tokenizer: Any) -> dict[str, list[int]]:
    if row_format == "messages":
        ids = tokenizer.apply_chat_template(batch["messages"], tokenize=True, return_dict=False)
    elif row_format == "prompt_completion" and isinstance(batch["prompt"][0], list):
        conversations = [p + c for p, c in zip(batch["prompt"], batch["completion"], strict=True)]
        ids = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=False)
    elif row_format == "prompt_completion":
        ids = tokenizer([p + c for p, c in zip(batch["prompt"], batch["completion"], strict=True)])["input_ids"]
    else:
        ids = tokenizer(batch["text"])["input_ids"]
    return {"tokens": [len(row) for row in ids]}


def data_report(dataset: Dataset, *, row_format: str, tokenizer: Any, max_seq_length: int,
                micro_batch: int, grad_accum: int, epochs: float, max_steps: int | None) -> dict[str, Any]:
    """Rows, tokens per row, what max_seq_length cuts, and the optimizer steps and tokens that
    follow: computed on the CPU before the model is loaded, so a surprise costs no GPU time."""
    import math
    import os

    import numpy as np

    counted = dataset.map(
        _token_counts, batched=True, remove_columns=dataset.column_names,
        fn_kwargs={"row_format": row_format, "tokenizer": tokenizer},
        num_proc=min(8, os.cpu_count() or 1) if len(dataset) >= 20_000 else None,
        desc="Counting tokens",
    )
    lengths = np.asarray(counted["tokens"], dtype=np.int64)
    trained = np.minimum(lengths, max_seq_length)
    steps_per_epoch = max(math.ceil(math.ceil(len(dataset) / micro_batch) / grad_accum), 1)
    steps = max_steps or math.ceil(steps_per_epoch * epochs)
    epochs_run = steps / steps_per_epoch
    return {
        "rows": int(len(lengths)),
        "row_format": row_format,
        "tokens_per_row": {"min": int(lengths.min()), "median": int(np.median(lengths)),
                           "p95": int(np.percentile(lengths, 95)), "max": int(lengths.max())},
        "rows_truncated": int((lengths > max_seq_length).sum()),
        "tokens_cut_by_truncation": int((lengths - trained).sum()),
        "tokens_per_epoch": int(trained.sum()),
        "optimizer_steps": int(steps),
        "tokens_to_train": int(trained.sum() * epochs_run),
    }
