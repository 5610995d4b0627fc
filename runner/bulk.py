"""The runner's bulk port: large values over blocking TLS sockets, one thread per transfer.

asyncio's TLS layer moves about a third of what OpenSSL can on a plain
blocking socket, so a cell's large values do not cross the session's
websocket: the runner listens on a second port (``--bulk-port``) with the same
certificate (so clients pin the same fingerprint) and the same client CA, and
serves each connection on a plain thread of its own.

A connection proves nothing by connecting: it must present, within
``handshake_timeout`` seconds, a ticket the runner issued over the session's
authenticated websocket (:meth:`BulkServer.issue`). A ticket is 32 random
bytes bound to one session, one cell and one direction, is consumed by its
first use, and is void after :data:`~didomagic.protocol.BULK_TICKET_TTL`
seconds. A claim naming another session, cell or direction than its ticket's,
an unknown, used or expired ticket, or anything that is not a claim is
refused with a reason and the connection closed; the ticket's own transfer
is not affected. At most ``max_transfers`` connections are served at once
(beyond it a new one is closed at once, and its client falls back to the
websocket).

Nothing here runs on the event loop: :meth:`BulkServer.issue` and
:meth:`BulkServer.cancel` only touch a locked table, and every transfer's
outcome is handed to the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import queue
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from didomagic.errors import ProtocolError
from didomagic.protocol import (
    BULK_CLAIM_HEAD,
    BULK_OK,
    BULK_TICKET_BYTES,
    BULK_TICKET_TTL,
    BulkClaim,
    Direction,
    bulk_claim_length,
    bulk_refusal,
    parse_bulk_claim,
)
from runner.uploads import Upload

logger = logging.getLogger("didomagic.runner")

MAX_TRANSFERS = 8
"""Bulk connections served at once (all sessions together)."""

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a bulk connection has for its TLS handshake and its claim."""

BUFFER = 4 << 20
"""Bytes received before each write into an upload's files."""

Transfer = Callable[[ssl.SSLSocket], None]
"""Moves a ticket's bytes on its connection (on the connection's thread); raises on failure."""

Done = Callable[[BaseException | None], None]
"""Called on the event loop once a ticket's transfer ended (None: it succeeded) or never came."""


class TransferBroken(Exception):
    """A bulk transfer did not complete; the message says how far it got and why."""


@dataclass
class _Grant:
    """What one ticket admits, and what to call when it is done."""

    ticket: bytes
    session: str
    cell: str
    direction: Direction
    transfer: Transfer
    done: Done
    expiry: asyncio.TimerHandle | None = None
    connection: socket.socket | None = None
    """The connection moving its bytes, once claimed."""


class BulkServer:
    """Listens on the bulk port and runs each ticket's transfer on a thread of its own."""

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        io_timeout: float,
        *,
        max_transfers: int = MAX_TRANSFERS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        ttl: float = BULK_TICKET_TTL,
    ) -> None:
        self.host, self.context, self.io_timeout, self.ttl = host, context, io_timeout, ttl
        self.handshake_timeout = handshake_timeout
        self._requested_port = port
        self._slots = threading.BoundedSemaphore(max_transfers)
        self._lock = threading.Lock()
        self._grants: dict[bytes, _Grant] = {}  # by SHA-256 of the ticket (see _claim)
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        """The bound port, once started."""

    def start(self) -> int:
        """Bind and listen (on the event loop's thread); accept on a thread. Return the port."""
        self._loop = asyncio.get_running_loop()
        family = socket.getaddrinfo(
            self.host, self._requested_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0][0]
        self._listener = socket.create_server(
            (self.host, self._requested_port), family=family, backlog=64
        )
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, name="didomagic-bulk-accept", daemon=True).start()
        return self.port

    def close(self) -> None:
        """Stop accepting and break every transfer in flight."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            grants, self._grants = list(self._grants.values()), {}
        for grant in grants:
            if grant.expiry is not None:
                grant.expiry.cancel()

    # -- tickets (event loop thread)

    def issue(
        self, session: str, cell: str, direction: Direction, transfer: Transfer, done: Done
    ) -> str:
        """A new ticket (hex) for one transfer of ``session``'s ``cell`` in ``direction``.

        ``transfer`` runs on the connection that presents it; ``done`` is
        called on the loop once it ended, or with :class:`TransferBroken` when
        no connection came within the ticket's lifetime.
        """
        assert self._loop is not None
        ticket = secrets.token_bytes(BULK_TICKET_BYTES)
        key = hashlib.sha256(ticket).digest()
        grant = _Grant(ticket, session, cell, direction, transfer, done)
        grant.expiry = self._loop.call_later(self.ttl, self._expire, key)
        with self._lock:
            self._grants[key] = grant
        return ticket.hex()

    def cancel(self, ticket: str) -> None:
        """Void ``ticket``: unused, it is dropped (``done`` gets an error); in flight, broken."""
        key = hashlib.sha256(bytes.fromhex(ticket)).digest()
        with self._lock:
            grant = self._grants.pop(key, None)
        if grant is None:
            return
        if grant.expiry is not None:
            grant.expiry.cancel()
        if grant.connection is not None:  # its thread sees the connection end and reports
            with contextlib.suppress(OSError):
                grant.connection.shutdown(socket.SHUT_RDWR)
            return
        grant.done(TransferBroken("cancelled before its connection came"))

    def _expire(self, key: bytes) -> None:
        with self._lock:
            grant = self._grants.get(key)
            if grant is None or grant.connection is not None:
                return
            del self._grants[key]
        grant.done(TransferBroken(f"no bulk connection came within {self.ttl:g} s"))

    def _claim(self, claim: BulkClaim, connection: socket.socket) -> _Grant | str:
        """The grant ``claim`` presents, now in flight on ``connection``; else why not."""
        presented = bytes.fromhex(claim.ticket)
        key = hashlib.sha256(presented).digest()  # (the table is keyed by a hash, not the secret)
        with self._lock:
            grant = self._grants.get(key)
            if grant is None or grant.connection is not None:
                return "unknown, used or expired ticket"
            if not hmac.compare_digest(grant.ticket, presented):
                return "unknown, used or expired ticket"
            if (grant.session, grant.cell, grant.direction) != (
                claim.session,
                claim.cell,
                claim.direction,
            ):
                return "the ticket is not for this session, cell and direction"
            grant.connection = connection
        if grant.expiry is not None:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(grant.expiry.cancel)
        return grant

    def _finish(self, grant: _Grant, error: BaseException | None) -> None:
        """Hand ``grant``'s outcome to the loop and forget it."""
        key = hashlib.sha256(grant.ticket).digest()
        with self._lock:
            if self._grants.get(key) is grant:
                del self._grants[key]
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone: the runner stopped
            self._loop.call_soon_threadsafe(grant.done, error)

    # -- connections (threads)

    def _accept(self) -> None:
        while (listener := self._listener) is not None:
            try:
                raw, address = listener.accept()
            except OSError:
                if self._listener is None:
                    return
                continue
            if not self._slots.acquire(blocking=False):
                logger.warning("bulk connection from %s refused: too many at once", address[0])
                raw.close()
                continue
            threading.Thread(
                target=self._serve, args=(raw, address[0]), name="didomagic-bulk", daemon=True
            ).start()

    def _serve(self, raw: socket.socket, peer: str) -> None:
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(self.handshake_timeout)
            with self.context.wrap_socket(raw, server_side=True) as connection:
                self._serve_tls(connection, peer)
        except (OSError, ssl.SSLError) as exc:
            logger.info("bulk connection from %s dropped before its claim: %s", peer, exc)
        finally:
            raw.close()
            self._slots.release()

    def _serve_tls(self, connection: ssl.SSLSocket, peer: str) -> None:
        first = connection.recv(BULK_CLAIM_HEAD)
        if not first:  # a client finding out whether the port can be reached
            logger.debug("bulk connection from %s closed without a claim", peer)
            return
        try:
            head = first + receive_exactly(connection, BULK_CLAIM_HEAD - len(first))
            length = bulk_claim_length(head)
            claim = parse_bulk_claim(receive_exactly(connection, length))
        except (ProtocolError, TransferBroken) as exc:
            logger.warning("bulk connection from %s refused: %s", peer, exc)
            _refuse(connection, f"not a bulk claim: {exc}")
            return
        grant = self._claim(claim, connection)
        if isinstance(grant, str):
            logger.warning("bulk connection from %s refused: %s", peer, grant)
            _refuse(connection, grant)
            return
        connection.settimeout(self.io_timeout)
        error: BaseException | None = None
        started = time.perf_counter()
        try:
            grant.transfer(connection)
        except (OSError, TransferBroken) as exc:
            error = exc if isinstance(exc, TransferBroken) else TransferBroken(str(exc))
        except Exception as exc:  # handed to the session, which logs it
            error = exc
        logger.debug(
            "bulk transfer %s of cell %s: %.1f ms",
            grant.direction.value,
            grant.cell[:8],
            (time.perf_counter() - started) * 1e3,
        )
        self._finish(grant, error)


def _refuse(connection: ssl.SSLSocket, reason: str) -> None:
    with contextlib.suppress(OSError):
        connection.sendall(bulk_refusal(reason))


def receive_exactly(connection: ssl.SSLSocket, nbytes: int) -> bytes:
    """``nbytes`` bytes from ``connection``; :class:`TransferBroken` if it ends first."""
    data = bytearray()
    while len(data) < nbytes:
        chunk = connection.recv(nbytes - len(data))
        if not chunk:
            raise TransferBroken(f"the connection ended after {len(data)} of {nbytes} bytes")
        data += chunk
    return bytes(data)


def receive_upload(upload: Upload) -> Transfer:
    """The transfer of a cell's values into ``upload``'s files, as their bytes arrive.

    Bytes are decrypted into a few fixed buffers that a second thread writes
    into the files (and hashes) while the next ones arrive, so receiving and
    writing use two cores; nothing is allocated for a declared size. The
    runner's status byte confirms the last byte.
    """

    def transfer(connection: ssl.SSLSocket) -> None:
        total = sum(v.nbytes for v in upload.request.values if not v.cached)
        received = 0
        writer = _Writer(upload)
        try:
            for index, header in enumerate(upload.request.values):
                left = 0 if header.cached else header.nbytes
                while left:
                    buffer = writer.take()
                    filled, want = 0, min(left, BUFFER)
                    while filled < want:
                        n = connection.recv_into(buffer[filled:want])
                        if not n:
                            raise TransferBroken(
                                f"the client's connection ended after {received + filled:,} "
                                f"of {total:,} bytes"
                            )
                        filled += n
                    writer.give(index, buffer, filled)
                    received += filled
                    left -= filled
        except BaseException:
            writer.close(quiet=True)
            raise
        writer.close()
        connection.sendall(BULK_OK)

    return transfer


class _Writer:
    """Writes received buffers into an upload on a thread of its own, in order."""

    DEPTH = 3
    """Buffers in rotation: one being received, one being written, one spare."""

    def __init__(self, upload: Upload) -> None:
        self.upload = upload
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(self.DEPTH):
            self._free.put(memoryview(bytearray(BUFFER)))
        self._full: queue.SimpleQueue[tuple[int, memoryview, int] | None] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="didomagic-bulk-write", daemon=True)
        self._thread.start()

    def take(self) -> memoryview:
        """A free buffer (waits for the writer); raise what the writer met, if anything."""
        buffer = self._free.get()
        if self.error is not None:
            raise self.error
        return buffer

    def give(self, value: int, buffer: memoryview, nbytes: int) -> None:
        """Have the first ``nbytes`` of ``buffer`` (from :meth:`take`) written as ``value``'s."""
        self._full.put((value, buffer, nbytes))

    def close(self, quiet: bool = False) -> None:
        """Wait for every buffer to be written; raise the writer's error unless ``quiet``."""
        self._full.put(None)
        self._thread.join()
        if self.error is not None and not quiet:
            raise self.error

    def _run(self) -> None:
        while (item := self._full.get()) is not None:
            value, buffer, nbytes = item
            if self.error is None:
                try:
                    self.upload.write(value, buffer[:nbytes])
                except BaseException as exc:  # handed to the receiving thread
                    self.error = exc
            self._free.put(buffer)


def send_parts(parts: Sequence[Sequence[memoryview]]) -> Transfer:
    """The transfer of a result's values (their parts, in order) to the client."""

    def transfer(connection: ssl.SSLSocket) -> None:
        connection.sendall(BULK_OK)
        for value in parts:
            for part in value:
                if part.nbytes:
                    connection.sendall(part)

    return transfer
