"""The runner's and mediator's listening socket: what every accepted connection gets."""

from __future__ import annotations

import asyncio
import logging
import socket

from runner import accept


def test_accepted_connections_send_small_frames_at_once():
    """TCP_NODELAY on every accepted connection: without it a result's second frame waited
    for the client's delayed ACK, and every trivial cell took 40 ms more."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        made: asyncio.Future[int] = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                raw = transport.get_extra_info("socket")
                made.set_result(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        handshakes = accept.Handshakes(8, logging.getLogger("test"))
        listener = accept.listening_socket("127.0.0.1", 0, handshakes)
        server = await loop.create_server(Probe, sock=listener)
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(made, 10)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) != 0
