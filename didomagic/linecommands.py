"""The line form of ``%remote``: one dispatcher over named commands.

``%remote on|off`` (remote mode, registered by :mod:`didomagic.magics`) and
``%remote attach|detach|close`` (held sessions, :mod:`didomagic.reattach`)
register here with :func:`command`; ``%remote help`` (or a bare ``%remote``)
lists every one, in alphabetical order.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from IPython.core.error import UsageError


@dataclass(frozen=True)
class LineCall:
    """One ``%remote NAME ...`` line, as a command gets it."""

    words: list[str]
    """The words after the command's name (shell-style split)."""
    rest: str
    """The text after the command's name, unsplit (``%remote on`` parses it as options)."""
    magics: Any
    """The :class:`~didomagic.magics.RemoteMagics` instance: its shell, mode and parser."""


Command = Callable[[LineCall], Any]

COMMANDS: dict[str, tuple[str, Command]] = {}
"""The ``%remote`` line commands by name, each with its usage line."""

HEADER = "%%remote [options]      run this cell on a runner (%%remote? lists the options)"
FOOTER = (
    "%%local                 run this one cell here while %remote on is in force\n"
    "%runners sessions       the sessions this user holds: runner, age, last cell, state"
)


def command(name: str, usage: str) -> Callable[[Command], Command]:
    """Register ``%remote NAME ...``; ``usage`` is its line in ``%remote help``."""

    def register(function: Command) -> Command:
        COMMANDS[name] = (usage, function)
        return function

    return register


def usage() -> str:
    """The text ``%remote help`` prints: the cell magic and every line command."""
    return "\n".join([HEADER, *(COMMANDS[name][0] for name in sorted(COMMANDS)), FOOTER])


def dispatch(line: str, magics: Any) -> Any:
    """Run one ``%remote`` line: ``on [options]``, ``off``, ``attach ID``, ``help``, ..."""
    name, _, rest = line.strip().partition(" ")
    if name in ("", "help", "-h", "--help"):
        print(usage())
        return None
    entry = COMMANDS.get(name)
    if entry is None:
        raise UsageError(f"%remote: unknown command {line.strip()!r}.\n{usage()}")
    try:
        words = shlex.split(rest)
    except ValueError as exc:
        raise UsageError(f"%remote {name}: {exc}\n{usage()}") from None
    return entry[1](LineCall(words, rest, magics))
