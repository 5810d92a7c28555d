"""Unit tests for core.rows: row formats, the column mapping, the per-row checks with their exact
words, RowCheck's refusal, and check_file over JSON Lines, JSON arrays and Parquet.

Pure Python and fast: no server, no Redis, no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.parquet
import pytest

from core.rows import (
    PROBLEMS_KEPT,
    DataError,
    RowCheck,
    check_file,
    detect_format,
    file_kind,
    is_conversational,
    loss_option_problem,
    map_row,
    mapped_columns,
    read_rows,
    row_problem,
)

ROLES_LISTED = "['assistant', 'system', 'tool', 'user']"
SPEAKERS_LISTED = "['assistant', 'gpt', 'human', 'system', 'tool', 'user']"
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
GOOD_TEXT = {"text": "some text"}
BAD_TEXT = {"text": ""}


def write_lines(path: Path, lines: list[str]) -> Path:
    """A JSON Lines file written by hand, so that broken and blank lines can be placed exactly."""
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def messages_problem(*turns: Any) -> str | None:
    return row_problem({"messages": list(turns)}, "messages")


# ---- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["messages"], "messages"),
        (["prompt", "completion"], "prompt_completion"),
        (["text"], "text"),
        (["id", "completion", "prompt", "source"], "prompt_completion"),
        (["text", "messages"], "messages"),  # formats are tried in order: messages first
        (["text", "prompt", "completion"], "prompt_completion"),
        (["prompt", "text"], "text"),  # a prompt without a completion is not prompt/completion
    ],
)
def test_detect_format(columns: list[str], expected: str) -> None:
    assert detect_format(columns) == expected


def test_detect_format_names_the_columns_and_what_a_row_needs() -> None:
    with pytest.raises(DataError) as caught:
        detect_format(["question", "answer", "id"])
    assert str(caught.value) == (
        "the rows have columns ['answer', 'id', 'question']; a row needs 'messages' (chat), 'prompt' and "
        "'completion', or 'text' (dataset.columns maps other names onto these, e.g. "
        '{"prompt": "question", "completion": "answer"})'
    )


@pytest.mark.parametrize(
    ("row", "row_format", "expected"),
    [
        ({"messages": CHAT}, "messages", True),
        ({"prompt": "Hi", "completion": "Hello"}, "prompt_completion", False),
        ({"prompt": [user("Hi")], "completion": [assistant("Hello")]}, "prompt_completion", True),
        (GOOD_TEXT, "text", False),
    ],
)
def test_is_conversational(row: dict[str, Any], row_format: str, expected: bool) -> None:
    assert row_problem(row, row_format) is None
    assert is_conversational(row, row_format) is expected


# ---- the column mapping -------------------------------------------------------------------------


def test_mapping_renames_columns_and_rows() -> None:
    mapping = {"prompt": "question", "completion": "answer"}
    assert mapped_columns(["id", "question", "answer"], mapping) == ["id", "prompt", "completion"]
    row = {"id": 7, "question": "2+2?", "answer": "4"}
    assert map_row(row, mapping) == {"id": 7, "prompt": "2+2?", "completion": "4"}
    assert detect_format(mapped_columns(list(row), mapping)) == "prompt_completion"


def test_no_mapping_leaves_columns_and_rows_alone() -> None:
    row = {"text": "a", "id": 1}
    assert mapped_columns(["text", "id"], {}) == ["text", "id"]
    assert map_row(row, {}) == row


def test_a_column_already_bearing_a_mapped_to_name_is_shadowed() -> None:
    mapping = {"text": "body"}
    assert mapped_columns(["text", "body", "id"], mapping) == ["text", "id"]
    assert map_row({"text": "old", "body": "new", "id": 1}, mapping) == {"id": 1, "text": "new"}


def test_a_swap_mapping_exchanges_two_columns() -> None:
    mapping = {"prompt": "completion", "completion": "prompt"}
    assert mapped_columns(["prompt", "completion"], mapping) == ["completion", "prompt"]
    assert map_row({"prompt": "A", "completion": "Q"}, mapping) == {"prompt": "Q", "completion": "A"}


def test_a_mapping_naming_a_missing_column_is_a_data_error() -> None:
    with pytest.raises(DataError) as caught:
        mapped_columns(["question", "reply"], {"prompt": "question", "completion": "answer"})
    assert str(caught.value) == "dataset.columns maps to ['answer'], but the rows have columns ['question', 'reply']"


def test_map_row_gives_none_for_a_source_column_the_row_lacks_and_the_row_check_reports_it() -> None:
    mapped = map_row({"question": "2+2?"}, {"prompt": "question", "completion": "answer"})
    assert mapped == {"prompt": "2+2?", "completion": None}
    assert row_problem(mapped, "prompt_completion") == (
        "'completion' must be a non-empty string (or, for chat, a list of messages)"
    )


# ---- row problems -------------------------------------------------------------------------------


def test_good_chat_rows() -> None:
    assert messages_problem(*CHAT) is None
    assert messages_problem({"role": "system", "content": "Be brief."}, *CHAT) is None
    assert messages_problem(user("Hi"), assistant(""), user("?"), assistant("!")) is None  # "" is a string


def test_an_assistant_turn_with_tool_calls_may_have_no_content() -> None:
    call = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}
    result = {"role": "tool", "content": "42"}
    assert messages_problem(user("Use f"), call, result, assistant("42")) is None
    assert messages_problem(user("Use f"), {"role": "assistant", "content": None}) == (
        "assistant turn: 'content' must be a string"
    )


def test_sharegpt_turns_are_read_as_chat_messages() -> None:
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    assert messages_problem(*turns) is None
    assert is_conversational({"messages": turns}, "messages")


@pytest.mark.parametrize(
    ("turns", "expected"),
    [
        ([], "'messages' must be a non-empty list of messages"),
        (["Hi"], "each message must be an object with 'role' and 'content'"),
        (
            [{"speaker": "user", "text": "Hi"}],
            "each message needs 'role' and 'content' (or ShareGPT's 'from' and 'value')",
        ),
        ([{"role": "bot", "content": "Hi"}], f"unknown role 'bot' (expected one of {ROLES_LISTED})"),
        ([{"role": ["user"], "content": "Hi"}], f"unknown role ['user'] (expected one of {ROLES_LISTED})"),
        (
            [user("Hi"), {"from": "robot", "value": "Hi"}],
            f"unknown speaker 'robot' (expected one of {SPEAKERS_LISTED})",
        ),
        (
            [{"from": {"name": "gpt"}, "value": "Hi"}],
            f"unknown speaker {{'name': 'gpt'}} (expected one of {SPEAKERS_LISTED})",
        ),
        ([user("Hi"), {"role": "system", "content": "Be brief."}], "no assistant turn to learn from"),
        ([{"from": "human", "value": "Hi"}], "no assistant turn to learn from"),
        ([user(["Hi"]), assistant("Yo")], "user turn: 'content' must be a string"),
        ([user("Hi"), assistant(None)], "assistant turn: 'content' must be a string"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "Yo"}], "user turn: 'content' must be a string"),
        ([{"role": "user"}, assistant("Yo")], "user turn: 'content' must be a string"),
    ],
)
def test_chat_row_problems(turns: list[Any], expected: str) -> None:
    assert messages_problem(*turns) == expected


@pytest.mark.parametrize("messages", [None, "Hi", {"role": "user", "content": "Hi"}])
def test_messages_must_be_a_list(messages: Any) -> None:
    assert row_problem({"messages": messages}, "messages") == "'messages' must be a non-empty list of messages"


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "Q", "completion": "A"}, None),
        ({"prompt": " ", "completion": "A"}, None),  # only the empty string is refused here, unlike 'text'
        ({"prompt": "", "completion": "A"}, "'prompt' must be a non-empty string (or, for chat, a list of messages)"),
        (
            {"prompt": "Q", "completion": 4},
            "'completion' must be a non-empty string (or, for chat, a list of messages)",
        ),
        (
            {"prompt": None, "completion": None},
            "'prompt' must be a non-empty string (or, for chat, a list of messages)",
        ),
        ({"prompt": [user("Q")], "completion": [assistant("A")]}, None),
        ({"prompt": [user("Q")], "completion": "A"}, "'completion' must be a non-empty list of messages"),
        ({"prompt": "Q", "completion": [assistant("A")]}, "'prompt' must be a non-empty list of messages"),
        ({"prompt": [], "completion": [assistant("A")]}, "'prompt' must be a non-empty list of messages"),
        ({"prompt": [user("Q")], "completion": [user("A")]}, "no assistant turn to learn from"),
        (
            {"prompt": [{"role": "bot", "content": "Q"}], "completion": [assistant("A")]},
            f"unknown role 'bot' (expected one of {ROLES_LISTED})",
        ),
    ],
)
def test_prompt_completion_row_problems(row: dict[str, Any], expected: str | None) -> None:
    assert row_problem(row, "prompt_completion") == expected


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"text": "x"}, None),
        ({"text": ""}, "'text' must be a non-empty string"),
        ({"text": " \n\t"}, "'text' must be a non-empty string"),
        ({"text": 5}, "'text' must be a non-empty string"),
        ({}, "'text' must be a non-empty string"),
    ],
)
def test_text_row_problems(row: dict[str, Any], expected: str | None) -> None:
    assert row_problem(row, "text") == expected


# ---- loss options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row_format", "conversational", "assistant_only", "completion_only"),
    [
        ("messages", True, True, None),
        ("messages", True, False, False),
        ("prompt_completion", True, True, None),
        ("prompt_completion", True, True, True),
        ("prompt_completion", False, False, True),
        ("text", False, False, None),
        ("text", False, False, False),
    ],
)
def test_loss_options_that_suit_the_rows(
    row_format: str, conversational: bool, assistant_only: bool, completion_only: bool | None
) -> None:
    assert (
        loss_option_problem(
            row_format, conversational, assistant_only_loss=assistant_only, completion_only_loss=completion_only
        )
        is None
    )


@pytest.mark.parametrize("row_format", ["text", "prompt_completion"])
def test_assistant_only_loss_needs_chat_rows(row_format: str) -> None:
    assert loss_option_problem(row_format, False, assistant_only_loss=True, completion_only_loss=None) == (
        "hyperparameters.assistant_only_loss needs chat rows (messages, or prompt/completion as lists of "
        f"messages); these rows are {row_format!r}"
    )


def test_completion_only_loss_on_chat_messages_hints_at_assistant_only_loss() -> None:
    assert loss_option_problem("messages", True, assistant_only_loss=False, completion_only_loss=True) == (
        "hyperparameters.completion_only_loss needs prompt/completion rows; these rows are 'messages'; "
        "for chat rows use assistant_only_loss"
    )


def test_completion_only_loss_on_text() -> None:
    assert loss_option_problem("text", False, assistant_only_loss=False, completion_only_loss=True) == (
        "hyperparameters.completion_only_loss needs prompt/completion rows; these rows are 'text'"
    )


# ---- RowCheck ------------------------------------------------------------------------------------


def row_check(good: int, bad: int) -> RowCheck:
    """A text RowCheck with `bad` bad rows (line 1 onwards) and then `good` good ones."""
    check = RowCheck(row_format="text", columns=["text"])
    for number in range(1, bad + 1):
        check.add(f"line {number}", f"problem {number}")
    for number in range(bad + 1, bad + good + 1):
        check.add(f"line {number}", None)
    return check


def test_refusal_with_no_rows() -> None:
    assert row_check(0, 0).refusal(0.1) == "the dataset has no rows"
    assert row_check(0, 0).refusal(0.1, "the validation set") == "the validation set has no rows"


def test_no_refusal_without_bad_rows() -> None:
    assert row_check(3, 0).refusal(0.0) is None


def test_no_refusal_at_or_under_the_limit() -> None:
    assert row_check(9, 1).refusal(0.1) is None  # exactly 10 %
    assert row_check(19, 1).refusal(0.1) is None


def test_refusal_above_the_limit_shows_count_share_and_the_first_five_problems() -> None:
    check = row_check(3, 7)
    assert check.bad_fraction == 0.7
    assert check.refusal(0.5) == (
        "7 of the dataset's 10 rows (70.00%) are malformed, more than the 50.00% this server skips "
        "(MAX_BAD_ROW_FRACTION): line 1: problem 1; line 2: problem 2; line 3: problem 3; line 4: problem 4; "
        "line 5: problem 5 (and 2 more)"
    )


def test_refusal_above_the_limit_with_few_problems_has_no_more_note() -> None:
    assert row_check(1, 2).refusal(0.25, "the validation set") == (
        "2 of the validation set's 3 rows (66.67%) are malformed, more than the 25.00% this server skips "
        "(MAX_BAD_ROW_FRACTION): line 1: problem 1; line 2: problem 2"
    )


def test_refusal_when_every_row_is_bad_whatever_the_limit() -> None:
    assert row_check(0, 2).refusal(1.0) == (
        "every row of the dataset is malformed (2): line 1: problem 1; line 2: problem 2"
    )
    assert row_check(0, 6).refusal(1.0, "the validation set") == (
        "every row of the validation set is malformed (6): line 1: problem 1; line 2: problem 2; "
        "line 3: problem 3; line 4: problem 4; line 5: problem 5 (and 1 more)"
    )


def test_only_the_first_problems_are_kept_but_every_bad_row_is_counted() -> None:
    check = row_check(5, PROBLEMS_KEPT + 5)
    assert PROBLEMS_KEPT == 20
    assert check.rows == 30
    assert check.bad_rows == 25
    assert check.problems == [f"line {n}: problem {n}" for n in range(1, 21)]
    assert check.summary() == {"rows": 30, "row_format": "text", "bad_rows": 25, "bad_row_examples": check.problems}


# ---- files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("train.jsonl", "jsonl"),
        ("train.json", "jsonl"),
        ("TRAIN.JSONL", "jsonl"),
        ("train.parquet", "parquet"),
        ("train.Parquet", "parquet"),
    ],
)
def test_file_kind(name: str, kind: str) -> None:
    assert file_kind(Path(name)) == kind


def test_file_kind_refuses_other_files() -> None:
    with pytest.raises(DataError) as caught:
        file_kind(Path("data/train.csv"))
    assert str(caught.value) == "train.csv: unsupported file type '.csv'; use .jsonl, .json or .parquet"


def test_read_rows_of_json_lines_counts_blank_lines_and_reports_broken_ones(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "rows.jsonl",
        [
            json.dumps(GOOD_TEXT),
            "",
            "{not json",
            "   ",
            '["a", "JSON", "array"]',
            json.dumps({"text": "last"}),
        ],
    )
    assert list(read_rows(path)) == [
        ("line 1", GOOD_TEXT, None),
        ("line 3", None, "not valid JSON (Expecting property name enclosed in double quotes)"),
        ("line 5", None, "not a JSON object (one row per line)"),
        ("line 6", {"text": "last"}, None),
    ]


def test_read_rows_of_a_json_array_counts_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text("\n  " + json.dumps([GOOD_TEXT, "not a row", {"text": "b"}]))
    assert list(read_rows(path)) == [
        ("row 0", GOOD_TEXT, None),
        ("row 1", None, "not a JSON object"),
        ("row 2", {"text": "b"}, None),
    ]


def test_a_broken_json_array_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text('[{"text": "a"},')
    with pytest.raises(DataError, match=r"^rows\.json is not valid JSON \(Expecting value: line 1 column 16"):
        list(read_rows(path))


def test_a_broken_parquet_file_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"^rows\.parquet is not a readable Parquet file \("):
        check_file(path)


def test_check_file_json_lines_counts_and_locates_every_problem(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "chat.jsonl",
        [
            json.dumps({"messages": CHAT}),
            "",
            json.dumps({"messages": [user("Hi")]}),
            "{broken",
            json.dumps({"messages": [{"role": "bot", "content": "Hi"}]}),
            json.dumps({"text": "no messages column"}),
            json.dumps({"messages": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}),
        ],
    )
    check = check_file(path)
    assert (check.row_format, check.columns, check.conversational) == ("messages", ["messages"], True)
    assert (check.rows, check.bad_rows) == (6, 4)
    assert check.problems == [
        "line 3: no assistant turn to learn from",
        "line 4: not valid JSON (Expecting property name enclosed in double quotes)",
        f"line 5: unknown role 'bot' (expected one of {ROLES_LISTED})",
        "line 6: missing ['messages']",
    ]


def test_check_file_of_a_json_array_reports_rows_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "pc.json"
    path.write_text(json.dumps([{"prompt": "Q", "completion": "A"}, {"prompt": "Q", "completion": ""}, 3]))
    check = check_file(path)
    assert (check.row_format, check.conversational, check.rows, check.bad_rows) == ("prompt_completion", False, 3, 2)
    assert check.problems == [
        "row 1: 'completion' must be a non-empty string (or, for chat, a list of messages)",
        "row 2: not a JSON object",
    ]


def test_check_file_parquet_reports_rows_from_zero(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "text.parquet", [{"text": "a"}, {"text": ""}, {"text": None}, {"text": "b"}])
    check = check_file(path)
    assert (check.row_format, check.columns, check.conversational) == ("text", ["text"], False)
    assert (check.rows, check.bad_rows) == (4, 2)
    assert check.problems == ["row 1: 'text' must be a non-empty string", "row 2: 'text' must be a non-empty string"]


def test_check_file_parquet_with_chat_rows(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "chat.parquet",
        [
            {"messages": CHAT},
            {"messages": [user("Hi"), user("Anyone?")]},
            {"messages": [user(None), assistant("Yo")]},
        ],
    )
    check = check_file(path)
    assert (check.row_format, check.conversational, check.rows, check.bad_rows) == ("messages", True, 3, 2)
    assert check.problems == [
        "row 1: no assistant turn to learn from",
        "row 2: user turn: 'content' must be a string",
    ]


def test_check_file_parquet_with_a_mapping(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "qa.parquet",
        [
            {"question": "2+2?", "answer": "4", "prompt": "shadowed"},
            {"question": "3+3?", "answer": None, "prompt": "shadowed"},
        ],
    )
    check = check_file(path, {"prompt": "question", "completion": "answer"})
    assert (check.row_format, check.columns) == ("prompt_completion", ["prompt", "completion"])
    assert (check.rows, check.bad_rows) == (2, 1)
    assert check.problems == ["row 1: 'completion' must be a non-empty string (or, for chat, a list of messages)"]


def test_check_file_parquet_mapping_a_missing_column_is_a_data_error(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "qa.parquet", [{"question": "2+2?", "reply": "4"}])
    with pytest.raises(DataError) as caught:
        check_file(path, {"prompt": "question", "completion": "answer"})
    assert str(caught.value) == "dataset.columns maps to ['answer'], but the rows have columns ['question', 'reply']"


def test_check_file_json_lines_with_a_mapping_reports_a_row_lacking_the_source_column(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "qa.jsonl",
        [
            json.dumps({"question": "2+2?", "answer": "4"}),
            json.dumps({"question": "3+3?"}),
        ],
    )
    check = check_file(path, {"prompt": "question", "completion": "answer"})
    assert (check.row_format, check.columns, check.rows, check.bad_rows) == (
        "prompt_completion",
        ["prompt", "completion"],
        2,
        1,
    )
    assert check.problems == ["line 2: 'completion' must be a non-empty string (or, for chat, a list of messages)"]


def test_check_file_json_lines_with_a_swap_mapping(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "swapped.jsonl", [json.dumps({"prompt": "A", "completion": "Q"})])
    check = check_file(path, {"prompt": "completion", "completion": "prompt"})
    assert (check.row_format, check.columns, check.rows, check.bad_rows) == (
        "prompt_completion",
        ["completion", "prompt"],
        1,
        0,
    )


def test_check_file_with_no_fitting_format_lists_columns_and_counts_only_unreadable_lines(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "qa.jsonl",
        [
            json.dumps({"question": "2+2?", "answer": "4"}),
            "not json",
            json.dumps({"question": "3+3?"}),
            "7",
        ],
    )
    check = check_file(path)
    assert (check.row_format, check.columns, check.conversational) == (None, ["question", "answer"], None)
    assert (check.rows, check.bad_rows) == (4, 2)
    assert check.problems == [
        "line 2: not valid JSON (Expecting value)",
        "line 4: not a JSON object (one row per line)",
    ]


def test_check_file_parquet_with_no_fitting_format(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "qa.parquet", [{"question": "2+2?", "answer": "4"}])
    check = check_file(path)
    assert (check.row_format, check.columns, check.rows, check.bad_rows) == (None, ["question", "answer"], 1, 0)


def test_check_file_counts_unreadable_lines_before_the_first_readable_row(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "late.jsonl", ["", "oops", "[1]", json.dumps(GOOD_TEXT), json.dumps(BAD_TEXT)])
    check = check_file(path)
    assert (check.row_format, check.rows, check.bad_rows) == ("text", 4, 3)
    assert check.problems == [
        "line 2: not valid JSON (Expecting value)",
        "line 3: not a JSON object (one row per line)",
        "line 5: 'text' must be a non-empty string",
    ]


def test_check_file_with_no_readable_row_at_all(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "junk.jsonl", ["oops", "", "[1]"])
    check = check_file(path)
    assert (check.row_format, check.columns, check.rows, check.bad_rows) == (None, [], 2, 2)
    assert check.refusal(0.5) == (
        "every row of the dataset is malformed (2): line 1: not valid JSON (Expecting value); "
        "line 3: not a JSON object (one row per line)"
    )


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_check_file_of_an_empty_file_has_no_rows(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    check = check_file(path)
    assert (check.row_format, check.columns, check.rows, check.bad_rows) == (None, [], 0, 0)
    assert check.refusal(0.5) == "the dataset has no rows"


def test_check_file_of_a_parquet_file_without_rows(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": pyarrow.array([], pyarrow.string())}), path)
    check = check_file(path)
    assert (check.row_format, check.rows) == ("text", 0)
    assert check.refusal(0.5, "the validation set") == "the validation set has no rows"


def test_conversational_comes_from_the_first_good_row(tmp_path: Path) -> None:
    chat = {"prompt": [user("Q")], "completion": [assistant("A")]}
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [
            json.dumps({"prompt": [user("Q")], "completion": [user("A")]}),  # bad: skipped for the flag
            json.dumps(chat),
            json.dumps({"prompt": "Q", "completion": "A"}),
        ],
    )
    check = check_file(path)
    assert (check.row_format, check.conversational, check.rows, check.bad_rows) == ("prompt_completion", True, 3, 1)

    plain_first = write_lines(
        tmp_path / "plain_first.jsonl", [json.dumps({"prompt": "Q", "completion": "A"}), json.dumps(chat)]
    )
    assert check_file(plain_first).conversational is False


def test_conversational_stays_unknown_when_no_row_is_good(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(BAD_TEXT)])
    check = check_file(path)
    assert (check.row_format, check.conversational, check.bad_rows) == ("text", None, 1)


def test_check_file_reports_a_role_that_is_not_a_string_instead_of_crashing(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "odd.jsonl",
        [
            json.dumps({"messages": CHAT}),
            json.dumps({"messages": [{"role": ["user"], "content": "Hi"}, assistant("Yo")]}),
            json.dumps({"messages": [{"from": ["human"], "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}),
        ],
    )
    check = check_file(path)
    assert (check.rows, check.bad_rows) == (3, 2)
    assert check.problems == [
        f"line 2: unknown role ['user'] (expected one of {ROLES_LISTED})",
        f"line 3: unknown speaker ['human'] (expected one of {SPEAKERS_LISTED})",
    ]


def test_turns_with_the_union_of_keys_arrow_gives_are_read_by_their_values() -> None:
    """Arrow gives every turn of a column all the keys seen, missing ones as None."""
    row = {
        "messages": [
            {"role": None, "content": None, "from": "human", "value": "hi"},
            {"role": "assistant", "content": "hello", "from": None, "value": None},
        ]
    }
    assert row_problem(row, "messages") is None
    bad = {"messages": [{"role": None, "content": None, "from": "narrator", "value": "x"}]}
    assert row_problem(bad, "messages") == (
        "unknown speaker 'narrator' (expected one of ['assistant', 'gpt', 'human', 'system', 'tool', 'user'])"
    )


# ---- rows larger than MAX_ROW_BYTES, and files read as streams ----------------------------------

MIB = 1024**2


def too_large(size: int, limit: int) -> str:
    return (
        f"the row is {size:,} bytes, more than the {limit:,} a row may have (MAX_ROW_BYTES); max_seq_length "
        "cuts a row that long to its first tokens anyway: split long documents into several rows"
    )


def peak_bytes_while(read: Any) -> tuple[Any, int]:
    """What `read()` returns, and the most memory Python held meanwhile (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        return read(), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_json_lines_row_over_max_row_bytes_is_malformed_and_never_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    with path.open("wb") as handle:
        handle.write(b'{"text": "first"}\n{"text": "' + b"x" * (20 * MIB) + b'"}\n{"text": "third"}\n')
        handle.write(b'{"text": "' + b"y" * 3000 + b'"}')  # the last line, without its newline
    found, peak = peak_bytes_while(lambda: list(read_rows(path, max_row_bytes=2048)))
    assert found == [
        ("line 1", {"text": "first"}, None),
        ("line 2", None, too_large(20 * MIB + 12, 2048)),
        ("line 3", {"text": "third"}, None),
        ("line 4", None, too_large(3012, 2048)),
    ]
    assert peak < 4 * MIB  # a 20 MB line, read a chunk at a time
    check = check_file(path, max_row_bytes=2048)
    assert (check.rows, check.bad_rows, check.row_format) == (4, 2, "text")


def test_a_row_of_exactly_max_row_bytes_is_read(tmp_path: Path) -> None:
    row = json.dumps({"text": "x" * 100})
    path = write_lines(tmp_path / "rows.jsonl", [row, row + " "])
    assert [problem for _, _, problem in read_rows(path, max_row_bytes=len(row))] == [
        None,
        too_large(len(row) + 1, len(row)),
    ]


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 64, 1 << 20])
def test_a_json_array_is_read_element_by_element_as_json_reads_it(
    tmp_path: Path, chunk_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Strings holding brackets, quotes, escapes and non-ASCII text, nested values, numbers and
    literals: the same rows as json.loads of the whole file, whatever the chunks it is read in."""
    import core.rows

    monkeypatch.setattr(core.rows, "READ_CHUNK_BYTES", chunk_bytes)
    tricky = 'a ]} [{ , " \\ \n\t é € 😀 \\u0041 /'
    items: list[Any] = [
        {"text": tricky, "n": [1, 2.5, None, True, False, {"x": "]"}]},
        {"messages": [*CHAT, {"role": "assistant", "content": tricky * 3}]},
        "a string row",
        -12.5e3,
        [tricky, {"a": []}],
        {},
    ]
    path = tmp_path / "rows.json"
    for text in (json.dumps(items), "\n " + json.dumps(items, indent=2, ensure_ascii=False) + "\n\n"):
        path.write_text(text, encoding="utf-8")
        assert list(read_rows(path)) == [
            (f"row {i}", item, None) if isinstance(item, dict) else (f"row {i}", None, "not a JSON object")
            for i, item in enumerate(items)
        ]


def test_a_json_array_element_over_max_row_bytes_is_malformed_and_never_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    with path.open("w", encoding="utf-8") as handle:
        handle.write('[{"text": "first"}, {"text": "' + "z" * (20 * MIB) + '"}, ')
        handle.write(json.dumps({"text": "é" * 1500}, ensure_ascii=False) + ', {"text": "last"}]')
    found, peak = peak_bytes_while(lambda: list(read_rows(path, max_row_bytes=2048)))
    assert found == [
        ("row 0", {"text": "first"}, None),
        ("row 1", None, too_large(20 * MIB + 12, 2048)),
        ("row 2", None, too_large(3012, 2048)),  # 1,500 characters, 3,000 bytes of UTF-8
        ("row 3", {"text": "last"}, None),
    ]
    assert peak < 8 * MIB


@pytest.mark.parametrize(
    "text", ['[{"a": 1} {"b": 2}]', '[{"a": 1}] x', '[{"a": 1},', '[{"a": 1}', '[\n {"a": 1},\n\n ]', "[1, 2", "["]
)
def test_a_broken_json_array_is_named_where_json_would_name_it(tmp_path: Path, text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    path = tmp_path / "rows.json"
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        list(read_rows(path))
    assert str(caught.value) == f"rows.json is not valid JSON ({expected.value})"


def test_a_broken_element_of_a_json_array_is_a_malformed_row(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text('[{"text": "a"}, {"text": tru}, {"text": "c"}]')
    assert list(read_rows(path)) == [
        ("row 0", {"text": "a"}, None),
        ("row 1", None, "not valid JSON (Expecting value)"),
        ("row 2", {"text": "c"}, None),
    ]


def test_a_parquet_row_over_max_row_bytes_is_malformed_and_the_others_are_read_a_few_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import core.rows

    monkeypatch.setattr(core.rows, "ROWS_BUDGET_BYTES", 100)  # a few rows at a time
    rows = [
        {"messages": [{"role": "user", "content": "q" * i}, {"role": "assistant", "content": "a"}]} for i in range(9)
    ]
    rows[4]["messages"][0]["content"] = "z" * 5000
    path = tmp_path / "chat.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    found = list(read_rows(path, max_row_bytes=1000))
    assert found[4] == ("row 4", None, too_large(5000 + len("user") + 1 + len("assistant"), 1000))
    assert [row for _, row, _ in found if row is not None] == rows[:4] + rows[5:]
    check = check_file(path, max_row_bytes=1000)
    assert (check.rows, check.bad_rows) == (9, 1)


def test_arrow_row_sizes_add_up_nested_values_without_making_rows(tmp_path: Path) -> None:
    from core.rows import arrow_row_sizes

    rows = [
        {"messages": [{"role": "user", "content": "hi" * i}], "n": i, "note": None if i % 2 else "éé"} for i in range(6)
    ]
    table = pyarrow.Table.from_pylist(rows)
    expected = [len("user") + 2 * i + 8 + (0 if i % 2 else 4) for i in range(6)]
    assert arrow_row_sizes(table) == expected
    assert arrow_row_sizes(table.slice(2, 3)) == expected[2:5]  # offsets of a slice hold too


def test_a_row_nested_too_deeply_for_the_parser_is_malformed_not_a_crash(tmp_path: Path) -> None:
    nested = "[" * 100_000 + "]" * 100_000
    lines = write_lines(tmp_path / "rows.jsonl", [json.dumps(GOOD_TEXT), '{"text": ' + nested + "}"])
    array = tmp_path / "rows.json"
    array.write_text(f"[{json.dumps(GOOD_TEXT)}, {nested}]")
    assert list(read_rows(lines)) == [
        ("line 1", GOOD_TEXT, None),
        ("line 2", None, "not valid JSON (nested too deeply)"),
    ]
    assert list(read_rows(array)) == [("row 0", GOOD_TEXT, None), ("row 1", None, "not valid JSON (nested too deeply)")]
