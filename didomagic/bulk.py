"""The notebook side of a runner's bulk port: large values over a blocking, pinned TLS socket.

A runner's welcome names its bulk port (see :mod:`didomagic.protocol`, "Bulk
transfers"). A :class:`BulkLink` opens connections there with the session's
own pinned TLS context, so an impostor on that port fails the handshake just
as it would on the websocket. Every function here blocks: the session's I/O
loop runs them with ``asyncio.to_thread``.

Sending takes the bytes straight from the values' pickle buffers (zero-copy
``sendall`` of memoryviews). Receiving decrypts into one small buffer and
appends to each part as its bytes arrive, so a part exists only as far as its
bytes have come (a declared size is never allocated in advance): a
``bytearray`` grows by ``realloc``, which moves no bytes for large sizes.
That measured faster than decrypting straight into fresh memory.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence

from didomagic.errors import TransferFailed
from didomagic.protocol import (
    BULK_OK,
    BULK_REFUSED,
    MAX_BULK_REASON,
    BulkClaim,
    ValueHeader,
    bulk_claim,
)

logger = logging.getLogger("didomagic.client")

CONNECT_TIMEOUT = 10.0
"""Seconds to reach the bulk port and finish the TLS handshake."""

IO_TIMEOUT = 120.0
"""Seconds a bulk connection may go without moving a byte."""

STEP = 16 << 20
"""Bytes per ``sendall`` / progress report."""

HOT = 1 << 20
"""Bytes of the one buffer a received value's bytes are decrypted into before they are kept."""

Progress = Callable[[int, int], None]
"""Called with (bytes moved, bytes in all) as a transfer goes."""


class BulkLink:
    """Where a session's bulk connections go (the runner's host, its bulk port), pinned."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        self.host, self.port, self.context = host, port, context
        self.reachable: bool | None = None
        """Whether a connection got through (None: not tried yet). False: the websocket it is."""
        self._probing: threading.Thread | None = None

    def connect(self) -> ssl.SSLSocket | None:
        """A new bulk connection, or None (logged once) when the port cannot be had."""
        if self.reachable is False:
            return None
        try:
            raw = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            return self._unreachable(exc)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = self.context.wrap_socket(raw, server_hostname=self.host)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            return self._unreachable(exc)
        connection.settimeout(IO_TIMEOUT)
        self.reachable = True
        return connection

    def probe(self) -> None:
        """Find out in the background whether the port can be had (see :attr:`reachable`)."""

        def run() -> None:
            connection = self.connect()
            if connection is not None:
                connection.close()

        self._probing = threading.Thread(target=run, name="didomagic-bulk-probe", daemon=True)
        self._probing.start()

    def _unreachable(self, exc: BaseException) -> None:
        if self.reachable is not False:
            logger.warning(
                "the runner's bulk port %s:%d cannot be used (%s); large values of this "
                "session travel over its websocket",
                self.host,
                self.port,
                exc,
            )
        self.reachable = False
        return None


def send_values(
    connection: ssl.SSLSocket,
    claim: BulkClaim,
    values: Sequence[ValueHeader],
    parts: Sequence[Sequence[memoryview]],
    progress: Progress,
) -> None:
    """Send the claim, then every byte of the values not declared cached; wait for the OK."""
    total = sum(v.nbytes for v in values if not v.cached)
    sent = 0
    with connection:
        try:
            connection.sendall(bulk_claim(claim))
            for header, value_parts in zip(values, parts, strict=True):
                if header.cached:
                    continue
                for part in value_parts:
                    for start in range(0, part.nbytes, STEP):
                        piece = part[start : start + STEP]
                        connection.sendall(piece)
                        sent += piece.nbytes
                        progress(sent, total)
        except OSError as exc:
            raise TransferFailed(_broken("sending", sent, total, exc, connection)) from None
        _expect_ok(connection, "sending", sent, total)


def receive_values(
    connection: ssl.SSLSocket, claim: BulkClaim, values: Sequence[ValueHeader], progress: Progress
) -> list[list[bytearray]]:
    """Send the claim, then receive every part of ``values`` as its bytes arrive."""
    total = sum(v.nbytes for v in values)
    received = 0
    hot = memoryview(bytearray(HOT))
    out: list[list[bytearray]] = []
    with connection:
        try:
            connection.sendall(bulk_claim(claim))
            _expect_ok(connection, "receiving", 0, total)
            for header in values:
                out.append([])
                for size in header.sizes:
                    part = _receive_part(
                        connection, size, hot, lambda n, base=received: progress(base + n, total)
                    )
                    out[-1].append(part)
                    received += size
        except (OSError, _Short) as exc:
            raise TransferFailed(
                _broken("receiving", received + getattr(exc, "got", 0), total, exc, None)
            ) from None
    return out


class _Short(Exception):
    """The connection ended inside a part (``got`` of its bytes arrived)."""

    def __init__(self, got: int, size: int) -> None:
        super().__init__(f"the connection ended after {got:,} of a part's {size:,} bytes")
        self.got = got


def _receive_part(
    connection: ssl.SSLSocket, size: int, hot: memoryview, progress: Callable[[int], None]
) -> bytearray:
    """One part of ``size`` bytes, appended to as its bytes arrive through ``hot``."""
    part = bytearray()
    reported = 0
    while len(part) < size:
        want = min(size - len(part), hot.nbytes)
        filled = 0
        while filled < want:
            n = connection.recv_into(hot[filled:want])
            if not n:
                raise _Short(len(part) + filled, size)
            filled += n
        part += hot[:filled]
        if len(part) - reported >= STEP:
            reported = len(part)
            progress(reported)
    progress(size)
    return part


def _expect_ok(connection: ssl.SSLSocket, doing: str, done: int, total: int) -> None:
    """Read the runner's status byte; raise :class:`TransferFailed` with its reason if not OK."""
    try:
        status = connection.recv(1)
    except OSError as exc:
        raise TransferFailed(_broken(doing, done, total, exc, None)) from None
    if status == BULK_OK:
        return
    if status == BULK_REFUSED:
        raise TransferFailed(f"the runner refused the bulk connection: {_reason(connection)}")
    raise TransferFailed(_broken(doing, done, total, "the runner closed it", None))


def _reason(connection: ssl.SSLSocket) -> str:
    reason = bytearray()
    with contextlib.suppress(OSError):
        while len(reason) < MAX_BULK_REASON and (chunk := connection.recv(MAX_BULK_REASON)):
            reason += chunk
    return reason.decode(errors="replace") or "no reason given"


def _broken(
    doing: str, done: int, total: int, exc: object, connection: ssl.SSLSocket | None
) -> str:
    said = ""
    if connection is not None:  # a refusal may be waiting behind the broken send
        with contextlib.suppress(OSError):
            connection.settimeout(1.0)
            if connection.recv(1) == BULK_REFUSED:
                said = f"; the runner said: {_reason(connection)}"
    return (
        f"the bulk connection broke while {doing} values, after {done:,} of {total:,} "
        f"bytes ({exc}){said}. The session is fine: run the cell again"
    )
