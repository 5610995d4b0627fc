"""The runner's middle of the request channel: kernel asks go to the client, answers come back.

A :class:`Broker` listens on a Unix socket in its kernel's exchange directory
(see ``runner.asking`` for the kernel's end and the framing). While a cell
runs, each request read there becomes an :class:`~didomagic.protocol.Ask` on
the session's websocket; the client's :class:`~didomagic.protocol.Answer`
and its parts are written back to the kernel connection that asked, chunk by
chunk as the frames arrive, so nothing is held whole in the runner.

Everything here runs on the runner's event loop and never blocks it: reading
a request waits on the socket, and forwarding an answer only waits (bounded
by :data:`DRAIN_TIMEOUT`) when the kernel has stopped reading a large one.
Outside a cell every request is refused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from didomagic.protocol import MAX_OPEN_ASKS, Answer, AnswerStatus, Ask, Chunk
from runner.asking import MAX_HEADER, SOCKET_NAME, frame

logger = logging.getLogger("didomagic.runner")

HIGH_WATER = 16 << 20
"""Bytes buffered towards a kernel beyond which forwarding waits for it to read."""

DRAIN_TIMEOUT = 30.0
"""Seconds a kernel may leave a large answer unread before its connection is dropped."""

MAX_NAME = 4096
"""Longest resource name accepted from a kernel."""

_LENGTH = struct.Struct(">I")


class _Open:
    """One ask waiting for its answer: the kernel connection it goes back to."""

    def __init__(self, ask: Ask, writer: asyncio.StreamWriter) -> None:
        self.id = ask.id
        self.ask = ask
        self.writer = writer
        self.left = 0
        self.done = asyncio.get_running_loop().create_future()

    async def forward(self, data: bytes | memoryview) -> None:
        """Write towards the kernel; drop the connection if it stopped reading."""
        if self.writer.is_closing():
            return
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > HIGH_WATER:
            try:
                await asyncio.wait_for(self.writer.drain(), DRAIN_TIMEOUT)
            except (TimeoutError, ConnectionError):
                logger.warning("a kernel stopped reading an answer; dropping its connection")
                self.writer.close()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class Broker:
    """Carries one kernel's asks to the client and the client's answers back."""

    def __init__(self, exchange: Path, send: Callable[[Ask], None], log_id: str = "") -> None:
        self.path = exchange / SOCKET_NAME
        self._send = send
        self._log_id = log_id
        self._cell: str | None = None
        self._open: dict[str, _Open] = {}
        self._ids = itertools.count(1)
        self._receiving: _Open | None = None
        self._settled = asyncio.Event()
        self._settled.set()
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.asked = 0
        """Asks forwarded to the client over the life of this broker."""

    async def start(self) -> None:
        """Listen on the kernel's socket (only the runner's user may connect)."""
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        """Stop listening and drop every kernel connection."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()
        for pending in self._open.values():
            pending.finish()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    def open_cell(self, cell: str) -> None:
        """Accept asks for ``cell`` from now on."""
        self._cell = cell

    def close_cell(self) -> None:
        """Refuse asks from now on (the cell ended; its open asks still get their answers)."""
        self._cell = None

    async def settled(self) -> None:
        """Return once every ask sent has its whole answer (the result may then go)."""
        await self._settled.wait()

    # -- the client's side

    async def on_answer(self, answer: Answer) -> None:
        """An answer arrived: send its header to the kernel; its parts follow."""
        pending = self._open.get(answer.id)
        if pending is None:  # the protocol checked the id: this is a bug, not input
            raise RuntimeError(f"answer for unknown ask {answer.id}")
        header = {
            "status": answer.status.value,
            "message": answer.message,
            "meta": answer.meta,
            "sizes": list(answer.sizes),
        }
        await pending.forward(frame(header))
        pending.left = answer.nbytes
        if pending.left:
            self._receiving = pending
        else:
            self._finish(answer.id)

    async def on_parts(self, chunks: Sequence[Chunk]) -> None:
        """Bytes of the answer in flight arrived: pass them on to its kernel connection."""
        pending = self._receiving
        assert pending is not None
        for chunk in chunks:
            await pending.forward(chunk.data)
            pending.left -= chunk.data.nbytes
        if pending.left <= 0:
            self._receiving = None
            self._finish(pending.id)

    def connection_lost(self) -> None:
        """The client's connection dropped: an answer cut halfway fails its kernel connection.

        The asks not answered yet stay open; :meth:`resend` sends them on the
        connection that takes the session back.
        """
        pending, self._receiving = self._receiving, None
        if pending is not None:
            pending.writer.close()  # the kernel's read fails: its import or open raises
            self._finish(pending.id)

    def resend(self) -> None:
        """Send every open ask again (on a connection that took the session back)."""
        for pending in list(self._open.values()):
            self._send(pending.ask)

    def _finish(self, ask_id: str) -> None:
        pending = self._open.pop(ask_id)
        pending.finish()
        if not self._open:
            self._settled.set()

    # -- the kernel's side

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                await self._handle(request, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except ValueError as exc:  # a malformed request: drop this connection only
            logger.warning("session %s: bad request from its kernel: %s", self._log_id, exc)
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _handle(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        resource, name, args = request.get("resource"), request.get("name"), request.get("args")
        if not (isinstance(resource, str) and isinstance(name, str) and isinstance(args, dict)):
            return _refuse(writer, "a request needs a resource and a name (strings) and args")
        if len(name) > MAX_NAME:
            return _refuse(writer, f"a resource name is at most {MAX_NAME} characters")
        if self._cell is None:
            return _refuse(
                writer, "no cell is running: the notebook side answers only while one runs"
            )
        if len(self._open) >= MAX_OPEN_ASKS:
            return _refuse(writer, f"more than {MAX_OPEN_ASKS} requests open at once")
        ask = Ask(self._cell, str(next(self._ids)), resource, name, args)
        pending = self._open[ask.id] = _Open(ask, writer)
        self._settled.clear()
        self.asked += 1
        logger.debug("session %s: kernel asks for %s %r", self._log_id, resource, name[:200])
        self._send(ask)
        await pending.done


def _refuse(writer: asyncio.StreamWriter, why: str) -> None:
    writer.write(frame({"status": AnswerStatus.REFUSED.value, "message": why}))


async def _read_request(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next request on a kernel connection; None at a clean end of the stream."""
    try:
        prefix = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    (length,) = _LENGTH.unpack(prefix)
    if length > MAX_HEADER:
        raise ValueError(f"request of {length} bytes exceeds {MAX_HEADER}")
    body = json.loads(await reader.readexactly(length))
    if not isinstance(body, dict):
        raise ValueError("a request must be a JSON object")
    return body
