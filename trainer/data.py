"""A job's dataset and validation set: loaded, every row checked (core.rows, the rules the API
applies before queuing), bad rows skipped or the job refused, and the rows measured in tokens."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from core.contract import ErrorCode
from core.rows import (
    FORMATS,
    MAX_ROW_BYTES_DEFAULT,
    SFT_FORMATS,
    SHAREGPT_ROLES,
    DataError,
    RowCheck,
    bounded_rows,
    check_file,
    detect_format,
    format_problem,
    is_conversational,
    is_sharegpt_turn,
    map_row,
    mapped_columns,
    read_rows,
)
from trainer.failures import JobFailure

if TYPE_CHECKING:
    import pyarrow as pa

# Parallel workers for row checks and token counts pay off from this many rows.
PARALLEL_FROM_ROWS = 20_000


def _num_proc(rows: int) -> int | None:
    return min(8, os.cpu_count() or 1) if rows >= PARALLEL_FROM_ROWS else None


def normalized(row: dict[str, Any], row_format: str, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """The format's columns (and those in `keep`), with ShareGPT turns ({"from": "gpt", "value":
    ...}) as chat messages ({"role", "content"})."""

    def turns(value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [
            {"role": SHAREGPT_ROLES[t["from"]], "content": t.get("value")}
            if is_sharegpt_turn(t)
            else {k: v for k, v in t.items() if k not in ("from", "value")}
            for t in value
        ]

    return {column: turns(row[column]) for column in columns_of(row_format, keep)}


def columns_of(row_format: str, keep: tuple[str, ...] = ()) -> list[str]:
    return list(dict.fromkeys((*FORMATS[row_format], *keep)))


def _may_hold_sharegpt_turns(dataset: Dataset, column: str) -> bool:
    """Whether the column's schema has a turn field named `from` (read once, not row by row)."""
    feature = dataset.features[column]
    inner = feature[0] if isinstance(feature, list) else getattr(feature, "feature", None)
    return isinstance(inner, dict) and "from" in inner


def _good_file_rows(
    path: str,
    mapping: dict[str, str],
    row_format: str,
    stamp: str,
    max_row_bytes: int,
    required: dict[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """The rows of a local file that pass the checks. `stamp` (size and mtime) is only there so
    that `datasets`' generator cache, keyed on these arguments, never serves a changed file."""
    for _where, row, _problem in read_rows(Path(path), max_row_bytes=max_row_bytes):
        if row is None:
            continue
        mapped = map_row(row, mapping)
        if format_problem(mapped, row_format, required) is None:
            yield normalized(mapped, row_format, tuple(required or ()))


def _refuse(check: RowCheck, what: str, max_bad_fraction: float) -> None:
    reason = check.unusable(max_bad_fraction, what)
    if reason:
        raise JobFailure(ErrorCode.dataset_invalid, reason)


def _load_file(
    path: Path,
    mapping: dict[str, str],
    what: str,
    max_bad_fraction: float,
    max_row_bytes: int,
    formats: tuple[str, ...],
    required: dict[str, str],
) -> tuple[Dataset, RowCheck]:
    try:
        check = check_file(path, mapping, max_row_bytes=max_row_bytes, formats=formats, required=required)
    except DataError as exc:
        raise JobFailure(ErrorCode.dataset_invalid, f"{what}: {exc}") from None
    _refuse(check, what, max_bad_fraction)
    assert check.row_format is not None
    stat = path.stat()
    dataset = Dataset.from_generator(
        _good_file_rows,
        gen_kwargs={
            "path": str(path),
            "mapping": mapping,
            "row_format": check.row_format,
            "stamp": f"{stat.st_size}-{stat.st_mtime_ns}",
            "max_row_bytes": max_row_bytes,
            "required": required,
        },
    )
    assert isinstance(dataset, Dataset)
    return dataset, check


def _load_other(source: str, split: str) -> Dataset:
    """A Hub dataset, or a folder saved by `datasets` (save_to_disk)."""
    path = Path(source)
    if not path.is_absolute():
        loaded = load_dataset(source, split=split)
        assert isinstance(loaded, Dataset)
        return loaded
    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise JobFailure(
            ErrorCode.dataset_invalid,
            f"{path} is a folder but not one saved by `datasets` (save_to_disk); "
            "give a .jsonl, .json or .parquet file, or such a folder",
        )
    folder = load_from_disk(str(path))
    if isinstance(folder, DatasetDict):
        if split not in folder:
            raise JobFailure(ErrorCode.dataset_invalid, f"{path} has no split {split!r}; it has {sorted(folder)}")
        return folder[split]
    return folder


def _problems(
    batch: pa.Table, indices: list[int], *, row_format: str, max_row_bytes: int, required: dict[str, str]
) -> dict[str, list[Any]]:
    """Each row's problem or None, from the batch as Arrow holds it: a row larger than
    `max_row_bytes` is never made a Python object (core.rows.bounded_rows)."""
    problems = [
        too_large if row is None else format_problem(row, row_format, required)
        for row, too_large in bounded_rows(batch, max_row_bytes)
    ]
    return {"problem": problems, "index": indices}


def _check_dataset(
    dataset: Dataset,
    mapping: dict[str, str],
    what: str,
    max_bad_fraction: float,
    max_row_bytes: int,
    formats: tuple[str, ...],
    required: dict[str, str],
) -> tuple[Dataset, RowCheck]:
    try:
        columns = mapped_columns(dataset.column_names, mapping)
    except DataError as exc:
        raise JobFailure(ErrorCode.dataset_invalid, f"{what}: {exc}") from None
    shadowed = [c for c in mapping if c in dataset.column_names and c not in mapping.values()]
    dataset = dataset.remove_columns(shadowed).rename_columns({theirs: ours for ours, theirs in mapping.items()})
    check = RowCheck(row_format=None, columns=columns, formats=formats)
    try:
        row_format = check.row_format = detect_format(columns, formats)
    except DataError as exc:
        raise JobFailure(ErrorCode.dataset_invalid, f"{what}: {exc}") from None
    absent = [name for name in required if name not in columns]
    if absent:
        raise JobFailure(
            ErrorCode.dataset_invalid, f"{what}: the rows have no column {absent[0]!r}, which {required[absent[0]]}"
        )
    keep = tuple(required)
    dataset = dataset.select_columns(columns_of(row_format, keep))
    found = (
        dataset.with_format("arrow")
        .map(
            _problems,
            batched=True,
            with_indices=True,
            remove_columns=dataset.column_names,
            fn_kwargs={"row_format": row_format, "max_row_bytes": max_row_bytes, "required": required},
            num_proc=_num_proc(len(dataset)),
            desc=f"Checking every row of {what}",
        )
        .with_format(None)
    )
    bad = set()
    for index, problem in zip(found["index"], found["problem"], strict=True):
        check.add(f"row {index}", problem)
        if problem:
            bad.add(index)
    _refuse(check, what, max_bad_fraction)
    if bad:
        dataset = dataset.select([i for i in range(len(dataset)) if i not in bad])
    check.conversational = is_conversational(dataset[0], row_format)
    if row_format == "unpaired_preference":
        check.desirable_rows = sum(1 for label in dataset["label"] if label is True)
        check.undesirable_rows = len(dataset) - check.desirable_rows
    if any(_may_hold_sharegpt_turns(dataset, c) for c in FORMATS[row_format] if c in dataset.column_names):
        dataset = dataset.map(
            normalized, fn_kwargs={"row_format": row_format, "keep": keep}, desc="Reading ShareGPT turns"
        )
    return dataset, check


def load_checked(
    source: str,
    split: str,
    mapping: Mapping[str, str],
    *,
    what: str,
    max_bad_fraction: float,
    max_row_bytes: int = MAX_ROW_BYTES_DEFAULT,
    formats: tuple[str, ...] = SFT_FORMATS,
    required: Mapping[str, str] | None = None,
) -> tuple[Dataset, RowCheck]:
    """The rows that pass the checks, under our column names and only the format's columns (and
    the `required` ones, which every row must have: a grader's), and the check itself. The format
    is the first of `formats` (the method's) the columns fit. Raises
    JobFailure(ErrorCode.dataset_invalid) with row numbers when the rows cannot train: no format
    fits, or more than `max_bad_fraction` of them are malformed (a row larger than `max_row_bytes`
    is malformed, and never tokenized)."""
    path = Path(source)
    needed = dict(required or {})
    if path.is_absolute() and path.is_file():
        return _load_file(path, dict(mapping), what, max_bad_fraction, max_row_bytes, formats, needed)
    return _check_dataset(
        _load_other(source, split), dict(mapping), what, max_bad_fraction, max_row_bytes, formats, needed
    )


# ---- tokens -----------------------------------------------------------------------------------


def _with_eos(text: str, eos: str | None) -> str:
    """TRL ends plain text and completions with the EOS token, so the counts do too."""
    return text + eos if eos and not text.endswith(eos) else text


def _count(
    batch: dict[str, list[Any]],
    *,
    row_format: str,
    tokenizer: Any,
    max_length: int,
    assistant_only: bool,
    completion_only: bool,
    template: str | None,
) -> dict[str, list[int]]:
    """Tokens per row, and tokens in the loss after truncation, as TRL's SFTTrainer makes them."""
    kwargs: dict[str, Any] = {"chat_template": template} if template else {}
    if row_format == "messages" or (row_format == "prompt_completion" and isinstance(batch["prompt"][0], list)):
        chats = (
            batch["messages"]
            if row_format == "messages"
            else [p + c for p, c in zip(batch["prompt"], batch["completion"], strict=True)]
        )
        out = tokenizer.apply_chat_template(
            chats, tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only, **kwargs
        )
        lengths = [len(ids) for ids in out["input_ids"]]
        # TRL masks with every mask that applies: the completion's (when completion_only_loss)
        # and the assistant turns' (when assistant_only_loss).
        starts = [0] * len(lengths)
        if row_format == "prompt_completion" and completion_only:
            prompts = tokenizer.apply_chat_template(
                batch["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True, **kwargs
            )["input_ids"]
            starts = [len(p) for p in prompts]
        if assistant_only:
            loss = [sum(mask[start:max_length]) for mask, start in zip(out["assistant_masks"], starts, strict=True)]
        else:
            loss = [max(min(n, max_length) - start, 0) for n, start in zip(lengths, starts, strict=True)]
    elif row_format == "prompt_completion":
        completions = [_with_eos(c, tokenizer.eos_token) for c in batch["completion"]]
        full = tokenizer([p + c for p, c in zip(batch["prompt"], completions, strict=True)])["input_ids"]
        lengths = [len(ids) for ids in full]
        if completion_only:
            prompts = tokenizer(batch["prompt"])["input_ids"]
            loss = [max(min(n, max_length) - len(p), 0) for n, p in zip(lengths, prompts, strict=True)]
        else:
            loss = [min(n, max_length) for n in lengths]
    else:
        texts = [_with_eos(t, tokenizer.eos_token) for t in batch["text"]]
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        loss = [min(n, max_length) for n in lengths]
    return {"tokens": lengths, "loss_tokens": loss}


def token_counts(
    dataset: Dataset,
    *,
    row_format: str,
    tokenizer: Any,
    max_length: int,
    assistant_only: bool,
    completion_only: bool,
    template: str | None,
    what: str,
) -> tuple[Any, Any]:
    """(tokens per row, loss tokens per row) as numpy arrays."""
    import numpy as np

    counted = dataset.map(
        _count,
        batched=True,
        remove_columns=dataset.column_names,
        fn_kwargs={
            "row_format": row_format,
            "tokenizer": tokenizer,
            "max_length": max_length,
            "assistant_only": assistant_only,
            "completion_only": completion_only,
            "template": template,
        },
        num_proc=_num_proc(len(dataset)),
        desc=f"Counting tokens of {what}",
    )
    return np.asarray(counted["tokens"], dtype=np.int64), np.asarray(counted["loss_tokens"], dtype=np.int64)
