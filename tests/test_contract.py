"""The contract's words are enums (core/contract.py); the OpenAPI document and the README say
the same words, no more and no fewer."""

from __future__ import annotations

import ast
import re
from enum import StrEnum
from pathlib import Path

import pytest

from core.contract import ErrorCode, EventKind, JobStatus, Phase

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def words(text: str) -> set[str]:
    return set(re.findall(r"`([a-z_]+)`", text))


def readme_error_codes() -> set[str]:
    table = README.split("**When a job fails**", 1)[1].split("\n\n", 2)[1]
    return {code for line in table.splitlines()[2:] for code in words(line.split("|")[1])}


def readme_phases() -> set[str]:
    return words(README.split("while running its `phase` (", 1)[1].split(")", 1)[0])


def readme_statuses() -> set[str]:
    return words(README.split("holds `status` (", 1)[1].split(")", 1)[0])


def readme_event_kinds() -> set[str]:
    text = README.split("have a `kind`, one of:", 1)[1].split("; and a `message`", 1)[0]
    return words(re.sub(r"\([^)]*\)", "", text))  # the words in parentheses explain, they are not kinds


@pytest.mark.parametrize(
    ("enum", "documented"),
    [
        (ErrorCode, readme_error_codes),
        (Phase, readme_phases),
        (JobStatus, readme_statuses),
        (EventKind, readme_event_kinds),
    ],
)
def test_the_readme_lists_exactly_the_enums_members(enum: type[StrEnum], documented: object) -> None:
    assert callable(documented)
    assert documented() == {member.value for member in enum}


def test_the_openapi_document_uses_the_enums() -> None:
    from app.main import create_app

    schemas = create_app().openapi()["components"]["schemas"]
    assert schemas["ErrorCode"]["enum"] == [m.value for m in ErrorCode]
    assert schemas["Phase"]["enum"] == [m.value for m in Phase]
    assert schemas["EventKind"]["enum"] == [m.value for m in EventKind]
    assert schemas["JobStatus"]["enum"] == [m.value for m in JobStatus]
    assert schemas["JobError"]["properties"]["code"]["$ref"].endswith("/ErrorCode")
    assert schemas["EventPublic"]["properties"]["kind"]["$ref"].endswith("/EventKind")


def test_no_bare_strings_where_the_contract_has_an_enum() -> None:
    """Codes and kinds are written as members (ErrorCode.disk_full), never as string literals,
    in every call that records one: JobFailure(code, ...), event(job_id, kind, ...),
    add_event(kind=...), and error_code= / "error_code": values."""
    root = Path(__file__).resolve().parents[1]
    bare = []
    for path in [*root.glob("app/**/*.py"), *root.glob("worker/**/*.py"), *root.glob("core/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            values: list[ast.expr] = []
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                values += [kw.value for kw in node.keywords if kw.arg in ("kind", "code", "error_code")]
                if name == "JobFailure" and node.args:
                    values.append(node.args[0])
                if name == "event" and len(node.args) > 1:
                    values.append(node.args[1])
            if isinstance(node, ast.Dict):
                values += [
                    v
                    for k, v in zip(node.keys, node.values, strict=True)
                    if isinstance(k, ast.Constant) and k.value == "error_code"
                ]
            bare += [
                f"{path.relative_to(root)}:{v.lineno}"
                for v in values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)
            ]
    assert bare == []


def test_the_trainers_result_takes_members_only() -> None:
    from pydantic import ValidationError

    from core.contract import TrainerResult

    with pytest.raises(ValidationError):
        TrainerResult.model_validate({"status": "failed", "error_code": "not_a_code"})
    assert TrainerResult.model_validate({"status": "interrupted", "step": 3, "seconds": 1.5}).extra_fields() == {
        "seconds": 1.5
    }


def test_the_load_benchmark_writes_only_codes_the_contract_knows() -> None:
    """bench/load/generate.py writes failed jobs straight into SQLite: a code the enum lacks would
    make the API refuse to present them (it did once: `out_of_memory`)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "load" / "generate.py"
    spec = importlib.util.spec_from_file_location("load_generate", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert {code for code, _message in module.FAILURES} <= {member.value for member in ErrorCode}
