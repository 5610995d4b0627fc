"""The Python API under the magics: run a cell's code on a runner with its namespace synced.

:func:`run_cell` is what ``%%remote`` calls. It analyses the cell, packs the
values it reads, runs it on a runner (or, with ``local=True``, here through
the same pack/unpack path), shows its outputs as they arrive, and brings the
values it binds back. Values are unpacked into a staging dict first and only
then applied, so a failure never leaves a half-synced namespace.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import concurrent.futures
import contextlib
import os
import queue
import re
import secrets
import sys
import threading
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from didomagic import display, matching, serialize
from didomagic.client import ANY_RUNNER, Requirements, RunnerConnection, open_connection, query
from didomagic.config import Config, Entry
from didomagic.discovery import RunnerView, survey_async
from didomagic.embedded import EmbeddedRunner
from didomagic.errors import (
    CellTimeout,
    CellTooLarge,
    ConfigurationError,
    ConnectError,
    ConnectionLost,
    KernelDied,
    NoMatchingRunner,
    RemoteError,
    RunnerBusy,
)
from didomagic.loop import BackgroundLoop, background_loop
from didomagic.namespace import analyze_cell, transform_cell
from didomagic.progress import NoProgress, Progress, make_progress
from didomagic.protocol import Execute, Output, Result, Status, ValueHeader
from didomagic.urls import ConnectionURL

IDLE_ENDED = "idle-timeout"
"""The close reason a runner gives when it ends an idle session."""

RUNNER_ENV = "DIDOMAGIC_RUNNER"
"""Environment variable naming the default runner's connection URL."""

_IPYTHON_HISTORY = re.compile(r"_+|_i+|_i?\d+|_[iod]h")
"""IPython's own history names (``_``, ``_i3``, ``_5``, ``_oh``): never sent."""


@dataclass(frozen=True)
class CellSpec:
    """What to run and which names to move; the magic's options, as data."""

    code: str
    push: tuple[str, ...] = ()
    pull: tuple[str, ...] = ()
    sync: bool = True
    timeout: float | None = None
    tags: tuple[str, ...] = ()
    os: str = ""


@dataclass
class Transfer:
    """The names a cell sends and fetches, decided before it runs."""

    send: list[str]
    fetch: list[str]
    deletes: list[str]
    failures: dict[str, str] = field(default_factory=dict)


def plan_transfer(
    spec: CellSpec,
    namespace: MutableMapping[str, Any],
    transform: Callable[[str], str] = transform_cell,
    hidden: Iterable[str] = (),
) -> Transfer:
    """Decide which names travel: those the cell reads (that exist here) and binds."""
    names = analyze_cell(spec.code, transform) if spec.sync else None
    hidden = set(hidden)

    def sendable(name: str) -> bool:
        return name in namespace and name not in hidden and not _IPYTHON_HISTORY.fullmatch(name)

    reads = sorted(names.reads) if names else []
    writes = sorted(names.writes) if names else []
    deletes = sorted(names.deletes) if names else []
    return Transfer(
        send=[n for n in dict.fromkeys([*reads, *spec.push]) if sendable(n)],
        fetch=list(dict.fromkeys([*writes, *spec.pull])),
        deletes=deletes,
    )


def report_failures(failures: dict[str, str], direction: str) -> None:
    """Tell the user, by name, which values did not travel and why."""
    for name, reason in sorted(failures.items()):
        print(f"didomagic: {name!r} was not {direction}: {reason}", file=sys.stderr)


def apply_values(
    namespace: MutableMapping[str, Any],
    values: Iterable[tuple[str, Sequence[Any]]],
    deleted: Iterable[str],
    safe: bool = False,
) -> dict[str, str]:
    """Unpack values into a staging dict, then apply them and the deletions in one step.

    ``safe``: accept only plain data (the runner's URL says ``safe_results``).
    """
    staging: dict[str, Any] = {}
    failures = serialize.unpack_into(staging, values, safe)
    namespace.update(staging)
    for name in deleted:
        namespace.pop(name, None)
    return failures


# --------------------------------------------------------------------------- sessions


CACHE_MIN = 1 << 20
"""Values at least this big carry a digest, so an unchanged one is not sent again."""

TICK = 0.25
"""Seconds between progress updates while a cell waits with no event."""

Event = tuple[Any, ...]
"""What the I/O thread hands the notebook thread: ("output", Output), ("queued", k), ..."""


class EventSink(Protocol):
    """Where the I/O loop puts a cell's events (a queue read by the caller's thread)."""

    def put(self, event: Event, /) -> None:
        """Hand one event over."""


class RemoteSession:
    """A session with one runner (direct or through a mediator), driven from a blocking thread.

    The remote namespace lives as long as this session: one per runner for the
    life of the notebook kernel. A lost connection is reopened on the next
    cell, as a new remote session (through a mediator, possibly on another
    matching runner).
    """

    def __init__(
        self,
        url: ConnectionURL,
        requirements: Requirements = ANY_RUNNER,
        loop: BackgroundLoop | None = None,
    ) -> None:
        self.url = url
        self.requirements = requirements
        self.loop = loop or background_loop()
        self._connection: RunnerConnection | None = None
        self._future: concurrent.futures.Future[Any] | None = None
        self._held: dict[str, str] = {}
        """Digest of each large value the remote session holds, by name (see CACHE_MIN)."""
        self._busy = asyncio.Lock()  # one cell at a time, whoever calls (run, run_async)
        self.runner_name = url.address
        """The runner's name, once it has introduced itself."""
        self.description: dict[str, Any] = {}
        """The runner's description from its welcome (empty before the first cell)."""

    @property
    def connected(self) -> bool:
        """True while the session with the runner is open."""
        return self._connection is not None and not self._connection.closed

    async def connect_async(self, events: EventSink) -> RunnerConnection:
        """Open the session now if it is not open (on the I/O loop)."""
        if self._connection is None or self._connection.closed:
            if self._connection is not None and self._connection.ws.close_reason == IDLE_ENDED:
                events.put(
                    (
                        "notice",
                        f"runner {self.runner_name} ended this notebook's idle session "
                        "(--idle-timeout); this cell starts a new one, so earlier remote "
                        "state is gone.",
                    )
                )
            events.put(("connecting", self.url.address))
            self._connection = await open_connection(
                self.url,
                self.requirements,
                on_queued=lambda k, note: events.put(("queued", k, note)),
            )
            self._held.clear()  # a new remote session holds no values yet
            self.description = dict(self._connection.welcome.runner)
            self.runner_name = self._connection.runner_name
        events.put(("runner", self.description))
        return self._connection

    async def execute_async(
        self,
        request: Execute,
        parts: Sequence[Sequence[memoryview]],
        events: EventSink,
    ) -> tuple[Result, list[list[bytearray]]]:
        """Open the session if needed and run one cell (on the I/O loop); report to ``events``."""
        async with self._busy:
            connection = await self.connect_async(events)
            held = self._held
            _check_size(request, held, self.description)
            request = replace(
                request,
                values=tuple(
                    replace(v, cached=bool(v.digest) and held.get(v.name) == v.digest)
                    for v in request.values
                ),
            )
            outcome = await connection.execute(
                request,
                parts,
                lambda output: events.put(("output", output)),
                _throttled(events),
            )
            for v in request.values:  # the runner session now holds these bytes
                if v.digest:
                    held[v.name] = v.digest
            return outcome

    def execute(
        self,
        request: Execute,
        parts: Sequence[Sequence[memoryview]],
        on_output: Callable[[Output], None],
        progress: Progress | None = None,
    ) -> tuple[Result, list[list[bytearray]]]:
        """Run one cell; outputs are handed to ``on_output`` on this thread as they arrive.

        A first KeyboardInterrupt (the notebook's stop button, or Cancel)
        interrupts the remote cell; a second one abandons the session. While
        the session is still being opened (or waits in a queue), the first one
        abandons it.
        """
        progress = progress or NoProgress()
        events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        future = self.loop.submit(self.execute_async(request, parts, events))
        self._future = future
        future.add_done_callback(lambda _: events.put(None))
        progress.on_cancel = self.cancel
        interrupted = False
        while True:
            try:
                try:
                    event = events.get(timeout=TICK)
                except queue.Empty:
                    progress.tick()
                    continue
                if event is None:
                    break
                dispatch(event, on_output, progress)
            except KeyboardInterrupt:
                if interrupted or self._connection is None or self._connection.running is None:
                    future.cancel()
                    self.close()
                    progress.finish(False, "cancelled")
                    raise
                interrupted = True
                self.cancel()
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
        progress.finish(result[0].status is Status.OK, _status_text(result[0]))
        return result

    def cancel(self) -> None:
        """Interrupt the running cell; abandon a session still connecting (any thread)."""
        connection = self._connection
        if connection is not None and connection.running is not None:
            self.loop.submit(connection.interrupt())
        elif self._future is not None:
            self._future.cancel()

    def close(self) -> None:
        """End the remote session."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            self.loop.submit(connection.close()).result(timeout=10)

    async def close_async(self) -> None:
        """End the remote session (on the I/O loop)."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            await connection.close()


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
    elif kind == "notice":
        print(f"didomagic: {event[1]}", file=sys.stderr)
    elif kind == "queued":
        if event[2]:  # a mediator's note on a runner it launches
            progress.queued(event[1], event[2])
        else:
            progress.queued(event[1])
    elif kind == "runner":
        progress.chose(event[1])
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

    def execute(
        self, source: str, cell: str, sent: list[serialize.Packed], transfer: Transfer
    ) -> LocalOutcome:
        """Run transformed ``source``; return its last value, its exception and what goes back."""
        from IPython import get_ipython

        ns = self.namespace
        ns.setdefault("get_ipython", get_ipython)
        failures = serialize.unpack_into(ns, [(p.name, p.parts) for p in sent])
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
        outcome.failures = {**failures, **pack_failures}
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


class SessionPool:
    """The sessions this notebook holds (one per runner), and how runners are chosen.

    Where a cell runs:

    1. ``runner=`` a connection URL, or the name of a configured runner or
       mediator, or of a runner in a configured mediator's pool;
    2. else ``tags=`` / ``os=``: an open session on a matching runner if there
       is one (so remote state carries over), else the least loaded matching
       runner among the configured runners and mediators;
    3. else the notebook's default (:meth:`use`), else ``$DIDOMAGIC_RUNNER``,
       else an embedded runner on this machine.
    """

    def __init__(self, config: Config | None = None) -> None:
        self._sessions: list[RemoteSession] = []
        self._embedded: EmbeddedRunner | None = None
        self._lock = threading.RLock()
        self._config = config
        self.default: str | None = None
        """The notebook's default runner (a name or URL), set by ``%runners use``."""
        self.local = LocalSession()

    @property
    def config(self) -> Config:
        """The configured runners, read afresh (another notebook may have changed them)."""
        return self._config if self._config is not None else Config()

    def survey(self) -> list[RunnerView]:
        """Every configured runner (and every runner behind a configured mediator), queried now."""
        return background_loop().run(survey_async(self.entries()))

    def entries(self) -> list[Entry]:
        """The configured runners and mediators, plus ``$DIDOMAGIC_RUNNER`` if set."""
        entries = list(self.config.entries)
        env = _env_url()
        if env is not None and all(str(e.url) != str(env) for e in entries):
            entries.append(Entry(RUNNER_ENV, env))
        return entries

    def use(self, runner: str | None) -> None:
        """Make ``runner`` (a name or URL) the notebook's default; ``None`` clears it."""
        if runner is not None:
            self._target(runner)  # fail now, not at the next cell
        self.default = runner

    def session(
        self, runner: str | None = None, tags: Sequence[str] = (), os: str = ""
    ) -> RemoteSession:
        """The session for a cell (see the class docstring), opened on first use."""
        with self._lock:
            if runner:
                url, requirements = self._target(runner)
            elif tags or os:
                return self._matching(tuple(tags), os)
            elif self.default:
                url, requirements = self._target(self.default)
            else:
                url, requirements = self._fallback(), ANY_RUNNER
            return self._get(url, requirements)

    def holder(self, runner: str | None, tags: Sequence[str] = (), os: str = "") -> ConnectionURL:
        """Where a detached job goes: a runner or mediator that outlives this kernel.

        Like :meth:`session`, but a busy match is fine (jobs wait in the holder's
        queue), a mediator is preferred, the embedded runner is refused, and with
        nothing else given the first configured mediator (else runner) that is up
        holds the job.
        """
        if runner:
            return self._target(runner)[0]
        if tags or os:
            views = self.survey()
            up = [
                v for v in views if v.status == "up" and matching.matches(v.description, tags, os)
            ]
            if not up:
                descriptions = [v.description for v in views]
                raise NoMatchingRunner(matching.no_match_message(descriptions, tuple(tags), os))
            return next((v.url for v in up if v.mediator), up[0].url)
        if self.default:
            return self._target(self.default)[0]
        env = _env_url()
        if env is not None:
            return env
        views = [v for v in self.survey() if v.status == "up"]
        if views:  # a configured mediator first (it has the most runners), else a runner
            return next((v.url for v in views if v.mediator), views[0].url)
        raise ConfigurationError(
            "Detached jobs need a runner or mediator that outlives this kernel, and none is "
            "configured (the embedded runner stops with the kernel). Use --runner or --tags "
            f"with one from %runners, or set {RUNNER_ENV}."
        )

    def _get(self, url: ConnectionURL, requirements: Requirements) -> RemoteSession:
        for session in self._sessions:
            if str(session.url) == str(url) and session.requirements == requirements:
                return session
        session = RemoteSession(url, requirements)
        self._sessions.append(session)
        return session

    def _target(self, runner: str) -> tuple[ConnectionURL, Requirements]:
        if "://" in runner:
            return _parse_url(runner), ANY_RUNNER
        entry = self.config.get(runner)
        if entry is not None:
            return entry.url, ANY_RUNNER
        views = self.survey()
        for view in views:
            if view.mediator and view.name == runner:
                return view.url, Requirements(runner=runner)
            if view.name == runner and view.status == "up":
                return view.url, ANY_RUNNER
        known = ", ".join(dict.fromkeys(v.name for v in views)) or "none"
        raise ConfigurationError(
            f"No runner called {runner!r}: it is neither a configured name nor a runner in a "
            f"configured mediator's pool (known: {known}). Give a connection URL, or add it "
            "with %runners add URL --name NAME."
        )

    def _matching(self, tags: tuple[str, ...], os: str) -> RemoteSession:
        for session in self._sessions:
            if session.connected and matching.matches(session.description, tags, os):
                return session
        views = self.survey()
        chosen = matching.choose([v.description for v in views], tags, os)
        if chosen is None:
            descriptions = [v.description for v in views]
            error = RunnerBusy if matching.all_busy(descriptions, tags, os) else NoMatchingRunner
            raise error(matching.no_match_message(descriptions, tags, os))
        view = next(v for v in views if v.description is chosen)
        if view.mediator:
            return self._get(view.url, Requirements(tags=tags, os=os))
        return self._get(view.url, ANY_RUNNER)

    def _fallback(self) -> ConnectionURL:
        env = _env_url()
        if env is not None:
            return env
        if self._embedded is None or self._embedded.process is None:
            self._embedded = EmbeddedRunner()
            url = self._embedded.start()
            print(
                f"didomagic: no runner configured, so started an embedded runner on "
                f"{url.address} (it stops with this kernel; use --runner, --tags or "
                f"{RUNNER_ENV}=URL to run elsewhere)."
            )
        assert self._embedded.url is not None
        return self._embedded.url

    def close(self) -> None:
        """Close every session and stop the embedded runner."""
        with self._lock:
            for session in self._sessions:
                # Best effort: the runner may already be gone.
                with contextlib.suppress(Exception):
                    session.close()
            self._sessions.clear()
            if self._embedded is not None:
                self._embedded.stop()
                self._embedded = None


def _env_url() -> ConnectionURL | None:
    """The runner named by ``$DIDOMAGIC_RUNNER``, if it is set."""
    text = os.environ.get(RUNNER_ENV)
    return _parse_url(text) if text else None


def _parse_url(text: str) -> ConnectionURL:
    if "://" not in text:
        raise ConfigurationError(
            f"{text!r} is not a connection URL. Give the wss://… URL that didomagic-runner "
            "printed when it started, or the name of a configured runner."
        )
    return ConnectionURL.parse(text)


_pool: SessionPool | None = None


def default_pool() -> SessionPool:
    """The process-wide :class:`SessionPool` the magics use."""
    global _pool
    if _pool is None:
        _pool = SessionPool()
    return _pool


# --------------------------------------------------------------------------- run a cell


def run_cell(
    spec: CellSpec,
    namespace: MutableMapping[str, Any],
    *,
    runner: str | None = None,
    local: bool = False,
    transform: Callable[[str], str] = transform_cell,
    hidden: Iterable[str] = (),
    pool: SessionPool | None = None,
    progress: Progress | None = None,
) -> Any:
    """Run a cell on a runner with its namespace synced; return its displayed value.

    Raises :class:`RemoteError` when the cell raises remotely (after syncing
    the names it bound before raising), :class:`CellTimeout`,
    :class:`KernelDied`, or a :class:`ConnectError` subclass.
    """
    pool = pool or default_pool()
    transfer = plan_transfer(spec, namespace, transform, hidden)
    sent, failures = serialize.pack_names(namespace, transfer.send)
    report_failures(failures, "sent")
    if local:
        return _run_local(pool.local, spec, namespace, transform, sent, transfer)
    session = pool.session(runner, spec.tags, spec.os)
    request = Execute(
        cell=secrets.token_hex(8),
        code=spec.code,
        values=tuple(_header(p) for p in sent),
        fetch=tuple(transfer.fetch),
        deletes=tuple(transfer.deletes),
        timeout=spec.timeout,
    )
    shown: list[display.RemoteResult] = []

    def on_output(output: Output) -> None:
        result = display.show(output)
        if result is not None:
            shown.append(result)

    result, buffers = session.execute(
        request, [p.parts for p in sent], on_output, progress or make_progress()
    )
    returned = [(v.name, parts) for v, parts in zip(result.values, buffers, strict=True)]
    failures = dict(result.failures)
    failures.update(apply_values(namespace, returned, result.deleted, session.url.safe_results))
    report_failures(failures, "synced")
    raise_for_status(result, session.runner_name)
    return shown[-1] if shown else None


def _header(packed: serialize.Packed) -> ValueHeader:
    """A value's header, with a content digest when it is large enough to be worth caching."""
    header = packed.header
    if packed.nbytes < CACHE_MIN:
        return header
    return replace(header, digest=packed.digest())


def raise_for_status(result: Result, runner: str) -> None:
    """Raise the error that matches a cell's status (nothing for a cell that succeeded)."""
    error = result.error or {}
    if result.status is Status.ERROR:
        raise RemoteError(
            error.get("ename", "Error"), error.get("evalue", ""), error.get("traceback", []), runner
        )
    if result.status is Status.INTERRUPTED:
        raise KeyboardInterrupt(f"the cell was interrupted on runner {runner}")
    if result.status is Status.TIMEOUT:
        raise CellTimeout(f"Timeout on runner {runner}: {error.get('message', '')}.")
    if result.status is Status.KERNEL_DIED:
        raise KernelDied(f"Runner kernel died on runner {runner}: {error.get('message', '')}.")


def _run_local(
    session: LocalSession,
    spec: CellSpec,
    namespace: MutableMapping[str, Any],
    transform: Callable[[str], str],
    sent: list[serialize.Packed],
    transfer: Transfer,
) -> Any:
    outcome = session.execute(transform(spec.code), spec.code, sent, transfer)
    failures = dict(outcome.failures)
    failures.update(
        apply_values(namespace, [(p.name, p.parts) for p in outcome.values], outcome.deleted)
    )
    report_failures(failures, "synced")
    if outcome.error is not None:
        raise outcome.error
    return outcome.value


# --------------------------------------------------------------------------- runners


def runners(pool: SessionPool | None = None) -> list[RunnerView]:
    """Every configured runner, and every runner behind a configured mediator, queried now."""
    return (pool or default_pool()).survey()


def add_runner(
    url: str,
    name: str | None = None,
    *,
    client_cert: str | None = None,
    client_key: str | None = None,
    safe_results: bool = False,
) -> Entry:
    """Remember a runner's or mediator's connection URL in the config file (mode 0600).

    Without ``name`` the runner (or mediator) is asked for its own name.
    ``client_cert``/``client_key`` are presented to runners started with
    ``--client-ca``; ``safe_results`` accepts only plain data back from it.
    """
    parsed = _parse_url(url)
    if client_key is not None and client_cert is None:
        raise ConfigurationError("--client-key needs --client-cert (the certificate it goes with).")
    if client_cert is not None:
        for given in (client_cert, client_key):
            if given is not None and not Path(given).expanduser().is_file():
                raise ConfigurationError(
                    f"No such file: {given}. Give the client certificate and key files the "
                    "runner's owner issued (didomagic-runner gen-client-cert writes them)."
                )
        client_cert = str(Path(client_cert).expanduser().resolve())
        client_key = str(Path(client_key).expanduser().resolve()) if client_key else None
        parsed = replace(parsed, client_cert=client_cert, client_key=client_key)
    if safe_results:
        parsed = replace(parsed, safe_results=True)
    if name is None:
        try:
            info, _ = background_loop().run(query(parsed))
            name = info.name or (info.runners[0].get("name") if info.runners else None)
        except ConnectError as exc:
            raise ConfigurationError(
                f"Could not ask {parsed.address} for its name ({exc}). Give one with --name "
                "NAME to add it anyway."
            ) from None
    config = Config()
    return config.add(str(name), parsed)


def remove_runner(name: str) -> Entry:
    """Forget a configured runner or mediator."""
    return Config().remove(name)


def use(runner: str | None, pool: SessionPool | None = None) -> None:
    """Make ``runner`` (a name or URL) where cells without --runner or --tags run."""
    (pool or default_pool()).use(runner)
