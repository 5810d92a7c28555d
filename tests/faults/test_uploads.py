"""The API killed in the middle of an upload: the partial file it was writing is removed when
an API starts again, and the removal is logged with its size."""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.conftest import wait_until
from tests.faults.conftest import Cluster

pytestmark = pytest.mark.slow

BOUNDARY = "fault-test-boundary"


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
