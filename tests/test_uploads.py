"""POST/GET/DELETE /files and jobs that name an uploaded file: real SQLite and Redis."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.builders import chat_rows
from tests.conftest import Env, job_spec, run_to_end


def jsonl_bytes(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def upload(client: httpx.Client, name: str, content: bytes) -> httpx.Response:
    return client.post("/files", files={"file": (name, content, "application/octet-stream")})


def files_on_disk(env: Env) -> list[str]:
    folder = env.data_dir / "files"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def file_spec(tiny_model: Path, file_id: int, **hyperparameters: object) -> dict:
    spec = job_spec(tiny_model, Path("unused"), **hyperparameters)
    spec["dataset"] = {"file_id": file_id}
    return spec


def test_upload_jsonl_chat_file(client: httpx.Client, env: Env) -> None:
    content = jsonl_bytes(chat_rows(5)) + b"\n"  # an empty line is skipped
    response = upload(client, "chat.jsonl", content)
    assert response.status_code == 201, response.text
    record = response.json()
    assert record == {
        "id": record["id"],
        "project": "default",
        "created_at": record["created_at"],
        "filename": "chat.jsonl",
        "size": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
        "row_format": "messages",
        "columns": ["messages"],
        "rows": 5,
        "bad_rows": 0,
        "bad_row_examples": [],
    }
    assert (env.data_dir / "files" / f"{record['id']}.jsonl").read_bytes() == content
    assert files_on_disk(env) == [f"{record['id']}.jsonl"]
    assert client.get(f"/files/{record['id']}").json() == record


def test_upload_parquet_prompt_completion_file(client: httpx.Client, env: Env) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "completion": [" x", " y", " z"]}), buffer)
    content = buffer.getvalue()
    record = upload(client, "pairs.parquet", content).json()
    assert (record["row_format"], record["rows"], record["size"]) == ("prompt_completion", 3, len(content))
    assert record["sha256"] == hashlib.sha256(content).hexdigest()
    assert files_on_disk(env) == [f"{record['id']}.parquet"]


def test_text_rows_in_a_json_file(client: httpx.Client, env: Env) -> None:
    record = upload(client, "plain.json", jsonl_bytes([{"text": "one"}, {"text": "two"}])).json()
    assert (record["row_format"], record["rows"]) == ("text", 2)
    assert files_on_disk(env) == [f"{record['id']}.jsonl"]


def test_upload_counts_bad_rows_with_line_numbers(client: httpx.Client, env: Env) -> None:
    content = b'{"text": "a"}\n\n{"text": oops}\n[1, 2]\n{"text": ""}\n{"text": "b"}\n'
    record = upload(client, "mixed.jsonl", content).json()
    assert (record["row_format"], record["rows"], record["bad_rows"]) == ("text", 5, 3)
    assert record["bad_row_examples"] == [
        "line 3: not valid JSON (Expecting value)",
        "line 4: not a JSON object (one row per line)",
        "line 5: 'text' must be a non-empty string",
    ]
    assert files_on_disk(env) == [f"{record['id']}.jsonl"]  # kept: a job skips bad rows, or is refused


def test_upload_with_columns_of_other_names_is_kept_for_a_mapping(client: httpx.Client, env: Env) -> None:
    record = upload(client, "qa.jsonl", jsonl_bytes([{"question": "q", "answer": "a"}] * 3)).json()
    assert (record["row_format"], record["columns"], record["rows"]) == (None, ["question", "answer"], 3)


@pytest.mark.parametrize(
    ("name", "content", "detail"),
    [
        (
            "broken.jsonl",
            b'{"text": oops}\n[1]\n',
            "no row of the file could be read: line 1: not valid JSON "
            "(Expecting value); line 2: not a JSON object (one row per line)",
        ),
        ("empty.jsonl", b"\n\n", "the file has no rows"),
        ("chat.csv", b"text\nhello\n", "'chat.csv' is not a .jsonl, .json (JSON Lines) or .parquet file"),
    ],
)
def test_bad_upload_is_422_and_leaves_nothing(
    client: httpx.Client, env: Env, name: str, content: bytes, detail: str
) -> None:
    response = upload(client, name, content)
    assert response.status_code == 422
    assert response.json() == {"error": "InvalidFile", "detail": detail}
    assert files_on_disk(env) == []  # no temporary file either
    assert client.get("/files").json() == {"items": []}


def test_bad_parquet_is_422(client: httpx.Client, env: Env) -> None:
    response = upload(client, "broken.parquet", b"not parquet at all")
    assert response.status_code == 422
    assert response.json()["detail"].startswith("'broken.parquet' is not a readable Parquet file (")
    assert files_on_disk(env) == []


def test_upload_over_the_size_limit_is_413_and_leaves_nothing(
    client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("MAX_UPLOAD_BYTES", "100")
    get_settings.cache_clear()
    response = upload(client, "chat.jsonl", jsonl_bytes([{"text": "x" * 200}]))
    assert response.status_code == 413
    assert response.json() == {
        "error": "PayloadTooLarge",
        "detail": "the file is larger than this server's upload limit of 100 bytes (MAX_UPLOAD_BYTES)",
    }
    assert files_on_disk(env) == []
    assert client.get("/files").json() == {"items": []}
    assert upload(client, "small.jsonl", jsonl_bytes([{"text": "x" * 80}])).status_code == 201  # 93 bytes


def multipart(name: str, content: bytes, *, close: bool = True) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body by hand, optionally without its closing boundary."""
    head = (
        f'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + content + (b"\r\n--XyZ--\r\n" if close else b""), {
        "Content-Type": "multipart/form-data; boundary=XyZ"
    }


def test_upload_that_breaks_off_is_refused_and_leaves_nothing(client: httpx.Client, env: Env) -> None:
    rows = jsonl_bytes([{"text": f"row {i}"} for i in range(50)])
    body, headers = multipart("chat.jsonl", rows[:300], close=False)  # the client went away mid-file
    response = client.post("/files", content=body, headers=headers)
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "the upload of 'chat.jsonl' ended after 300 bytes, before the multipart "
        "body was complete (a broken-off upload?); nothing was stored"
    )
    assert files_on_disk(env) == []
    body, headers = multipart("chat.jsonl", rows)  # the same body, complete
    assert client.post("/files", content=body, headers=headers).json()["rows"] == 50


def test_size_limit_holds_as_bytes_arrive_without_a_content_length(
    client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("MAX_UPLOAD_BYTES", "1000")
    get_settings.cache_clear()
    body, headers = multipart("big.jsonl", jsonl_bytes([{"text": "x" * 100}] * 50))

    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to judge up front
        for start in range(0, len(body), 256):
            yield body[start : start + 256]

    response = client.post("/files", content=chunks(), headers=headers)
    assert response.status_code == 413
    assert files_on_disk(env) == []
    # A declared length far over the limit is refused before the body is read.
    huge, headers = multipart("huge.jsonl", jsonl_bytes([{"text": "x" * 1000}] * 100))
    assert client.post("/files", content=huge, headers=headers).status_code == 413


@pytest.mark.parametrize(
    ("body", "content_type", "detail"),
    [
        (b"text\nhello\n", "text/csv", "send the dataset as multipart/form-data with the file in field 'file'"),
        (
            b'--XyZ\r\nContent-Disposition: form-data; name="other"\r\n\r\nx\r\n--XyZ--\r\n',
            "multipart/form-data; boundary=XyZ",
            "the body has no multipart field 'file' with a file",
        ),
        (
            b'--XyZ\r\nContent-Disposition: form-data; name="file"\r\n\r\nx\r\n--XyZ--\r\n',
            "multipart/form-data; boundary=XyZ",
            "the 'file' part has no file name",
        ),
    ],
)
def test_bodies_that_are_not_a_file_upload_are_422(
    client: httpx.Client, env: Env, body: bytes, content_type: str, detail: str
) -> None:
    response = client.post("/files", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 422
    assert response.json()["detail"].startswith(detail)
    assert files_on_disk(env) == []


def test_list_get_delete(client: httpx.Client, env: Env) -> None:
    first = upload(client, "a.jsonl", jsonl_bytes([{"text": "a"}])).json()
    second = upload(client, "b.jsonl", jsonl_bytes([{"text": "b"}])).json()
    assert client.get("/files").json() == {"items": [second, first]}  # newest first

    missing = client.get("/files/999")
    assert missing.status_code == 404
    assert missing.json() == {"error": "NotFound", "detail": "file 999 not found"}
    assert client.delete("/files/999").json() == {"error": "NotFound", "detail": "file 999 not found"}

    deleted = client.delete(f"/files/{first['id']}")
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert client.get("/files").json() == {"items": [second]}
    assert files_on_disk(env) == [f"{second['id']}.jsonl"]


def test_job_naming_a_file_and_delete_while_in_use(client: httpx.Client, env: Env, tiny_model: Path) -> None:
    file_id = upload(client, "chat.jsonl", jsonl_bytes(chat_rows(8))).json()["id"]
    jobs = []
    for _ in range(2):
        response = client.post("/jobs", json=file_spec(tiny_model, file_id))
        assert response.status_code == 201, response.text
        jobs.append(response.json())
    stored = env.data_dir.resolve() / "files" / f"{file_id}.jsonl"
    assert jobs[0]["spec"]["dataset"] == {"source": str(stored), "file_id": file_id, "split": "train", "columns": {}}

    refused = client.delete(f"/files/{file_id}")
    assert refused.status_code == 409
    assert refused.json() == {
        "error": "Conflict",
        "detail": f"file {file_id} is used by job(s) {jobs[0]['id']}, {jobs[1]['id']} "
        "which are queued, running or paused",
    }
    assert stored.is_file()

    for job in jobs:
        assert client.post(f"/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert client.delete(f"/files/{file_id}").status_code == 204
    assert not stored.exists()
    assert client.get(f"/files/{file_id}").status_code == 404


def test_job_naming_an_unknown_file_is_422(client: httpx.Client, env: Env, tiny_model: Path) -> None:
    response = client.post("/jobs", json=file_spec(tiny_model, 9))
    assert response.status_code == 422
    assert response.json() == {"error": "InvalidSpec", "detail": "dataset.file_id: file 9 does not exist"}
    assert client.get("/jobs").json()["items"] == []


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        (
            {"source": "allenai/tulu-3-sft-mixture", "file_id": 1},
            "give either dataset.source or dataset.file_id, not both",
        ),
        ({"split": "train"}, "give dataset.source (a Hub id or a local path) or dataset.file_id (an uploaded file)"),
    ],
)
def test_dataset_needs_exactly_one_of_source_and_file_id(
    client: httpx.Client, env: Env, tiny_model: Path, dataset: dict, message: str
) -> None:
    upload(client, "chat.jsonl", jsonl_bytes(chat_rows(2)))
    spec = file_spec(tiny_model, 1)
    spec["dataset"] = dataset
    response = client.post("/jobs", json=spec)
    assert response.status_code == 422
    assert response.json()["errors"] == [{"field": "dataset", "message": message}]


def test_files_routes_need_a_token_when_configured(
    client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    monkeypatch.setenv("API_TOKENS", "s3cret")
    get_settings.cache_clear()
    assert client.get("/files").status_code == 401
    assert upload(client, "a.jsonl", b'{"text": "a"}\n').status_code == 401
    assert client.get("/files", headers={"Authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.slow
def test_job_on_an_uploaded_file_trains(client: httpx.Client, env: Env, tiny_model: Path) -> None:
    file_id = upload(client, "chat.jsonl", jsonl_bytes(chat_rows(16))).json()["id"]
    spec = file_spec(
        tiny_model,
        file_id,
        max_steps=2,
        save_steps=100,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_seq_length=64,
    )
    record = run_to_end(client, spec)
    assert record["status"] == "succeeded", record["error"]
    assert record["spec"]["dataset"]["file_id"] == file_id
    events = client.get(f"/jobs/{record['id']}/events").json()["items"]
    assert next(e["message"] for e in events if e["kind"] == "dataset_loaded").startswith("16 rows in 'messages'")
    assert client.delete(f"/files/{file_id}").status_code == 204  # the job has finished


def test_a_row_over_max_row_bytes_is_named_at_upload_and_a_file_of_nothing_else_is_refused(
    client: httpx.Client, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.config import get_settings

    # At the default (8 MiB), the one-row dataset of the incident: refused, nothing kept.
    one_row = upload(client, "one.jsonl", jsonl_bytes([{"text": "x" * (9 * 1024**2)}]))
    assert one_row.status_code == 422
    assert one_row.json()["detail"] == (
        "no row of the file could be read: line 1: the row is 9,437,196 bytes, more than the 8,388,608 a row may "
        "have (MAX_ROW_BYTES); max_seq_length cuts a row that long to its first tokens anyway: split long "
        "documents into several rows"
    )
    assert files_on_disk(env) == []

    monkeypatch.setenv("MAX_ROW_BYTES", "2048")
    get_settings.cache_clear()
    response = upload(client, "rows.jsonl", jsonl_bytes([{"text": "fine"}] * 3 + [{"text": "x" * 5000}]))
    assert response.status_code == 201, response.text
    assert (response.json()["rows"], response.json()["bad_rows"]) == (4, 1)
    assert response.json()["bad_row_examples"] == [
        "line 4: the row is 5,012 bytes, more than the 2,048 a row may have (MAX_ROW_BYTES); max_seq_length "
        "cuts a row that long to its first tokens anyway: split long documents into several rows"
    ]
