"""Which names a cell moves, and applying what comes back in one step.

:func:`plan_transfer` decides before a cell runs which notebook values it
sends (the names it reads that exist here) and fetches (the names it binds);
:func:`apply_values` unpacks returned values into a staging dict first and
only then applies them, so a failure never leaves a half-synced namespace.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from didomagic import serialize
from didomagic.filebundle import FileOptions
from didomagic.namespace import analyze_cell, transform_cell
from didomagic.returned import Expected, screen

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
    pip: tuple[str, ...] = ()
    """Requirements the runner's kernel must see (``--pip``, ``--requirements``)."""
    packages: str = ""
    """``match``: also the notebook's versions of what the cell uses; ``none``; "" for the
    notebook's default (``$DIDOMAGIC_PACKAGES``, see :mod:`didomagic.packages`)."""
    files: FileOptions = field(default_factory=FileOptions)


@dataclass
class Transfer:
    """The names a cell sends and fetches, decided before it runs."""

    send: list[str]
    fetch: list[str]
    deletes: list[str]
    failures: dict[str, str] = field(default_factory=dict)

    def expected(self) -> Expected:
        """What the runner may send back: see :mod:`didomagic.returned`."""
        return Expected(
            frozenset([*self.fetch, *self.deletes, *self.send]), frozenset(self.deletes)
        )


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
    expected: Expected | None = None,
) -> dict[str, str]:
    """Unpack values into a staging dict, then apply them and the deletions in one step.

    ``safe``: accept only plain data (the runner's URL says ``safe_results``).
    Only names ``expected`` allows (and plain identifiers in any case) are
    applied; the others are returned as failures, by name.
    """
    values, deleted, refused = screen(values, deleted, expected)
    staging: dict[str, Any] = {}
    failures = serialize.unpack_into(staging, values, safe, main=namespace)
    namespace.update(staging)
    for name in deleted:
        namespace.pop(name, None)
    return {**failures, **refused}
