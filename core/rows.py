"""Dataset rows: their formats, the column mapping, and the checks every row must pass.

Pure Python (pyarrow only for Parquet), so the API can check an uploaded or local file before a
job is queued, and the trainer checks every row of any source, Hub datasets included, with the
same rules and the same messages.

Files are read as streams, a row at a time, and no row is read whole when it is larger than
MAX_ROW_BYTES: such a row is a malformed row, named with its size, so that neither the API nor the
trainer ever holds (or tokenizes) one without bound."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

# Which columns a row format needs. A method trains on some of them (core/methods.py), recognised
# in its order; SFT's are the first three.
FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    # Preference pairs (DPO, ORPO, KTO): TRL's explicit and implicit prompt, and OpenAI's DPO JSONL.
    "preference": ("prompt", "chosen", "rejected"),
    "openai_preference": ("input", "preferred_output", "non_preferred_output"),
    "implicit_preference": ("chosen", "rejected"),
    # KTO's unpaired rows: a completion and whether it is desirable.
    "unpaired_preference": ("prompt", "completion", "label"),
    # Prompts to generate from (GRPO), plain or chat; OpenAI's reinforcement rows are `messages`.
    "prompt_only": ("prompt",),
    "prompt_messages": ("messages",),
}
SFT_FORMATS = ("messages", "prompt_completion", "text")
# The formats an upload (which names no method) is recognised as, in this order.
ALL_FORMATS = (
    "messages",
    "unpaired_preference",
    "preference",
    "openai_preference",
    "implicit_preference",
    "prompt_completion",
    "text",
    "prompt_only",
)
PAIRED_FORMATS = frozenset({"preference", "openai_preference", "implicit_preference"})
COLUMN_NAMES = frozenset(name for needed in FORMATS.values() for name in needed)
# A pair whose two answers are the same: a malformed row (it teaches nothing), counted apart too.
IDENTICAL_PAIR = "are the same, so the pair teaches nothing"
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
# The default of MAX_ROW_BYTES, the most a row may take: twice what the longest max_seq_length the
# spec allows (1,048,576 tokens) takes in English text, so no row that could train whole is
# refused, while a row that would cost the trainer gigabytes to tokenize is (a 50 MB row took
# 13.7 GB). A longer row would be cut to max_seq_length tokens anyway.
MAX_ROW_BYTES_DEFAULT = 8 * 1024**2
# Files are read this much at a time; rows are converted to Python objects this much at a time.
READ_CHUNK_BYTES = 1024**2
ROWS_BUDGET_BYTES = 64 * 1024**2


def row_too_large(size: int, limit: int) -> str:
    return (
        f"the row is {size:,} bytes, more than the {limit:,} a row may have (MAX_ROW_BYTES); max_seq_length "
        "cuts a row that long to its first tokens anyway: split long documents into several rows"
    )


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


# What a row needs, in words, for a method's formats.
NEEDED_BY_FORMATS = {
    SFT_FORMATS: NEEDED,
    ("preference", "openai_preference", "implicit_preference"): "a preference row needs 'prompt', 'chosen' and "
    "'rejected' ('chosen' and 'rejected' alone when they are conversations), or OpenAI's 'input', "
    "'preferred_output' and 'non_preferred_output'",
    ("unpaired_preference", "preference", "openai_preference", "implicit_preference"): "a KTO row needs 'prompt', "
    "'completion' and a boolean 'label', or a preference pair ('prompt', 'chosen', 'rejected'), which counts as "
    "two rows",
    ("prompt_only", "prompt_messages"): "a GRPO row needs a 'prompt' (text or messages), or OpenAI's 'messages' "
    "ending with the user's turn",
}


def detect_format(columns: list[str], formats: tuple[str, ...] = SFT_FORMATS) -> str:
    present = set(columns)
    for name in formats:
        if set(FORMATS[name]) <= present:
            return name
    needed = NEEDED_BY_FORMATS.get(formats, NEEDED)
    example = (
        '{"prompt": "question", "completion": "answer"}'
        if "prompt_completion" in formats or "prompt_only" in formats
        else '{"chosen": "better", "rejected": "worse"}'
    )
    raise DataError(
        f"the rows have columns {sorted(present)}; {needed} (dataset.columns maps other names onto these, "
        f"e.g. {example})"
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


def _prompt_or_answer_problem(value: Any, what: str, *, chat: bool, answer: bool) -> str | None:
    """A prompt or answer of a preference or unpaired row: text, or (for chat rows) messages."""
    if chat:
        return _conversation_problem(value, what, needs_assistant=answer)
    if not isinstance(value, str) or not value:
        return f"{what!r} must be a non-empty string (or, for chat, a list of messages)"
    return None


def _pair_problem(row: Mapping[str, Any], row_format: str) -> str | None:
    if row_format == "openai_preference":
        names = ("preferred_output", "non_preferred_output")
        given = row.get("input")
        if not isinstance(given, Mapping):
            return "'input' must be an object holding 'messages' (OpenAI's preference format)"
        problem = _conversation_problem(given.get("messages"), "input.messages", needs_assistant=False)
        chat = True
    else:
        names = ("chosen", "rejected")
        chat = isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list)
        problem = None
        prompt = row.get("prompt")
        if row_format == "preference" and chat and isinstance(prompt, str):
            # A text prompt beside whole conversations repeats their opening (some Hub datasets do
            # this): TRL takes the prompt from the conversations instead, as without a prompt.
            row_format = "implicit_preference"
        elif row_format == "preference":
            chat = chat or isinstance(prompt, list)
            problem = _prompt_or_answer_problem(prompt, "prompt", chat=chat, answer=False)
    for name in names:
        problem = problem or _prompt_or_answer_problem(row.get(name), name, chat=chat, answer=True)
    if problem:
        return problem
    first, second = row.get(names[0]), row.get(names[1])
    if first == second:
        return f"{names[0]!r} and {names[1]!r} {IDENTICAL_PAIR}"
    if row_format == "implicit_preference":
        if not chat:
            return "without a 'prompt', 'chosen' and 'rejected' must be conversations (lists of messages)"
        if not first or not second or first[0] != second[0] or len(first) < 2 or len(second) < 2:
            return "'chosen' and 'rejected' share no opening turn to take as the prompt; add a 'prompt' column"
    return None


def _generation_prompt_problem(turns: Any, what: str) -> str | None:
    if isinstance(turns, str):
        return None if turns.strip() else f"{what!r} must be a non-empty string or a list of messages"
    problem = _conversation_problem(turns, what, needs_assistant=False)
    if problem is None and (turns[-1].get("role") == "assistant" or turns[-1].get("from") in ("gpt", "assistant")):
        return f"{what!r} ends with an assistant turn; the model generates that turn, so end with the user's"
    return problem


def row_problem(row: Mapping[str, Any], row_format: str) -> str | None:
    """What is wrong with one row, in words; None for a good row."""
    if row_format in PAIRED_FORMATS:
        return _pair_problem(row, row_format)
    if row_format == "unpaired_preference":
        prompt, completion = row.get("prompt"), row.get("completion")
        chat = isinstance(prompt, list) or isinstance(completion, list)
        problem = _prompt_or_answer_problem(prompt, "prompt", chat=chat, answer=False)
        problem = problem or _prompt_or_answer_problem(completion, "completion", chat=chat, answer=True)
        if problem is None and not isinstance(row.get("label"), bool):
            return f"'label' must be true (a desirable completion) or false, not {echo_value(row.get('label'))}"
        return problem
    if row_format == "prompt_only":
        return _generation_prompt_problem(row.get("prompt"), "prompt")
    if row_format == "prompt_messages":
        return _generation_prompt_problem(row.get("messages"), "messages")
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


def echo_value(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 40 else f"{shown[:40]}..."


def is_conversational(row: Mapping[str, Any], row_format: str) -> bool:
    if row_format in ("messages", "prompt_messages", "openai_preference", "implicit_preference"):
        return True
    if row_format in ("preference", "unpaired_preference"):
        return any(isinstance(row.get(column), list) for column in FORMATS[row_format])
    return row_format in ("prompt_completion", "prompt_only") and isinstance(row.get("prompt"), list)


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
    formats: tuple[str, ...] = SFT_FORMATS  # the formats looked for (the job's method's)
    identical_pairs: int = 0  # pairs whose two answers are the same (among bad_rows)
    desirable_rows: int = 0  # unpaired rows labelled true (good rows only)
    undesirable_rows: int = 0

    def add(self, where: str, problem: str | None, row: Mapping[str, Any] | None = None) -> None:
        self.rows += 1
        if problem:
            self.bad_rows += 1
            if IDENTICAL_PAIR in problem:
                self.identical_pairs += 1
            if len(self.problems) < PROBLEMS_KEPT:
                self.problems.append(f"{where}: {problem}")
        elif row is not None and self.row_format == "unpaired_preference":
            if row.get("label") is True:
                self.desirable_rows += 1
            else:
                self.undesirable_rows += 1

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
            if not self.columns and self.bad_rows:  # not one row could be read: say why, row by row
                return self.refusal(max_bad_fraction, what)
            try:
                detect_format(self.columns, self.formats)
            except DataError as exc:
                return f"{what}: {exc}"
        return self.refusal(max_bad_fraction, what)

    def summary(self) -> dict[str, Any]:
        found: dict[str, Any] = {
            "rows": self.rows,
            "row_format": self.row_format,
            "bad_rows": self.bad_rows,
            "bad_row_examples": self.problems,
        }
        if self.row_format in PAIRED_FORMATS:
            found.update(pairs=self.rows - self.bad_rows, identical_pairs=self.identical_pairs)
        if self.row_format == "unpaired_preference":
            found.update(desirable_rows=self.desirable_rows, undesirable_rows=self.undesirable_rows)
        return found


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


def read_rows(
    path: Path, *, max_row_bytes: int = MAX_ROW_BYTES_DEFAULT
) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """(where, row, problem) for each row of a JSON Lines / JSON / Parquet file: a row that cannot
    be read, or is larger than `max_row_bytes`, comes with its problem instead. `where` is "line N"
    (JSON Lines) or "row N" (counting from 0, as `datasets` indexes rows)."""
    kind = file_kind(path)
    if kind == "parquet":
        yield from _parquet_rows(path, max_row_bytes)
    elif _json_array(path):
        try:
            yield from _json_array_rows(path, max_row_bytes)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path.name} is not valid JSON (it is not UTF-8 text: {exc.reason})") from None
    else:
        yield from _json_lines(path, max_row_bytes)


def _json_lines(path: Path, max_row_bytes: int) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    with open(path, "rb") as handle:
        number = 0
        while line := handle.readline(max_row_bytes + 1):
            number += 1
            where = f"line {number}"
            if len(line) > max_row_bytes and not line.endswith(b"\n"):
                yield where, None, row_too_large(len(line) + _skip_line(handle), max_row_bytes)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                yield where, None, f"not valid JSON ({reason})"
                continue
            except RecursionError:
                yield where, None, NESTED_TOO_DEEPLY
                continue
            if isinstance(row, dict):
                yield where, row, None
            else:
                yield where, None, "not a JSON object (one row per line)"


def _skip_line(handle: IO[bytes]) -> int:
    """Read on to the end of the line, a chunk at a time; the bytes before its newline."""
    skipped = 0
    while chunk := handle.read(READ_CHUNK_BYTES):
        newline = chunk.find(b"\n")
        if newline >= 0:
            handle.seek(newline + 1 - len(chunk), 1)
            return skipped + newline
        skipped += len(chunk)
    return skipped


# What ends or nests a JSON value outside strings; what ends a string or escapes in one; what ends
# a number or literal.
_STRUCTURE = re.compile(r'["\[\]{}]')
_IN_STRING = re.compile(r'["\\]')
_SCALAR_END = re.compile(r"[,\]\s]")


class _Window:
    """A JSON text read a chunk at a time: `buf` holds it from `start` on (what is still needed),
    and positions in error messages are the whole text's."""

    def __init__(self, handle: IO[str], name: str) -> None:
        self.handle, self.name = handle, name
        self.buf, self.start = "", 0
        self.offset = self.lines = 0  # characters and newlines before buf
        self.line_start = 0  # where the line holding buf[0] starts, as an offset

    def more(self) -> int:
        """Read another chunk, dropping what comes before `start`; the characters dropped (every
        position into buf moves back by as many), or -1 at the end of the text."""
        chunk = self.handle.read(READ_CHUNK_BYTES)
        if not chunk:
            return -1
        dropped, self.buf = self.buf[: self.start], self.buf[self.start :] + chunk
        newline = dropped.rfind("\n")
        if newline >= 0:
            self.lines += dropped.count("\n")
            self.line_start = self.offset + newline + 1
        self.offset += len(dropped)
        moved, self.start = self.start, 0
        return moved

    def next_char(self, i: int) -> int | None:
        """The position of the first character at or after i that is not white space, or None."""
        while True:
            while i < len(self.buf):
                if not self.buf[i].isspace():
                    return i
                i += 1
            self.start = i
            moved = self.more()
            if moved < 0:
                return None
            i -= moved

    def error(self, what: str, i: int) -> DataError:
        line = self.lines + self.buf.count("\n", 0, i) + 1
        newline = self.buf.rfind("\n", 0, i)
        column = i - newline if newline >= 0 else self.offset + i - self.line_start + 1
        return DataError(
            f"{self.name} is not valid JSON ({what}: line {line} column {column} (char {self.offset + i}))"
        )


def _json_array_rows(path: Path, max_row_bytes: int) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """The elements of a JSON array, each read and parsed on its own: none larger than
    `max_row_bytes` is ever held whole (its extent is found by scanning strings and brackets)."""
    with open(path, encoding="utf-8") as handle:
        text = _Window(handle, path.name)
        i = text.next_char(0)
        assert i is not None and text.buf[i] == "["  # _json_array said so
        i = text.next_char(i + 1)
        index = 0
        while i is not None and text.buf[i] != "]":
            text.start = i
            where = f"row {index}"
            index += 1
            decoded = _decoded(text, i)
            if decoded is not None:  # the common case: whole in the buffer, and valid
                item, end = decoded
                yield where, *_array_item(text.buf[i:end], max_row_bytes, item)
                i = text.next_char(end)
            elif (end_size := _element_end(text, i, max_row_bytes))[0] is None:
                size = end_size[1]
                yield where, None, row_too_large(size, max_row_bytes)
                i = text.next_char(text.start)
            else:
                end = end_size[0]
                yield where, *_array_item(text.buf[text.start : end], max_row_bytes)
                i = text.next_char(end)
            if i is None:
                raise text.error("Expecting ',' delimiter", len(text.buf))
            if text.buf[i] == ",":
                i = text.next_char(i + 1)
                if i is None or text.buf[i] == "]":
                    raise text.error("Expecting value", len(text.buf) if i is None else i)
            elif text.buf[i] != "]":
                raise text.error("Expecting ',' delimiter", i)
        if i is None:
            raise text.error("Expecting value", len(text.buf))
        after = text.next_char(i + 1)
        if after is not None:
            raise text.error("Extra data", after)


_DECODER = json.JSONDecoder()
NESTED_TOO_DEEPLY = "not valid JSON (nested too deeply)"


def _decoded(text: _Window, i: int) -> tuple[Any, int] | None:
    """The value starting at buf[i] and its end, when it is whole in the buffer and valid JSON
    (json's own parser, in C); else None, and _element_end finds out what it is."""
    try:
        item, end = _DECODER.raw_decode(text.buf, i)
    except (ValueError, RecursionError):
        return None
    if end == len(text.buf) and text.buf[i] not in '{["':  # a number the next chunk may go on with
        return None
    return item, end


def _array_item(item_text: str, max_row_bytes: int, item: Any = None) -> tuple[dict[str, Any] | None, str | None]:
    """An element's row, or its problem; `item` is the element already parsed, if it was."""
    if len(item_text) * 4 > max_row_bytes:  # UTF-8 takes at most 4 bytes a character
        size = len(item_text.encode())
        if size > max_row_bytes:
            return None, row_too_large(size, max_row_bytes)
    if item is None:
        try:
            item = json.loads(item_text)
        except json.JSONDecodeError as exc:
            return None, f"not valid JSON ({exc.msg})"
        except RecursionError:
            return None, NESTED_TOO_DEEPLY
    return (item, None) if isinstance(item, dict) else (None, "not a JSON object")


def _element_end(text: _Window, i: int, max_row_bytes: int) -> tuple[int | None, int]:
    """Where the value starting at buf[i] ends, by its strings and brackets (json.loads says later
    whether it is valid): (its end, 0); or, when it is more than `max_row_bytes` characters, (None,
    its size in bytes), having read past it without keeping it (`text.start` is just after it)."""
    first = text.buf[i]
    depth = 1 if first in "[{" else 0
    in_string = first == '"'
    scalar = depth == 0 and not in_string
    j, skipped = (i if scalar else i + 1), -1  # skipped: bytes of an oversized value read past
    while True:
        pattern = _SCALAR_END if scalar else _IN_STRING if in_string else _STRUCTURE
        found = pattern.search(text.buf, j)
        if found is None or (found.group() == "\\" and found.end() == len(text.buf)):
            j = len(text.buf) if found is None else found.start()
            if skipped < 0 and j - text.start > max_row_bytes:
                skipped = 0
            if skipped >= 0:  # oversized: count what was read, keep none of it
                skipped += len(text.buf[text.start : j].encode())
                text.start = j
            moved = text.more()
            if moved < 0 and scalar:  # a number or literal may end the text
                end = len(text.buf)
                break
            if moved < 0:
                raise text.error("the file ends inside a row", text.start if skipped < 0 else len(text.buf))
            j -= moved
            continue
        if scalar:
            end = found.start()
            break
        j = found.end()
        char = found.group()
        if in_string:
            if char == "\\":
                j += 1  # the escaped character
                continue
            in_string = False
            if depth == 0:
                end = j
                break
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                end = j
                break
    if skipped < 0:
        return end, 0
    skipped += len(text.buf[text.start : end].encode())
    text.start = end
    return None, skipped


def _parquet_rows(path: Path, max_row_bytes: int) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow.ArrowInvalid and friends
        raise DataError(f"{path.name} is not a readable Parquet file ({exc})") from None
    index = 0
    with parquet:
        for batch in parquet.iter_batches(batch_size=4096):
            for row, problem in bounded_rows(batch, max_row_bytes):
                yield f"row {index}", row, problem
                index += 1


def arrow_row_sizes(table: pa.Table | pa.RecordBatch) -> list[int]:
    """Each row's size in bytes as Arrow holds it (text and binary by their length, numbers by
    their width), computed column by column without making a Python object of any row."""
    import pyarrow as pa

    totals: pa.Array = pa.array([0] * table.num_rows, pa.int64())
    for column in table.columns:
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        sizes = pa.concat_arrays([_value_sizes(chunk) for chunk in chunks]) if chunks else totals
        totals = _add(totals, sizes)
    return [int(size) for size in totals.to_pylist()]


def _add(left: pa.Array, right: pa.Array) -> pa.Array:
    import pyarrow.compute as pc

    return pc.add(left, right)


def _value_sizes(array: pa.Array) -> pa.Array:
    """The bytes of each value of an Arrow array (nested lists and structs summed), as int64."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or (pa.types.is_large_binary(kind))
    ):
        return pc.fill_null(pc.binary_length(array), 0).cast(pa.int64())
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_map(kind):
        # A value's size is the sum of its items': differences of the items' running total, taken
        # at the list's offsets (which also hold for a slice of the array).
        items = _value_sizes(array.values)
        running = pa.concat_arrays([pa.array([0], pa.int64()), pc.cumulative_sum(items)])
        offsets = array.offsets.cast(pa.int64())
        ends, starts = pc.take(running, offsets[1:]), pc.take(running, offsets[:-1])
        return pc.subtract(ends, starts)
    if pa.types.is_struct(kind):
        fields = array.flatten()
        totals = pa.array([0] * len(array), pa.int64())
        for part in fields:
            totals = pc.add(totals, _value_sizes(part))
        return totals
    width = kind.bit_width // 8 if hasattr(kind, "bit_width") else 8
    return pa.array([max(width, 1)] * len(array), pa.int64())


def bounded_rows(
    table: pa.Table | pa.RecordBatch, max_row_bytes: int
) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """(row, None) for each row of an Arrow table, or (None, why) for a row larger than
    `max_row_bytes`, which is never made a Python object; the others are made so a few MB at a
    time, not a whole batch at once."""
    sizes = arrow_row_sizes(table)
    first, held = 0, 0
    for index, size in enumerate([*sizes, None]):
        if size is not None and size <= max_row_bytes and held + size <= ROWS_BUDGET_BYTES:
            held += size
            continue
        if index > first:
            yield from ((row, None) for row in table.slice(first, index - first).to_pylist())
        if size is None:
            return
        if size > max_row_bytes:
            yield None, row_too_large(size, max_row_bytes)
            first, held = index + 1, 0
        else:
            first, held = index, size


def parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as parquet:
            return list(parquet.schema_arrow.names)
    except Exception as exc:
        raise DataError(f"{path.name} is not a readable Parquet file ({exc})") from None


def check_file(
    path: Path,
    mapping: Mapping[str, str] | None = None,
    *,
    max_row_bytes: int = MAX_ROW_BYTES_DEFAULT,
    formats: tuple[str, ...] = SFT_FORMATS,
    required: Mapping[str, str] | None = None,
) -> RowCheck:
    """Read every row of a local file and check it. The format is the first of `formats` that the
    columns of the first readable row (JSON) or the schema (Parquet) fit, after the mapping; with
    no format that fits, row_format is None and nothing is checked beyond readability. A row
    larger than `max_row_bytes` is a malformed row, and so is one without a `required` column
    (name -> why it is needed, e.g. a grader's {{item.answer}})."""
    mapping = mapping or {}
    check: RowCheck | None = None
    if file_kind(path) == "parquet":
        columns = mapped_columns(parquet_columns(path), mapping)
        check = RowCheck(row_format=_format_or_none(columns, formats), columns=columns, formats=formats)
    pending: list[tuple[str, str]] = []  # unreadable rows before the first readable one
    for where, row, problem in read_rows(path, max_row_bytes=max_row_bytes):
        if row is None:
            if check is None:
                pending.append((where, problem or "unreadable"))
            else:
                check.add(where, problem)
            continue
        if check is None:
            columns = mapped_columns(list(row), mapping)
            check = RowCheck(row_format=_format_or_none(columns, formats), columns=columns, formats=formats)
            for earlier in pending:
                check.add(*earlier)
        if check.row_format is None:
            check.add(where, None)
            continue
        mapped = map_row(row, mapping)
        problem = format_problem(mapped, check.row_format, required)
        if problem is None and check.conversational is None:
            check.conversational = is_conversational(mapped, check.row_format)
        check.add(where, problem, mapped)
    if check is None:
        check = RowCheck(row_format=None, columns=[], formats=formats)
        for earlier in pending:
            check.add(*earlier)
    return check


def format_problem(row: Mapping[str, Any], row_format: str, required: Mapping[str, str] | None = None) -> str | None:
    """A row's problem: a column its format needs, or one `required` names, missing; or row_problem."""
    missing = [c for c in FORMATS[row_format] if c not in row]
    if missing:
        return f"missing {missing}"
    absent = [name for name in required or {} if row.get(name) is None]
    if absent:
        return f"missing {absent[0]!r}, which {(required or {})[absent[0]]}"
    return row_problem(row, row_format)


def _format_or_none(columns: list[str], formats: tuple[str, ...] = SFT_FORMATS) -> str | None:
    try:
        return detect_format(columns, formats)
    except DataError:
        return None
