"""The API killed in the middle of an upload: the partial file it was writing is removed when
an API starts again, and the removal is logged with its size. An upload that would eat into the
disk's reserved space is refused, on a small tmpfs."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.faults.conftest import Cluster
from tests.faults.rawhttp import read_response, request_head, send_chunked

pytestmark = pytest.mark.slow

BOUNDARY = "fault-test-boundary"
MIB = 1024**2


def start_upload(port: int, total_bytes: int) -> socket.socket:
    """Open a multipart upload that announces `total_bytes` of rows, and send its headers."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        (
            f"POST /files HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
            f"boundary={BOUNDARY}\r\nContent-Length: {len(head) + total_bytes + len(tail)}\r\n\r\n"
        ).encode()
    )
    sock.sendall(head)
    return sock


def test_api_killed_mid_upload_leaves_no_partial_file(cluster: Cluster) -> None:
    cluster.start_redis()
    cluster.migrate()
    cluster.start_api()
    line = (json.dumps({"text": "the quick brown fox " * 20}) + "\n").encode()
    sock = start_upload(cluster.api_port, 200 * 1024 * 1024)
    sent = 0
    while sent < 20 * 1024 * 1024:
        sock.sendall(line * 256)
        sent += len(line) * 256
    files = cluster.data_dir / "files"

    def partial_on_disk() -> list:
        return [p for p in files.glob(".incoming-*") if p.stat().st_size > 10 * 1024 * 1024]

    partial = wait_until(partial_on_disk, 30, "the upload to reach the disk")[0]
    assert cluster.api is not None
    cluster.api.kill()
    cluster.api.wait(10)
    sock.close()
    size = partial.stat().st_size
    assert partial.exists()  # what a killed API leaves behind
    time.sleep(1.2)  # older than the sweeper's guard for uploads just begun

    cluster.start_api()
    wait_until(lambda: not partial.exists(), 30, "the partial upload to be removed")
    log = (cluster.root / "api.log").read_text()
    assert f"removed 1 unfinished upload(s) left by a stopped API process ({size} bytes)" in log
    with cluster.http() as http:
        assert http.get("/files").json() == {"items": []}
        # And uploads work as before.
        uploaded = http.post("/files", files={"file": ("rows.jsonl", line * 4)})
    assert uploaded.status_code == 201, uploaded.text
    assert sorted(p.name for p in files.iterdir()) == [f"{uploaded.json()['id']}.jsonl"]


def test_an_upload_that_would_eat_into_the_reserved_space_is_refused_before_and_while_it_streams(
    tmpfs: Any, cluster: Cluster
) -> None:
    """MIN_FREE_DISK_BYTES stays free for the job database and logs: an upload whose declared size
    would eat into it is refused (507, with the figures) before a byte is read; one that declares
    no size is refused as the disk reaches it; neither leaves a byte behind."""
    cluster.data_dir = tmpfs(cluster.root / "data", "64m")
    cluster.env.update(DATA_DIR=str(cluster.data_dir), MIN_FREE_DISK_BYTES=str(40 * MIB), DISK_RESERVE_BYTES="0")
    cluster.start_redis()
    cluster.migrate()
    cluster.start_api()
    files = cluster.data_dir / "files"
    line = (json.dumps({"text": "the quick brown fox " * 20}) + "\n").encode()
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    multipart = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    reserve = "of which 40.0 MiB stays free (MIN_FREE_DISK_BYTES); free space under DATA_DIR"

    with socket.create_connection(("127.0.0.1", cluster.api_port)) as sock:
        sock.sendall(request_head("POST", "/files", {**multipart, "Content-Length": str(30 * MIB)}))
        status, _, body, closed = read_response(sock)
    detail = json.loads(body)["detail"]
    assert (status, closed) == (507, True), body
    assert detail.startswith("the upload was refused: the request declares 31,457,280 bytes; storing it would eat ")
    assert " MiB free of 64.0 MiB on the disk holding " in detail and reserve in detail

    with socket.create_connection(("127.0.0.1", cluster.api_port)) as sock:
        sock.sendall(request_head("POST", "/files", {**multipart, "Transfer-Encoding": "chunked"}))
        sent = send_chunked(sock, [head, *(line * 256 for _ in range(30 * MIB // (len(line) * 256)))])
        status, _, body, closed = read_response(sock)
    detail = json.loads(body)["detail"]
    assert (status, closed) == (507, True), body
    assert detail.startswith("the upload was refused after ") and detail.endswith("; nothing was stored")
    assert reserve in detail
    assert sent < 30 * MIB
    wait_until(lambda: not list(files.glob(".incoming-*")), 10, "the refused upload's partial file to go")

    with cluster.http() as http:
        assert http.get("/files").json() == {"items": []}
        small = http.post("/files", files={"file": ("rows.jsonl", line * 1000)})  # 0.4 MB: fits
    assert small.status_code == 201, small.text
    assert sorted(p.name for p in files.iterdir()) == [f"{small.json()['id']}.jsonl"]
