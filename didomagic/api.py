"""The Python API under the magics: run a cell's code on a runner with its namespace synced.

:func:`run_cell` is what ``%%remote`` calls. It analyses the cell, packs the
values it reads, runs it on a runner (or, with ``local=True``, here through
the same pack/unpack path), shows its outputs as they arrive, and brings the
values it binds back. Values are unpacked into a staging dict first and only
then applied, so a failure never leaves a half-synced namespace.

The parts it stands on live in their own modules and are re-exported here:
:mod:`didomagic.transfer` (which names travel), :mod:`didomagic.session`
(one runner session) and :mod:`didomagic.pool` (which runner, and the runner list).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import replace
from typing import Any

from didomagic import display, serialize
from didomagic.errors import CellTimeout, KernelDied, RemoteError
from didomagic.namespace import transform_cell
from didomagic.pool import (
    RUNNER_ENV,
    SessionPool,
    add_runner,
    default_pool,
    remove_runner,
    runners,
    use,
)
from didomagic.progress import Progress, make_progress
from didomagic.protocol import Execute, Output, Result, Status, ValueHeader
from didomagic.session import (
    CACHE_MIN,
    IDLE_ENDED,
    TICK,
    Event,
    EventSink,
    LocalOutcome,
    LocalSession,
    RemoteSession,
    dispatch,
)
from didomagic.transfer import CellSpec, Transfer, apply_values, plan_transfer, report_failures

__all__ = [
    "CACHE_MIN",
    "IDLE_ENDED",
    "RUNNER_ENV",
    "TICK",
    "CellSpec",
    "Event",
    "EventSink",
    "LocalOutcome",
    "LocalSession",
    "RemoteSession",
    "SessionPool",
    "Transfer",
    "add_runner",
    "apply_values",
    "default_pool",
    "dispatch",
    "plan_transfer",
    "raise_for_status",
    "remove_runner",
    "report_failures",
    "run_cell",
    "runners",
    "use",
]


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
    session: RemoteSession | None = None,
) -> Any:
    """Run a cell on a runner with its namespace synced; return its displayed value.

    ``session`` runs it in that session instead of choosing one (``--session``).

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
    session = session or pool.session(runner, spec.tags, spec.os)
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
