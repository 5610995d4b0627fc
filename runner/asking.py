"""The kernel's end of the request channel: ask the notebook side for a resource and wait.

Code running in a runner kernel (the module finder, the file fetcher, a cell)
calls :func:`ask`. The request goes over a Unix socket in the kernel's private
exchange directory to the runner (``runner.broker``), which forwards it to the
client as an ``ask`` message and streams the client's ``answer`` back. The
call blocks the calling thread only; the runner's event loop never waits.

The socket is a file in a directory the kernel already shares with the runner,
so it works under ``--sandbox bwrap`` (the directory is bound in) and
``--no-network`` (a Unix socket bound to a path is no network). Each thread
keeps its own connection, so threads may ask at the same time.

Framing on the socket, both ways: a 4-byte big-endian length, then that many
bytes of JSON. A request is ``{"resource", "name", "args"}``; a reply is
``{"status", "message", "meta", "sizes"}`` followed by the bytes of each part,
end to end, exactly as many as ``sizes`` declares.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOCKET_NAME = "ask.sock"
"""The socket's name in the kernel's exchange directory."""

MAX_HEADER = 1 << 20
"""Largest JSON header either end accepts on the socket."""

FOUND, NOT_FOUND, REFUSED = "found", "not-found", "refused"
"""The statuses of a :class:`Reply` (the protocol's ``AnswerStatus`` values)."""

_LENGTH = struct.Struct(">I")

_socket_path: str | None = None
_local = threading.local()


class ChannelError(OSError):
    """The request channel to the runner is not there (not in a runner kernel) or broke."""


@dataclass
class Reply:
    """What the notebook side answered: a status, why, a description and the bytes."""

    status: str
    message: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    parts: list[bytearray] = field(default_factory=list)

    @property
    def found(self) -> bool:
        """True when the resource was found and sent."""
        return self.status == FOUND


def configure(exchange: str | Path) -> None:
    """Point this kernel's asks at the runner's socket in ``exchange`` (done by the agent)."""
    global _socket_path
    _socket_path = str(Path(exchange) / SOCKET_NAME)


def available() -> bool:
    """True in a runner kernel whose agent set the channel up."""
    return _socket_path is not None


def ask(
    resource: str,
    name: str,
    args: dict[str, Any] | None = None,
    *,
    sink: Callable[[int, memoryview], None] | None = None,
) -> Reply:
    """Ask the notebook side for ``resource`` ``name``; block until the answer is complete.

    ``args`` must be JSON. Without ``sink`` the reply's parts are returned in
    memory; with it, ``sink(part, chunk)`` receives each chunk as it arrives
    (write a large file straight to disk) and :attr:`Reply.parts` stays empty.
    Raise :class:`ChannelError` when there is no channel or it breaks.
    """
    if _socket_path is None:
        raise ChannelError("no request channel: this is not a didomagic runner kernel")
    request = frame({"resource": resource, "name": name, "args": args or {}})
    conn = _connection()
    try:
        conn.sendall(request)
        header = read_header(conn.recv_into)
        reply = Reply(
            str(header.get("status", REFUSED)),
            str(header.get("message", "")),
            dict(header.get("meta") or {}),
        )
        for index, size in enumerate(header.get("sizes") or []):
            if sink is None:
                buffer = bytearray(size)  # declared by the runner, which checked it
                read_exactly(conn.recv_into, memoryview(buffer))
                reply.parts.append(buffer)
            else:
                _stream(conn, int(size), lambda chunk, i=index: sink(i, chunk))
        return reply
    except BaseException:  # an interrupt mid-answer leaves the stream unusable
        _drop_connection()
        raise


def _connection() -> socket.socket:
    conn: socket.socket | None = getattr(_local, "conn", None)
    if conn is None:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(_socket_path))
        except OSError as exc:
            conn.close()
            raise ChannelError(f"cannot reach the runner's request channel: {exc}") from None
        _local.conn = conn
    return conn


def _drop_connection() -> None:
    conn = getattr(_local, "conn", None)
    _local.conn = None
    if conn is not None:
        conn.close()


def _stream(conn: socket.socket, size: int, on_chunk: Callable[[memoryview], None]) -> None:
    buffer = memoryview(bytearray(min(size, 1 << 20) or 1))
    left = size
    while left:
        got = conn.recv_into(buffer, min(left, buffer.nbytes))
        if not got:
            raise ChannelError("the runner closed the request channel mid-answer")
        on_chunk(buffer[:got])
        left -= got


def read_exactly(recv_into: Callable[[memoryview], int], into: memoryview) -> None:
    """Fill ``into`` from a stream; raise :class:`ChannelError` if it ends first."""
    position = 0
    while position < into.nbytes:
        got = recv_into(into[position:])
        if not got:
            raise ChannelError("the request channel closed mid-message")
        position += got


def read_header(recv_into: Callable[[memoryview], int]) -> dict[str, Any]:
    """Read one length-prefixed JSON object from a blocking stream."""
    prefix = bytearray(_LENGTH.size)
    read_exactly(recv_into, memoryview(prefix))
    (length,) = _LENGTH.unpack(prefix)
    if length > MAX_HEADER:
        raise ChannelError(f"request channel header of {length} bytes exceeds {MAX_HEADER}")
    body = bytearray(length)
    read_exactly(recv_into, memoryview(body))
    header = json.loads(body)
    if not isinstance(header, dict):
        raise ChannelError("request channel header is not a JSON object")
    return header


def frame(body: dict[str, Any]) -> bytes:
    """One length-prefixed JSON object, as both ends write them."""
    data = json.dumps(body, separators=(",", ":")).encode()
    return _LENGTH.pack(len(data)) + data
