"""TCP_NODELAY on every connection of an API process, also under `uvicorn --workers N`.

With --workers, uvicorn's supervisor binds the listening socket itself and leaves its protocol
number at 0; accepted sockets inherit it, and asyncio turns TCP_NODELAY on only for sockets that
say IPPROTO_TCP. Nagle's algorithm then holds back the body that follows the headers until the
client's delayed ACK: 44 ms for every keep-alive request (encode/uvicorn#3149, open in 0.54.0).
Measured with bench/load at 100 pollers, two API processes: 2,258 req/s at a p50 of 44 ms, the
trivial reference app the same; one process: 13,997 req/s. This widens asyncio's own check to
every stream socket of the internet families. It can go once uvicorn binds with IPPROTO_TCP
(tests/test_tcp_nodelay.py shows when it is no longer needed)."""

from __future__ import annotations

import asyncio.base_events
import socket

ASYNCIO_SET_NODELAY = asyncio.base_events._set_nodelay  # type: ignore[attr-defined]  # asyncio's own


def set_nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def install() -> None:
    """Make asyncio's transports (selector and proactor alike call this) use set_nodelay."""
    asyncio.base_events._set_nodelay = set_nodelay  # type: ignore[attr-defined]
