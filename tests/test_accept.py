"""The runner's and mediator's listener (``runner.server.listen``) on each event loop.

Real TLS websockets, in process: what every accepted connection gets, and the
bound on connections still in their handshakes (``--max-handshakes``), on
asyncio's loop and on uvloop (which accepts in C, so the bound cannot count
``accept()`` calls).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection

from runner import certs
from runner.server import listen

from .conftest import TIMEOUT

T = TypeVar("T")


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    uvloop = pytest.importorskip("uvloop")
    return uvloop.new_event_loop


LOOPS = {"asyncio": lambda: asyncio.new_event_loop, "uvloop": _uvloop_factory}


@pytest.fixture(params=sorted(LOOPS))
def on_loop(request: pytest.FixtureRequest) -> Callable[[Awaitable[T]], T]:
    """Run a coroutine to its end on the event loop the test is parametrized with."""
    factory = LOOPS[request.param]()

    def run(main: Awaitable[T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main)  # type: ignore[arg-type]

    return run


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    certfile, keyfile, _ = certs.generate(tmp_path_factory.mktemp("tls"), ["127.0.0.1"])
    return certfile, keyfile


async def _listen(
    tls: tuple[Path, Path],
    handler: Callable[[ServerConnection], Awaitable[None]],
    max_handshakes: int = 128,
    handshake_timeout: float = TIMEOUT,
) -> tuple[Server, int]:
    server = await listen(
        handler,
        lambda connection, request: None,  # every request may open a websocket
        "127.0.0.1",
        0,
        *tls,
        "test.websockets",
        handshake_timeout=handshake_timeout,
        max_handshakes=max_handshakes,
    )
    return server, next(iter(server.sockets)).getsockname()[1]


def _trusting(certfile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certfile))


def test_accepted_connections_send_small_frames_at_once(on_loop, tls):
    """TCP_NODELAY on every accepted connection: without it a result's second frame waited
    for the client's delayed ACK, and every trivial cell took 40 ms more."""

    async def handler(ws: ServerConnection) -> None:
        raw = ws.transport.get_extra_info("socket")
        await ws.send(str(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))

    async def main() -> str:
        server, port = await _listen(tls, handler)
        try:
            async with connect(f"wss://127.0.0.1:{port}/", ssl=_trusting(tls[0])) as ws:
                return str(await asyncio.wait_for(ws.recv(), TIMEOUT))
        finally:
            server.close()
            await server.wait_closed()

    assert on_loop(main()) != "0"


def test_beyond_the_bound_the_oldest_unfinished_connections_are_dropped(on_loop, tls, caplog):
    """Five silent TCP connections, then a real client, with ``--max-handshakes 2``: the four
    oldest are closed by the server, the newest stays, and the client gets its websocket."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send("hello")

    async def main() -> tuple[list[bool], str]:
        server, port = await _listen(tls, handler, max_handshakes=2)
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        try:
            async with connect(f"wss://127.0.0.1:{port}/", ssl=_trusting(tls[0])) as ws:
                greeting = str(await asyncio.wait_for(ws.recv(), TIMEOUT))
            for reader, _ in silent[:4]:
                assert await asyncio.wait_for(reader.read(1), TIMEOUT) == b""
            return [reader.at_eof() for reader, _ in silent], greeting
        finally:
            for _, writer in silent:
                writer.close()
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.WARNING, "test.websockets"):
        ended, greeting = on_loop(main())
    assert greeting == "hello"
    assert ended == [True, True, True, True, False]  # the newest is within the bound
    assert "connections still in their handshake (--max-handshakes 2)" in caplog.text


def test_a_tls_handshake_that_fails_frees_its_place(on_loop, tls):
    """A peer that speaks no TLS is closed and no longer counts as pending."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send("hello")

    async def main() -> tuple[bytes, str]:
        server, port = await _listen(tls, handler, max_handshakes=1)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # plain HTTP on a TLS port
            answer = await asyncio.wait_for(reader.read(), TIMEOUT)
            writer.close()
            async with connect(f"wss://127.0.0.1:{port}/", ssl=_trusting(tls[0])) as ws:
                return answer, str(await asyncio.wait_for(ws.recv(), TIMEOUT))
        finally:
            server.close()
            await server.wait_closed()

    answer, greeting = on_loop(main())
    assert not answer.startswith(b"HTTP")
    assert greeting == "hello"


def test_connections_that_stall_in_either_handshake_are_closed_at_the_timeout(on_loop, tls):
    """``--handshake-timeout``: silent after TCP (the TLS deadline), and silent after TLS
    (the websocket deadline)."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send("hello")

    async def main() -> tuple[bytes, bytes]:
        server, port = await _listen(tls, handler, handshake_timeout=0.5)
        try:
            tcp_reader, tcp_writer = await asyncio.open_connection("127.0.0.1", port)
            tls_reader, tls_writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=_trusting(tls[0])
            )
            silent_tcp = await asyncio.wait_for(tcp_reader.read(), TIMEOUT)
            silent_tls = await asyncio.wait_for(tls_reader.read(), TIMEOUT)
            tcp_writer.close()
            tls_writer.close()
            return silent_tcp, silent_tls
        finally:
            server.close()
            await server.wait_closed()

    assert on_loop(main()) == (b"", b"")
