"""What a failed cell's error is called, even when the kernel's reply does not say.

ipykernel names the error of a cell from the exception its code raised. An
exception raised while *displaying* the cell's value (a ``_repr_html_`` that
raises) is shown by IPython's formatter and fails the cell, yet leaves no
exception behind: the reply then says ``NoneType: None``. The error the kernel
published on iopub, or failing that the last line of its traceback, names it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LAST_LINE = re.compile(r"^([A-Za-z_][\w.]*): ?(.*)$", re.DOTALL)


def _named(ename: Any) -> bool:
    return isinstance(ename, str) and ename not in ("", "NoneType")


def _from_traceback(traceback: Sequence[str]) -> tuple[str, str] | None:
    """``(type, message)`` from the last line of a formatted traceback, if it names one."""
    for entry in reversed(traceback):
        lines = _ANSI.sub("", str(entry)).strip().splitlines()
        if not lines:
            continue
        match = _LAST_LINE.match(lines[-1].strip())
        return (match.group(1), match.group(2)) if match else None
    return None


def cell_error(reply: Mapping[str, Any], published: Mapping[str, Any] | None) -> dict[str, Any]:
    """``ename``, ``evalue`` and ``traceback`` of a failed cell, always naming a real error.

    ``reply`` is the ``execute_reply`` content; ``published`` the last ``error``
    message the kernel sent on iopub for the cell (None if it sent none).
    """
    ename, evalue = reply.get("ename"), reply.get("evalue")
    traceback = list(reply.get("traceback") or [])
    if published is not None and not traceback:
        traceback = list(published.get("traceback") or [])
    if not _named(ename):
        if published is not None and _named(published.get("ename")):
            ename, evalue = published["ename"], published.get("evalue", "")
        else:
            found = _from_traceback(traceback)
            ename, evalue = found or (
                "CellFailed",
                "the kernel reported a failure without naming an exception",
            )
    return {"ename": str(ename), "evalue": str(evalue or ""), "traceback": traceback}
