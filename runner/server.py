"""The runner's websocket server: TLS, token check, sessions, one kernel per session.

A connection is authenticated during the HTTP upgrade (``Authorization:
Bearer``, compared in constant time), so an unauthenticated peer gets a 401
before any websocket message is read and before any kernel is touched. A
connection's hello opens a session: it gets a kernel from the pool and runs
cells one at a time. A client that closes the connection (code 1000) ends the
session, and its kernel and directories go; a connection that merely drops
leaves the session kept for ``--session-grace`` seconds, for a connection
that presents its ticket to take it back (see :mod:`runner.keeping`).

A runner serves at most ``max_sessions`` sessions at once. Further sessions
wait in a queue of at most ``max_queue`` places, in order of arrival, and are
told their position as it changes; beyond that a session is refused as busy.
A first message that is a query instead of a hello gets the runner's
description and takes no slot.

Sessions arrive either on the runner's own port or, for a runner that joined a
mediator, on connections the runner dials to the mediator (relays); both are
served the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import os
import platform
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

import didomagic
from didomagic.errors import ProtocolError, VersionMismatch
from didomagic.protocol import (
    BULK_MIN,
    CHUNK_SIZE,
    MAX_TEXT_SIZE,
    PROTOCOL_VERSION,
    Answer,
    Attach,
    Attached,
    BulkTicket,
    CommMsg,
    Direction,
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
    State,
    Status,
    Welcome,
    check_compatible,
    cloudpickle_version,
    encode,
    python_version,
)
from runner import accept, admission, agent, bulk, resources, results
from runner.admission import RequestLimits
from runner.broker import Broker
from runner.certs import server_context
from runner.comms import CommRelay
from runner.envs import EnvCache
from runner.health import with_health
from runner.jobs import JOBS_PATH, JobService, owner_of
from runner.keeping import OutputLog, SessionGone, SessionRegistry
from runner.kernels import CellOutcome, Kernel, KernelPool
from runner.limits import Limits, format_size
from runner.sandbox import Sandbox
from runner.session_packages import SessionPackages
from runner.status import PageData, log_buffer, with_status_page
from runner.uploads import RELEASE_AFTER, Upload, ValueCache
from runner.wire import IDLE_CLOSE_REASON, peer_of, refuse

logger = logging.getLogger("didomagic.runner")

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a connection has to finish its TLS and websocket handshakes."""

HELLO_TIMEOUT = 10.0
"""Seconds a client has to send its hello after the websocket opens."""

GC_DELAY = 1.0
"""Seconds after a kernel stops before the garbage collection it calls for (see below)."""

MACHINE_REFRESH = 2.0
"""Seconds between measurements of memory and GPUs (taken off the event loop)."""

Connection = ServerConnection | ClientConnection
"""A session's websocket: accepted on the runner's port, or dialed to a mediator (relay)."""


@dataclass
class RunnerSettings:
    """Everything the server needs, as parsed from the command line."""

    host: str = "127.0.0.1"
    port: int = 4940
    name: str = field(default_factory=platform.node)
    tags: tuple[str, ...] = ()
    token: str = ""
    certfile: Path = Path()
    keyfile: Path = Path()
    max_sessions: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_queue: int = 0
    max_output: int = 64 << 20
    """Bytes of output one cell may stream to the client; beyond it output is cut."""
    cell_timeout: float | None = None
    """The longest any cell may run (a client's --timeout can only be shorter)."""
    idle_timeout: float | None = None
    """A session with no cell for this long is ended and its kernel freed."""
    session_grace: float = 300.0
    """Seconds a session whose connection dropped is kept for its client to come back."""
    max_connections: int = 64
    """Open websocket connections (any stage) beyond which new ones get a 503 at once."""
    warm_kernels: int = 1
    max_message_size: int = 8 << 30
    """The most bytes of values one cell may send (refused before anything is allocated)."""
    client_ca: Path | None = None
    """Clients must present a certificate this CA signed (mutual TLS)."""
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    admin_token: str = ""
    """Opens the read-only status page at ``/status`` (no other token does)."""
    limits: Limits = field(default_factory=Limits)
    """What each session's kernel may use (reported to clients; enforced by the sandbox)."""
    max_values: int = admission.MAX_VALUES
    """The most values one cell (or job submission) may declare."""
    upload_timeout: float = admission.UPLOAD_TIMEOUT
    """Seconds a cell's declared values may go without a frame before the cell is dropped."""
    max_handshakes: int = accept.MAX_HANDSHAKES
    """Connections still in their TLS or HTTP handshake; beyond it the oldest is dropped."""
    bulk_port: int | None = 0
    """The bulk port on ``host`` (0: any free one; None: no bulk port, see runner.bulk)."""

    @property
    def requests(self) -> RequestLimits:
        """The limits every cell and job submission is held to."""
        return RequestLimits(self.max_message_size, self.max_values, self.upload_timeout)


async def listen(
    handler: Callable[[ServerConnection], Awaitable[None]],
    authenticate: Callable[
        [ServerConnection, Request], Response | Awaitable[Response | None] | None
    ],
    host: str,
    port: int,
    certfile: Path,
    keyfile: Path,
    logger_name: str,
    client_ca: Path | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    max_handshakes: int = accept.MAX_HANDSHAKES,
    opened: accept.OpenConnections | None = None,
) -> Server:
    """A TLS websocket server as runners and mediators run it: compression off, sized limits.

    A connection that has not finished its TLS and websocket handshakes within
    ``handshake_timeout`` seconds is closed, and at most ``max_handshakes``
    are in those handshakes at once (see :mod:`runner.accept`). With
    ``client_ca``, clients must present a certificate it signed (or the
    server's own, so that a runner can open sessions to itself for its
    detached jobs). ``opened`` counts the open websockets (``--max-connections``).
    """
    context = tls_context(certfile, keyfile, client_ca)
    pending = accept.Handshakes(max_handshakes, logging.getLogger(logger_name))

    checked = with_health(authenticate)  # /healthz needs no token

    def process_request(
        connection: ServerConnection, request: Request
    ) -> Response | Awaitable[Response | None] | None:
        pending.finished(connection)  # from here on it counts as a connection
        return checked(connection, request)

    return await serve(
        opened.counted(handler) if opened is not None else handler,
        sock=accept.listening_socket(host, port),
        ssl=None,  # each connection starts TLS itself, once counted (see runner.accept)
        create_connection=accept.connection_factory(context, handshake_timeout, pending),
        open_timeout=handshake_timeout,
        process_request=process_request,
        compression=None,  # no compression bombs, and values are mostly incompressible
        max_size=MAX_TEXT_SIZE,
        write_limit=4 * CHUNK_SIZE,
        server_header=None,
        logger=logging.getLogger(logger_name),
    )


def tls_context(certfile: Path, keyfile: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The server TLS context of a runner's ports (with ``client_ca``, its own cert is let in)."""
    context = server_context(certfile, keyfile, client_ca)
    if client_ca is not None:
        context.load_verify_locations(cafile=str(certfile))
    return context


def check_token(request: Request, token: str) -> bool:
    """True when the request carries ``Authorization: Bearer <token>`` (constant time)."""
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), token.encode()
    )


class RunnerServer:
    """Serves sessions until :meth:`stop` is called."""

    def __init__(
        self,
        settings: RunnerSettings,
        work_root: Path,
        private_root: Path | None = None,
        sandbox: Sandbox | None = None,
        envs: EnvCache | None = None,
    ) -> None:
        self.settings = settings
        self.envs = envs
        """The package environments cells ask for (None: no installs, see runner.envs)."""
        self.pool = KernelPool(
            work_root,
            settings.warm_kernels,
            env={"DIDOMAGIC_RUNNER_NAME": settings.name},
            private_root=private_root,
            sandbox=sandbox,
        )
        self.sessions: set[asyncio.Task[Any]] = set()
        self.registry = SessionRegistry(settings.name)
        """Every open session by id, attached or kept (see :mod:`runner.keeping`)."""
        self.active = 0
        """Sessions holding a slot."""
        self.waiting: list[asyncio.Future[None]] = []
        """Queued sessions, first in line first; each future is set when it gets a slot."""
        self.load_listeners: list[Callable[[], None]] = []
        """Called whenever the number of active or queued sessions changes."""
        self._server: Server | None = None
        self._open = accept.OpenConnections()
        self.jobs: JobService | None = None
        """The runner's own detached jobs (set up by the command line once listening)."""
        self._machine: dict[str, Any] = {}
        self._measuring: asyncio.Task[None] | None = None
        self._gc_pending: asyncio.TimerHandle | None = None
        self.stopping = False
        """Set by :meth:`stop`: sessions end with their connections, none is kept."""
        self.bulk: bulk.BulkServer | None = None
        """The bulk port's server (None with --no-bulk)."""

    def machine(self) -> dict[str, Any]:
        """The machine's description, as last measured (see :meth:`_measure`)."""
        return self._machine

    async def _measure(self) -> None:
        """Measure the machine again every :data:`MACHINE_REFRESH` s, in a worker thread.

        ``nvidia-smi`` can take a while; the event loop that serves cells never waits for it.
        """
        while True:
            await asyncio.sleep(MACHINE_REFRESH)
            self._machine = await asyncio.to_thread(resources.machine)

    def load(self) -> dict[str, int]:
        """Sessions active and queued, with their limits."""
        return {
            "sessions": self.active,
            "max_sessions": self.settings.max_sessions,
            "queue": len(self.waiting),
            "max_queue": self.settings.max_queue,
        }

    def describe(self) -> dict[str, Any]:
        """What this runner says about itself: name, tags, machine, load."""
        return {
            "name": self.settings.name,
            "tags": list(self.settings.tags),
            "didomagic": didomagic.__version__,
            "status": "up",
            "limits": self.settings.limits.describe(),
            "max_message_size": self.settings.max_message_size,
            "session_grace": self.settings.session_grace,
            "warm_kernels": self.pool.ready,
            "packages": self.envs.describe() if self.envs else {"install": False},
            **self.machine(),
            **self.load(),
        }

    def _load_changed(self) -> None:
        for listener in list(self.load_listeners):
            listener()

    def try_admit(self) -> asyncio.Future[None] | None:
        """Take a slot now (``None``), or a place in the queue (a future set on admission).

        Raise :class:`_Busy` when both are full.
        """
        settings = self.settings
        if self.active < settings.max_sessions and not self.waiting:
            self.active += 1
            self._load_changed()
            return None
        if len(self.waiting) >= settings.max_queue:
            queue = (
                f"and its queue is full (--max-queue {settings.max_queue})"
                if settings.max_queue
                else "and it queues none (--max-queue 0)"
            )
            raise _Busy(
                f"Runner {settings.name} is busy: all {settings.max_sessions} session slots "
                f"(--max-sessions) are in use {queue}. Try again when a notebook using it "
                "disconnects, or use another runner."
            )
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(ticket)
        self._load_changed()
        return ticket

    def leave_queue(self, ticket: asyncio.Future[None]) -> None:
        """Give up a place in the queue (the client left before its turn)."""
        if ticket in self.waiting:
            self.waiting.remove(ticket)
            self._load_changed()

    def release(self) -> None:
        """Give a slot back; the first queued session, if any, takes it."""
        self.active -= 1
        while self.waiting and self.active < self.settings.max_sessions:
            ticket = self.waiting.pop(0)
            if not ticket.done():
                self.active += 1
                ticket.set_result(None)
        self._load_changed()

    def collect_garbage_soon(self) -> None:
        """Run one full garbage collection a moment after kernels stop (coalesced).

        A stopped kernel's manager and client (jupyter_client, traitlets, ZMQ)
        are reference cycles; left to the collector's own schedule they pile
        up for many sessions (the soak test saw 2 MB per session).
        """
        if self._gc_pending is None or self._gc_pending.cancelled():
            self._gc_pending = asyncio.get_running_loop().call_later(GC_DELAY, self._collect)

    def _collect(self) -> None:
        self._gc_pending = None
        started = time.perf_counter()
        found = gc.collect()
        logger.debug(
            "collected %d objects in %.1f ms", found, (time.perf_counter() - started) * 1e3
        )

    def position(self, ticket: asyncio.Future[None]) -> int:
        """1-based place of a queued session (0 once admitted)."""
        return self.waiting.index(ticket) + 1 if ticket in self.waiting else 0

    async def start(self) -> int:
        """Start listening and warming kernels; return the bound port."""
        self.pool.fill()
        self._machine = await asyncio.to_thread(resources.machine)
        self._measuring = asyncio.create_task(self._measure())
        settings = self.settings
        self._server = await listen(
            self._session,
            with_status_page(self._authenticate, settings.admin_token, self._status),
            settings.host,
            settings.port,
            settings.certfile,
            settings.keyfile,
            "didomagic.runner.websockets",
            settings.client_ca,
            settings.handshake_timeout,
            settings.max_handshakes,
            self._open,
        )
        if settings.bulk_port is not None:
            self.bulk = bulk.BulkServer(
                settings.host,
                settings.bulk_port,
                tls_context(settings.certfile, settings.keyfile, settings.client_ca),
                settings.upload_timeout,
            )
            logger.info("bulk transfers on port %d", self.bulk.start())
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def _status(self) -> PageData:
        """What the status page shows: this runner, its detached jobs, its log."""
        jobs = []
        if self.jobs is not None:
            jobs = [r.public() for r in await self.jobs.records()]
        name = self.settings.name
        return PageData(
            f"didomagic runner {name}",
            [self.describe()],
            jobs,
            [(f"runner {name}", list(log_buffer().lines))],
        )

    async def stop(self) -> None:
        """Stop accepting, end every session, shut every kernel down."""
        self.stopping = True
        if self._measuring is not None:
            self._measuring.cancel()
        if self.jobs is not None:
            await self.jobs.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self.bulk is not None:
            self.bulk.close()
        kept = [s for s in self.registry.open.values() if isinstance(s, SessionHandler)]
        await asyncio.gather(*(s.close("the runner stopped") for s in kept), return_exceptions=True)
        await self.pool.close()

    def _authenticate(self, connection: ServerConnection, request: Request) -> Response | None:
        full = accept.too_many(
            connection, self._open, self.settings.max_connections, "runner", logger
        )
        if full is not None:
            return full
        if check_token(request, self.settings.token):
            return None
        logger.warning("refused a connection from %s: missing or wrong token", peer_of(connection))
        response = connection.respond(
            HTTPStatus.UNAUTHORIZED,
            "didomagic runner: missing or wrong token; use the runner's connection URL.\n",
        )
        response.headers = Headers({**response.headers, "WWW-Authenticate": "Bearer"})
        return response

    async def _session(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        if ws.request.path.strip("/") == JOBS_PATH:
            if self.jobs is None:
                await refuse(ws, ErrorCode.NOT_FOUND, "This runner keeps no detached jobs.")
            else:
                await self.jobs.serve(ws, peer_of(ws))
            return
        await self.serve_connection(ws)

    async def serve_connection(
        self, ws: Connection, peer: str | None = None, client: str | None = None
    ) -> None:
        """Serve one connection on ``ws`` until it closes (direct or relayed).

        Its first message opens a session, takes a kept one back, or asks a
        question. ``client`` is the client identity a mediator vouches for on a
        relay; a direct connection's comes from its handshake header.
        """
        task = asyncio.current_task()
        assert task is not None
        self.sessions.add(task)
        peer = peer or peer_of(ws)
        owner = owner_of(ws) if client is None else client
        try:
            protocol = Session(Role.RUNNER)
            first = await _first_message(ws, protocol)
            if isinstance(first, Hello):
                await SessionHandler(self, owner, peer).run(ws, protocol, first)
            elif isinstance(first, Attach):
                try:
                    kept = self.registry.claim(first.session, first.ticket, owner)
                except SessionGone as exc:
                    logger.info("refused to reattach a session from %s: gone or not its own", peer)
                    await refuse(ws, ErrorCode.NOT_FOUND, str(exc))
                    return
                assert isinstance(kept, SessionHandler)
                await kept.reattach(ws, protocol, first, peer)
            elif isinstance(first, ListSessions):
                held = [s.view() for s in self.registry.of(owner) if isinstance(s, SessionHandler)]
                await ws.send(protocol.send(SessionList(tuple(held))))
                await ws.close()
            elif isinstance(first, Query):
                info = Info(role="runner", runners=(self.describe(),), name=self.settings.name)
                await ws.send(protocol.send(info))
                await ws.close()
        except TimeoutError:
            await refuse(ws, ErrorCode.PROTOCOL, "No hello received in time.")
        except ProtocolError as exc:
            logger.warning("connection from %s: protocol error: %s", peer, exc)
            await refuse(ws, ErrorCode.PROTOCOL, f"Protocol error: {exc}")
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("connection from %s: internal error", peer)
            await refuse(ws, ErrorCode.INTERNAL, "Internal runner error; see the runner's log.")
        finally:
            self.sessions.discard(task)

    def keep_task(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` as a task the server tracks until it ends."""
        task = asyncio.create_task(coroutine)
        self.sessions.add(task)
        task.add_done_callback(self.sessions.discard)


async def _first_message(ws: Connection, protocol: Session) -> Message:
    """The first message of a connection (a hello, attach, query or list-sessions)."""
    text = await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT)
    if not isinstance(text, str):
        raise ProtocolError("expected a hello text message first")
    return protocol.receive(text)


@dataclass
class _Finished:
    """A cell's result, kept until the client has it (and until the next cell, to resend)."""

    result: Result
    parts: list[list[memoryview]]
    """The parts of its values, mapped from the kernel's ``out.bin`` (see runner.results)."""
    delivered: bool = False
    bulk_out: bool = False
    """Whether the client takes the values over the bulk port."""


class SessionHandler:
    """One client session: its kernel, its cells, and the connection it is attached to.

    The session outlives its connection: when that drops without a close of
    code 1000, the session waits ``--session-grace`` seconds, with its kernel
    and any running cell going on and its outputs kept (see
    :mod:`runner.keeping`), for a connection that takes it back (:meth:`reattach`).
    """

    def __init__(self, server: RunnerServer, owner: str, peer: str) -> None:
        self.server = server
        self.owner = owner
        self.peer = peer
        self.ws: Connection | None = None
        """The connection the session is attached to (None while it waits for one)."""
        self.protocol = Session(Role.RUNNER)
        """The protocol state of that connection."""
        self.has_slot = False
        self.id = server.registry.new_id()
        self.ticket = secrets.token_urlsafe(24)
        self.opened = time.time()
        self.kernel: Kernel | None = None
        self.broker: Broker | None = None
        """Carries the kernel's asks to the client (see runner.broker)."""
        self.cell_task: asyncio.Task[None] | None = None
        self.cell_id = ""
        self.last_cell = ""
        """The first line of the last cell's code (for %runners sessions)."""
        self.upload: Upload | None = None
        self.bulk_upload: tuple[str, Upload] | None = None
        """The ticket and upload of a cell whose values come over the bulk port."""
        self.interrupted = False
        self.outbox: asyncio.Queue[str] = asyncio.Queue()
        self.outputs = OutputLog(server.settings.max_output)
        self.finished: _Finished | None = None
        self._delivering = asyncio.Lock()
        self.grace: asyncio.TimerHandle | None = None
        self.closed = False
        self.welcomed = False
        """Set once the client has the welcome (and its ticket): only then is it kept."""
        self.comms = CommRelay(self._send_live)  # widget traffic, while a client is attached
        self.writer: asyncio.Task[None] | None = None
        self.last_activity = time.monotonic()
        """When the session last received a frame or was busy with a cell."""
        self.client_versions: dict[str, str] = {}
        """The Python and cloudpickle versions the client says it pickles with."""
        self.cache: ValueCache | None = None
        """The large values the session holds, in its kernel's cache directory."""
        self.packages = SessionPackages(server.envs)

    @property
    def log_id(self) -> str:
        """A short id for log lines (the part after the runner's instance id)."""
        return self.id.rpartition(".")[2][:6]

    def view(self) -> dict[str, Any]:
        """What ``%runners sessions`` shows of this session."""
        running = self.cell_task is not None and not self.cell_task.done()
        waiting = self.finished is not None and not self.finished.delivered
        return {
            "id": self.id,
            "runner": self.server.settings.name,
            "opened": self.opened,
            "age": time.time() - self.opened,
            "last_cell": self.last_cell,
            "state": "running" if running else "result waiting" if waiting else "idle",
            "attached": self.ws is not None,
        }

    async def run(self, ws: Connection, protocol: Session, hello: Hello) -> None:
        """Open the session on ``ws`` and serve it until the client leaves or breaks protocol."""
        self.ws, self.protocol = ws, protocol
        await self._attached(ws, lambda: self._open(hello))

    async def reattach(self, ws: Connection, protocol: Session, attach: Attach, peer: str) -> None:
        """Take the session over on ``ws``: replay missed outputs, then go on as before."""
        try:
            _check_versions(attach.protocol, attach.python, attach.cloudpickle)
        except VersionMismatch as exc:
            await refuse(ws, ErrorCode.VERSION, str(exc).replace("this side", "this runner"))
            return
        if self.closed:
            await refuse(ws, ErrorCode.NOT_FOUND, self.server.registry.gone(self.id))
            return
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        old = self.ws
        if old is not None:  # a connection not yet seen dead: the ticket holder takes over
            self._detach()
            old.transport.abort()
        cell = self._resumable(attach.cell)
        resume, _ = self.outputs.since(attach.received if attach.cell == cell else 0)
        attached = Attached(
            self.id, cell, resume if cell else 0, self.server.describe(), self._bulk_port(ws)
        )
        try:
            await ws.send(protocol.send(attached))
        except ConnectionClosed:
            if self.ws is None and not self.closed:
                self._keep()  # that connection went at once: wait for the next
            raise
        self.ws, self.protocol, self.peer = ws, protocol, peer
        self.last_activity = time.monotonic()
        if cell:
            # Output in RUNNING stays RUNNING: the replayed texts need no new validation.
            for text in self.outputs.since(resume)[1]:
                self.outbox.put_nowait(text)
            if self.broker is not None:  # the asks the client has not answered go again
                self.broker.resend()
            if self.cell_task is None or self.cell_task.done():
                self.cell_task = asyncio.create_task(self._deliver_safely())
        logger.info("session %s reattached from %s", self.log_id, peer)

        async def serve() -> bool:
            return await self._serve_cells(ws)

        await self._attached(ws, serve)

    def _resumable(self, waiting: str) -> str:
        """The cell a reattached client gets outputs and a result of ("" for none)."""
        if self.cell_task is not None and not self.cell_task.done():
            return self.cell_id
        finished = self.finished
        if finished is not None and (not finished.delivered or finished.result.cell == waiting):
            finished.delivered = False  # (again: the client says it did not get it all)
            return finished.result.cell
        return ""

    async def _attached(self, ws: Connection, body: Callable[[], Awaitable[bool]]) -> None:
        """Run ``body`` on ``ws``; then end the session, or keep it if the connection was lost."""
        end = True
        try:
            end = await body()
        except ProtocolError as exc:
            logger.warning("session %s from %s: protocol error: %s", self.log_id, self.peer, exc)
            await refuse(ws, ErrorCode.PROTOCOL, f"Protocol error: {exc}")
        except ConnectionClosed:
            received = ws.protocol.close_rcvd
            end = received is not None and received.code == 1000  # closed on purpose
        except Exception:
            logger.exception("session %s: internal error", self.log_id)
            await refuse(
                ws,
                ErrorCode.INTERNAL,
                "Internal runner error; the runner's log has the details.",
            )
        finally:
            if self.ws is ws:  # (not taken over by a newer connection meanwhile)
                if end or not self._keepable():
                    await self.close("it was closed")
                else:
                    self._keep()

    def _keepable(self) -> bool:
        """Whether a lost connection leaves this session kept (it has a client to come back)."""
        server = self.server
        return bool(
            self.has_slot
            and self.owner
            and server.settings.session_grace > 0
            and not server.stopping
        )

    def _detach(self) -> None:
        """Let go of the connection: queued outputs stay only in the log, an upload is void."""
        self.ws = None
        while not self.outbox.empty():
            self.outbox.get_nowait()
            self.outbox.task_done()
        if self.upload is not None:  # the client sends the cell again when it is back
            self.upload.close(keep=False)
            self.upload = None
        self._cancel_bulk_upload()
        if self.broker is not None:
            self.broker.connection_lost()

    def _keep(self) -> None:
        grace = self.server.settings.session_grace
        self._detach()
        self.grace = asyncio.get_running_loop().call_later(grace, self._expire)
        logger.info(
            "session %s: connection lost; kept for %g s (--session-grace)", self.log_id, grace
        )

    def _expire(self) -> None:
        self.grace = None
        grace = self.server.settings.session_grace
        logger.info("session %s: no client came back within %g s; ending it", self.log_id, grace)
        why = f"no client reattached within its grace period, --session-grace {grace:g} s"
        self.server.keep_task(self.close(why))

    def _send_live(self, message: Message) -> None:
        """Queue ``message`` for the attached connection; drop it while there is none."""
        if self.ws is not None:
            self.outbox.put_nowait(self.protocol.send(message))

    async def _write_outbox(self) -> None:
        """Send queued outputs in order, so a slow client never blocks the kernel."""
        while True:
            text = await self.outbox.get()
            ws = self.ws
            if ws is not None:
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(text)
            self.outbox.task_done()

    async def _open(self, first: Hello) -> bool:
        """Check versions, take a slot and a kernel, welcome; then serve cells."""
        ws = self.ws
        assert ws is not None
        self.client_versions = {"python": first.python, "cloudpickle": first.cloudpickle}
        try:
            _check_versions(first.protocol, first.python, first.cloudpickle)
        except VersionMismatch as exc:
            logger.warning("refused a session from %s: %s", self.peer, exc)
            await refuse(
                ws,
                ErrorCode.VERSION,
                str(exc).replace("this side", f"runner {self.server.settings.name}"),
            )
            return True
        if not await self._take_slot(ws):
            return True
        self.kernel = await self.server.pool.take()
        self.cache = ValueCache(self.kernel.cache)
        await self._attach_broker()
        self.comms.attach(self.kernel)
        self.server.registry.add(self)
        self.writer = asyncio.create_task(self._write_outbox())
        await ws.send(
            self.protocol.send(
                Welcome(
                    protocol=PROTOCOL_VERSION,
                    python=python_version(),
                    cloudpickle=cloudpickle_version(),
                    session=self.id,
                    runner=self.server.describe(),
                    ticket=self.ticket if self.owner and self.server.settings.session_grace else "",
                    bulk=self._bulk_port(ws),
                )
            )
        )
        self.welcomed = True
        self.last_activity = time.monotonic()  # idle from now: a queue or a kernel start is not
        logger.info("session %s opened from %s (kernel %s)", self.log_id, self.peer, self.kernel.id)
        return await self._serve_cells(ws)

    async def _take_slot(self, ws: Connection) -> bool:
        """Get a session slot, waiting in the queue if there is room; False if refused."""
        try:
            ticket = self.server.try_admit()
        except _Busy as exc:
            logger.info("refused a session from %s: busy", self.peer)
            await refuse(ws, ErrorCode.BUSY, str(exc))
            return False
        if ticket is None:
            self.has_slot = True
            return True
        logger.info(
            "session %s from %s queued at position %d",
            self.log_id,
            self.peer,
            self.server.position(ticket),
        )
        moved = asyncio.Event()
        self.server.load_listeners.append(moved.set)
        closed = asyncio.ensure_future(ws.wait_closed())
        told = 0
        try:
            while not ticket.done():
                position = self.server.position(ticket)
                if position != told:
                    await ws.send(self.protocol.send(Queued(position)))
                    told = position
                moved.clear()
                changed = asyncio.ensure_future(moved.wait())
                await asyncio.wait({ticket, changed, closed}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                if closed.done():
                    break
        finally:
            self.server.load_listeners.remove(moved.set)
            closed.cancel()
            if not ticket.done():
                self.server.leave_queue(ticket)
        if ticket.done() and not ticket.cancelled():
            self.has_slot = True
            if closed.done() or ws.close_code is not None:
                return False  # admitted just as the client left; _close gives the slot back
            logger.info("session %s left the queue", self.log_id)
            return True
        return False

    def _idle(self) -> bool:
        return self.protocol.state is State.IDLE and (
            self.cell_task is None or self.cell_task.done()
        )

    async def _next_frame(self, ws: Connection) -> str | bytes | None:
        """The next frame; None once the session has stayed idle past --idle-timeout."""
        limit = self.server.settings.idle_timeout
        if limit is None:
            return await ws.recv()
        receiving = asyncio.ensure_future(ws.recv())
        while True:
            # Look again at least every second: a running cell may end meanwhile.
            wait = min(1.0, max(0.0, limit - (time.monotonic() - self.last_activity)))
            done, _ = await asyncio.wait({receiving}, timeout=wait)
            if done:
                self.last_activity = time.monotonic()
                return receiving.result()
            if not self._idle():
                self.last_activity = time.monotonic()
            elif time.monotonic() - self.last_activity >= limit:
                receiving.cancel()
                with contextlib.suppress(BaseException):
                    await receiving
                return None

    async def _serve_cells(self, ws: Connection) -> bool:
        """Serve cells on ``ws``; True once the session should end (raise when ``ws`` closes)."""
        while True:
            if self.upload is not None:
                frame = await self._next_upload_frame(ws)
                if frame is None:
                    return True
            else:
                frame = await self._next_frame(ws)
            if frame is None:
                logger.info(
                    "session %s: idle for %g s (--idle-timeout); ending it",
                    self.log_id,
                    self.server.settings.idle_timeout,
                )
                await ws.close(1000, IDLE_CLOSE_REASON)
                return True
            if isinstance(frame, bytes):
                answering = self.protocol.state is State.ANSWER
                chunks = self.protocol.receive_binary(frame)  # refuses one not expected now
                if answering:
                    if self.broker is None:
                        raise ProtocolError("binary frame of an answer with no ask open")
                    await self.broker.on_parts(chunks)
                    continue
                if self.upload is None:
                    raise ProtocolError("binary frame outside an upload")
                for chunk in chunks:
                    self.upload.write(chunk.value, chunk.data)
                if self.protocol.state is State.RUNNING:
                    self._start_cell()
                continue
            message = self.protocol.receive(frame)
            if isinstance(message, Execute):
                assert self.kernel is not None and self.cache is not None
                if not await self._within_size_limit(ws, message):
                    return True
                self._forget_finished()  # the client has the last result: a new cell starts
                self.cell_id, self.last_cell = message.cell, _first_line(message.code)
                self.outputs.reset()
                self.upload = Upload(message, self.kernel.exchange, self.cache)
                self.interrupted = False
                if message.bulk_in:
                    await self._upload_over_bulk(ws)
                elif self.protocol.state is State.RUNNING:
                    self._start_cell()
            elif isinstance(message, Interrupt):
                await self._interrupt()
            elif isinstance(message, Answer):
                if not await self._within_size_limit(ws, message):
                    return True
                assert self.broker is not None
                await self.broker.on_answer(message)
            elif isinstance(message, CommMsg):
                self.comms.forward(message)

    async def _within_size_limit(self, ws: Connection, request: Execute | Answer) -> bool:
        """Refuse (and end the session) a cell or answer over --max-message-size or --max-values."""
        if isinstance(request, Answer):
            limit = self.server.settings.max_message_size
            why = None
            if request.nbytes > limit:
                why = (
                    f"An answer of the notebook side declares {format_size(request.nbytes)}; "
                    f"this runner accepts at most {format_size(limit)} per cell "
                    "(--max-message-size). Nothing was allocated."
                )
        else:
            why = admission.refusal(request.values, self.server.settings.requests, "cell")
        if why is None:
            return True
        logger.warning("session %s: refused a cell: %s", self.log_id, why)
        await refuse(ws, ErrorCode.BAD_REQUEST, why)
        return False

    async def _next_upload_frame(self, ws: Connection) -> str | bytes | None:
        """The next frame of an upload; None (and the cell dropped) after --upload-timeout."""
        limits = self.server.settings.requests
        try:
            async with asyncio.timeout(limits.upload_timeout):
                frame = await ws.recv()
        except TimeoutError:
            assert self.upload is not None
            self.upload.close(keep=False)
            self.upload = None
            logger.warning("session %s: upload stalled (--upload-timeout)", self.log_id)
            await refuse(ws, ErrorCode.BAD_REQUEST, admission.stalled(limits, "cell"))
            return None
        self.last_activity = time.monotonic()
        return frame

    def _start_cell(self) -> None:
        assert self.upload is not None
        upload, self.upload = self.upload, None
        try:
            upload.verify()
        except ProtocolError:
            upload.close(keep=False)
            raise
        upload.close()
        self.cell_task = asyncio.create_task(self._run_cell(upload.request, upload.described()))

    def _bulk_port(self, ws: Connection) -> int:
        """The bulk port this session's client may use (0: none; a relayed session has none)."""
        direct = isinstance(ws, ServerConnection)
        return self.server.bulk.port if self.server.bulk is not None and direct else 0

    async def _upload_over_bulk(self, ws: Connection) -> None:
        """Give the client a ticket for the cell's values; the cell starts once they are in."""
        upload, self.upload = self.upload, None
        assert upload is not None
        server = self.server.bulk
        if server is None or not self._bulk_port(ws):
            upload.close(keep=False)
            raise ProtocolError("an execute with bulk_in, but this session has no bulk port")
        ticket = server.issue(
            self.id,
            upload.request.cell,
            Direction.IN,
            bulk.receive_upload(upload),
            lambda error: self._bulk_upload_done(upload, error),
        )
        self.bulk_upload = (ticket, upload)
        await ws.send(self.protocol.send(BulkTicket(upload.request.cell, ticket)))

    def _bulk_upload_done(self, upload: Upload, error: BaseException | None) -> None:
        """(On the loop.) Start the cell whose values came over the bulk port, or fail it."""
        if self.bulk_upload is None or self.bulk_upload[1] is not upload:
            upload.close(keep=False)  # voided meanwhile (detached, closed)
            return
        self.bulk_upload = None
        request = upload.request
        try:
            if error is not None:
                raise error
            upload.verify()
            upload.close()
        except Exception as exc:
            if not isinstance(exc, ProtocolError | bulk.TransferBroken | OSError):
                logger.error(
                    "session %s: bulk upload failed inside the runner", self.log_id, exc_info=exc
                )
            upload.close(keep=False)
            logger.warning(
                "session %s: cell %s: bulk upload failed: %s", self.log_id, request.cell[:8], exc
            )
            why = f"the cell's values did not all arrive over the bulk connection ({exc})"
            result = Result(request.cell, Status.TRANSFER_FAILED, error={"message": why})
            self.finished = _Finished(result, [])
            self.cell_task = asyncio.create_task(self._deliver_safely())
            return
        nbytes = sum(v.nbytes for v in request.values if not v.cached)
        logger.info(
            "session %s: cell %s: %d bytes in over the bulk port",
            self.log_id,
            request.cell[:8],
            nbytes,
        )
        self.cell_task = asyncio.create_task(self._run_cell(request, upload.described()))

    def _cancel_bulk_upload(self) -> None:
        """Void a bulk upload in flight (its upload is removed once its thread lets go)."""
        if self.bulk_upload is not None and self.server.bulk is not None:
            ticket, self.bulk_upload = self.bulk_upload[0], None
            self.server.bulk.cancel(ticket)

    async def _interrupt(self) -> None:
        if self.upload is not None or self.bulk_upload is not None:  # it has not started
            self.interrupted = True
            logger.info("session %s: cell cancelled before it started", self.log_id)
            return
        if self.cell_task is not None and not self.cell_task.done() and self.kernel:
            self.interrupted = True
            logger.info("session %s: interrupting the cell at the client's request", self.log_id)
            await self.kernel.interrupt()

    async def _run_cell(self, request: Execute, values: list[dict[str, Any]]) -> None:
        try:
            await self._run_cell_inner(request, values)
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("session %s: cell failed inside the runner", self.log_id)
            if self.ws is not None:
                await refuse(
                    self.ws,
                    ErrorCode.INTERNAL,
                    "Internal runner error; the runner's log has the details.",
                )

    async def _run_cell_inner(self, request: Execute, values: list[dict[str, Any]]) -> None:
        assert self.kernel is not None
        kernel = self.kernel
        exchange = kernel.exchange
        failure = await self.packages.prepare(
            kernel,
            request.packages,
            lambda count, line, done: self._send_live(
                Installing(request.cell, count, line[-500:], done)
            ),
        )
        described = {  # travels in the execute_request (see runner.agent): no file per cell
            "values": values,
            "fetch": list(request.fetch),
            "deletes": list(request.deletes),
            "held": list(request.held),
            "origin": self.client_versions,
        }
        named = {"run": secrets.token_hex(8), "count": request.count}  # (cell ids may repeat)
        started = time.perf_counter()

        limit = self.server.settings.max_output
        sent = 0

        def forward(msg_type: str, content: dict[str, Any]) -> None:
            nonlocal sent
            output = Output(request.cell, msg_type, content)
            if self.ws is None:  # kept for a reattach; beyond --max-output the oldest go
                self.outputs.add(encode(output))
                return
            if sent > limit:
                return  # cut: the cell goes on, its further output is dropped
            text = self.protocol.send(output)
            sent += len(text)
            if sent > limit:
                logger.info("session %s: output cut at --max-output", self.log_id)
                text = self.protocol.send(
                    Output(
                        request.cell,
                        "stream",
                        {
                            "name": "stderr",
                            "text": f"\n[didomagic: output beyond {limit / 1e6:g} MB "
                            "(--max-output) was cut here; the cell kept running]\n",
                        },
                    )
                )
            self.outputs.add(text)
            self.outbox.put_nowait(text)

        # Interrupted while its values were still arriving, or its packages could not be had.
        if self.interrupted or failure:
            outcome = CellOutcome(
                Status.ERROR,
                failure or {"ename": "KeyboardInterrupt", "evalue": "cancelled before it started"},
            )
        else:
            timeout, limit_name = request.timeout, "its timeout"
            cap = self.server.settings.cell_timeout
            if cap is not None and (timeout is None or cap < timeout):
                timeout, limit_name = cap, "the runner's --cell-timeout"
            assert self.broker is not None
            self.broker.open_cell(request.cell)
            assert self.cache is not None
            release = asyncio.get_running_loop().call_later(RELEASE_AFTER, self.cache.release)
            try:
                outcome = await kernel.execute(
                    request.code,
                    forward,
                    timeout,
                    limit_name,
                    msg_id=request.parent,
                    metadata={agent.DESCRIPTION_KEY: named},
                    buffers=[json.dumps(described).encode()],
                )
            finally:
                self.broker.close_cell()
                release.cancel()
            await self.broker.settled()  # no answer may cross the result
        if self.cache is not None:  # the kernel let go of the values this cell replaced
            self.cache.release()
        await self.outbox.join()  # every output leaves before the result
        status = outcome.status
        if (
            status is Status.ERROR
            and self.interrupted
            and (outcome.error or {}).get("ename") == "KeyboardInterrupt"
        ):
            status = Status.INTERRUPTED
        values, offsets, failures, deleted = results.collect(
            outcome.metadata.get(agent.DESCRIPTION_KEY), self.log_id
        )
        out_path = exchange / agent.OUTPUT_FILE
        if status is Status.KERNEL_DIED:
            values, offsets = [], []
            await self._replace_kernel()
        parts, values = results.output_parts(out_path, values, offsets, failures, self.log_id)
        logger.info(
            "session %s: cell %s %s in %.1f ms (%d values in, %d held, %d out)",
            self.log_id,
            request.cell[:8],
            status.value,
            (time.perf_counter() - started) * 1e3,
            len(request.values),
            len(request.held),
            len(values),
        )
        result = Result(
            request.cell, status, tuple(values), tuple(deleted), failures, outcome.error
        )
        out_path.unlink(missing_ok=True)  # (its parts are mapped: they outlive the name)
        self.finished = _Finished(result, parts, bulk_out=request.bulk_out)
        await self._deliver()

    async def _deliver_safely(self) -> None:
        """:meth:`_deliver` as a task of its own (after a reattach)."""
        with contextlib.suppress(ConnectionClosed):
            await self._deliver()

    async def _deliver(self) -> None:
        """Send the finished cell's result and values, on the attached connection.

        Without one, or if it drops meanwhile, the result waits for a reattach.
        """
        async with self._delivering:
            while (finished := self.finished) is not None and not finished.delivered:
                ws, protocol = self.ws, self.protocol
                if ws is None:
                    return
                try:
                    await self.outbox.join()  # every output leaves before the result
                    if self.ws is not ws:
                        continue
                    result = self._offer_bulk(ws, finished)
                    await ws.send(protocol.send(result))
                    if not result.bulk:
                        for frame in protocol.frames(finished.parts):
                            await ws.send(frame)
                    finished.delivered = True
                except ConnectionClosed:
                    if self.ws is ws:
                        return  # lost: kept, and delivered again on reattach

    def _offer_bulk(self, ws: Connection, finished: _Finished) -> Result:
        """The result to send: with a bulk ticket for its values when they are large enough."""
        nbytes = sum(part.nbytes for value in finished.parts for part in value)
        server = self.server.bulk
        if server is None or not finished.bulk_out or nbytes < BULK_MIN or not self._bulk_port(ws):
            return finished.result
        cell = finished.result.cell

        def done(error: BaseException | None) -> None:
            if error is None:
                logger.info(
                    "session %s: cell %s: %d bytes out over the bulk port",
                    self.log_id,
                    cell[:8],
                    nbytes,
                )
            else:
                logger.warning(
                    "session %s: cell %s: bulk download failed: %s", self.log_id, cell[:8], error
                )

        ticket = server.issue(self.id, cell, Direction.OUT, bulk.send_parts(finished.parts), done)
        return replace(finished.result, bulk=ticket)

    def _forget_finished(self) -> None:
        finished, self.finished = self.finished, None
        if finished is not None:  # (a large mapping goes on a thread, off the loop)
            box, finished.parts = [finished.parts], []
            results.release(box)

    async def _replace_kernel(self) -> None:
        old, self.kernel = self.kernel, await self.server.pool.take()
        if self.cache is not None:  # before the old kernel's directories go
            self.cache.move_to(self.kernel.cache)
        if old is not None:
            await old.shutdown()
        await self._attach_broker()
        self.comms.attach(self.kernel)
        logger.info("session %s: kernel died; replaced by kernel %s", self.log_id, self.kernel.id)

    async def _attach_broker(self) -> None:
        """Listen for the (new) kernel's asks; forget the old kernel's broker."""
        assert self.kernel is not None
        if self.broker is not None:
            await self.broker.close()

        # While detached, an ask waits in the broker; it goes again on reattach.
        self.broker = Broker(self.kernel.exchange, self._send_live, self.log_id)
        await self.broker.start()

    async def close(self, why: str) -> None:
        """End the session now: its cell, kernel, values and slot go (``why`` is recorded)."""
        if self.closed:
            return
        self.closed = True
        self.server.registry.remove(self, why)
        if self.grace is not None:
            self.grace.cancel()
        self.ws = None
        if self.writer is not None:
            self.writer.cancel()
        if self.broker is not None:
            await self.broker.close()
        if self.cell_task is not None and not self.cell_task.done():
            if self.kernel is not None:
                await self.kernel.interrupt()
            self.cell_task.cancel()
            with contextlib.suppress(BaseException):
                await self.cell_task
        if self.upload is not None:
            self.upload.close(keep=False)
        self._cancel_bulk_upload()
        self._forget_finished()
        if self.cache is not None:
            self.cache.clear()
        self.packages.close()
        if self.has_slot:  # the client is gone: the next session may start while this
            self.has_slot = False  # kernel shuts down
            self.server.release()
        if self.kernel is not None:
            await self.kernel.shutdown()
            self.server.collect_garbage_soon()
            logger.info("session %s closed", self.log_id)


def _first_line(code: str) -> str:
    """The first non-blank line of a cell, shortened (what %runners sessions shows)."""
    line = next((s.strip() for s in code.splitlines() if s.strip()), "")
    return line if len(line) <= 60 else line[:59] + "…"


def _check_versions(protocol: int, python: str, cloudpickle: str) -> None:
    check_compatible(protocol=protocol, python=python, cloudpickle=cloudpickle, side="client")


class _Busy(Exception):
    """No slot and no place in the queue (the message says which limits)."""
