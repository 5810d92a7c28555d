"""Dataset rows: their formats, the column mapping, and the checks every row must pass.

Pure Python (pyarrow only for Parquet), so the API can check an uploaded or local file before a
job is queued, and the trainer checks every row of any source, Hub datasets included, with the
same rules and the same messages."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Which columns a row format needs, in the order formats are recognised.
FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
COLUMN_NAMES = frozenset(name for needed in FORMATS.values() for name in needed)
ROLES = frozenset({"system", "user", "assistant", "tool"})
# ShareGPT-style turns ({"from": "human", "value": "..."}) are read as chat messages.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}
NEEDED = "a row needs 'messages' (chat), 'prompt' and 'completion', or 'text'"
PROBLEMS_KEPT = 20  # examples of bad rows kept in a report; the count covers all of them


class DataError(ValueError):
    """A dataset that cannot be used at all: unreadable, or no row format fits its columns."""


def mapped_columns(columns: list[str], mapping: Mapping[str, str]) -> list[str]:
    """The column names after `mapping` (our name -> the dataset's) renames them. A dataset
    column that already bears a mapped-to name is shadowed (dropped)."""
    missing = sorted(source for source in mapping.values() if source not in columns)
    if missing:
        raise DataError(f"dataset.columns maps to {missing}, but the rows have columns {sorted(columns)}")
    renamed = {source: ours for ours, source in mapping.items()}
    return [renamed.get(c, c) for c in columns if c in renamed or c not in mapping]


def map_row(row: dict[str, Any], mapping: Mapping[str, str]) -> dict[str, Any]:
    """One row under our column names (a source column the row lacks becomes None)."""
    if not mapping:
        return row
    sources = set(mapping.values())
    kept = {name: value for name, value in row.items() if name not in mapping and name not in sources}
    return kept | {ours: row.get(source) for ours, source in mapping.items()}


def detect_format(columns: list[str]) -> str:
    present = set(columns)
    for name, needed in FORMATS.items():
        if set(needed) <= present:
            return name
    raise DataError(
        f"the rows have columns {sorted(present)}; {NEEDED} (dataset.columns maps other names "
        'onto these, e.g. {"prompt": "question", "completion": "answer"})'
    )


def is_sharegpt_turn(turn: Mapping[str, Any]) -> bool:
    """A {"from", "value"} turn. Arrow gives every turn of a column the union of the keys seen,
    so a missing key reads as None: look at values, not keys."""
    return turn.get("role") is None and turn.get("from") is not None


def _turn_problem(turn: Any) -> str | None:
    if not isinstance(turn, dict):
        return "each message must be an object with 'role' and 'content'"
    if not is_sharegpt_turn(turn) and "role" in turn:
        role, content = turn["role"], turn.get("content")
        if not isinstance(role, str) or role not in ROLES:  # a list or object would not hash
            return f"unknown role {role!r} (expected one of {sorted(ROLES)})"
    elif is_sharegpt_turn(turn):
        role = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        content = turn.get("value")
        if role is None:
            return f"unknown speaker {turn['from']!r} (expected one of {sorted(SHAREGPT_ROLES)})"
    else:
        return "each message needs 'role' and 'content' (or ShareGPT's 'from' and 'value')"
    if not isinstance(content, str) and not (role == "assistant" and content is None and turn.get("tool_calls")):
        return f"{role} turn: 'content' must be a string"
    return None


def _conversation_problem(turns: Any, what: str, *, needs_assistant: bool) -> str | None:
    if not isinstance(turns, list) or not turns:
        return f"{what!r} must be a non-empty list of messages"
    for turn in turns:
        problem = _turn_problem(turn)
        if problem:
            return problem
    roles = [SHAREGPT_ROLES.get(turn["from"]) if is_sharegpt_turn(turn) else turn.get("role") for turn in turns]
    if needs_assistant and "assistant" not in roles:
        return "no assistant turn to learn from"
    return None


def row_problem(row: Mapping[str, Any], row_format: str) -> str | None:
    """What is wrong with one row, in words; None for a good row."""
    if row_format == "messages":
        return _conversation_problem(row.get("messages"), "messages", needs_assistant=True)
    if row_format == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
            return _conversation_problem(prompt, "prompt", needs_assistant=False) or _conversation_problem(
                completion, "completion", needs_assistant=True
            )
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str) or not value:
                return f"{name!r} must be a non-empty string (or, for chat, a list of messages)"
        return None
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        return "'text' must be a non-empty string"
    return None


def is_conversational(row: Mapping[str, Any], row_format: str) -> bool:
    return row_format == "messages" or (row_format == "prompt_completion" and isinstance(row.get("prompt"), list))


def loss_option_problem(
    row_format: str, conversational: bool, *, assistant_only_loss: bool, completion_only_loss: bool | None
) -> str | None:
    """Why the loss options do not suit these rows (TRL would refuse or silently ignore them)."""
    if assistant_only_loss and not conversational:
        return (
            f"hyperparameters.assistant_only_loss needs chat rows (messages, or prompt/completion as lists of "
            f"messages); these rows are {row_format!r}"
        )
    if completion_only_loss and row_format != "prompt_completion":
        hint = "; for chat rows use assistant_only_loss" if row_format == "messages" else ""
        return f"hyperparameters.completion_only_loss needs prompt/completion rows; these rows are {row_format!r}{hint}"
    return None


@dataclass
class RowCheck:
    """Every row looked at: how many, how many bad, and the first few problems with row numbers."""

    row_format: str | None
    columns: list[str]
    conversational: bool | None = None  # chat rows (messages, or prompt/completion as message lists)
    rows: int = 0
    bad_rows: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, where: str, problem: str | None) -> None:
        self.rows += 1
        if problem:
            self.bad_rows += 1
            if len(self.problems) < PROBLEMS_KEPT:
                self.problems.append(f"{where}: {problem}")

    @property
    def bad_fraction(self) -> float:
        return self.bad_rows / self.rows if self.rows else 0.0

    def refusal(self, max_bad_fraction: float, what: str = "the dataset") -> str | None:
        """Why the rows cannot be trained on, or None: no good row, or too many bad ones."""
        if self.rows == 0:
            return f"{what} has no rows"
        if self.bad_rows == 0:
            return None
        shown = "; ".join(self.problems[:5])
        more = f" (and {self.bad_rows - 5} more)" if self.bad_rows > 5 else ""
        if self.bad_rows == self.rows:
            return f"every row of {what} is malformed ({self.rows}): {shown}{more}"
        if self.bad_fraction > max_bad_fraction:
            return (
                f"{self.bad_rows} of {what}'s {self.rows} rows ({self.bad_fraction:.2%}) are malformed, more than "
                f"the {max_bad_fraction:.2%} this server skips (MAX_BAD_ROW_FRACTION): {shown}{more}"
            )
        return None

    def unusable(self, max_bad_fraction: float, what: str = "the dataset") -> str | None:
        """Why the rows cannot train, or None: no row format fits the columns, or `refusal`."""
        if self.row_format is None:
            try:
                detect_format(self.columns)
            except DataError as exc:
                return f"{what}: {exc}"
        return self.refusal(max_bad_fraction, what)

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "row_format": self.row_format,
            "bad_rows": self.bad_rows,
            "bad_row_examples": self.problems,
        }


# ---- files ------------------------------------------------------------------------------------


def file_kind(path: Path) -> str:
    """jsonl (JSON Lines, or a JSON array in a .json file), or parquet."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    raise DataError(f"{path.name}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def _json_array(path: Path) -> bool:
    with open(path, "rb") as handle:
        while chunk := handle.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped.startswith(b"[")
    return False


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """(where, row, problem) for each row of a JSON Lines / JSON / Parquet file: a row that cannot
    be read comes with its problem instead. `where` is "line N" (JSON Lines) or "row N"
    (counting from 0, as `datasets` indexes rows)."""
    kind = file_kind(path)
    if kind == "parquet":
        yield from _parquet_rows(path)
    elif _json_array(path):
        try:
            items = json.loads(path.read_bytes())
        except ValueError as exc:
            raise DataError(f"{path.name} is not valid JSON ({exc})") from None
        for index, item in enumerate(items):
            yield (
                (f"row {index}", item, None) if isinstance(item, dict) else (f"row {index}", None, "not a JSON object")
            )
    else:
        yield from _json_lines(path)


def _json_lines(path: Path) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"line {number}"
            try:
                row = json.loads(line)
            except ValueError as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                yield where, None, f"not valid JSON ({reason})"
                continue
            if isinstance(row, dict):
                yield where, row, None
            else:
                yield where, None, "not a JSON object (one row per line)"


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow.ArrowInvalid and friends
        raise DataError(f"{path.name} is not a readable Parquet file ({exc})") from None
    index = 0
    with parquet:
        for batch in parquet.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield f"row {index}", row, None
                index += 1


def parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as parquet:
            return list(parquet.schema_arrow.names)
    except Exception as exc:
        raise DataError(f"{path.name} is not a readable Parquet file ({exc})") from None


def check_file(path: Path, mapping: Mapping[str, str] | None = None) -> RowCheck:
    """Read every row of a local file and check it. The format comes from the columns of the
    first readable row (JSON) or the schema (Parquet), after the mapping; with no format that
    fits, row_format is None and nothing is checked beyond readability."""
    mapping = mapping or {}
    check: RowCheck | None = None
    if file_kind(path) == "parquet":
        columns = mapped_columns(parquet_columns(path), mapping)
        check = RowCheck(row_format=_format_or_none(columns), columns=columns)
    pending: list[tuple[str, str]] = []  # unreadable rows before the first readable one
    for where, row, problem in read_rows(path):
        if row is None:
            if check is None:
                pending.append((where, problem or "unreadable"))
            else:
                check.add(where, problem)
            continue
        if check is None:
            columns = mapped_columns(list(row), mapping)
            check = RowCheck(row_format=_format_or_none(columns), columns=columns)
            for earlier in pending:
                check.add(*earlier)
        if check.row_format is None:
            check.add(where, None)
            continue
        mapped = map_row(row, mapping)
        missing = [c for c in FORMATS[check.row_format] if c not in mapped]
        problem = f"missing {missing}" if missing else row_problem(mapped, check.row_format)
        if problem is None and check.conversational is None:
            check.conversational = is_conversational(mapped, check.row_format)
        check.add(where, problem)
    if check is None:
        check = RowCheck(row_format=None, columns=[])
        for earlier in pending:
            check.add(*earlier)
    return check


def _format_or_none(columns: list[str]) -> str | None:
    try:
        return detect_format(columns)
    except DataError:
        return None
