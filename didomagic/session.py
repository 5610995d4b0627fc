"""A notebook's session with one runner, driven from a blocking thread.

:class:`RemoteSession` owns the connection (opened on first use, on the
background I/O loop) and the digests of the large values the runner session
holds; :class:`LocalSession` is ``--local``: the same pack/unpack path, run in
this process.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import concurrent.futures
import contextlib
import queue
import sys
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from didomagic import comms, localcode, reconnect, serialize, tickets
from didomagic.client import ANY_RUNNER, Requirements, RunnerConnection, attach, open_connection
from didomagic.config import client_secret
from didomagic.errors import (
    CellInterrupted,
    CellTooLarge,
    ConnectionLost,
    DidomagicError,
    SessionEnded,
)
from didomagic.loop import BackgroundLoop, background_loop
from didomagic.progress import NoProgress, Progress
from didomagic.protocol import CLIENT_HEADER, Execute, Output, Result, Status
from didomagic.reconnect import DEFAULT_GRACE
from didomagic.resources import Responder
from didomagic.transfer import Transfer
from didomagic.uipoll import POLL, ShellPump
from didomagic.urls import ConnectionURL
from didomagic.versions import HeldVersions, InPlaceTracker

IDLE_ENDED = "idle-timeout"
"""The close reason a runner gives when it ends an idle session."""

CACHE_MIN = 1 << 20
"""Values at least this big carry a digest, so an unchanged one is not sent again."""

TICK = 0.25
"""Seconds between progress updates while a cell waits with no event."""

CLOSE_TIMEOUT = 5.0
"""Seconds to end a session on purpose (reaching a runner that keeps it, if need be)."""

T = TypeVar("T")

Event = tuple[Any, ...]
"""What the I/O thread hands the notebook thread: ("output", Output), ("queued", k), ..."""


class EventSink(Protocol):
    """Where the I/O loop puts a cell's events (a queue read by the caller's thread)."""

    def put(self, event: Event, /) -> None:
        """Hand one event over."""


class RemoteSession:
    """A session with one runner (direct or through a mediator), driven from a blocking thread.

    The remote namespace lives as long as this session: one per runner for the
    life of the notebook kernel. When the connection drops, the runner keeps
    the session for its grace period and this side takes it back with its
    ticket (see :mod:`didomagic.reconnect`), during a cell or before the next
    one; only a session that is gone for good (or a runner that keeps none)
    makes the next cell open a new one (through a mediator, possibly on
    another matching runner).
    """

    def __init__(
        self,
        url: ConnectionURL,
        requirements: Requirements = ANY_RUNNER,
        loop: BackgroundLoop | None = None,
        ticket: tickets.Ticket | None = None,
    ) -> None:
        self.url = url
        self.requirements = requirements
        self.loop = loop or background_loop()
        self._connection: RunnerConnection | None = None
        self._future: concurrent.futures.Future[Any] | None = None
        self._held: dict[str, str] = {}
        """Digest of each large value the remote session holds, by name (see CACHE_MIN)."""
        self.versions = HeldVersions()
        """Which version of each value the remote kernel's namespace holds."""
        self.responder = _responder(url)
        """Answers the remote kernel's asks with the registered handlers (see resources)."""
        self._responder_fresh = True  # no remote session has used it yet
        self._busy = asyncio.Lock()  # one cell at a time, whoever calls (run, run_async)
        self.runner_name = ticket.runner if ticket else url.address
        """The runner's name, once it has introduced itself."""
        self.description: dict[str, Any] = {}
        """The runner's description from its welcome (empty before the first cell)."""
        self.comms: comms.CommBridge | None = None
        """The proxies of the remote session's widgets in this kernel (None before it opens)."""
        self._in_cell = False
        self.ticket = ticket
        """What it takes to reattach the remote session (kept in the user's ticket file)."""
        self._identity = {CLIENT_HEADER: client_secret()}

    def cell_state(self) -> dict[str, Any]:
        """The responder state a cell prepares what it sends in (its files bundle, say).

        A fresh one when the next cell opens a new remote session, so that what
        the cell records there (the tree went, these files went) holds for the
        session that gets it, and the cell after does not send it all again.
        """
        if not self.connected and not self._responder_fresh:
            self.responder = _responder(self.url)
            self._responder_fresh = True
        return self.responder.state

    @property
    def connected(self) -> bool:
        """True while the session with the runner is open."""
        return self._connection is not None and not self._connection.closed

    @property
    def session_id(self) -> str:
        """The remote session's id ("" before it opens)."""
        return self.ticket.session if self.ticket else ""

    async def connect_async(self, events: EventSink) -> RunnerConnection:
        """Open the session now if it is not open, or take it back (on the I/O loop)."""
        if self._connection is None or self._connection.closed:
            old, self._connection = self._connection, None
            if old is not None and old.ws.close_reason == IDLE_ENDED:
                events.put(
                    (
                        "notice",
                        f"runner {self.runner_name} ended this notebook's idle session "
                        "(--idle-timeout); this cell starts a new one, so earlier remote "
                        "state is gone.",
                    )
                )
                await self._drop_ticket()
            if self.ticket is not None:
                try:
                    connection = await self._reattach(events, "", 0)
                    if connection.attached is not None and connection.attached.cell:
                        # A cell no one waits for any more (abandoned): let it finish.
                        await connection.receive_result(
                            connection.attached.cell, _ignore, responder=self.responder
                        )
                    self._connection = connection
                except ConnectionLost as exc:  # the session is gone
                    events.put(("notice", str(exc)))
                    await self._drop_ticket()
            if self._connection is None:
                await self._open(events)
        events.put(("runner", self.description))
        assert self._connection is not None
        return self._connection

    async def _open(self, events: EventSink) -> None:
        events.put(("connecting", self.url.address))
        connection = await open_connection(
            self.url,
            self.requirements,
            on_queued=lambda k, note: events.put(("queued", k, note)),
            headers=self._identity,
        )
        self._connection = connection
        self._held.clear()  # a new remote session holds no values yet
        self.versions.clear()
        if not self._responder_fresh:  # what it knew was of a remote session now gone
            self.responder = _responder(self.url)
        self._responder_fresh = False
        self.description = dict(connection.welcome.runner)
        self.runner_name = connection.runner_name
        self._bridge_widgets(events, connection)
        welcome = connection.welcome
        if welcome.ticket and self._grace() > 0:
            self.ticket = tickets.Ticket(
                welcome.session, self.runner_name, str(self.url), welcome.ticket
            )
            await asyncio.to_thread(tickets.save, self.ticket)

    def _bridge_widgets(self, events: EventSink, connection: RunnerConnection) -> None:
        """Proxy this connection's remote widgets in the notebook kernel (earlier ones end)."""
        ended = self.comms.notice() if self.comms is not None else None
        if ended:
            events.put(("notice", ended))
        self.comms = comms.CommBridge(
            comms.sender(self.loop, connection), self.runner_name, lambda: self._in_cell
        )
        connection.listen(self.comms.arrive)

    def _grace(self) -> float:
        return float(self.description.get("session_grace", DEFAULT_GRACE))

    async def _reattach(self, events: EventSink, cell: str, received: int) -> RunnerConnection:
        assert self.ticket is not None
        connection = await reconnect.reattach(
            self.url,
            self.ticket,
            cell=cell,
            received=received,
            lost_at=time.time(),
            grace=self._grace() if self.description else DEFAULT_GRACE,
            headers=self._identity,
            on_attempt=lambda attempt: events.put(("reconnecting", attempt)),
        )
        self.description = dict(connection.welcome.runner)
        self.runner_name = connection.runner_name
        self._bridge_widgets(events, connection)
        events.put(("reattached", self.runner_name))
        return connection

    async def _recover(
        self, events: EventSink, lost: RunnerConnection, cell: str, exc: ConnectionLost
    ) -> RunnerConnection:
        """Take the session back during ``cell``; raise if it cannot be."""
        self._connection = None
        if isinstance(exc, SessionEnded):
            raise exc
        if lost.ended_by_runner:
            await self._drop_ticket()
        if self.ticket is None or self._grace() <= 0:
            raise ConnectionLost(
                f"{exc} The cell may or may not have finished there, and the remote session's "
                "state is gone (the runner ended the session, or keeps none after its "
                "connection dropped: --session-grace 0); the next cell opens a new session."
            ) from None
        received = lost.received
        try:
            connection = await self._reattach(events, cell, received)
        except ConnectionLost:  # the session is gone
            await self._drop_ticket()
            raise
        self._connection = connection
        attached = connection.attached
        assert attached is not None
        if attached.cell and attached.cell != cell:  # an older cell's result comes first
            await connection.receive_result(attached.cell, _ignore, responder=self.responder)
        elif attached.cell:
            connection.received = attached.resume
            if attached.resume > received:
                dropped = attached.resume - received
                note = (
                    f"\n[didomagic: {dropped} outputs printed while disconnected were dropped "
                    "here (beyond the runner's --max-output); the cell kept running]\n"
                )
                events.put(("output", Output(cell, "stream", {"name": "stderr", "text": note})))
        return connection

    async def _drop_ticket(self) -> None:
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            await asyncio.to_thread(tickets.remove, ticket.session)

    async def execute_async(
        self,
        request: Execute,
        parts: Sequence[Sequence[memoryview]],
        events: EventSink,
        versions: Mapping[str, str] | None = None,
        ahead: localcode.Ahead | None = None,
    ) -> tuple[Result, list[list[bytearray]]]:
        """Open the session if needed and run one cell (on the I/O loop); report to ``events``.

        ``versions``: the version of each value (see :class:`HeldVersions`); a
        value the remote kernel holds at that version is not sent. ``ahead``:
        the code bundle the caller worked out (taken if still right). A connection
        that drops meanwhile is reopened and the session taken back; the cell
        goes on (or is sent again if the runner never got it all).
        """
        async with self._busy:
            if not self.connected:  # the slow first look, before the runner's idle clock runs
                await asyncio.to_thread(localcode.warm_up)
            connection = await self.connect_async(events)
            if versions is not None:
                values, parts, names = self.versions.hold(request.values, parts, versions)
                request = replace(request, values=values, held=names)
            code = localcode.state_of(self.responder.state)
            bundle = None
            if ahead is not None and ahead.holds(code):  # worked out by the caller's thread
                bundle = ahead.bundle
            elif not localcode.shipped(request.values):  # stats and reads: off the I/O loop
                bundle = await asyncio.to_thread(
                    localcode.bundle_for,
                    code,
                    names_only=self.url.safe_results,
                    budget=localcode.PUSH_BUDGET,
                )
            if bundle is not None:  # the notebook's modules go first, before any value
                request = replace(request, values=(bundle.header, *request.values))
                parts = [bundle.parts, *parts]
            held = self._held
            _check_size(request, held, self.description)
            request = replace(
                request,
                values=tuple(  # (most values have no digest: those stay as they are)
                    replace(v, cached=bool(v.digest) and held.get(v.name) == v.digest)
                    if v.digest or v.cached
                    else v
                    for v in request.values
                ),
            )
            assert self.comms is not None
            self.comms.sink = events  # widget traffic goes through the cell's loop, in order
            try:
                on_transfer = _throttled(events)
                send = True
                while True:
                    try:
                        if send:
                            await connection.send_cell(request, parts, on_transfer)
                        outcome = await connection.receive_result(
                            request.cell,
                            lambda output: events.put(("output", output)),
                            on_transfer,
                            lambda m: events.put(("installing", m.count, m.line, m.done)),
                            self.responder,
                        )
                        break
                    except ConnectionLost as exc:
                        connection = await self._recover(events, connection, request.cell, exc)
                        assert connection.attached is not None
                        send = connection.attached.cell != request.cell
            finally:
                self.comms.sink = None
            for v in request.values:  # the runner session now holds these bytes
                if v.digest:
                    held[v.name] = v.digest
            if outcome[0].status is Status.KERNEL_DIED:  # a fresh kernel holds no values
                self.versions.clear()
            if bundle is not None:
                bundle.commit(code)
            if outcome[0].status is Status.KERNEL_DIED:  # a fresh kernel holds no modules
                localcode.forget(self.responder.state)
            return outcome

    def execute(
        self,
        request: Execute,
        parts: Sequence[Sequence[memoryview]],
        on_output: Callable[[Output], None],
        progress: Progress | None = None,
        versions: Mapping[str, str] | None = None,
    ) -> tuple[Result, list[list[bytearray]]]:
        """Run one cell; outputs are handed to ``on_output`` on this thread as they arrive.

        A first KeyboardInterrupt (the notebook's stop button, or Cancel)
        interrupts the remote cell; a second one abandons the session. While
        the session is still being opened (or waits in a queue, or is being
        reconnected), the first one abandons it.
        """
        request = replace(request, **comms.cell_identity())  # the notebook's own cell
        ahead = None  # the code bundle, worked out on this (waiting) thread: no hop on the loop
        if self.connected and not localcode.shipped(request.values):
            ahead = localcode.ahead(self.responder.state, names_only=self.url.safe_results)
        return self._drive(
            lambda events: self.execute_async(request, parts, events, versions, ahead),
            on_output,
            progress,
        )

    def resume(
        self, on_output: Callable[[Output], None], progress: Progress | None = None
    ) -> tuple[Result, list[list[bytearray]]] | None:
        """Take the session named by :attr:`ticket` back now (``%remote attach``).

        A cell that ran there meanwhile (or still runs) shows its outputs and
        returns its result and values; None when the session was idle.
        """
        return self._drive(self.resume_async, on_output, progress)

    async def resume_async(self, events: EventSink) -> tuple[Result, list[list[bytearray]]] | None:
        """:meth:`resume` on the I/O loop."""
        async with self._busy:
            old, self._connection = self._connection, None
            if old is not None and not old.closed:
                await old.detach()
            try:
                connection = await self._reattach(events, "", 0)
            except ConnectionLost:  # the session is gone
                await self._drop_ticket()
                raise
            self._connection = connection
            self._held.clear()  # (what it holds is not known here)
            self.versions.clear()
            cell = connection.attached.cell if connection.attached else ""
            if not cell:
                return None
            return await connection.receive_result(
                cell,
                lambda output: events.put(("output", output)),
                _throttled(events),
                lambda m: events.put(("installing", m.count, m.line, m.done)),
                self.responder,
            )

    def _drive(
        self,
        work: Callable[[EventSink], Coroutine[Any, Any, T]],
        on_output: Callable[[Output], None],
        progress: Progress | None,
    ) -> T:
        """Run ``work`` on the I/O loop; hand its events to ``on_output`` and ``progress`` here."""
        progress = progress or NoProgress()
        events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        pump = ShellPump.current()  # Cancel clicks and widget events, while this cell waits
        self._in_cell = True
        future = self.loop.submit(work(events))
        self._future = future
        future.add_done_callback(lambda _: events.put(None))
        progress.on_cancel = self.cancel
        try:
            self._wait(future, events, on_output, progress, pump)
        finally:
            self._in_cell = False
            if pump is not None:
                pump.release()
        try:
            result = future.result()
        except ConnectionLost as exc:
            self._connection = None
            progress.finish(False, str(exc).split(". ")[0])
            raise
        except BaseException as exc:
            progress.finish(False, str(exc).split(". ")[0])
            raise
        finally:
            self._future = None
        if not isinstance(result, tuple):
            progress.finish(True)
        elif result[0].status is Status.INTERRUPTED:
            progress.cancelled()
        else:
            progress.finish(result[0].status is Status.OK, _status_text(result[0]))
        return result

    def _wait(
        self,
        future: concurrent.futures.Future[Any],
        events: queue.SimpleQueue[Event | None],
        on_output: Callable[[Output], None],
        progress: Progress,
        pump: ShellPump | None,
    ) -> None:
        """Handle the cell's events on this thread until it ends (see :meth:`execute`)."""
        interrupted = False
        while True:
            try:
                if pump is not None:
                    pump.poll()
                try:
                    event = events.get(timeout=POLL if pump is not None else TICK)
                except queue.Empty:
                    progress.tick()
                    continue
                if event is None:
                    return
                dispatch(event, on_output, progress)
            except KeyboardInterrupt:
                if interrupted or self._connection is None or self._connection.running is None:
                    future.cancel()
                    self.close()
                    progress.cancelled("session abandoned")
                    raise CellInterrupted(
                        f"Interrupted: the session with runner {self.runner_name} was abandoned "
                        "(its remote state is gone; the next cell opens a new one)."
                    ) from None
                interrupted = True
                self.cancel()

    def cancel(self) -> None:
        """Interrupt the running cell; abandon a session still connecting (any thread)."""
        connection = self._connection
        if connection is not None and connection.running is not None:
            self.loop.submit(connection.interrupt())
        elif self._future is not None:
            self._future.cancel()

    def close(self) -> None:
        """End the remote session now (even one kept on the runner after a dropped connection)."""
        self.loop.submit(self.close_async()).result(timeout=CLOSE_TIMEOUT + 5)

    async def close_async(self) -> None:
        """End the remote session (on the I/O loop)."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            await connection.close()
        elif self.ticket is not None:  # kept on the runner: take it back to end it
            with contextlib.suppress(DidomagicError, OSError):
                ticket = self.ticket
                taken = await attach(
                    self.url,
                    ticket.session,
                    ticket.ticket,
                    headers=self._identity,
                    timeout=CLOSE_TIMEOUT,
                )
                await taken.close()
        await self._drop_ticket()

    def detach(self) -> None:
        """Let go of the session without ending it: it waits on the runner for its grace period."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            self.loop.submit(connection.detach()).result(timeout=CLOSE_TIMEOUT)
        self.ticket = None  # (the ticket file keeps it, for %remote attach)


def _ignore(output: Output) -> None:
    """Outputs of a cell no one waits for any more."""


def _responder(url: ConnectionURL) -> Responder:
    """A new session's responder; its handlers see whether the runner is untrusted."""
    responder = Responder()
    responder.state[localcode.SAFE_RESULTS] = url.safe_results
    return responder


def _check_size(request: Execute, held: dict[str, str], runner: dict[str, Any]) -> None:
    """Refuse, before anything is sent, a cell over the runner's --max-message-size."""
    limit = runner.get("max_message_size")
    size = sum(v.nbytes for v in request.values if not (v.digest and held.get(v.name) == v.digest))
    if isinstance(limit, int) and size > limit:
        raise CellTooLarge(
            f"This cell sends {size / 1e6:,.1f} MB of values, but runner "
            f"{runner.get('name', '?')} accepts at most {limit / 1e6:,.1f} MB per cell (its "
            "--max-message-size). Nothing was sent and the session is intact: send less "
            "(compute the data on the runner, or --push fewer names), or ask the runner's "
            "owner to raise the limit."
        )


def _throttled(events: EventSink) -> Callable[[str, int, int], None]:
    """Transfer progress as events, at most one per mebibyte moved (and the last one)."""
    last = {"sending": -1, "receiving": -1}

    def report(direction: str, done: int, total: int) -> None:
        if done >= total or done - last[direction] >= 1 << 20 or last[direction] < 0:
            last[direction] = done
            events.put(("transfer", direction, done, total))

    return report


def dispatch(event: Event, on_output: Callable[[Output], None], progress: Progress) -> None:
    """Hand one event to the output callback or the progress display (caller's thread)."""
    kind = event[0]
    if kind == "output":
        progress.running()
        on_output(event[1])
    elif kind == "connecting":
        progress.connecting(event[1])
    elif kind == "aside":
        event[1].handle(event[2])
    elif kind == "notice":
        print(f"didomagic: {event[1]}", file=sys.stderr)
    elif kind == "queued":
        if event[2]:  # a mediator's note on a runner it launches
            progress.queued(event[1], event[2])
        else:
            progress.queued(event[1])
    elif kind == "reconnecting":
        progress.reconnecting(event[1])
    elif kind == "reattached":
        progress.reattached()
    elif kind == "runner":
        progress.chose(event[1])
    elif kind == "installing":
        progress.installing(event[1], event[2], event[3])
    elif kind == "transfer":
        progress.transfer(event[1], event[2], event[3])
        if event[1] == "sending" and event[2] >= event[3]:
            progress.running()


def _status_text(result: Result) -> str:
    if result.status is Status.OK:
        return ""
    if result.status is Status.ERROR:
        return f"{(result.error or {}).get('ename', 'error')} raised"
    return result.status.value


class LocalSession:
    """``--local``: the same pack/unpack path, executed in this process.

    The cell runs in a private namespace that persists across ``--local``
    cells, as a remote session's would.
    """

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self._versions = InPlaceTracker()

    def execute(
        self, source: str, cell: str, sent: list[serialize.Packed], transfer: Transfer
    ) -> LocalOutcome:
        """Run transformed ``source``; return its last value, its exception and what goes back."""
        from IPython import get_ipython

        ns = self.namespace
        ns.setdefault("get_ipython", get_ipython)
        failures = serialize.unpack_into(ns, [(p.name, p.parts) for p in sent])
        for p in sent:
            if p.name not in failures:
                self._versions.loaded(ns, p.name)
        self._versions.start(ns, [p.name for p in sent])
        before = serialize.snapshot(ns, transfer.fetch)
        outcome = LocalOutcome()
        try:
            tree = ast.parse(source)
            last = None
            if (
                tree.body
                and isinstance(tree.body[-1], ast.Expr)
                and not cell.rstrip().endswith(";")
            ):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, "<remote --local>", "exec"), ns)
            if last is not None:
                outcome.value = eval(compile(last, "<remote --local>", "eval"), ns)
        except Exception as exc:
            outcome.error = exc
        names = serialize.names_to_return(ns, before, outcome.error is None)
        outcome.values, pack_failures = serialize.pack_names(ns, names)
        changed, change_failures = self._versions.changed(ns, skip=names)
        outcome.values += changed
        self._versions.returned(ns, outcome.values)
        outcome.failures = {**failures, **pack_failures, **change_failures}
        outcome.deleted = [n for n in transfer.deletes if n not in ns]
        return outcome


@dataclass
class LocalOutcome:
    """What a ``--local`` cell produced."""

    value: Any = None
    error: Exception | None = None
    values: list[serialize.Packed] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
