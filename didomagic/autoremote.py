"""``%remote on``: every following code cell runs remotely until ``%remote off``.

As ipyparallel's ``%autopx`` does, the mode is an IPython input transformer:
while it is on, each cell gets a ``%%remote OPTIONS`` line put above it
before IPython looks at it, so the cell takes exactly the path of a cell
written with the magic (progress row, errors, values). A cell that already
starts with ``%%remote`` keeps its own options, given after the mode's so
that they win; a cell starting with ``%%local`` runs in the notebook; a cell
made only of the line magics that control didomagic (``%remote off``,
``%runners``, ``%jobs``, ``%config``, extension loading) stays local. An
error in a cell leaves the mode on.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CONTROL_MAGICS = frozenset(
    {"remote", "runners", "jobs", "config", "load_ext", "unload_ext", "reload_ext"}
)
"""Line magics that stay local while the mode is on: they control didomagic itself."""

_LINE_MAGIC = re.compile(r"^\s*%(?!%)(\w+)")


class RemoteMode:
    """The notebook-wide remote mode of one IPython shell."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.options: str | None = None
        """The ``%%remote`` options of the mode while it is on; ``None`` when off."""
        self._suspended = 0

    @property
    def on(self) -> bool:
        """True while cells run remotely by default."""
        return self.options is not None

    def start(self, options: str) -> None:
        """Turn the mode on with these ``%%remote`` options (already validated)."""
        if self.options is None:
            self.shell.input_transformers_cleanup.append(self.transform)
        self.options = options.strip()

    def stop(self) -> None:
        """Turn the mode off."""
        if self.options is not None:
            self.shell.input_transformers_cleanup.remove(self.transform)
        self.options = None

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Transform nothing meanwhile (the magic analysing a cell's own source)."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def transform(self, lines: list[str]) -> list[str]:
        """IPython's cleanup transformer: put the mode's ``%%remote`` line above a cell."""
        if self.options is None or self._suspended:
            return lines
        code = [line for line in lines if line.strip()]
        if not code:
            return lines
        first = code[0].lstrip()
        if first.startswith("%%local"):
            index = lines.index(code[0])
            return lines[:index] + lines[index + 1 :]
        if first.startswith("%%remote"):
            index = lines.index(code[0])
            own = first[len("%%remote") :].strip()
            return [
                *lines[:index],
                f"%%remote {self.options} {own}".rstrip() + "\n",
                *lines[index + 1 :],
            ]
        if all(_controls(line) for line in code):
            return lines
        return [f"%%remote {self.options}".rstrip() + "\n", *lines]


def _controls(line: str) -> bool:
    match = _LINE_MAGIC.match(line)
    return match is not None and match.group(1) in CONTROL_MAGICS


def run_here(shell: Any, cell: str) -> Any:
    """Run ``cell`` in the notebook's namespace; return its last expression's value."""
    tree = ast.parse(shell.transform_cell(cell))
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not cell.rstrip().endswith(";"):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, "<%%local>", "exec"), shell.user_ns)
    if last is not None:
        return eval(compile(last, "<%%local>", "eval"), shell.user_ns)
    return None
