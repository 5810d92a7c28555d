"""HTTP/1.1 by hand over a socket, for the tests that must see what a server answers before (or
instead of) reading a request's body: a client such as httpx sends the whole body first."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterable

# A generous bound for an answer that should come at once: only a server that waits for the body
# (what these tests exist to catch) runs into it.
ANSWER_TIMEOUT_S = 60


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, whether the server closed the connection after it)."""
    sock.settimeout(ANSWER_TIMEOUT_S)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-answer"
        body += chunk
    try:
        closed = sock.recv(1) == b""
    except ConnectionResetError:  # closed with part of our body unread
        closed = True
    return int(lines[0].split()[1]), headers, body, closed


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send_chunked(sock: socket.socket, pieces: Iterable[bytes]) -> int:
    """Send each piece as a chunk (Transfer-Encoding: chunked) until they are all sent, or until
    the server answers or closes the connection; the bytes of the pieces sent."""
    sent = 0
    try:
        for piece in pieces:
            if select.select([sock], [], [], 0)[0]:  # an answer (or a close) before the end
                return sent
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent
