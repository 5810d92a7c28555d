"""Idempotent creates: an Idempotency-Key on POST /jobs, /files and their /v1 twins makes a job or
file once; the same key with another body is a 409 naming the key; keys are a principal's own and
kept IDEMPOTENCY_KEYS_KEPT_S. Through the API in-process and, for the CLI's retries and the openai
SDK, against uvicorn behind a proxy that loses the first answer."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from sqlmodel import Session, select
from typer.testing import CliRunner

from client import cli
from tests.builders import chat_rows, write_jsonl
from tests.conftest import Env, Service, clear_caches, job_spec

TOKENS = ("alice-token", "bob-token")


def with_key(key: str, token: str | None = None) -> dict[str, str]:
    headers = {"Idempotency-Key": key}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def job_count(env: Env) -> int:
    from core.db import get_engine
    from core.models import Job

    with Session(get_engine()) as session:
        return len(session.exec(select(Job)).all())


def test_same_key_and_body_answer_the_same_job_and_another_body_is_a_409(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path
) -> None:
    spec = job_spec(tiny_model, chat_dataset)
    first = client.post("/jobs", json=spec, headers=with_key("submit-1"))
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    again = client.post("/jobs", json=spec, headers=with_key("submit-1"))
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert job_count(env) == 1
    # Another body under the same key is refused, naming the key; nothing is made.
    other = client.post("/jobs", json=job_spec(tiny_model, chat_dataset, max_steps=7), headers=with_key("submit-1"))
    assert other.status_code == 409
    assert other.json()["error"] == "Conflict"
    assert (
        "Idempotency-Key 'submit-1' was used at" in other.json()["detail"] and "another body" in other.json()["detail"]
    )
    # The same key on another create route is another request too.
    upload = client.post("/files", files={"file": ("a.jsonl", b'{"text": "x"}\n')}, headers=with_key("submit-1"))
    assert upload.status_code == 409 and "for POST /jobs" in upload.json()["detail"]
    # A new key makes a new job; no key at all makes one every time.
    assert client.post("/jobs", json=spec, headers=with_key("submit-2")).json()["id"] != first.json()["id"]
    assert client.post("/jobs", json=spec).status_code == client.post("/jobs", json=spec).status_code == 201
    assert job_count(env) == 4


@pytest.mark.parametrize("key", ["", "a" * 256, "has space", "tab\tkey"])
def test_a_key_that_is_not_visible_ascii_of_at_most_255_is_422_naming_the_header(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, key: str
) -> None:
    response = client.post("/jobs", json=job_spec(tiny_model, chat_dataset), headers={"Idempotency-Key": key})
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == "Idempotency-Key", response.text
    assert job_count(env) == 0


def test_keys_are_a_principals_own_and_expire_after_the_kept_time(
    client: httpx.Client, env: Env, tiny_model: Path, chat_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_TOKENS", ",".join(TOKENS))
    clear_caches()
    spec = job_spec(tiny_model, chat_dataset)
    alice = client.post("/jobs", json=spec, headers=with_key("k", TOKENS[0])).json()["id"]
    bob = client.post("/jobs", json=spec, headers=with_key("k", TOKENS[1])).json()["id"]
    assert alice != bob  # the same key of two principals: two requests
    replay = client.post("/jobs", json=spec, headers=with_key("k", TOKENS[0]))
    assert replay.json()["id"] == alice and replay.headers["idempotent-replayed"] == "true"

    # A day later (IDEMPOTENCY_KEYS_KEPT_S) the key is forgotten: it makes a new job, and the
    # expired row is gone.
    from core.db import get_engine
    from core.models import IdempotencyKey

    with Session(get_engine()) as session:
        for row in session.exec(select(IdempotencyKey)).all():
            row.created_at -= timedelta(days=1, seconds=1)
            session.add(row)
        session.commit()
    later = client.post("/jobs", json=spec, headers=with_key("k", TOKENS[0]))
    assert later.status_code == 201 and "idempotent-replayed" not in later.headers
    assert later.json()["id"] not in (alice, bob)
    with Session(get_engine()) as session:
        assert sorted(row.resource_id for row in session.exec(select(IdempotencyKey)).all()) == [later.json()["id"]]


def test_an_upload_with_a_key_is_stored_once_and_a_deleted_file_forgets_its_key(client: httpx.Client, env: Env) -> None:
    content = b"".join(json.dumps(row).encode() + b"\n" for row in chat_rows(4))
    files = {"file": ("chat.jsonl", content)}
    first = client.post("/files", files=files, headers=with_key("upload-1"))
    assert first.status_code == 201
    again = client.post("/files", files=files, headers=with_key("upload-1"))
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert sorted(p.name for p in (env.data_dir / "files").iterdir()) == [f"{first.json()['id']}.jsonl"]
    # Other bytes, or the same bytes under another name, are another request.
    for other in ({"file": ("chat.jsonl", content + content)}, {"file": ("other.jsonl", content)}):
        refused = client.post("/files", files=other, headers=with_key("upload-1"))
        assert refused.status_code == 409 and "another body" in refused.json()["detail"]
    assert len(client.get("/files").json()["items"]) == 1
    # Once the file is deleted, the key makes it again rather than answering with what is gone.
    assert client.delete(f"/files/{first.json()['id']}").status_code == 204
    remade = client.post("/files", files=files, headers=with_key("upload-1"))
    assert remade.status_code == 201 and "idempotent-replayed" not in remade.headers


class LosingProxy:
    """A TCP proxy in front of the API that loses the answers of the first `lose` connections: the
    request reaches the API (which commits what it makes) and the client sees the connection close
    without an answer, as when a network drops mid-request."""

    def __init__(self, upstream_port: int, lose: int = 1) -> None:
        self.upstream_port = upstream_port
        self.lose = lose
        self.lost = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            drop = self.lost < self.lose
            self.lost += drop
            threading.Thread(target=self._serve, args=(conn, drop), daemon=True).start()

    def _serve(self, conn: socket.socket, drop: bool) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        threading.Thread(target=self._pump, args=(conn, upstream), daemon=True).start()
        try:
            while data := upstream.recv(65536):
                if drop:  # the answer has begun: the API has done its work; the client never hears
                    break
                conn.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (conn, upstream):  # shutdown first: it wakes the pump's recv and sends the FIN
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def api(env: Env, tmp_path: Path) -> Iterator[Service]:
    """The API under uvicorn alone (the jobs made here only need to be stored and queued)."""
    service = Service(tmp_path / "service", data_dir=env.data_dir, redis_url=env.redis_url, settings=env.vars)
    try:
        service.start_api()
        yield service
    finally:
        service.stop()
        print(service.logs())


@pytest.mark.slow
def test_the_cli_sends_a_create_again_after_a_lost_answer_and_the_sdk_keys_its_creates(
    api: Service, env: Env, tiny_model: Path, chat_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "CREATE_RETRY_S", 0.01)
    cli.console.width = 160
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(job_spec(tiny_model, chat_dataset)))
    runner = CliRunner()
    proxy = LosingProxy(int(api.url.rsplit(":", 1)[1]))
    try:
        result = runner.invoke(cli.app, ["submit", str(spec_file), "--url", proxy.url], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "sending it again (same Idempotency-Key)" in result.output and "job 1 queued" in result.output
        proxy.lose += 1  # the upload's first answer is lost too
        result = runner.invoke(cli.app, ["upload", str(chat_dataset), "--url", proxy.url], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "sending it again" in result.output and "file 1 chat.jsonl: 64 rows (messages), 0 bad" in result.output
    finally:
        proxy.close()
    assert proxy.lost == 2
    http = api.http()
    assert [job["id"] for job in http.get("/jobs").json()["items"]] == [1]
    assert [f["id"] for f in http.get("/files").json()["items"]] == [1]
    access = (api.root / "api.log").read_text()
    assert access.count('"POST /jobs HTTP/1.1" 201') == 2 and access.count('"POST /files HTTP/1.1" 201') == 2

    # The openai SDK sends a key with extra_headers: a create sent twice makes one file and one job.
    training = write_jsonl(tmp_path / "train.jsonl", chat_rows(16))
    with openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0) as sdk:
        files = []
        for _ in range(2):
            with training.open("rb") as handle:
                files.append(sdk.files.create(file=handle, purpose="fine-tune", extra_headers=with_key("sdk-file")))
        assert files[0].id == files[1].id == "file-2"
        request = {"model": str(tiny_model), "training_file": files[0].id, "suffix": "once", "metadata": {"a": "b"}}
        jobs = [sdk.fine_tuning.jobs.create(**request, extra_headers=with_key("sdk-job")) for _ in range(2)]
        assert jobs[0].id == jobs[1].id == "ftjob-2" and jobs[1].suffix == "once"
        with pytest.raises(openai.ConflictError) as refused:
            sdk.fine_tuning.jobs.create(**{**request, "suffix": "twice"}, extra_headers=with_key("sdk-job"))
        assert "Idempotency-Key 'sdk-job' was used at" in refused.value.message
    assert [job["id"] for job in http.get("/jobs").json()["items"]] == [2, 1]
