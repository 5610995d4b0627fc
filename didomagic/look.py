"""How didomagic's own displays look: state colours and symbols, numbers, static HTML.

Colours are JupyterLab's theme variables (with light-theme fallbacks), so
the progress row and the runner table read well in the light and the dark
theme. Numbers use tabular figures, so a growing count never shifts what
follows it. The static HTML forms are what a saved notebook shows after the
live widgets are gone (see :func:`didomagic.display.freeze`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

STATE_LOOK: dict[str, tuple[str, str]] = {
    "connecting": ("○", "var(--jp-ui-font-color2, #616161)"),
    "queued": ("◔", "var(--jp-warn-color1, #9a6700)"),
    "waiting": ("◔", "var(--jp-warn-color1, #9a6700)"),
    "installing": ("◌", "var(--jp-brand-color1, #1976d2)"),
    "running": ("●", "var(--jp-brand-color1, #1976d2)"),
    "sending": ("↑", "var(--jp-brand-color1, #1976d2)"),
    "receiving": ("↓", "var(--jp-brand-color1, #1976d2)"),
    "done": ("✔", "var(--jp-success-color1, #388e3c)"),
    "failed": ("✖", "var(--jp-error-color1, #d32f2f)"),
    "cancelled": ("■", "var(--jp-warn-color1, #f57c00)"),
}
"""Each state's symbol and colour: done, failed and cancelled differ in both."""

TABULAR = "tabular-nums"
"""The font variant of every number shown (fixed-width figures)."""

NOWRAP = "white-space:nowrap;font-variant-numeric:tabular-nums"


def state_look(state: str) -> tuple[str, str]:
    """The symbol and colour of a progress state."""
    return STATE_LOOK.get(state, ("●", "var(--jp-ui-font-color1, #212121)"))


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 01 min`` (an ETA)."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def progress_html(
    state: str, detail: str, runner: str, elapsed: str, moved: str, title: str = ""
) -> str:
    """The final progress row as static HTML (symbol, state, runner, elapsed, bytes)."""
    symbol, colour = state_look(state)
    label = state + (f" ({detail})" if detail else "")
    parts = [
        f'<span style="color:{colour};font-weight:bold">{symbol} {html.escape(label)}</span>',
        f"<b>{html.escape(runner or 'didomagic')}</b>",
        f'<span style="{NOWRAP}">{html.escape(elapsed)}</span>',
    ]
    if moved:
        parts.append(f'<span style="{NOWRAP}">{html.escape(moved)}</span>')
    return (
        f'<div class="didomagic-progress" title="{html.escape(title)}" '
        'style="display:flex;flex-wrap:wrap;gap:0.3em 1.2em;align-items:baseline;'
        'font-size:var(--jp-ui-font-size1,13px);color:var(--jp-ui-font-color1,inherit)">'
        + "".join(parts)
        + "</div>"
    )


def table_html(
    columns: Sequence[str], rows: Sequence[dict[str, str]], marks: Sequence[str], note: str = ""
) -> str:
    """A static table (cells never wrap; it scrolls sideways in a narrow notebook).

    ``marks[i]`` goes in the first column of row ``i`` (e.g. "default").
    """
    cell = "padding:0.15em 0.8em;text-align:left;white-space:nowrap;"
    head = "".join(f'<th style="{cell}">{html.escape(c)}</th>' for c in ("", *columns))
    body = "".join(
        "<tr>"
        + f'<td style="{cell}"><b>{html.escape(mark)}</b></td>'
        + "".join(
            f'<td style="{cell}font-variant-numeric:tabular-nums">{html.escape(r[c])}</td>'
            for c in columns
        )
        + "</tr>"
        for r, mark in zip(rows, marks, strict=True)
    )
    foot = f"<div><i>{html.escape(note)}</i></div>" if note else ""
    return (
        '<div class="didomagic-table" style="overflow-x:auto;max-width:100%">'
        f'<table style="border-collapse:collapse;font-size:var(--jp-ui-font-size1,13px)">'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{foot}</div>"
    )
