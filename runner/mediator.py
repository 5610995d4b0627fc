"""The mediator: a registry of runners that matches client sessions to them and relays.

Endpoints, all on one TLS port, each with its own credential::

    /           clients (client token): a hello to get a session, or a query
    /jobs       clients (client token): submit, list, pull, cancel, delete jobs
    /register   runners (runner token): the link a runner keeps open
    /relay      runners (runner token): one connection per relayed session

A client token cannot register a runner, and a runner token cannot open a
session or list the pool: the token is checked against the endpoint during
the HTTP upgrade, before any message is read.

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
import contextlib
import logging
import secrets
import time
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
    Attach,
    Dial,
    ErrorCode,
    Hello,
    Info,
    Leave,
    Link,
    ListSessions,
    Load,
    Query,
    Register,
    Registered,
    Role,
    Session,
    SessionList,
)
from runner.jobs import JOBS_PATH, JobService, owner_of
from runner.jobstore import JobRecord, JobStore
from runner.link import REGISTER_PATH, RELAY_PATH, TICKET_HEADER
from runner.server import HANDSHAKE_TIMEOUT, HELLO_TIMEOUT, check_token, listen
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

    def view(self) -> dict[str, Any]:
        """The description as clients see it, with the mediator's status and load."""
        view = dict(self.description)
        view["status"] = self.status
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
        self._tickets: dict[str, asyncio.Future[ServerConnection]] = {}
        self._server: Server | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.jobs: JobService | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Start listening; return the bound port."""
        settings = self.settings
        self._server = await listen(
            self._handle,
            self._authenticate,
            settings.host,
            settings.port,
            settings.certfile,
            settings.keyfile,
            "didomagic.mediator.websockets",
            settings.client_ca,
            settings.handshake_timeout,
        )
        self._watchdog = asyncio.create_task(self._watch_heartbeats())
        store = JobStore(self.settings.state_dir / "jobs")
        self.jobs = JobService(store, self._open_for_job, self.settings.name, self.settings.job_ttl)
        self.jobs.start()
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting and close every connection."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.jobs is not None:
            await self.jobs.stop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # -- authentication

    def _endpoint(self, request: Request) -> str:
        return request.path.split("?", 1)[0].strip("/")

    def _authenticate(self, connection: ServerConnection, request: Request) -> Response | None:
        endpoint = self._endpoint(request)
        if endpoint in ("", JOBS_PATH, REGISTER_PATH, RELAY_PATH):
            runner_side = endpoint in (REGISTER_PATH, RELAY_PATH)
            token = self.settings.runner_token if runner_side else self.settings.token
            if check_token(request, token):
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
        entry = self.runners.get(message.id)
        if entry is not None and entry.link is not None:
            await entry.link.close()  # an older link of the same runner
        entry = RunnerEntry(message.id, message.runner, message.heartbeat, ws, link)
        self.runners[message.id] = entry
        await ws.send(link.send(Registered(self.settings.name)))
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
                    entry.description = update.load
                elif isinstance(update, Leave):
                    reason = "stopped"
                    break
        finally:
            if entry.link is ws:
                self._mark_down(entry, entry.reason or reason)

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
        waiter = self._tickets.pop(ticket, None)
        if waiter is None or waiter.done():
            raise ProtocolError("relay connection with an unknown or expired ticket")
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
            runners = tuple(entry.view() for entry in self.runners.values())
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
        assert isinstance(first, Hello)
        entry = self._choose(first)
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
            await _pipe(ws, relay)
        finally:
            entry.relayed -= 1

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
        await _pipe(ws, relay)

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
            return None
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

    async def _open_relay(self, entry: RunnerEntry, owner: str = "") -> ServerConnection | None:
        if entry.link is None or entry.protocol is None:
            return None
        ticket = secrets.token_urlsafe(24)
        waiter: asyncio.Future[ServerConnection] = asyncio.get_running_loop().create_future()
        self._tickets[ticket] = waiter
        try:
            await entry.link.send(entry.protocol.send(Dial(ticket, owner)))
            return await asyncio.wait_for(waiter, DIAL_TIMEOUT)
        except (ConnectionClosed, TimeoutError):
            return None
        finally:
            self._tickets.pop(ticket, None)


async def _pipe(a: ServerConnection, b: ServerConnection) -> None:
    """Copy frames both ways, unchanged, until either side closes; then close both.

    The side still open gets the close code the other sent if it was 1000 (the
    session ends), else :data:`LOST_CODE` (the session is kept).
    """

    async def copy(src: ServerConnection, dst: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in src:
                await dst.send(frame)

    tasks = [asyncio.create_task(copy(a, b)), asyncio.create_task(copy(b, a))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
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
