"""The mediator: a registry of runners that matches client sessions to them and relays.

Endpoints, all on one TLS port, each with its own credential::

    /           clients (client token): a hello to get a session, or a query
    /jobs       clients (client token): submit, list, pull, cancel, delete jobs
    /register   runners (runner token): the link a runner keeps open
    /relay      runners (runner token): one connection per relayed session

A client token cannot register a runner, and a runner token cannot open a
session or list the pool: the token is checked against the endpoint during
the HTTP upgrade, before any message is read.

A runner joins with a credential of its own (``mediator add-runner NAME``,
see :mod:`runner.credentials`), which binds it to its name: it can register
as ``NAME`` only, and nobody else can. The shared runner token, where it is
allowed (not ``--no-shared-runner-token``), registers only names that have
no credential, and such runners are listed as unverified. Every description
and load report is checked (:mod:`runner.descriptions`); a bad one is
refused with an error and ends that runner's link, never anyone else's.

For a client's hello the mediator picks the least loaded runner that matches
the hello's tags, OS and name (free slots first; a runner with only queue
places left gets a session only when no match has a free slot), asks it over
its link to dial a relay connection, forwards the hello, and then copies
frames both ways unchanged until either side closes. The runner does all
protocol checking of the session itself. A close of code 1000 (the client ends
its session) is passed on as it is; a connection that merely drops closes the
other side with :data:`LOST_CODE`, so the runner keeps the session for its
grace period. An attach goes to the runner whose instance id starts the
session id; a list-sessions asks every runner that is up, for the client's
identity, which the mediator vouches for in each :class:`Dial`.

A runner whose link goes quiet for three heartbeats is marked down (and its
link closed); it is up again as soon as it registers again. Nothing about
runners is persisted: a restarted mediator learns its runners back as they
dial in again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from didomagic import matching
from didomagic.client import RunnerConnection, handshake
from didomagic.errors import ProtocolError
from didomagic.protocol import (
    RUNNER_GONE_CODE,
    Attach,
    Dial,
    ErrorCode,
    Hello,
    Info,
    Leave,
    Link,
    ListSessions,
    Load,
    LogLines,
    Query,
    Queued,
    Register,
    Registered,
    Role,
    Session,
    SessionList,
    expect,
)
from runner import accept
from runner.admission import RequestLimits
from runner.credentials import Identity, RunnerCredentials
from runner.descriptions import (
    DescriptionError,
    check_description,
    check_heartbeat,
    check_runner_id,
)
from runner.jobs import JOBS_PATH, JobService, owner_of
from runner.jobstore import JobRecord, JobStore
from runner.launcher import Launcher, LaunchFailed
from runner.link import REGISTER_PATH, RELAY_PATH, TICKET_HEADER
from runner.server import HANDSHAKE_TIMEOUT, HELLO_TIMEOUT, check_token, listen
from runner.status import LINE_LIMIT, RUNNER_LINES, PageData, log_buffer, with_status_page
from runner.wire import peer_of, refuse

logger = logging.getLogger("didomagic.mediator")

MISSED_HEARTBEATS = 3
"""A runner silent for this many heartbeats is marked down."""

DIAL_TIMEOUT = 15.0
"""Seconds a runner has to open the relay connection it was asked for."""

DOWN_KEPT = 600.0
"""Seconds a runner that is down stays in the listing."""

LOST_CODE = 4000
"""Close code for "the other side's connection dropped" (the runner keeps the session)."""

LIST_TIMEOUT = 10.0
"""Seconds each runner has to list a client's sessions."""


@dataclass
class MediatorSettings:
    """Everything the mediator needs, as parsed from the command line."""

    host: str = "127.0.0.1"
    port: int = 4941
    name: str = "mediator"
    token: str = ""
    runner_token: str = ""
    certfile: Path = Path()
    keyfile: Path = Path()
    state_dir: Path = Path()
    job_ttl: float | None = None
    client_ca: Path | None = None
    """Clients and runners must present a certificate this CA signed (mutual TLS)."""
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    admin_token: str = ""
    """Opens the read-only status page at ``/status`` (no other token does)."""
    shared_runner_token: bool = True
    """Runners may join with the shared runner token (unverified), not only their own."""
    max_connections: int = 256
    """Open websockets (any endpoint; a relayed session takes two) beyond which: a 503."""
    max_handshakes: int = accept.MAX_HANDSHAKES
    """Connections still in their TLS or HTTP handshake; beyond it the oldest is dropped."""
    idle_timeout: float | None = None
    """A jobs connection with no request for this long is closed."""
    requests: RequestLimits = field(default_factory=RequestLimits)
    """What one job submission may declare, and how long its upload may stall."""


@dataclass
class RunnerEntry:
    """What the mediator knows of one runner."""

    id: str
    description: dict[str, Any]
    heartbeat: float
    link: ServerConnection | None
    protocol: Link | None
    last_seen: float = field(default_factory=time.monotonic)
    status: str = "up"
    reason: str = ""
    relayed: int = 0
    """Sessions relayed to it now (counted at once, before the runner reports them)."""
    log: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=RUNNER_LINES)
    )
    """The runner's last log lines, as it sent them (for the status page)."""
    identity: Identity = field(default_factory=lambda: Identity(None))
    """The credential the runner proved it holds."""

    def view(self) -> dict[str, Any]:
        """The description as clients see it, with the mediator's status and load."""
        view = dict(self.description)
        view["status"] = self.status
        view["identity"] = self.identity.describe()
        if self.reason:
            view["reason"] = self.reason
        # Relays started since the runner's last report count at once (queued ones aside).
        reported, queue = int(view.get("sessions") or 0), int(view.get("queue") or 0)
        cap = int(view.get("max_sessions") or 0)
        view["sessions"] = max(reported, min(self.relayed - queue, cap))
        return view


class Mediator:
    """Serves clients and runners until :meth:`stop`."""

    def __init__(self, settings: MediatorSettings) -> None:
        self.settings = settings
        self.runners: dict[str, RunnerEntry] = {}
        self.credentials = RunnerCredentials(settings.state_dir)
        self._tickets: dict[str, tuple[Identity, asyncio.Future[ServerConnection | None]]] = {}
        self._server: Server | None = None
        self._open = accept.OpenConnections()
        self._watchdog: asyncio.Task[None] | None = None
        self.jobs: JobService | None = None
        self.launcher: Launcher | None = None
        """Launches runners on demand (``--launcher slurm``; set up by the command line)."""
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Start listening; return the bound port."""
        settings = self.settings
        self._server = await listen(
            self._handle,
            with_status_page(self._authenticate, settings.admin_token, self._status),
            settings.host,
            settings.port,
            settings.certfile,
            settings.keyfile,
            "didomagic.mediator.websockets",
            settings.client_ca,
            settings.handshake_timeout,
            settings.max_handshakes,
            self._open,
        )
        self._watchdog = asyncio.create_task(self._watch_heartbeats())
        store = JobStore(self.settings.state_dir / "jobs")
        self.jobs = JobService(
            store,
            self._open_for_job,
            settings.name,
            settings.job_ttl,
            settings.requests,
            settings.idle_timeout,
        )
        self.jobs.start()
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def _status(self) -> PageData:
        """What the status page shows: the pool, the jobs, the mediator's and runners' logs."""
        jobs = []
        if self.jobs is not None:
            jobs = [r.public() for r in await self.jobs.records()]
        entries = list(self.runners.values())
        return PageData(
            f"didomagic mediator {self.settings.name}",
            [e.view() for e in entries],
            jobs,
            [
                (f"mediator {self.settings.name}", list(log_buffer().lines)),
                *((f"runner {e.description.get('name', e.id)}", list(e.log)) for e in entries),
            ],
        )

    async def stop(self) -> None:
        """Stop accepting and close every connection."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.jobs is not None:
            await self.jobs.stop()
        if self.launcher is not None:
            await self.launcher.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # -- authentication

    def _endpoint(self, request: Request) -> str:
        return request.path.split("?", 1)[0].strip("/")

    def _authenticate(self, connection: ServerConnection, request: Request) -> Response | None:
        full = accept.too_many(
            connection, self._open, self.settings.max_connections, "mediator", logger
        )
        if full is not None:
            return full
        endpoint = self._endpoint(request)
        if endpoint in ("", JOBS_PATH, REGISTER_PATH, RELAY_PATH):
            runner_side = endpoint in (REGISTER_PATH, RELAY_PATH)
            if runner_side and self._identify(request) is not None:
                return None
            if not runner_side and check_token(request, self.settings.token):
                return None
            role = "runner" if runner_side else "client"
            logger.warning(
                "refused a %s connection from %s: missing or wrong %s token",
                role,
                peer_of(connection),
                role,
            )
            response = connection.respond(
                HTTPStatus.UNAUTHORIZED,
                f"didomagic mediator: missing or wrong {role} token for this endpoint.\n",
            )
            response.headers = Headers({**response.headers, "WWW-Authenticate": "Bearer"})
            return response
        return connection.respond(HTTPStatus.NOT_FOUND, "didomagic mediator: no such endpoint.\n")

    def _identify(self, request: Request) -> Identity | None:
        """Which runner credential the request carries, if any is valid."""
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        name = self.credentials.identify(presented.strip())
        if name is not None:
            return Identity(name)
        if self.settings.shared_runner_token and check_token(request, self.settings.runner_token):
            return Identity(None)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        endpoint = self._endpoint(ws.request)
        try:
            if endpoint == REGISTER_PATH:
                await self._serve_link(ws)
            elif endpoint == RELAY_PATH:
                await self._accept_relay(ws)
            elif endpoint == JOBS_PATH:
                assert self.jobs is not None
                await self.jobs.serve(ws, peer_of(ws))
            else:
                await self._serve_client(ws)
        except ProtocolError as exc:
            logger.warning("protocol error from %s: %s", peer_of(ws), exc)
            await refuse(ws, ErrorCode.PROTOCOL, f"Protocol error: {exc}")
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("internal error serving %s", peer_of(ws))
            await refuse(ws, ErrorCode.INTERNAL, "Internal mediator error; see its log.")

    # -- runners

    async def _serve_link(self, ws: ServerConnection) -> None:
        link = Link(Role.MEDIATOR)
        text = await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT)
        message = link.receive(text)
        if not isinstance(message, Register):
            raise ProtocolError(f"expected a register message, got {message.kind}")
        try:
            description, identity = await self._admit(message, ws)
        except _Refused as exc:
            logger.warning("refused a registration from %s: %s", peer_of(ws), exc)
            await refuse(ws, ErrorCode.BAD_REQUEST, f"Mediator {self.settings.name}: {exc}")
            return
        entry = RunnerEntry(message.id, description, message.heartbeat, ws, link, identity=identity)
        self.runners[message.id] = entry
        await ws.send(link.send(Registered(self.settings.name)))
        self._pool_changed(entry.description)
        logger.info(
            "runner %s registered from %s (tags: %s)",
            entry.description.get("name"),
            peer_of(ws),
            ",".join(entry.description.get("tags") or ()) or "none",
        )
        reason = "link closed"
        try:
            async for text in ws:
                update = link.receive(text)
                entry.last_seen = time.monotonic()
                if isinstance(update, Load):
                    try:
                        entry.description = self._check_load(entry, update.load)
                    except _Refused as exc:
                        logger.warning(
                            "runner %s sent a bad load report: %s; ending its link",
                            entry.description.get("name"),
                            exc,
                        )
                        self._mark_down(entry, f"sent a bad load report: {exc}")
                        await refuse(
                            ws, ErrorCode.BAD_REQUEST, f"Mediator {self.settings.name}: {exc}"
                        )
                        break
                    self._pool_changed()
                elif isinstance(update, LogLines):
                    entry.log.extend(line[:LINE_LIMIT] for line in update.lines[-RUNNER_LINES:])
                elif isinstance(update, Leave):
                    reason = "stopped"
                    break
        finally:
            if entry.link is ws:
                self._mark_down(entry, entry.reason or reason)
                self._pool_changed()

    async def _admit(
        self, message: Register, ws: ServerConnection
    ) -> tuple[dict[str, Any], Identity]:
        """The checked description and identity of an accepted registration, or :class:`_Refused`.

        A runner's own credential owns its name: any other entry of that name
        (an older link of the same runner, or one registered with the shared
        token before the credential was issued) is closed and forgotten. The
        shared token may take neither a name with a credential nor the name
        of a runner registered with one.
        """
        identity = self._identify(ws.request) if ws.request else None
        if identity is None:
            raise _Refused("the runner credential was revoked while connecting")
        try:
            check_runner_id(message.id)
            check_heartbeat(message.heartbeat)
            description = check_description(message.runner)
        except DescriptionError as exc:
            raise _Refused(f"invalid registration: {exc}") from None
        name = description["name"]
        if identity.name is not None and name != identity.name:
            raise _Refused(
                f"this runner credential is for runner {identity.name!r}, but the registration "
                f"names {name!r}; start the runner with --name {identity.name} or issue it a "
                "credential of its own (didomagic-runner mediator add-runner NAME)"
            )
        if identity.name is None and name in self.credentials.names():
            raise _Refused(
                f"runner name {name!r} has a credential of its own at this mediator; the "
                "shared runner token cannot register it (use that runner's own URL)"
            )
        named = [e for e in self.runners.values() if e.description.get("name") == name]
        if not identity.verified and any(e.identity.verified for e in named):
            raise _Refused(
                f"runner name {name!r} is registered under a credential of its own; "
                "choose another --name"
            )
        old = self.runners.get(message.id)
        if old is not None and old.identity != identity:
            raise _Refused("this runner id is registered under another credential")
        evicted = [*named, old] if identity.verified else [old]
        for other in {id(e): e for e in evicted if e is not None}.values():
            if other.link is not None:
                await other.link.close()
            if other.id != message.id:
                self.runners.pop(other.id, None)
        return description, identity

    def _check_load(self, entry: RunnerEntry, load: dict[str, Any]) -> dict[str, Any]:
        """The checked description a load report carries; raise :class:`_Refused`."""
        try:
            description = check_description(load)
        except DescriptionError as exc:
            raise _Refused(f"invalid load report: {exc}") from None
        if description["name"] != entry.description.get("name"):
            raise _Refused(f"a load report cannot rename runner {entry.description.get('name')!r}")
        return description

    def _mark_down(self, entry: RunnerEntry, reason: str) -> None:
        if entry.status == "up":
            logger.info("runner %s is down: %s", entry.description.get("name"), reason)
        entry.status, entry.reason, entry.link, entry.protocol = "down", reason, None, None
        entry.last_seen = time.monotonic()

    async def _watch_heartbeats(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for entry in list(self.runners.values()):
                silent = now - entry.last_seen
                if entry.status == "up" and silent > MISSED_HEARTBEATS * entry.heartbeat:
                    link = entry.link
                    self._mark_down(entry, f"heartbeat lost ({silent:.1f} s without one)")
                    if link is not None:
                        await link.close()
                elif entry.status != "up" and silent > DOWN_KEPT:
                    del self.runners[entry.id]

    async def _accept_relay(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        ticket = ws.request.headers.get(TICKET_HEADER, "")
        issued = self._tickets.pop(ticket, None)
        if issued is None or issued[1].done():
            raise ProtocolError("relay connection with an unknown or expired ticket")
        identity, waiter = issued
        if self._identify(ws.request) != identity:
            logger.warning("refused a relay from %s: a ticket of another runner", peer_of(ws))
            waiter.set_result(None)  # the session is not relayed to it
            raise ProtocolError("relay connection with a ticket issued to another runner")
        waiter.set_result(ws)
        await ws.wait_closed()  # the client's handler pipes; keep this connection open

    # -- clients

    async def _serve_client(self, ws: ServerConnection) -> None:
        session = Session(Role.RUNNER)
        text = await asyncio.wait_for(ws.recv(), HELLO_TIMEOUT)
        if not isinstance(text, str):
            raise ProtocolError("expected a hello text message first")
        first = session.receive(text)
        if isinstance(first, Query):
            runners = tuple(self._listing())
            await ws.send(
                session.send(Info(role="mediator", runners=runners, name=self.settings.name))
            )
            await ws.close()
            return
        owner = owner_of(ws)
        if isinstance(first, ListSessions):
            held = await self._sessions_of(owner)
            await ws.send(session.send(SessionList(held)))
            await ws.close()
            return
        if isinstance(first, Attach):
            await self._reattach(ws, text, first, owner)
            return
        first = expect(first, Hello)
        entry = self._choose(first)
        if entry is None and self._can_launch(first.tags, first.os, first.runner):
            try:
                entry = await self._launch_for(ws, session, first)
            except LaunchFailed as exc:
                await refuse(ws, ErrorCode.NO_MATCH, f"Mediator {self.settings.name}: {exc}")
                return
            if entry is None:
                return  # the client left while it waited
        if entry is None:
            views = [e.view() for e in self.runners.values()]
            busy = matching.all_busy(views, first.tags, first.os, first.runner)
            code = ErrorCode.BUSY if busy else ErrorCode.NO_MATCH
            message = matching.no_match_message(views, first.tags, first.os, first.runner)
            await refuse(ws, code, f"Mediator {self.settings.name}: {message}")
            return
        entry.relayed += 1
        try:
            relay = await self._open_relay(entry, owner)
            if relay is None:
                await refuse(
                    ws,
                    ErrorCode.BUSY,
                    f"Runner {entry.description.get('name')} did not answer the mediator in "
                    f"time; try again.",
                )
                return
            logger.info(
                "relaying a session from %s to runner %s",
                peer_of(ws),
                entry.description.get("name"),
            )
            await relay.send(text)
            await _pipe(ws, relay, lambda: self._lost_reason(entry))
        finally:
            entry.relayed -= 1
            self._pool_changed()

    async def _reattach(self, ws: ServerConnection, text: str, attach: Attach, owner: str) -> None:
        """Relay an attach to the runner that holds the session (by its instance id)."""
        instance = attach.session.partition(".")[0]
        entry = self.runners.get(instance)
        if entry is None:
            await refuse(
                ws,
                ErrorCode.NOT_FOUND,
                f"Mediator {self.settings.name}: the runner that held session {attach.session} "
                "is no longer registered (it was restarted or stopped), so the session and all "
                "its remote state are gone; the next cell opens a new session.",
            )
            return
        relay = await self._open_relay(entry, owner) if entry.status == "up" else None
        if relay is None:
            why = entry.reason or "it did not answer"
            await refuse(
                ws,
                ErrorCode.NOT_READY,
                f"Mediator {self.settings.name}: runner {entry.description.get('name')}, which "
                f"holds session {attach.session}, is not connected now ({why}).",
            )
            return
        logger.info("relaying a reattach from %s to runner %s", peer_of(ws), entry.id)
        await relay.send(text)
        await _pipe(ws, relay, lambda: self._lost_reason(entry))

    async def _sessions_of(self, owner: str) -> tuple[dict[str, Any], ...]:
        """Every session ``owner`` holds on the runners that are up (asked all at once)."""
        entries = [e for e in self.runners.values() if e.status == "up" and e.link is not None]
        answers = await asyncio.gather(
            *(self._sessions_on(e, owner) for e in entries), return_exceptions=True
        )
        return tuple(s for a in answers if isinstance(a, list) for s in a)

    async def _sessions_on(self, entry: RunnerEntry, owner: str) -> list[dict[str, Any]]:
        relay = await self._open_relay(entry, owner)
        if relay is None:
            return []
        try:
            asking = Session(Role.CLIENT)
            await relay.send(asking.send(ListSessions()))
            reply = asking.receive(await asyncio.wait_for(relay.recv(), LIST_TIMEOUT))
            return list(reply.sessions) if isinstance(reply, SessionList) else []
        finally:
            await relay.close()

    def _choose(self, hello: Hello) -> RunnerEntry | None:
        entries = [e for e in self.runners.values() if e.status == "up" and e.link is not None]
        views = [e.view() for e in entries]
        chosen = matching.choose(views, hello.tags, hello.os, hello.runner)
        if chosen is None:
            return None
        return entries[views.index(chosen)]

    async def _open_for_job(self, job: JobRecord) -> RunnerConnection | None:
        """A session for a job on a matching runner with a free slot (None: none free now)."""
        entries = [e for e in self.runners.values() if e.status == "up" and e.link is not None]
        free = [
            e
            for e in entries
            if matching.matches(e.view(), job.tags, job.os) and matching.free_slots(e.view()) > 0
        ]
        if not free:
            if self._can_launch(job.tags, job.os):
                assert self.launcher is not None  # LaunchFailed is a ConnectError: the job waits
                await self.launcher.claim(("job", job.id))
            return None
        if self.launcher is not None:
            self.launcher.release(("job", job.id))
        entry = min(free, key=lambda e: matching.load_key(e.view()))
        entry.relayed += 1
        relay = await self._open_relay(entry)
        if relay is None:
            entry.relayed -= 1
            return None

        async def release() -> None:
            await relay.wait_closed()
            entry.relayed -= 1

        self._background.add(task := asyncio.create_task(release()))
        task.add_done_callback(self._background.discard)
        return await handshake(relay, None)

    # -- runners launched on demand (runner.launcher)

    def _can_launch(self, tags: tuple[str, ...], os: str, name: str = "") -> bool:
        return self.launcher is not None and self.launcher.can_serve(tags, os, name)

    def _pool_changed(self, registered: dict[str, Any] | None = None) -> None:
        """Wake sessions waiting for a launched runner: the pool changed."""
        if self.launcher is not None:
            if registered is not None:
                self.launcher.registered(registered)
            else:
                self.launcher.changed()

    async def _launch_for(
        self, ws: ServerConnection, session: Session, hello: Hello
    ) -> RunnerEntry | None:
        """Wait while runners launch until one matches ``hello`` (None: the client left)."""
        assert self.launcher is not None

        async def say(note: str) -> None:
            await ws.send(session.send(Queued(0, note)))

        gone = asyncio.ensure_future(ws.wait_closed())
        try:
            return await self.launcher.wait_for(ws, lambda: self._choose(hello), say, gone)
        finally:
            gone.cancel()

    def _listing(self) -> list[dict[str, Any]]:
        views = [entry.view() for entry in self.runners.values()]
        return self.launcher.listing(views) if self.launcher is not None else views

    async def _lost_reason(self, entry: RunnerEntry) -> str | None:
        if self.launcher is None:
            return None
        return await self.launcher.lost_reason(entry.description)

    async def _open_relay(self, entry: RunnerEntry, owner: str = "") -> ServerConnection | None:
        if entry.link is None or entry.protocol is None:
            return None
        ticket = secrets.token_urlsafe(24)
        waiter: asyncio.Future[ServerConnection | None] = asyncio.get_running_loop().create_future()
        self._tickets[ticket] = (entry.identity, waiter)
        try:
            await entry.link.send(entry.protocol.send(Dial(ticket, owner)))
            return await asyncio.wait_for(waiter, DIAL_TIMEOUT)
        except (ConnectionClosed, TimeoutError):
            return None
        finally:
            self._tickets.pop(ticket, None)


class _Refused(Exception):
    """A registration or load report the mediator does not accept (the message says why)."""


async def _pipe(
    a: ServerConnection,
    b: ServerConnection,
    b_left: Callable[[], Awaitable[str | None]] | None = None,
) -> None:
    """Copy frames both ways, unchanged, until either side closes; then close both.

    When ``b`` closes first, ``b_left`` may give the reason ``a`` is closed with.
    Otherwise the side still open gets the close code the other sent if it was
    1000 (the session ends), else :data:`LOST_CODE` (the session is kept).
    """

    async def copy(src: ServerConnection, dst: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in src:
                await dst.send(frame)

    tasks = [asyncio.create_task(copy(a, b)), asyncio.create_task(copy(b, a))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if b_left is not None and tasks[1].done() and not tasks[0].done():
            reason = await b_left()
            if reason:
                await a.close(RUNNER_GONE_CODE, reason)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ended = any(_ended_on_purpose(s) for s in (a, b))
        code, reason = (1000, "") if ended else (LOST_CODE, "peer connection lost")
        await asyncio.gather(a.close(code, reason), b.close(code, reason), return_exceptions=True)


def _ended_on_purpose(ws: ServerConnection) -> bool:
    """Whether ``ws`` got a close frame of code 1000 (its side ended the session)."""
    received = ws.protocol.close_rcvd
    return received is not None and received.code == 1000
