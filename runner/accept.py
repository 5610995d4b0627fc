"""Bounding connections before they are websockets: TCP accepted, TLS or HTTP unfinished.

``--max-connections`` counts open websockets, which a peer only has once it
finished the TLS handshake and the HTTP upgrade. Connections that never get
that far hold a descriptor each until ``--handshake-timeout``; a thousand of
them used to exhaust the runner's descriptors. So every accepted connection
counts as pending in :class:`Handshakes` until its websocket handshake
reaches the server's request hook, and at most ``--max-handshakes`` are
pending: beyond that, the oldest is aborted. A real client finishes its
handshakes in milliseconds, so a flood of idle connections sheds itself and
the client gets through.

How, on any event loop: the websocket server listens in plain TCP, and each
connection (:class:`HandshakingConnection`) upgrades itself to TLS with
``loop.start_tls`` once it is counted. The count therefore sits in the
protocol's ``connection_made``, which every loop calls — asyncio's and
uvloop's alike, though uvloop accepts in C — and shedding aborts a
connection's own transport, never a descriptor number that may already be
reused. ``loop.start_tls`` runs the same TLS layer as ``create_server(ssl=)``
on both loops, with ``ssl_handshake_timeout`` as the TLS deadline.

Two things the loops do that the class allows for: uvloop starts reading a
new connection as soon as ``connection_made`` returns, whatever
``pause_reading`` said, so the client's first TLS bytes may arrive before the
TLS layer is in place (they are handed to it once it is); and both loops'
TLS layers pass on the first decrypted bytes (the HTTP request) before
``start_tls`` returns (they are kept for the websocket side).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, cast

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Response

from runner.wire import peer_of

MAX_HANDSHAKES = 128
"""Default of ``--max-handshakes``."""


class Handshakes:
    """The accepted connections whose websocket handshake has not finished, oldest first."""

    def __init__(self, limit: int, logger: logging.Logger) -> None:
        self.limit = limit
        self.logger = logger
        self.pending: dict[ServerConnection, asyncio.BaseTransport] = {}  # in order of arrival
        """Each pending connection and its TCP transport (what shedding aborts)."""
        self.shed = 0

    def accepted(self, connection: ServerConnection, transport: asyncio.BaseTransport) -> None:
        """Count a new connection, aborting the oldest unfinished ones beyond the limit."""
        while len(self.pending) >= self.limit:
            oldest = next(iter(self.pending))
            self.pending.pop(oldest).abort()  # its TLS task or websocket handshake then ends
            self.shed += 1
            if self.shed == 1 or self.shed % 1000 == 0:
                self.logger.warning(
                    "%d connections still in their handshake (--max-handshakes %d): dropping "
                    "the oldest (%d so far)",
                    self.limit,
                    self.limit,
                    self.shed,
                )
        self.pending[connection] = transport

    def finished(self, connection: ServerConnection) -> None:
        """The connection's handshakes are done, or it is gone: it is no longer pending."""
        self.pending.pop(connection, None)


TCP, TLS, OPEN = "tcp", "tls", "open"
"""A :class:`HandshakingConnection`'s stages: its protocol's callbacks come from the TCP
transport, then from the TLS layer ``start_tls`` put on it, then the websocket side has it."""


class HandshakingConnection(ServerConnection):
    """A websocket connection accepted in plain TCP that counts itself, then starts TLS.

    websockets creates it (``serve(create_connection=...)``, see
    :func:`connection_factory`) and the loop calls :meth:`connection_made`
    with the TCP transport. The websocket side (``ServerConnection``) only
    starts once TLS is up, on the TLS transport, exactly as if the loop had
    done the TLS handshake itself.
    """

    tls: ssl.SSLContext
    tls_timeout: float
    handshakes: Handshakes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stage = TCP
        self._gone = False  # lost before the websocket side had it
        self._early: list[bytes | None] = []  # bytes (None: EOF) that came before their stage
        self._tcp: asyncio.Transport | None = None
        self._starting: asyncio.Task[None] | None = None  # held: the loop holds tasks weakly

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the TCP connection as pending and start its TLS handshake."""
        raw = transport.get_extra_info("socket")
        if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets TCP_NODELAY only where an accepted socket's proto says TCP, and
            # socket.create_server's say 0: without it, a small frame after another waits
            # for the peer's delayed ACK (40 ms). uvloop sets it; both get it here.
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tcp = cast(asyncio.Transport, transport)  # uvloop's do not subclass asyncio's
        tcp.pause_reading()  # asyncio's loop then reads nothing before TLS is in place
        self._tcp = tcp
        self.handshakes.accepted(self, tcp)
        self._starting = self.loop.create_task(self._start_tls(tcp))

    async def _start_tls(self, tcp: asyncio.Transport) -> None:
        if self._gone:  # shed before its turn came
            return
        starting = self.loop.create_task(
            self.loop.start_tls(
                tcp,
                self,
                self.tls,
                server_side=True,
                ssl_handshake_timeout=self.tls_timeout,
                ssl_shutdown_timeout=self.close_timeout,  # as serve(ssl=...) sets it
            )
        )
        while tcp.get_protocol() is self and not starting.done():
            await asyncio.sleep(0)  # its first step puts the TLS layer on the transport
        self._stage = TLS
        await asyncio.sleep(0)  # and calls the layer's connection_made soon after
        if self._gone or tcp.is_closing():  # shed, or the peer left before TLS
            starting.cancel()  # start_tls closes the transport
        else:
            early, self._early = self._early, []
            _deliver(tcp.get_protocol(), early)  # what uvloop read as TCP (it reads regardless)
        await asyncio.wait([starting])
        failure = None if starting.cancelled() else starting.exception()
        if starting.cancelled() or failure is not None:
            self.handshakes.finished(self)
            if failure is None or isinstance(failure, OSError):
                return  # failed, timed out (ConnectionAbortedError) or shed: closed already
            raise failure
        tls = starting.result()
        if tls is None or tls.is_closing() or self._gone:  # lost as the handshake ended
            self.handshakes.finished(self)
            tcp.abort()
            return
        self._stage = OPEN
        super().connection_made(tls)  # starts the websocket handshake (open_timeout)
        early, self._early = self._early, []
        for data in early:
            if data is None:
                super().eof_received()
            else:
                super().data_received(data)

    def data_received(self, data: bytes) -> None:
        """Bytes for a stage not reached yet are kept; it gets them when it starts."""
        if self._stage == OPEN:
            super().data_received(data)
            return
        self._early.append(data)
        if self._stage == TCP and self._tcp is not None:  # uvloop reads from the start: stop
            self._tcp.pause_reading()  # an honest client says nothing more before TLS answers

    def eof_received(self) -> bool | None:
        """The peer's end of the stream, kept like data until the websocket side starts."""
        if self._stage == OPEN:
            return super().eof_received()
        if self._stage == TCP:
            return False  # it left before TLS: close
        self._early.append(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: no longer pending, and closed on the websocket side."""
        self.handshakes.finished(self)
        if self._stage == OPEN:
            super().connection_lost(exc)
        else:
            self._gone = True


def _deliver(protocol: asyncio.BaseProtocol, chunks: list[bytes | None]) -> None:
    """Hand ``chunks`` to ``protocol`` as a transport would (both loops' TLS layers are
    buffered protocols; uvloop's does not subclass :class:`asyncio.BufferedProtocol`)."""
    for data in chunks:
        if data is None:
            continue  # TCP's EOF closed the transport already
        if hasattr(protocol, "buffer_updated"):
            view = memoryview(data)
            while view:
                buffer = protocol.get_buffer(len(view))  # type: ignore[attr-defined]
                n = min(len(buffer), len(view))
                buffer[:n] = view[:n]
                protocol.buffer_updated(n)  # type: ignore[attr-defined]
                view = view[n:]
        else:
            cast(asyncio.Protocol, protocol).data_received(data)


def connection_factory(
    context: ssl.SSLContext, tls_timeout: float, handshakes: Handshakes
) -> type[HandshakingConnection]:
    """The class ``serve(create_connection=...)`` takes: TLS by ``context``, counted."""

    timeout, pending = tls_timeout, handshakes  # a class body reads no same-named locals

    class Connection(HandshakingConnection):
        tls = context
        tls_timeout = timeout
        handshakes = pending

    return Connection


def listening_socket(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket on ``host``:``port`` (one socket, even for port 0)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family, backlog=128)


class OpenConnections:
    """How many websockets are open now: their handlers count themselves in and out.

    ``websockets``' ``Server.connections`` builds a set of every open
    connection each time it is read, so checking ``--max-connections`` with it
    on each new connection cost the mediator time that grew with the square of
    its sessions (half its CPU with 5,000 waiting); this is a counter.
    """

    def __init__(self) -> None:
        self.count = 0

    def counted(
        self, handler: Callable[[ServerConnection], Awaitable[None]]
    ) -> Callable[[ServerConnection], Awaitable[None]]:
        """``handler``, counting the connection as open while it runs."""

        async def run(connection: ServerConnection) -> None:
            self.count += 1
            try:
                await handler(connection)
            finally:
                self.count -= 1

        return run


def too_many(
    connection: ServerConnection,
    opened: OpenConnections,
    limit: int,
    what: str,
    logger: logging.Logger,
) -> Response | None:
    """A 503 when ``limit`` websockets are open already (``--max-connections``), else None."""
    # Only those past the handshake count, not this one.
    if opened.count < limit:
        return None
    logger.warning(
        "refused a connection from %s: %d open (--max-connections %d)",
        peer_of(connection),
        opened.count,
        limit,
    )
    return connection.respond(
        HTTPStatus.SERVICE_UNAVAILABLE,
        f"didomagic {what}: too many connections (--max-connections {limit}); try again shortly.\n",
    )
