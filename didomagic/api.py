"""The Python API under the magics: run a cell's code on a runner with its namespace synced.

:func:`run_cell` is what ``%%remote`` calls. It analyses the cell, packs the
values it reads, runs it on a runner (or, with ``local=True``, here through
the same pack/unpack path), shows its outputs as they arrive, and brings the
values it binds back. Values are unpacked into a staging dict first and only
then applied, so a failure never leaves a half-synced namespace.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import os
import queue
import re
import secrets
import sys
import threading
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from didomagic import display, serialize
from didomagic.client import RunnerConnection, open_connection
from didomagic.embedded import EmbeddedRunner
from didomagic.errors import (
    CellTimeout,
    ConfigurationError,
    ConnectionLost,
    KernelDied,
    RemoteError,
)
from didomagic.loop import BackgroundLoop, background_loop
from didomagic.namespace import analyze_cell, transform_cell
from didomagic.protocol import Execute, Output, Result, Status
from didomagic.urls import ConnectionURL

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
) -> dict[str, str]:
    """Unpack values into a staging dict, then apply them and the deletions in one step."""
    staging: dict[str, Any] = {}
    failures = serialize.unpack_into(staging, values)
    namespace.update(staging)
    for name in deleted:
        namespace.pop(name, None)
    return failures


# --------------------------------------------------------------------------- sessions


class RemoteSession:
    """A session with one runner, driven from a blocking (notebook) thread.

    The remote namespace lives as long as this session: one per runner for the
    life of the notebook kernel. A lost connection is reopened on the next
    cell, as a new remote session.
    """

    def __init__(self, url: ConnectionURL, loop: BackgroundLoop | None = None) -> None:
        self.url = url
        self.loop = loop or background_loop()
        self._connection: RunnerConnection | None = None
        self.runner_name = url.address
        """The runner's name, once it has introduced itself."""

    def connection(self) -> RunnerConnection:
        """The open connection, opened now if there is none."""
        if self._connection is None or self._connection.closed:
            self._connection = self.loop.run(open_connection(self.url))
            self.runner_name = self._connection.runner_name
        return self._connection

    def execute(
        self,
        request: Execute,
        parts: Sequence[Sequence[memoryview]],
        on_output: Callable[[Output], None],
    ) -> tuple[Result, list[list[bytearray]]]:
        """Run one cell; outputs are handed to ``on_output`` on this thread as they arrive.

        A first KeyboardInterrupt (the notebook's stop button) interrupts the
        remote cell; a second one abandons the session.
        """
        connection = self.connection()
        events: queue.SimpleQueue[Output | None] = queue.SimpleQueue()
        future = self.loop.submit(connection.execute(request, parts, events.put))
        future.add_done_callback(lambda _: events.put(None))
        interrupted = False
        while True:
            try:
                event = events.get()
                if event is None:
                    break
                on_output(event)
            except KeyboardInterrupt:
                if interrupted:
                    self.close()
                    raise
                interrupted = True
                self.loop.submit(connection.interrupt())
        try:
            return future.result()
        except ConnectionLost:
            self._connection = None
            raise

    def close(self) -> None:
        """End the remote session."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.closed:
            self.loop.submit(connection.close()).result(timeout=10)


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
    """The sessions this notebook holds, one per runner, plus the embedded runner."""

    def __init__(self) -> None:
        self._sessions: dict[str, RemoteSession] = {}
        self._embedded: EmbeddedRunner | None = None
        self._lock = threading.Lock()
        self.local = LocalSession()

    def resolve(self, runner: str | None) -> ConnectionURL:
        """The runner to use: the given URL, else $DIDOMAGIC_RUNNER, else the embedded one."""
        text = runner or os.environ.get(RUNNER_ENV)
        if text:
            if "://" not in text:
                raise ConfigurationError(
                    f"--runner {text!r} is not a connection URL. Give the wss://… URL that "
                    "didomagic-runner printed when it started."
                )
            return ConnectionURL.parse(text)
        if self._embedded is None or self._embedded.process is None:
            self._embedded = EmbeddedRunner()
            url = self._embedded.start()
            print(
                f"didomagic: no runner configured, so started an embedded runner on "
                f"{url.address} (it stops with this kernel; use --runner URL or "
                f"{RUNNER_ENV}=URL to run elsewhere)."
            )
        assert self._embedded.url is not None
        return self._embedded.url

    def session(self, runner: str | None = None) -> RemoteSession:
        """The session with ``runner`` (see :meth:`resolve`), opened on first use."""
        with self._lock:
            url = self.resolve(runner)
            key = str(url)  # a different token is a different identity
            if key not in self._sessions:
                self._sessions[key] = RemoteSession(url)
            return self._sessions[key]

    def close(self) -> None:
        """Close every session and stop the embedded runner."""
        with self._lock:
            for session in self._sessions.values():
                # Best effort: the runner may already be gone.
                with contextlib.suppress(Exception):
                    session.close()
            self._sessions.clear()
            if self._embedded is not None:
                self._embedded.stop()
                self._embedded = None


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
    session = pool.session(runner)
    request = Execute(
        cell=secrets.token_hex(8),
        code=spec.code,
        values=tuple(p.header for p in sent),
        fetch=tuple(transfer.fetch),
        deletes=tuple(transfer.deletes),
        timeout=spec.timeout,
    )
    shown: list[display.RemoteResult] = []

    def on_output(output: Output) -> None:
        result = display.show(output)
        if result is not None:
            shown.append(result)

    result, buffers = session.execute(request, [p.parts for p in sent], on_output)
    returned = [(v.name, parts) for v, parts in zip(result.values, buffers, strict=True)]
    failures = dict(result.failures)
    failures.update(apply_values(namespace, returned, result.deleted))
    report_failures(failures, "synced")
    _raise_for_status(result, session.runner_name)
    return shown[-1] if shown else None


def _raise_for_status(result: Result, runner: str) -> None:
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
