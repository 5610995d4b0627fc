"""The ``%runners`` listing: a plain-text table, and a widget table with the runner choice.

Both show, for each runner: name, address, the identity that was verified
(the credential its mediator checked, or the certificate this notebook
pinned), tags, status (with the reason when it is not up), latency, OS and
architecture, Python, CPUs, memory free/total, GPUs, sessions active/max,
queue length, the limits each session runs under, and whether it installs
packages (with how many cached environments). The widget adds a "Use" button
per runner that makes it the notebook's default.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as w

from didomagic.discovery import RunnerView
from didomagic.progress import format_bytes

COLUMNS = (
    "name",
    "address",
    "identity",
    "tags",
    "status",
    "latency",
    "os",
    "python",
    "cpus",
    "memory free/total",
    "gpus",
    "sessions",
    "queue",
    "limits",
    "packages",
)


def _gpus(description: dict[str, Any]) -> str:
    gpus = description.get("gpus") or []
    if not gpus:
        return "none" if description.get("status", "up") == "up" else "-"
    parts = []
    for gpu in gpus:
        memory = gpu.get("memory_total")
        parts.append(f"{gpu.get('name', 'GPU')} ({format_bytes(memory)})" if memory else "GPU")
    return "; ".join(parts)


def _packages(description: dict[str, Any], up: bool) -> str:
    """``installs (uv 0.13.9), 2 envs``, ``no installs``, or ``-`` when unknown."""
    packages = description.get("packages")
    if not up or not isinstance(packages, dict):
        return "-"
    if not packages.get("install"):
        return "no installs"
    installer = f" ({packages['installer']})" if packages.get("installer") else ""
    return f"installs{installer}, {packages.get('environments', 0)} envs"


def row(view: RunnerView) -> dict[str, str]:
    """One runner's cells, as text, keyed by column name."""
    d = view.description
    up = view.status == "up"

    def known(key: str) -> bool:
        return d.get(key) is not None

    status = view.status + (f": {d['reason']}" if d.get("reason") else "")
    memory = "-"
    if known("memory_total"):
        free = format_bytes(d["memory_free"]) if known("memory_free") else "?"
        memory = f"{free} / {format_bytes(d['memory_total'])}"
    latency = f"{d['latency'] * 1000:.1f} ms" if known("latency") and up else "-"
    return {
        "name": view.name,
        "address": view.address,
        "identity": str(d.get("identity") or "-"),
        "tags": ",".join(d.get("tags") or ()) or "-",
        "status": status,
        "latency": latency,
        "os": f"{d['os']}/{d.get('arch', '?')}" if known("os") else "-",
        "python": str(d.get("python") or "-"),
        "cpus": str(d.get("cpus") or "-"),
        "memory free/total": memory,
        "gpus": _gpus(d),
        "sessions": f"{d.get('sessions', 0)}/{d.get('max_sessions', '?')}" if up else "-",
        "queue": f"{d.get('queue', 0)}/{d.get('max_queue', 0)}" if up else "-",
        "limits": ", ".join(d.get("limits") or ()) or ("none" if up else "-"),
        "packages": _packages(d, up),
    }


def text_table(views: Sequence[RunnerView], default: str | None = None) -> str:
    """The listing as an aligned plain-text table (``*`` marks the notebook's default)."""
    if not views:
        return (
            "No runners configured. Add one with: %runners add URL [--name NAME]\n"
            "(a runner's or a mediator's connection URL). Without one, %%remote uses an "
            "embedded runner on this machine."
        )
    rows = [row(v) for v in views]
    for r, v in zip(rows, views, strict=True):
        r["name"] = ("* " if default in (v.name, v.entry) else "  ") + r["name"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    header = "  " + "  ".join(c.upper().ljust(widths[c]) for c in COLUMNS)
    lines = [header.rstrip()]
    for r in rows:
        lines.append("  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip())
    if default:
        lines.append(f"* the notebook's default runner ({default})")
    return "\n".join(lines)


_STATUS_COLOURS = {"up": "#1a7f37", "down": "#9a6700", "unreachable": "#cf222e"}


class RunnerTable(w.VBox):  # type: ignore[misc]
    """The listing as a widget: a grid of runners with a "Use" button on each row.

    ``on_use(name)`` is called when a button is clicked; the row then shows it
    as the default. The plain-text form (saved notebooks, terminals) is the
    text table.
    """

    def __init__(
        self,
        views: Sequence[RunnerView],
        default: str | None,
        on_use: Callable[[str], None],
    ) -> None:
        self.views = list(views)
        self.default = default
        self._on_use = on_use
        self.buttons: dict[str, w.Button] = {}
        header = [w.HTML(f"<b>{html.escape(c)}</b>") for c in ("", *COLUMNS)]
        cells: list[w.Widget] = list(header)
        for view in self.views:
            r = row(view)
            button = w.Button(
                description="Use",
                tooltip=f"Run %%remote cells on {view.name} by default in this notebook",
                layout=w.Layout(width="auto"),
                disabled=view.status != "up",
            )
            button.on_click(lambda _, name=view.name: self.use(name))
            self.buttons[view.name] = button
            cells.append(button)
            for column in COLUMNS:
                text = html.escape(r[column])
                if column == "status":
                    colour = _STATUS_COLOURS.get(view.status, "inherit")
                    text = f'<span style="color:{colour}">●</span> {text}'
                cells.append(w.HTML(text))
        grid = w.GridBox(
            cells,
            layout=w.Layout(
                grid_template_columns=f"repeat({len(COLUMNS) + 1}, auto)",
                grid_gap="0.2em 1em",
            ),
        )
        self.note = w.HTML()
        super().__init__([grid, self.note])
        self._mark_default()

    def use(self, name: str) -> None:
        """Make ``name`` the notebook's default (what the "Use" button does)."""
        self._on_use(name)
        self.default = name
        self._mark_default()

    def _mark_default(self) -> None:
        for name, button in self.buttons.items():
            chosen = name == self.default
            button.description = "Default" if chosen else "Use"
            button.button_style = "success" if chosen else ""
        self.note.value = (
            f"<i>%%remote cells without --runner or --tags run on "
            f"<b>{html.escape(self.default)}</b>.</i>"
            if self.default
            else ""
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is not None:
            bundle["text/plain"] = text_table(self.views, self.default)
        return bundle
