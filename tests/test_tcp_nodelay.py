"""Connections accepted on a listener bound as `uvicorn --workers N` binds it get TCP_NODELAY
(app/tcp_nodelay.py: without it every keep-alive response waited 44 ms for a delayed ACK)."""

from __future__ import annotations

import asyncio
import socket

import pytest


def nodelay_of_accepted_connection(listener: socket.socket) -> int:
    """TCP_NODELAY of the server side of one connection accepted by an asyncio server on `listener`."""

    async def accept_one() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Report(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Report, sock=listener)
        _reader, writer = await asyncio.open_connection(*listener.getsockname())
        try:
            return await asyncio.wait_for(accepted, 5)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(accept_one())


def uvicorn_style_listener() -> socket.socket:
    """What uvicorn 0.54.0's Config.bind_socket makes for --workers: protocol number 0."""
    sock = socket.socket(family=socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_asyncio_alone_leaves_nagle_on_for_such_a_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug the module works around. When this fails, asyncio or uvicorn fixed it: the
    workaround can go."""
    import asyncio.base_events

    from app import tcp_nodelay

    monkeypatch.setattr(asyncio.base_events, "_set_nodelay", tcp_nodelay.ASYNCIO_SET_NODELAY)
    listener = uvicorn_style_listener()
    assert listener.proto == 0
    assert nodelay_of_accepted_connection(listener) == 0


def test_with_the_workaround_every_connection_gets_tcp_nodelay(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio.base_events

    from app import tcp_nodelay

    monkeypatch.setattr(asyncio.base_events, "_set_nodelay", asyncio.base_events._set_nodelay)  # type: ignore[attr-defined]
    tcp_nodelay.install()
    assert nodelay_of_accepted_connection(uvicorn_style_listener()) == 1


def test_the_api_module_installs_it() -> None:
    import asyncio.base_events

    import app.main  # noqa: F401
    from app import tcp_nodelay

    assert asyncio.base_events._set_nodelay is tcp_nodelay.set_nodelay  # type: ignore[attr-defined]
