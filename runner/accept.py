"""Bounding connections before they are websockets: TCP accepted, TLS or HTTP unfinished.

``--max-connections`` counts open websockets, which a peer only has once it
finished the TLS handshake and the HTTP upgrade. Connections that never get
that far hold a descriptor each until ``--handshake-timeout``; a thousand of
them used to exhaust the runner's descriptors. So the listening socket counts
every connection it accepts until its websocket handshake reaches the
server's request hook, and keeps at most ``--max-handshakes`` of them: beyond
that, the oldest unfinished one is shut down. A real client finishes its
handshakes in milliseconds, so a flood of idle connections sheds itself and
the client gets through.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.http11 import Response

from runner.wire import peer_of

MAX_HANDSHAKES = 128
"""Default of ``--max-handshakes``."""


class Handshakes:
    """The accepted connections whose websocket handshake has not finished, oldest first."""

    def __init__(self, limit: int, logger: logging.Logger) -> None:
        self.limit = limit
        self.logger = logger
        self.pending: dict[int, socket.socket] = {}  # by descriptor, in order of arrival
        self.shed = 0

    def accepted(self, sock: socket.socket) -> None:
        """Count a new connection, shutting the oldest unfinished ones down beyond the limit."""
        while len(self.pending) >= self.limit:
            fd, oldest = next(iter(self.pending.items()))
            del self.pending[fd]
            with contextlib.suppress(OSError):  # the event loop sees it end and closes it
                oldest.shutdown(socket.SHUT_RDWR)
            self.shed += 1
            if self.shed == 1 or self.shed % 1000 == 0:
                self.logger.warning(
                    "%d connections still in their handshake (--max-handshakes %d): dropping "
                    "the oldest (%d so far)",
                    self.limit,
                    self.limit,
                    self.shed,
                )
        self.pending[sock.fileno()] = sock

    def finished(self, connection: ServerConnection) -> None:
        """The connection's handshakes are done (it now counts as a connection)."""
        raw = connection.transport.get_extra_info("socket")
        if raw is not None:
            self.pending.pop(raw.fileno(), None)

    def closed(self, sock: socket.socket) -> None:
        """A connection is closing (its descriptor may be reused next)."""
        fd = sock.fileno()
        if self.pending.get(fd) is sock:
            del self.pending[fd]


class _Accepted(socket.socket):
    """An accepted connection that tells its :class:`Handshakes` when it closes."""

    handshakes: Handshakes | None = None

    def close(self) -> None:
        if self.handshakes is not None and self.fileno() != -1:
            self.handshakes.closed(self)
        super().close()


class _Listener(socket.socket):
    """A listening socket whose accepted connections are counted by a :class:`Handshakes`."""

    handshakes: Handshakes | None = None

    def accept(self) -> tuple[socket.socket, Any]:
        fd, address = self._accept()  # type: ignore[attr-defined]
        conn = _Accepted(self.family, self.type, self.proto, fileno=fd)
        # asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and these say 0:
        # without it, a small frame after another waits for a delayed ACK (40 ms).
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.handshakes is not None:
            conn.handshakes = self.handshakes
            self.handshakes.accepted(conn)
        return conn, address


def listening_socket(host: str, port: int, handshakes: Handshakes) -> socket.socket:
    """A bound, listening TCP socket on ``host``:``port`` that counts what it accepts."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    plain = socket.create_server((host, port), family=family, backlog=128)
    listener = _Listener(plain.family, plain.type, plain.proto, fileno=plain.detach())
    listener.handshakes = handshakes
    return listener


def too_many(
    connection: ServerConnection,
    server: Server | None,
    limit: int,
    what: str,
    logger: logging.Logger,
) -> Response | None:
    """A 503 when ``limit`` websockets are open already (``--max-connections``), else None."""
    # Server.connections counts those past the handshake, not this one.
    if server is None or len(server.connections) < limit:
        return None
    logger.warning(
        "refused a connection from %s: %d open (--max-connections %d)",
        peer_of(connection),
        len(server.connections),
        limit,
    )
    return connection.respond(
        HTTPStatus.SERVICE_UNAVAILABLE,
        f"didomagic {what}: too many connections (--max-connections {limit}); try again shortly.\n",
    )
