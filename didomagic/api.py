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
from typing import Any

from didomagic import display, files, packages, serialize
from didomagic.errors import CellInterrupted, CellTimeout, KernelDied, PackageError, RemoteError
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
    "cell_packages",
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
    progress: Progress | str | None = None,
    session: RemoteSession | None = None,
) -> Any:
    """Run a cell on a runner with its namespace synced; return its displayed value.

    ``progress`` is a display, or the kind of one to make (``widget``, ``text``,
    ``none``; ``None`` for this environment's), made once a runner was chosen.
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
    safe = session.url.safe_results
    state = session.cell_state()
    bundle = files.bundle_value(state, spec.files, safe=safe, skip_unchanged=True)
    if bundle is not None:  # (None: the kernel holds what it would say)
        sent.append(bundle)
    versions = session.versions.of(namespace, sent)
    request = Execute(
        cell=secrets.token_hex(8),
        code=spec.code,
        values=tuple(_header(p, versions.get(p.name, "")) for p in sent),
        fetch=tuple(transfer.fetch),
        deletes=tuple(transfer.deletes),
        timeout=spec.timeout,
        packages=cell_packages(spec, sent, transform),
    )
    shown: list[display.RemoteResult] = []

    def on_output(output: Output) -> None:
        result = display.show(output, session.url.safe_results)
        if result is not None:
            shown.append(result)

    try:
        result, buffers = session.execute(
            request,
            [p.parts for p in sent],
            on_output,
            progress if isinstance(progress, Progress) else make_progress(progress),
            versions,
        )
    except BaseException:
        files.cell_ended(state, kept=False)  # whether its kernel got the bundle is not known
        raise
    if result.status is Status.KERNEL_DIED:
        files.kernel_replaced(state)
    else:
        files.cell_ended(state, kept=True)
    returned = [(v.name, parts) for v, parts in zip(result.values, buffers, strict=True)]
    returned = files.take_back(returned, state, spec.files, safe=safe)
    failures = packages.hint_failures(result.failures, session.runner_name)
    unapplied = apply_values(namespace, returned, result.deleted, safe, transfer.expected())
    session.versions.after_cell(namespace, returned, result.failures, unapplied, result.deleted)
    failures.update(unapplied)
    report_failures(failures, "synced")
    raise_for_status(result, session.runner_name)
    return shown[-1] if shown else None


def cell_packages(
    spec: CellSpec, sent: list[serialize.Packed], transform: Callable[[str], str] = transform_cell
) -> tuple[str, ...]:
    """The requirements a cell sends: its ``pip`` and, with ``match``, what it uses."""
    mode = spec.packages or packages.default_mode()
    streams = (p.parts[0] for p in sent if p.parts)
    return packages.requested(spec.pip, mode, spec.code, streams, transform)


def _header(packed: serialize.Packed, digest: str = "") -> ValueHeader:
    """A value's header, with a content digest when it is large enough to be worth caching.

    ``digest``: the value's digest if already computed (its version).
    """
    sizes = tuple([p.nbytes for p in packed.parts])
    if sum(sizes) < CACHE_MIN:
        return ValueHeader(packed.name, sizes)
    return ValueHeader(packed.name, sizes, digest or packed.digest())


def raise_for_status(result: Result, runner: str) -> None:
    """Raise the error that matches a cell's status (nothing for a cell that succeeded)."""
    error = result.error or {}
    if result.status is Status.ERROR:
        ename, evalue = error.get("ename", "Error"), error.get("evalue", "")
        traceback = list(error.get("traceback", []))
        if ename in PackageError.ENAMES:
            raise PackageError(ename, evalue, traceback, runner)
        hint = (
            packages.missing_module_hint(evalue, runner) if ename == "ModuleNotFoundError" else None
        )
        if hint is not None:
            evalue = hint
            traceback.append(f"didomagic: {hint}")
        raise RemoteError(ename, evalue, traceback, runner)
    if result.status is Status.INTERRUPTED:
        raise CellInterrupted(f"Interrupted on runner {runner}; the remote session is kept.")
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
        apply_values(
            namespace,
            [(p.name, p.parts) for p in outcome.values],
            outcome.deleted,
            expected=transfer.expected(),
        )
    )
    report_failures(failures, "synced")
    if outcome.error is not None:
        raise outcome.error
    return outcome.value
