"""A runner's link to a mediator: register, report load, serve relayed sessions.

The runner dials out (so it may sit behind a firewall that only lets
connections out), authenticates with the mediator's *runner* token over pinned
TLS, registers its description, and then sends a :class:`~didomagic.protocol.Load`
whenever its load changes and at least every ``heartbeat`` seconds. For each
client session the mediator sends a :class:`~didomagic.protocol.Dial` with a
ticket; the runner opens a new connection to the mediator's relay endpoint
with that ticket and serves the session on it like any other.

When the link breaks (mediator restarted, network trouble, heartbeat judged
lost) the runner dials again with a capped backoff and registers anew, with
the same id, so the mediator takes it back without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from didomagic.client import dial
from didomagic.errors import ConnectError, ProtocolError
from didomagic.protocol import (
    Dial,
    Error,
    Leave,
    Link,
    Load,
    LogLines,
    Register,
    Registered,
    Role,
    expect,
)
from didomagic.urls import ConnectionURL
from runner.server import RunnerServer
from runner.status import log_buffer
from runner.wire import wait_set

logger = logging.getLogger("didomagic.runner.link")

REGISTER_PATH = "register"
"""The mediator's endpoint for runner links."""

RELAY_PATH = "relay"
"""The mediator's endpoint for relay connections."""

TICKET_HEADER = "X-Didomagic-Ticket"
"""Header naming the ticket of a relay connection."""

BACKOFF_START = 0.2
"""Seconds before the first attempt to dial a lost mediator again."""


class MediatorLink:
    """Keeps a runner registered with one mediator until :meth:`stop`."""

    def __init__(self, server: RunnerServer, url: ConnectionURL, heartbeat: float) -> None:
        self.server = server
        self.url = url
        self.heartbeat = heartbeat
        self.id = server.registry.instance  # a mediator routes an attach by it
        self.registered = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._link: Link | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._log_seen = 0
        """Log lines already sent to the mediator."""

    async def run(self) -> None:
        """Stay registered: dial, register, report; dial again whenever the link breaks."""
        delay = BACKOFF_START
        failing = False
        while not self._stopping:
            try:
                await self._serve_link()
                delay = BACKOFF_START
            except RegistrationRefused as exc:
                if not failing:
                    logger.error("%s; trying again every %g s", exc, self.heartbeat)
                failing = True
            except (ConnectError, ProtocolError, ConnectionClosed, OSError, TimeoutError) as exc:
                if not failing:
                    logger.warning(
                        "mediator %s unreachable or link lost (%s); retrying until it is back",
                        self.url.address,
                        exc,
                    )
                failing = True
            except Exception:
                logger.exception("link to mediator %s failed; retrying", self.url.address)
                failing = True
            else:
                failing = False
            self.registered.clear()
            if self._stopping:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.heartbeat)

    async def _serve_link(self) -> None:
        ws = await dial(self.url, REGISTER_PATH)
        link = Link(Role.RUNNER)
        self._ws, self._link = ws, link
        try:
            await ws.send(link.send(Register(self.id, self.server.describe(), self.heartbeat)))
            reply = link.receive(await asyncio.wait_for(ws.recv(), self.heartbeat * 3))
            if isinstance(reply, Error):
                raise RegistrationRefused(
                    f"mediator {self.url.address} refused this runner: {reply.message}"
                )
            reply = expect(reply, Registered)
            logger.info("registered with mediator %s at %s", reply.mediator, self.url.address)
            self.registered.set()
            reporter = asyncio.create_task(self._report(ws, link))
            try:
                async for text in ws:
                    message = link.receive(text)
                    if isinstance(message, Dial):
                        task = asyncio.create_task(self._relay(message.ticket, message.client))
                        self._relays.add(task)
                        task.add_done_callback(self._relays.discard)
                    elif isinstance(message, Error):
                        raise ProtocolError(f"the mediator ended the link: {message.message}")
            finally:
                reporter.cancel()
                with contextlib.suppress(BaseException):
                    await reporter
            if not self._stopping:
                raise ConnectionError(f"the mediator closed the link (code {ws.close_code})")
        finally:
            self._ws = self._link = None
            await ws.close()

    async def _report(self, ws: ClientConnection, link: Link) -> None:
        """Send the load whenever it changes, and at least every heartbeat."""
        changed = asyncio.Event()
        self.server.load_listeners.append(changed.set)
        try:
            while not self._stopping:
                await wait_set(changed, self.heartbeat)
                changed.clear()
                await ws.send(link.send(Load(self.server.describe())))
                lines, self._log_seen = log_buffer().since(self._log_seen)
                if lines:  # the mediator's status page shows them
                    await ws.send(link.send(LogLines(tuple(lines))))
        finally:
            self.server.load_listeners.remove(changed.set)

    async def _relay(self, ticket: str, client: str) -> None:
        try:
            ws = await dial(self.url, RELAY_PATH, {TICKET_HEADER: ticket})
        except ConnectError as exc:
            logger.warning("could not open a relay connection to the mediator: %s", exc)
            return
        try:
            await self.server.serve_connection(
                ws, peer=f"relay via {self.url.address}", client=client
            )
        finally:
            await ws.close()

    async def stop(self) -> None:
        """De-register (tell the mediator this runner is leaving) and close the link."""
        self._stopping = True
        ws, link = self._ws, self._link
        if ws is not None and link is not None and link.registered and not link.closed:
            with contextlib.suppress(ConnectionClosed, ProtocolError):
                await ws.send(link.send(Leave()))
        if ws is not None:
            await ws.close()
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)


class RegistrationRefused(ProtocolError):
    """The mediator refused the registration (wrong credential for the name, bad description)."""
