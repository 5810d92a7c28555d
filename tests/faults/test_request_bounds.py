"""What a request costs the API before it is refused, on a real uvicorn over raw sockets: without
a token, nothing but its headers (the 401 is sent before a byte of the body is read); over its
size limit, a 413 naming the limit, also for a chunked body that declares no length, and the
connection closed so that no more of it is read."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.faults.conftest import Cluster
from tests.faults.rawhttp import read_response, request_head, send_chunked

pytestmark = pytest.mark.slow

TOKEN = "bounds-token"
MIB = 1024**2


def api_rss_bytes(cluster: Cluster) -> int:
    assert cluster.api is not None
    status = Path(f"/proc/{cluster.api.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


@pytest.fixture
def api(cluster: Cluster) -> Cluster:
    cluster.env.update(API_TOKENS=TOKEN, MAX_UPLOAD_BYTES=str(8 * MIB))
    cluster.start_redis()
    cluster.migrate()
    cluster.start_api()
    return cluster


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/jobs", "application/json"),
        ("/v1/fine_tuning/jobs", "application/json"),
        ("/files", "multipart/form-data; boundary=XyZ"),
        ("/v1/files", "multipart/form-data; boundary=XyZ"),
    ],
)
def test_a_body_without_a_token_is_answered_401_before_a_byte_of_it_is_read(
    api: Cluster, path: str, content_type: str
) -> None:
    with socket.create_connection(("127.0.0.1", api.api_port)) as sock:
        # 200 MB announced, none of it sent: the answer cannot wait for the body.
        sock.sendall(request_head("POST", path, {"Content-Type": content_type, "Content-Length": str(200 * MIB)}))
        status, headers, body, closed = read_response(sock)
    assert (status, headers["www-authenticate"], closed) == (401, 'Bearer realm="finetune"', True)
    expected = (
        "this server needs 'Authorization: Bearer <token>' (one of API_TOKENS, or a token an admin made "
        "with `finetune admin tokens create`)"
    )
    said = json.loads(body)
    assert (said["error"]["message"] if path.startswith("/v1") else said["detail"]) == expected


def test_a_body_over_its_limit_is_413_naming_it_and_the_rest_is_never_read(api: Cluster) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    json_limit = "this server's limit for JSON bodies, 1,048,576 bytes (MAX_JSON_BODY_BYTES)"

    # Declared: refused from the headers.
    with socket.create_connection(("127.0.0.1", api.api_port)) as sock:
        sock.sendall(request_head("POST", "/jobs", {**auth, "Content-Length": str(200 * MIB)}))
        status, _, body, closed = read_response(sock)
    assert (status, closed) == (413, True)
    assert (
        json.loads(body)["detail"]
        == f"the request body is larger than {json_limit}; the request declares 209,715,200 bytes"
    )

    # Chunked, with no length declared: refused once the limit is passed, the connection closed
    # while the client still had 190 MB to send, and the API's memory barely moved.
    rss_before = api_rss_bytes(api)
    with socket.create_connection(("127.0.0.1", api.api_port)) as sock:
        sock.sendall(request_head("POST", "/jobs", {**auth, "Transfer-Encoding": "chunked"}))
        sent = send_chunked(sock, (b" " * 64 * 1024 for _ in range(200 * 16)))
        status, _, body, closed = read_response(sock)
    assert (status, closed) == (413, True)
    assert json.loads(body)["detail"] == f"the request body is larger than {json_limit}"
    assert sent < 190 * MIB
    assert api_rss_bytes(api) - rss_before < 64 * MIB

    # An upload is held to MAX_UPLOAD_BYTES the same way, in the /v1 shape there.
    with socket.create_connection(("127.0.0.1", api.api_port)) as sock:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "multipart/form-data; boundary=XyZ"}
        sock.sendall(request_head("POST", "/v1/files", {**headers, "Content-Length": str(200 * MIB)}))
        status, _, body, closed = read_response(sock)
    assert (status, closed) == (413, True)
    assert json.loads(body)["error"]["message"] == (
        "the file is larger than this server's upload limit of 8388608 bytes (MAX_UPLOAD_BYTES); "
        "the request declares 209,715,200 bytes"
    )
