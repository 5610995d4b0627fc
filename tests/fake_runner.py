"""A scripted runner for tests: a real TLS websocket server that speaks :mod:`didomagic.protocol`.

It is what a hostile (or merely broken) runner looks like to the client: it
completes the real handshakes (pinned certificate, bearer token, hello and
welcome), receives a cell and its values, and answers with whatever the test's
``script`` returns, outputs and pickles included. It runs no code.

::

    with FakeRunner(tmp_path, lambda request, values: Reply(values={"x": [payload]})) as fake:
        api.run_cell(api.CellSpec("y = 1"), ns, runner=str(fake.url(safe=True)))
"""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from didomagic.protocol import (
    PROTOCOL_VERSION,
    Execute,
    Info,
    Output,
    Query,
    Result,
    Role,
    Session,
    State,
    Status,
    ValueHeader,
    Welcome,
    cloudpickle_version,
    python_version,
)
from didomagic.urls import ConnectionURL
from runner import certs
from runner.server import check_token

from .conftest import TIMEOUT


@dataclass
class Reply:
    """What the fake runner answers to one cell."""

    values: dict[str, list[bytes]] = field(default_factory=dict)
    """Returned values by name: each a list of parts (pickle stream first)."""
    deleted: tuple[str, ...] = ()
    outputs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    """``(msg_type, content)`` of each output, sent before the result."""
    status: Status = Status.OK
    failures: dict[str, str] = field(default_factory=dict)


def pickled(value: object) -> list[bytes]:
    """The parts of ``value`` as a plain pickle (one part, no out-of-band buffers)."""
    return [pickle.dumps(value, protocol=5)]


Script = Callable[[Execute, dict[str, list[bytes]]], Reply]
"""Given the cell and the values it sent (parts by name), what to answer."""


class FakeRunner:
    """A scripted runner on 127.0.0.1, port 0, in a thread of its own; a context manager."""

    DESCRIPTION = {"name": "fake", "tags": [], "sessions": 0, "max_sessions": 1}

    def __init__(self, tmp: Path, script: Script, token: str = "fake-runner-token") -> None:
        self.script = script
        self.token = token
        self.requests: list[Execute] = []
        """Every cell received, in order."""
        self.received: list[dict[str, list[bytes]]] = []
        """The values each cell sent, by name."""
        tmp.mkdir(parents=True, exist_ok=True)
        self.certfile, self.keyfile, self.fingerprint = certs.generate(tmp, ["127.0.0.1"])
        self._loop = asyncio.new_event_loop()
        self._server: Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(TIMEOUT)

    def url(self, safe: bool = False) -> ConnectionURL:
        """Its connection URL (pinned, with the token); ``safe`` adds ``--safe-results``."""
        return ConnectionURL(
            "127.0.0.1", self.port, self.token, self.fingerprint, safe_results=safe
        )

    async def _start(self) -> int:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            ssl=certs.server_context(self.certfile, self.keyfile),
            process_request=self._authenticate,
            compression=None,
            max_size=None,
        )
        return int(next(iter(self._server.sockets)).getsockname()[1])

    def _authenticate(self, connection: ServerConnection, request: Request) -> Response | None:
        if check_token(request, self.token):
            return None
        return connection.respond(401, "wrong token\n")

    async def _handle(self, ws: ServerConnection) -> None:
        session = Session(Role.RUNNER)
        first = session.receive(await ws.recv())
        if isinstance(first, Query):
            await ws.send(session.send(Info("runner", (self.DESCRIPTION,), "fake")))
            return
        welcome = Welcome(
            PROTOCOL_VERSION, python_version(), cloudpickle_version(), "s", self.DESCRIPTION
        )
        await ws.send(session.send(welcome))
        request: Execute | None = None
        parts: list[list[bytearray]] = []
        async for frame in ws:
            if isinstance(frame, str):
                message = session.receive(frame)
                if isinstance(message, Execute):
                    request = message
                    parts = [[bytearray(size) for size in v.sizes] for v in message.values]
            else:
                for chunk in session.receive_binary(frame):
                    target = parts[chunk.value][chunk.part]
                    target[chunk.offset : chunk.offset + chunk.data.nbytes] = chunk.data
            if request is not None and session.state is State.RUNNING:
                await self._answer(ws, session, request, parts)
                request = None

    async def _answer(
        self,
        ws: ServerConnection,
        session: Session,
        request: Execute,
        parts: list[list[bytearray]],
    ) -> None:
        sent = {v.name: [bytes(p) for p in ps] for v, ps in zip(request.values, parts, strict=True)}
        self.requests.append(request)
        self.received.append(sent)
        reply = self.script(request, sent)
        for msg_type, content in reply.outputs:
            await ws.send(session.send(Output(request.cell, msg_type, content)))
        headers = tuple(
            ValueHeader(name, tuple(len(p) for p in ps)) for name, ps in reply.values.items()
        )
        result = Result(
            request.cell, reply.status, headers, reply.deleted, dict(reply.failures), None
        )
        await ws.send(session.send(result))
        views = [[memoryview(p) for p in ps] for ps in reply.values.values()]
        for frame in session.frames(views):
            await ws.send(frame)

    def close(self) -> None:
        """Stop serving and end its thread."""

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(TIMEOUT)
        self._loop.close()

    def __enter__(self) -> FakeRunner:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
