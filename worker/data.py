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
