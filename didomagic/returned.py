"""Which names a runner may bind or delete in the notebook: only those the cell could touch.

A runner answers a cell with values by name and a list of deleted names. The
client decides by its own analysis of the cell (see
:func:`didomagic.transfer.plan_transfer`) what may come back: the names the
cell binds or deletes, the ``--pull`` names, and the names it was sent (a value
changed in place comes back under its own name). Every name must also be a
plain identifier that is not a dunder (``__builtins__``, ``__name__``), so no
runner can replace the notebook's builtins, bind ``a.b`` or ``''``, or touch a
variable the cell never named. Refused names are reported by name and never
applied, in every mode.
"""

from __future__ import annotations

import keyword
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

Returned = tuple[str, Sequence[Any]]
"""A returned value's name and its parts."""


def plain_name(name: str) -> bool:
    """True for a name a runner may bind here: an identifier, not a keyword, not a dunder."""
    return (
        isinstance(name, str)
        and name.isidentifier()
        and not keyword.iskeyword(name)
        and not (name.startswith("__") and name.endswith("__"))
    )


@dataclass(frozen=True)
class Expected:
    """What a cell may bring back, decided here before it runs."""

    values: frozenset[str]
    """Names that may come back bound: those it binds, deletes, pulls or was sent."""
    deletes: frozenset[str]
    """Names that may come back deleted: those it deletes."""


def screen(
    values: Iterable[Returned], deleted: Iterable[str], expected: Expected | None
) -> tuple[list[Returned], list[str], dict[str, str]]:
    """Split what a runner returned into what may be applied and the refusals by name.

    ``expected`` None (a job pulled later, whose cell this notebook did not
    analyse) checks only that each name is plain.
    """
    refused: dict[str, str] = {}
    kept: list[Returned] = []
    for name, parts in values:
        reason = _refusal(name, expected.values if expected else None, "bind")
        if reason:
            refused[name] = reason
        else:
            kept.append((name, parts))
    gone: list[str] = []
    for name in deleted:
        reason = _refusal(name, expected.deletes if expected else None, "delete")
        if reason:
            refused[name] = reason
        else:
            gone.append(name)
    return kept, gone, refused


def _refusal(name: str, allowed: frozenset[str] | None, verb: str) -> str:
    if not plain_name(name):
        return (
            f"refused: the runner tried to {verb} a name that is not a plain identifier "
            "(a dunder, a keyword, empty or dotted); nothing was changed"
        )
    if allowed is not None and name not in allowed:
        return (
            f"refused: the runner tried to {verb} a name this cell does not "
            f"{'delete' if verb == 'delete' else 'bind, pull or send'}; nothing was changed"
        )
    return ""
