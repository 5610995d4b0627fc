"""An asyncio connection to one runner: pinned TLS, token, and the cell exchange.

Certificate pinning happens *during* the TLS handshake: the client first
fetches the runner's certificate over a connection on which it sends nothing,
checks its SHA-256 against the fingerprint in the connection URL, and then
connects with that certificate as the only trust anchor. An impostor at the
same address fails the second handshake and never sees the token, which only
travels in the ``Authorization`` header of the websocket upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

import didomagic
from didomagic.bulk import BulkLink, receive_values, send_values
from didomagic.errors import (
    AuthenticationFailed,
    ConfigurationError,
    ConnectionLost,
    DidomagicError,
    FingerprintMismatch,
    NoMatchingRunner,
    ProtocolError,
    RunnerBusy,
    RunnerUnreachable,
    SessionEnded,
    TransferFailed,
    VersionMismatch,
)
from didomagic.inbound import Inbound
from didomagic.protocol import (
    ASIDE,
    BULK_MIN,
    MAX_TEXT_SIZE,
    PROTOCOL_VERSION,
    RUNNER_GONE_CODE,
    Answer,
    Ask,
    Attach,
    Attached,
    BulkClaim,
    BulkTicket,
    Channel,
    Chunk,
    CommMsg,
    Error,
    ErrorCode,
    Execute,
    Hello,
    Info,
    Installing,
    Interrupt,
    ListSessions,
    Message,
    Output,
    Query,
    Queued,
    Result,
    Role,
    Session,
    SessionList,
    Welcome,
    cloudpickle_version,
    expect,
    python_version,
)
from didomagic.protocol import Direction as BulkDirection
from didomagic.protocol import Status as CellStatus
from didomagic.resources import Responder
from didomagic.urls import ConnectionURL

logger = logging.getLogger("didomagic.client")

NO_ANSWERS = Responder(
    {}, "this connection answers no requests: a detached job carries its modules with it"
)
"""Refuses every ask: for connections with no notebook behind them (job holders)."""

OPEN_TIMEOUT = 20.0
"""Seconds to reach a runner and complete both handshakes."""

DETACH_CODE = 4001
"""Close code of a client that lets go of a session without ending it (any but 1000 keeps it)."""

_pinned: dict[tuple[str, str], bytes] = {}
"""Certificates already fetched and checked, by (address, fingerprint)."""


async def _fetch_certificate(url: ConnectionURL, timeout: float) -> bytes:
    """The DER certificate the runner presents; nothing is sent after the handshake."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    _present_identity(probe, url)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(url.host, url.port, ssl=probe), timeout
        )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise _unreachable(url, exc) from None
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


async def tls_context(url: ConnectionURL, timeout: float = OPEN_TIMEOUT) -> ssl.SSLContext:
    """A client TLS context that trusts only the pinned certificate (or the system CAs)."""
    if url.fingerprint is None:
        system = ssl.create_default_context()
        _present_identity(system, url)
        return system
    key = (url.address, url.fingerprint)
    der = _pinned.get(key)
    if der is None:
        der = await _fetch_certificate(url, timeout)
        got = hashlib.sha256(der).hexdigest()
        if got != url.fingerprint:
            raise FingerprintMismatch(url.address, url.fingerprint, got)
        _pinned[key] = der
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the pin identifies the runner, whatever its name
    context.load_verify_locations(cadata=der)
    _present_identity(context, url)
    return context


def _present_identity(context: ssl.SSLContext, url: ConnectionURL) -> None:
    """Load the client certificate the URL names (for runners with --client-ca)."""
    if url.client_cert is None:
        return
    try:
        context.load_cert_chain(url.client_cert, url.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"Cannot load the client certificate {url.client_cert}"
            f"{' with key ' + url.client_key if url.client_key else ''}: {exc}. Check the "
            "paths given to '%runners add ... --client-cert/--client-key'."
        ) from None


_CERTIFICATE_REFUSED = (
    "CERTIFICATE_REQUIRED",
    "UNKNOWN_CA",
    "BAD_CERTIFICATE",
    "CERTIFICATE_UNKNOWN",
)
"""TLS alerts a server sends when it wants a client certificate it did not get."""


def _refused_after_handshake(url: ConnectionURL, context: ssl.SSLContext) -> bool:
    """Whether the server drops us right after the TLS handshake, before any request.

    That is what a server with ``--client-ca`` does to a certificate it does
    not accept under TLS 1.3 (it checks it after the client has finished its
    handshake, and closes); a server that accepted us waits for our request.
    """
    try:
        raw = socket.create_connection((url.host, url.port), timeout=REFUSAL_PROBE)
        with context.wrap_socket(raw, server_hostname=url.host) as tls:
            return tls.recv(1) == b""
    except ssl.SSLError as exc:
        return _certificate_refused(exc)
    except OSError:  # a timeout: the server waits for a request, so it accepted us
        return False


REFUSAL_PROBE = 3.0
"""Seconds to wait, when a connection failed, for a server to drop a fresh one."""


def _certificate_refused(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what caused it) is a TLS alert refusing our client certificate."""
    while exc is not None:
        if any(alert in str(exc) for alert in _CERTIFICATE_REFUSED):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _unreachable(url: ConnectionURL, exc: BaseException) -> RunnerUnreachable:
    reason = str(exc) or type(exc).__name__
    return RunnerUnreachable(
        f"Cannot reach the runner at {url.address}: {reason}. Check that didomagic-runner is "
        "running there, that the address and port in the connection URL are right, and that "
        "no firewall is in the way.",
        absent=isinstance(exc, ConnectionRefusedError),
    )


class RunnerConnection:
    """An open session with a runner. Use :func:`open_connection` to make one."""

    def __init__(
        self, ws: Any, session: Session, welcome: Welcome, url: ConnectionURL | None
    ) -> None:
        self.ws = ws
        self.session = session
        self.welcome = welcome
        self.url = url
        self.running: str | None = None
        self.received = 0
        """Outputs of the running cell received so far."""
        self.attached: Attached | None = None
        """The runner's answer, for a connection that took a kept session back."""
        self.ended_by_runner = False
        """Whether the session ended with the connection (closed on purpose, or its runner is
        gone: see RUNNER_GONE_CODE): nothing to take back."""
        self._answer_lock = asyncio.Lock()  # an answer's frames follow it, unbroken
        self.on_aside: Callable[[Message | None], None] = lambda message: None
        """Gets each widget message (Comm, SideOutput, CommDone), then None once closed."""
        self._inbox: asyncio.Queue[Message | list[Chunk] | BaseException] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._on_output: Callable[[Output], None] | None = None
        self.bulk: BulkLink | None = None
        """The runner's bulk port, when it has one and is reached directly (see didomagic.bulk)."""
        self._uploading: ssl.SSLSocket | None = None
        self._bulk_upload: tuple[ssl.SSLSocket, Execute, Sequence[Sequence[memoryview]]] | None = (
            None
        )

    def listen(self, on_aside: Callable[[Message | None], None]) -> None:
        """Read the session from now on, in and between cells; widget traffic to ``on_aside``."""
        self.on_aside = on_aside
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        """The one reader of the websocket: widget traffic aside, the rest to the cell."""
        try:
            while True:
                frame = await self.ws.recv()
                if isinstance(frame, bytes):
                    self._inbox.put_nowait(self.session.receive_binary(frame))
                    continue
                message = self.session.receive(frame)
                if isinstance(message, ASIDE):
                    self.on_aside(message)
                elif isinstance(message, Output) and self._on_output is not None:
                    self._on_output(message)  # at once: in order with the widget traffic
                else:
                    self._inbox.put_nowait(message)
        except ProtocolError as exc:
            self._inbox.put_nowait(exc)
            if self.running is None:
                logger.warning("runner %s broke the protocol: %s", self.runner_name, exc)
                await self.ws.close(1002, "protocol error")
        except ConnectionClosed as exc:
            self._inbox.put_nowait(exc)
        finally:
            self.on_aside(None)

    async def _next(self) -> Message | list[Chunk]:
        item = await self._inbox.get()
        if isinstance(item, BaseException):
            self._inbox.put_nowait(item)  # the session is over: say so to every later caller
            raise item
        return item

    async def send_comm(self, message: CommMsg) -> None:
        """Send the notebook frontend's comm message to the runner's kernel."""
        if not self.closed:
            with contextlib.suppress(ConnectionClosed, ProtocolError):
                await self.ws.send(self.session.send(message))

    @property
    def runner_name(self) -> str:
        """The runner's name, as it introduced itself."""
        return str(self.welcome.runner.get("name") or (self.url.address if self.url else "?"))

    @property
    def closed(self) -> bool:
        """True once the websocket is closed (the remote session is gone)."""
        return self.ws.close_code is not None

    async def execute(
        self,
        request: Execute,
        parts: Sequence[Sequence[memoryview]],
        on_output: Callable[[Output], None],
        on_transfer: Callable[[str, int, int], None] = lambda direction, done, total: None,
        on_installing: Callable[[Installing], None] = lambda message: None,
        responder: Responder = NO_ANSWERS,
    ) -> tuple[Result, list[list[bytearray]]]:
        """Run one cell: send it and its values, stream outputs, return the result and values.

        ``on_transfer(direction, done, total)`` follows the bytes of values
        moving ("sending" or "receiving"), once per binary frame;
        ``on_installing`` gets the runner's package installation progress; the
        kernel's asks while the cell runs are answered by ``responder``. Outputs
        go to ``on_output`` as the session's reader gets them (in order with the
        widget traffic, see :meth:`listen`).
        """
        await self.send_cell(request, parts, on_transfer)
        return await self.receive_result(
            request.cell, on_output, on_transfer, on_installing, responder
        )

    async def send_cell(
        self,
        request: Execute,
        parts: Sequence[Sequence[memoryview]],
        on_transfer: Callable[[str, int, int], None] = lambda direction, done, total: None,
    ) -> None:
        """Send a cell and its values (the first half of :meth:`execute`).

        Values of :data:`~didomagic.protocol.BULK_MIN` bytes or more go over the
        runner's bulk port when it can be reached (the websocket otherwise).
        """
        self.running = request.cell
        self.received = 0
        total = sum(v.nbytes for v in request.values if not v.cached)
        link = self.bulk
        connection = None
        if link is not None and total >= BULK_MIN:
            connection = await asyncio.to_thread(link.connect)
        bulk_out = link is not None and link.reachable is True
        request = replace(request, bulk_in=connection is not None, bulk_out=bulk_out)
        self._bulk_upload = None if connection is None else (connection, request, parts)
        async with self._translated():
            await self.ws.send(self.session.send(request))
            if connection is not None:
                return  # the runner's ticket comes next (see receive_result)
            sent = 0
            for frame in self.session.frames(parts):
                await self.ws.send(frame)
                sent += frame.nbytes
                on_transfer("sending", sent, total)

    async def receive_result(
        self,
        cell: str,
        on_output: Callable[[Output], None],
        on_transfer: Callable[[str, int, int], None] = lambda direction, done, total: None,
        on_installing: Callable[[Installing], None] = lambda message: None,
        responder: Responder = NO_ANSWERS,
    ) -> tuple[Result, list[list[bytearray]]]:
        """Stream the outputs of ``cell``, answer its asks, return its result and values.

        :attr:`received` counts its outputs, so a reattach asks only for the rest.
        """
        self.running = cell
        answering: set[asyncio.Task[None]] = set()
        uploading: asyncio.Future[None] | None = None

        def counted(output: Output) -> None:
            self.received += 1
            on_output(output)

        self._on_output = counted  # the reader hands outputs over at once, in order
        if self._reader is None:
            self.listen(self.on_aside)
        try:
            async with self._translated():
                result: Result | None = None
                inbound = Inbound()
                received = expected = 0
                while result is None or received < expected:
                    message = await self._next()
                    if isinstance(message, list):
                        for chunk in message:
                            inbound.add(chunk)
                            received += chunk.data.nbytes
                        on_transfer("receiving", received, expected)
                        continue
                    if isinstance(message, BulkTicket):
                        uploading = self._upload(message, on_transfer)
                    elif isinstance(message, Installing):
                        on_installing(message)
                    elif isinstance(message, Ask):
                        task = asyncio.create_task(self._answer(message, responder))
                        answering.add(task)
                        task.add_done_callback(answering.discard)
                    elif isinstance(message, Result):
                        if uploading is not None:  # (its connection has ended: the runner's)
                            await asyncio.wait([uploading])
                        if message.status is CellStatus.TRANSFER_FAILED:
                            raise TransferFailed(
                                f"Runner {self.runner_name}: "
                                f"{(message.error or {}).get('message', 'the transfer failed')}. "
                                "The session is fine: run the cell again."
                            )
                        if message.bulk:
                            return message, await self._download(message, on_transfer)
                        result = message
                        inbound = Inbound(message.values)
                        expected = sum(v.nbytes for v in message.values)
                    elif isinstance(message, Error):
                        raise ProtocolError(f"the runner ended the session: {message.message}")
                return result, inbound.parts
        finally:
            self.running = None
            self._on_output = None
            for task in list(answering):
                task.cancel()
            self._abandon_upload(uploading)

    def _upload(
        self, ticket: BulkTicket, on_transfer: Callable[[str, int, int], None]
    ) -> asyncio.Future[None]:
        """Send the cell's values on the bulk connection :meth:`send_cell` opened, on a thread."""
        if self._bulk_upload is None or self._bulk_upload[1].cell != ticket.cell:
            raise ProtocolError(f"a bulk ticket for cell {ticket.cell!r:.40}, which sent none")
        connection, request, parts = self._bulk_upload
        self._bulk_upload = None
        claim = BulkClaim(ticket.ticket, self.welcome.session, ticket.cell, BulkDirection.IN)
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(on_transfer, "sending", done, total)

        def sent(future: asyncio.Future[None]) -> None:
            if not future.cancelled() and future.exception() is not None:
                logger.warning("bulk upload to %s: %s", self.runner_name, future.exception())

        future = asyncio.ensure_future(
            asyncio.to_thread(send_values, connection, claim, request.values, parts, progress)
        )
        future.add_done_callback(sent)  # (the runner's result says how the cell fared)
        self._uploading = connection
        return future

    def _abandon_upload(self, uploading: asyncio.Future[None] | None) -> None:
        """Break a bulk upload still going (or never started) when the cell is over."""
        pending = self._bulk_upload
        self._bulk_upload = None
        if pending is not None:
            pending[0].close()
        if uploading is not None and not uploading.done() and self._uploading is not None:
            with contextlib.suppress(OSError):
                self._uploading.shutdown(socket.SHUT_RDWR)

    async def _download(
        self, result: Result, on_transfer: Callable[[str, int, int], None]
    ) -> list[list[Any]]:
        """The values of ``result`` over a bulk connection opened with its ticket."""
        link = self.bulk
        if link is None:
            raise ProtocolError("a result with a bulk ticket on a connection with no bulk port")
        connection = await asyncio.to_thread(link.connect)
        if connection is None:
            raise TransferFailed(
                f"Runner {self.runner_name} sent its result over its bulk port, which cannot "
                "be reached now; its values stay bound in the remote session. Run the cell "
                "again: it uses the websocket from now on."
            )
        claim = BulkClaim(result.bulk, self.welcome.session, result.cell, BulkDirection.OUT)
        loop = asyncio.get_running_loop()

        def progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(on_transfer, "receiving", done, total)

        try:
            return await asyncio.to_thread(
                receive_values, connection, claim, result.values, progress
            )
        except TransferFailed as exc:
            raise TransferFailed(
                f"Runner {self.runner_name}: {exc}; the values stay bound in the remote session"
            ) from None

    @contextlib.asynccontextmanager
    async def _translated(self) -> AsyncIterator[None]:
        """A protocol error closes the connection; a dropped one is :class:`ConnectionLost`."""
        try:
            yield
        except ProtocolError:
            self._abandon_upload(None)
            await self.ws.close(1002, "protocol error")
            raise
        except ConnectionClosed as exc:
            self._abandon_upload(None)
            ended = (1000, RUNNER_GONE_CODE)  # on purpose, or its runner is gone for good
            self.ended_by_runner = exc.rcvd is not None and exc.rcvd.code in ended
            raise ConnectionLost(
                f"The connection to runner {self.runner_name} was lost while the cell was "
                f"running ({exc})."
            ) from None

    async def _answer(self, ask: Ask, responder: Responder) -> None:
        """Answer one ask (the handler runs in a worker thread), then send its parts."""
        reply = await asyncio.to_thread(responder.answer, ask)
        parts = [memoryview(p).cast("B") for p in reply.parts]
        answer = Answer(
            ask.cell,
            ask.id,
            reply.status,
            reply.message,
            reply.meta,
            tuple(p.nbytes for p in parts),
        )
        async with self._answer_lock:
            with contextlib.suppress(ConnectionClosed):
                await self.ws.send(self.session.send(answer))
                for frame in self.session.frames([parts]):
                    await self.ws.send(frame)

    async def interrupt(self) -> None:
        """Ask the runner to interrupt the running cell."""
        if self.running is not None and not self.closed:
            with contextlib.suppress(ConnectionClosed, ProtocolError):
                await self.ws.send(self.session.send(Interrupt(self.running)))

    async def close(self) -> None:
        """End the session (the runner frees its kernel at once)."""
        await self.ws.close()

    async def detach(self) -> None:
        """Let go of the connection; the runner keeps the session for its grace period."""
        await self.ws.close(DETACH_CODE, "detached")


async def dial(
    url: ConnectionURL,
    path: str = "",
    headers: dict[str, str] | None = None,
    timeout: float = OPEN_TIMEOUT,
) -> ClientConnection:
    """Open a pinned, authenticated websocket to ``url`` (plus ``path``).

    Raise a :class:`ConnectError` subclass that says what to do when it fails.
    """
    context = await tls_context(url, timeout)
    try:
        return await connect(
            url.websocket_uri + path,
            ssl=context,
            server_hostname=url.host,
            additional_headers={"Authorization": f"Bearer {url.token}", **(headers or {})},
            user_agent_header=f"didomagic/{didomagic.__version__}",
            compression=None,
            max_size=MAX_TEXT_SIZE,
            write_limit=4 << 20,
            proxy=None,  # a token must never be handed to a proxy
            open_timeout=timeout,
            logger=logging.getLogger("didomagic.client.websockets"),
        )
    except InvalidStatus as exc:
        if exc.response.status_code == 503:
            body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
            raise RunnerBusy(
                f"The server at {url.address} refused a new connection: "
                f"{body or 'too many connections'}"
            ) from None
        if exc.response.status_code == 401:
            raise AuthenticationFailed(
                f"The server at {url.address} refused the token (missing or wrong). Copy the "
                "connection URL again from the runner's (or mediator's) output or its "
                "--url-file; one started with a new --token or state directory has a new one."
            ) from None
        raise _unreachable(url, exc) from None
    except ssl.SSLCertVerificationError as exc:
        if url.fingerprint is None:
            raise RunnerUnreachable(
                f"The certificate of {url.address} is not trusted by this system's CAs "
                f"({exc.verify_message}). For a runner with a self-signed certificate, use its "
                "full connection URL, which pins the certificate with #fp=…."
            ) from None
        _pinned.pop((url.address, url.fingerprint), None)
        raise RunnerUnreachable(
            f"The TLS handshake with {url.address} failed: its certificate is not the pinned "
            "one. The runner may have been restarted with a new certificate; copy its new "
            "connection URL."
        ) from None
    except (OSError, TimeoutError, InvalidHandshake, ssl.SSLError) as exc:
        if _certificate_refused(exc) or (
            isinstance(exc, InvalidHandshake)
            and await asyncio.to_thread(_refused_after_handshake, url, context)
        ):
            raise AuthenticationFailed(
                f"The server at {url.address} closed the connection right after the TLS "
                "handshake: it requires a client certificate signed by its certificate "
                "authority (it runs with --client-ca), and "
                + (
                    "none was presented"
                    if url.client_cert is None
                    else f"it did not accept {url.client_cert}"
                )
                + ". Add the runner with '%runners add URL --client-cert FILE --client-key "
                "FILE' using a certificate its owner issued (didomagic-runner "
                "gen-client-cert)."
            ) from None
        raise _unreachable(url, exc) from None


@dataclass(frozen=True)
class Requirements:
    """What a session needs of its runner; a mediator matches runners against it."""

    tags: tuple[str, ...] = ()
    os: str = ""
    runner: str = ""


ANY_RUNNER = Requirements()
"""No requirements: any runner will do."""


async def open_connection(
    url: ConnectionURL,
    requirements: Requirements = ANY_RUNNER,
    on_queued: Callable[[int, str], None] = lambda position, note: None,
    timeout: float = OPEN_TIMEOUT,
    headers: dict[str, str] | None = None,
) -> RunnerConnection:
    """Connect, authenticate and say hello; raise a :class:`ConnectError` subclass on failure.

    While the runner has no free slot and queues the session, ``on_queued``
    gets each new queue position and note (a mediator's word on a runner it
    launches for the session); the wait in a queue has no time limit.
    ``headers`` go with the websocket upgrade (the client identity, see
    :data:`~didomagic.protocol.CLIENT_HEADER`).
    """
    ws = await dial(url, headers=headers, timeout=timeout)
    return await handshake(ws, url, requirements, on_queued, timeout)


async def handshake(
    ws: Any,
    url: ConnectionURL | None,
    requirements: Requirements = ANY_RUNNER,
    on_queued: Callable[[int, str], None] = lambda position, note: None,
    timeout: float = OPEN_TIMEOUT,
    channel: Channel = Channel.CELLS,
) -> RunnerConnection:
    """Say hello on an open websocket (any websockets connection) and wait for the welcome."""
    session = Session(Role.CLIENT, channel)
    hello = Hello(
        PROTOCOL_VERSION,
        python_version(),
        cloudpickle_version(),
        didomagic.__version__,
        tags=requirements.tags,
        os=requirements.os,
        runner=requirements.runner,
    )
    try:
        await ws.send(session.send(hello))
        reply = session.receive(await asyncio.wait_for(ws.recv(), timeout))
        while isinstance(reply, Queued):
            on_queued(reply.position, reply.note)
            reply = session.receive(await ws.recv())
    except (ConnectionClosed, TimeoutError) as exc:
        await ws.close()
        if url is not None:
            raise _unreachable(url, exc) from None
        raise RunnerUnreachable(f"The runner closed the connection in the hello ({exc}).") from None
    except ProtocolError:
        await ws.close(1002, "protocol error")
        raise
    if isinstance(reply, Error):
        await ws.close()
        raise refusal(reply)
    reply = expect(reply, Welcome)
    logger.debug("session opened with runner %s", reply.runner.get("name"))
    connection = RunnerConnection(ws, session, reply, url)
    connection.bulk = await _bulk_link(url, reply.bulk)
    return connection


async def _bulk_link(url: ConnectionURL | None, port: int) -> BulkLink | None:
    """The runner's bulk port as this client reaches it (probed in the background), or None."""
    if url is None or not port:
        return None
    link = BulkLink(url.host, port, await tls_context(url))
    link.probe()
    return link


async def attach(
    url: ConnectionURL,
    session: str,
    ticket: str,
    cell: str = "",
    received: int = 0,
    headers: dict[str, str] | None = None,
    timeout: float = OPEN_TIMEOUT,
) -> RunnerConnection:
    """Take a kept session back with its ticket; :attr:`RunnerConnection.attached` says how.

    ``cell`` and ``received`` say which cell the client still waits for and how
    many of its outputs it has. Raise :class:`SessionEnded` when the session is
    gone, a :class:`ConnectError` subclass when the runner cannot be reached.
    """
    ws = await dial(url, headers=headers, timeout=timeout)
    protocol = Session(Role.CLIENT)
    request = Attach(
        PROTOCOL_VERSION, python_version(), cloudpickle_version(), session, ticket, cell, received
    )
    try:
        await ws.send(protocol.send(request))
        reply = protocol.receive(await asyncio.wait_for(ws.recv(), timeout))
    except (ConnectionClosed, TimeoutError) as exc:
        await ws.close()
        raise _unreachable(url, exc) from None
    except ProtocolError:
        await ws.close(1002, "protocol error")
        raise
    if isinstance(reply, Error):
        await ws.close()
        if reply.code is ErrorCode.NOT_FOUND:
            raise SessionEnded(reply.message)
        if reply.code is ErrorCode.NOT_READY:
            raise RunnerUnreachable(reply.message, absent=True)
        raise refusal(reply)
    assert isinstance(reply, Attached)
    welcome = Welcome(
        PROTOCOL_VERSION, python_version(), cloudpickle_version(), session, reply.runner, ticket
    )
    connection = RunnerConnection(ws, protocol, welcome, url)
    connection.attached = reply
    connection.bulk = await _bulk_link(url, reply.bulk)
    return connection


async def list_sessions(
    url: ConnectionURL, headers: dict[str, str], timeout: float = OPEN_TIMEOUT
) -> tuple[dict[str, Any], ...]:
    """The sessions the client identity in ``headers`` holds on a runner (or behind a mediator)."""
    ws = await dial(url, headers=headers, timeout=timeout)
    protocol = Session(Role.CLIENT)
    try:
        await ws.send(protocol.send(ListSessions()))
        reply = protocol.receive(await asyncio.wait_for(ws.recv(), timeout))
    except (ConnectionClosed, TimeoutError) as exc:
        raise _unreachable(url, exc) from None
    finally:
        await ws.close()
    if isinstance(reply, Error):
        raise refusal(reply)
    assert isinstance(reply, SessionList)
    return reply.sessions


async def query(url: ConnectionURL, timeout: float = OPEN_TIMEOUT) -> tuple[Info, float]:
    """Ask a runner or mediator to describe itself; return its answer and the round trip (s).

    The round trip is that of the query alone, after the handshakes.
    """
    ws = await dial(url, timeout=timeout)
    session = Session(Role.CLIENT)
    try:
        started = time.perf_counter()
        await ws.send(session.send(Query()))
        reply = session.receive(await asyncio.wait_for(ws.recv(), timeout))
        latency = time.perf_counter() - started
    except (ConnectionClosed, TimeoutError) as exc:
        raise _unreachable(url, exc) from None
    finally:
        await ws.close()
    if isinstance(reply, Error):
        raise refusal(reply)
    reply = expect(reply, Info)
    return reply, latency


def refusal(error: Error) -> DidomagicError:
    """The exception for a runner's or mediator's :class:`Error` message."""
    kinds: dict[ErrorCode, type[DidomagicError]] = {
        ErrorCode.VERSION: VersionMismatch,
        ErrorCode.BUSY: RunnerBusy,
        ErrorCode.NO_MATCH: NoMatchingRunner,
    }
    return kinds.get(error.code, ProtocolError)(error.message)
