"""Checkpoint downloads never leave the checkpoint folder, and the streamed tar is a real tar of
the announced length: app/downloads.py directly, then the HTTP routes against real SQLite."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from fastapi.testclient import TestClient

from app.downloads import CHUNK_BYTES, resolve_inside, stream_tar, tar_length, tar_members
from app.errors import NotFound
from tests.conftest import Env, raw_get_scope

SECRET = b"the operator's secret, never to be served\n"
LONG_NAME = "tokenizer-" + "x" * 120 + ".json"  # past ustar's 100-character name field


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A checkpoint-like folder with a nested file, next to a secret outside it."""
    base = tmp_path / "checkpoint"
    (base / "sub" / "deep").mkdir(parents=True)
    (base / "config.json").write_text("{}")
    (base / "sub" / "deep" / "shard.bin").write_bytes(b"\x01\x02")
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (base / "escape").symlink_to(tmp_path / "secret.txt")
    (base / "escape-dir").symlink_to(tmp_path)
    return base


@pytest.mark.parametrize(
    "relative",
    [
        "",
        "..",
        "../x",
        "../secret.txt",
        "sub/../../secret.txt",
        "./../secret.txt",
        "/etc/passwd",
        "\\etc\\passwd",
        "config.json\x00.txt",
        "escape",
        "escape-dir/secret.txt",
        "missing.bin",
    ],
)
def test_resolve_inside_refuses_paths_that_leave_or_do_not_exist(folder: Path, relative: str) -> None:
    with pytest.raises(NotFound) as caught:
        resolve_inside(folder, relative)
    assert caught.value.status_code == 404
    assert caught.value.detail == f"no file {relative!r} in this checkpoint"


@pytest.mark.parametrize("relative", ["sub", "sub/deep", "."])
def test_resolve_inside_refuses_directories(folder: Path, relative: str) -> None:
    with pytest.raises(NotFound) as caught:
        resolve_inside(folder, relative)
    expected = (
        f"no file {relative!r} in this checkpoint"
        if relative == "."
        else f"{relative!r} is not a file in this checkpoint"
    )
    assert caught.value.detail == expected


def test_resolve_inside_accepts_a_nested_real_file(folder: Path) -> None:
    assert resolve_inside(folder, "sub/deep/shard.bin") == (folder / "sub" / "deep" / "shard.bin").resolve()
    assert resolve_inside(folder, "config.json") == (folder / "config.json").resolve()
    # `..` that stays inside is harmless.
    assert resolve_inside(folder, "sub/../config.json") == (folder / "config.json").resolve()


def test_stream_tar_has_announced_length_and_exact_contents(tmp_path: Path) -> None:
    base = tmp_path / "final"
    (base / "nested" / "dir").mkdir(parents=True)
    contents = {
        "empty.txt": b"",
        "model.safetensors": bytes(range(256)) * 4096 * 5 + b"end",  # 5 MiB + 3 bytes: spans read chunks
        f"nested/dir/{LONG_NAME}": b'{"long": true}',
        "config.json": b'{"model_type": "llama"}',
    }
    for relative, data in contents.items():
        (base / relative).write_bytes(data)

    members = tar_members(base, "final", list(contents))

    async def read_all() -> list[bytes]:
        return [chunk async for chunk in stream_tar(members)]

    chunks = anyio.run(read_all)
    archive = b"".join(chunks)

    assert len(archive) == tar_length(members)
    assert len(archive) % tarfile.BLOCKSIZE == 0
    assert max(len(c) for c in chunks) <= CHUNK_BYTES  # streamed in bounded pieces, never whole
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        found = tar.getmembers()
        assert [m.name for m in found] == sorted(f"final/{r}" for r in contents)
        for member in found:
            assert member.isfile()
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            assert data == contents[member.name.removeprefix("final/")], member.name
            assert member.size == len(data)


def test_tar_members_refuses_a_listed_path_outside_the_folder(folder: Path) -> None:
    with pytest.raises(NotFound):
        tar_members(folder, "final", ["config.json", "escape"])


# --- the HTTP routes -------------------------------------------------------------------


@dataclass
class Stored:
    job_id: int
    files: dict[str, bytes]


@pytest.fixture
def api(env: Env) -> Iterator[TestClient]:
    """The API without its lifespan (no background reconcile loop: nothing here needs it)."""
    from app.main import create_app

    test_client = TestClient(create_app(), raise_server_exceptions=True)
    yield test_client
    test_client.close()


@pytest.fixture
def stored(env: Env) -> Stored:
    """A finished job with two checkpoints on disk and in the database, and a secret in the
    job's folder beside them. `final` is honest; `checkpoint-3`'s record was tampered with: it
    lists a symlink that points at the secret and `../secret.txt` itself."""
    from core.config import get_settings
    from core.db import session_scope
    from core.models import Checkpoint, CheckpointStatus, Job, JobStatus

    with session_scope() as session:
        job = Job(spec={"model": "org/model", "dataset": {"source": "org/data"}}, status=JobStatus.succeeded)
        session.add(job)
        session.flush()
        assert job.id is not None
        job_id = job.id

    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": bytes(range(256)) * 64,
        f"nested/{LONG_NAME}": b"{}",
    }
    job_dir = get_settings().job_dir(job_id)
    (job_dir / "secret.txt").parent.mkdir(parents=True)
    (job_dir / "secret.txt").write_bytes(SECRET)
    records = []
    for name, step in (("final", 6), ("checkpoint-3", 3)):
        folder = get_settings().checkpoints_dir(job_id) / name
        (folder / "nested").mkdir(parents=True)
        for relative, data in files.items():
            (folder / relative).write_bytes(data)
        (folder / "link.txt").symlink_to(job_dir / "secret.txt")
        # As the worker records them: each file's sha256 with its size and mtime at hashing.
        listed = [
            {
                "path": p,
                "size": len(d),
                "sha256": hashlib.sha256(d).hexdigest(),
                "mtime_ns": (folder / p).stat().st_mtime_ns,
            }
            for p, d in files.items()
        ]
        if name == "checkpoint-3":
            listed += [
                {"path": "link.txt", "size": len(SECRET), "sha256": None},
                {"path": "../secret.txt", "size": len(SECRET), "sha256": None},
            ]
        records.append(
            Checkpoint(
                job_id=job_id,
                name=name,
                step=step,
                status=CheckpointStatus.ready,
                size_bytes=sum(len(d) for d in files.values()),
                files=listed,
            )
        )
    with session_scope() as session:
        session.add_all(records)
    return Stored(job_id, files)


def raw_get(app: object, path: str) -> tuple[int, bytes]:
    """GET with the path sent as is, `..` included (curl --path-as-is): httpx, like browsers,
    removes dot segments before sending, so it cannot make this request."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = raw_get_scope(path)
    anyio.run(app, scope, receive, send)  # type: ignore[arg-type]
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.mark.parametrize("name", ["final", "checkpoint-3"])
def test_paths_leaving_the_checkpoint_are_404_and_never_leak(api: TestClient, stored: Stored, name: str) -> None:
    base = f"/jobs/{stored.job_id}/checkpoints/{name}/files"

    # `final` does not list them, so the record refuses; checkpoint-3 lists them, so resolve_inside must.
    def refusal(path: str) -> str:
        if name == "final":
            return f"checkpoint {name!r} of job {stored.job_id} has no file {path!r}"
        return f"no file {path!r} in this checkpoint"

    expected = {path: refusal(path) for path in ("../secret.txt", "link.txt")}
    for url, path in (
        (f"{base}/%2e%2e/secret.txt", "../secret.txt"),
        (f"{base}/..%2Fsecret.txt", "../secret.txt"),
        (f"{base}/%2E%2E%2fsecret.txt", "../secret.txt"),
        (f"{base}/link.txt", "link.txt"),
    ):
        response = api.get(url)
        assert (response.status_code, response.json()) == (404, {"error": "NotFound", "detail": expected[path]}), url
        assert SECRET not in response.content

    status, body = raw_get(api.app, f"{base}/../secret.txt")
    assert (status, json.loads(body)) == (404, {"error": "NotFound", "detail": expected["../secret.txt"]})
    status, body = raw_get(api.app, f"{base}/nested/../../secret.txt")
    assert status == 404 and SECRET not in body


def test_dot_segments_removed_by_the_client_reach_no_route(api: TestClient, stored: Stored) -> None:
    # What a browser or httpx sends for .../files/../secret.txt: the path without the segment.
    response = api.get(f"/jobs/{stored.job_id}/checkpoints/final/files/../secret.txt")
    assert response.request.url.path == f"/jobs/{stored.job_id}/checkpoints/final/secret.txt"
    assert (response.status_code, response.json()) == (
        404,
        {
            "error": "NotFound",
            "detail": f"no route GET /jobs/{stored.job_id}/checkpoints/final/secret.txt "
            "(the routes are listed at /docs)",
        },
    )


def test_listed_file_is_served_with_checksum_and_ranges(api: TestClient, stored: Stored) -> None:
    base = f"/jobs/{stored.job_id}/checkpoints/final/files"
    data = stored.files["model.safetensors"]

    response = api.get(f"{base}/model.safetensors")
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-length"] == str(len(data))
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["x-checksum-sha256"] == hashlib.sha256(data).hexdigest()

    nested = api.get(f"{base}/nested/{LONG_NAME}")
    assert (nested.status_code, nested.content) == (200, b"{}")

    partial = api.get(f"{base}/model.safetensors", headers={"Range": "bytes=0-3"})
    assert partial.status_code == 206
    assert partial.content == data[:4] == b"\x00\x01\x02\x03"
    assert partial.headers["content-range"] == f"bytes 0-3/{len(data)}"

    tail = api.get(f"{base}/model.safetensors", headers={"Range": "bytes=-5"})
    assert (tail.status_code, tail.content) == (206, data[-5:])

    beyond = api.get(f"{base}/model.safetensors", headers={"Range": "bytes=999999-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"
    assert beyond.json() == {
        "error": "RangeNotSatisfiable",
        "detail": f"Range 'bytes=999999-' starts past the end of the file ({len(data)} bytes)",
    }
    malformed = api.get(f"{base}/model.safetensors", headers={"Range": "items=0-3"})
    assert malformed.status_code == 400
    assert malformed.json() == {
        "error": "BadRange",
        "detail": "malformed Range header 'items=0-3': Only support bytes range",
    }


def test_unknown_file_and_checkpoint_are_404(api: TestClient, stored: Stored) -> None:
    base = f"/jobs/{stored.job_id}/checkpoints"
    response = api.get(f"{base}/final/files/optimizer.pt")
    assert (response.status_code, response.json()) == (
        404,
        {"error": "NotFound", "detail": f"checkpoint 'final' of job {stored.job_id} has no file 'optimizer.pt'"},
    )
    response = api.get(f"{base}/checkpoint-9/files/config.json")
    assert (response.status_code, response.json()) == (
        404,
        {"error": "NotFound", "detail": f"job {stored.job_id} has no checkpoint named 'checkpoint-9'"},
    )
    response = api.get("/jobs/999/checkpoints/final/files/config.json")
    assert (response.status_code, response.json()) == (404, {"error": "NotFound", "detail": "job 999 not found"})


def test_checkpoint_name_with_odd_characters_is_422(api: TestClient, stored: Stored) -> None:
    message = "String should match pattern '^[A-Za-z0-9_.-]{1,128}$'"
    for suffix in ("files/config.json", "archive"):
        response = api.get(f"/jobs/{stored.job_id}/checkpoints/final;rm/{suffix}")
        assert response.status_code == 422
        assert response.json() == {
            "error": "ValidationError",
            "detail": f"name: {message}",
            "errors": [{"field": "name", "message": message}],
        }


def test_archive_streams_a_tar_of_the_listed_files_under_the_checkpoint_name(api: TestClient, stored: Stored) -> None:
    response = api.get(f"/jobs/{stored.job_id}/checkpoints/final/archive")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-tar"
    assert response.headers["content-length"] == str(len(response.content))
    assert response.headers["content-disposition"] == f'attachment; filename="job-{stored.job_id}-final.tar"'
    assert SECRET not in response.content
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:") as tar:
        members = tar.getmembers()
        assert sorted(m.name for m in members) == sorted(f"final/{p}" for p in stored.files)
        assert all(m.isfile() and m.name.startswith("final/") and ".." not in m.name for m in members)
        for member in members:
            assert tar.extractfile(member).read() == stored.files[member.name.removeprefix("final/")]  # type: ignore[union-attr]


def test_archive_of_a_record_listing_paths_outside_is_refused_whole(api: TestClient, stored: Stored) -> None:
    response = api.get(f"/jobs/{stored.job_id}/checkpoints/checkpoint-3/archive")
    assert (response.status_code, response.json()) == (
        404,
        {"error": "NotFound", "detail": "no file '../secret.txt' in this checkpoint"},
    )
    assert SECRET not in response.content


@pytest.mark.parametrize("sizes", [[7, 7, 7, 7], [7, 7, 3, 7], [3, 9, 9], [20], [7, 7]])
def test_reading_ahead_returns_the_file_in_order(tmp_path: Path, sizes: list[int]) -> None:
    """Downloads read the next chunk while sending this one; any sequence of reads (a range's
    shorter last read included) and seeks must still give the file's bytes in order."""
    from app.downloads import _ThreadedFile

    data = bytes(range(256))[:19]
    path = tmp_path / "f.bin"
    path.write_bytes(data)

    async def read() -> list[bytes]:
        with open(path, "rb") as handle:
            reader = _ThreadedFile(handle)
            got = [await reader.read(size) for size in sizes]
            await reader.seek(2)
            got.append(await reader.read(5))
            await reader.settle()
            return got

    got = anyio.run(read)
    expected, position = [], 0
    for size in sizes:
        expected.append(data[position : position + size])
        position = min(position + size, len(data))
    assert got == [*expected, data[2:7]]
