"""The ``%jobs`` listing: a plain-text table, and the same as a widget table in a notebook."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

import ipywidgets as w

COLUMNS = ("id", "name", "holder", "runner", "state", "submitted", "duration")

_STATE_COLOURS = {
    "done": "#1a7f37",
    "running": "#0969da",
    "queued": "#9a6700",
    "failed": "#cf222e",
    "cancelled": "#6e7781",
    "unreachable": "#cf222e",
}


def _duration(job: dict[str, Any]) -> str:
    started, finished = job.get("started_at"), job.get("finished_at")
    if not started:
        return "-"
    seconds = (finished or time.time()) - started
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def row(job: dict[str, Any]) -> dict[str, str]:
    """One job's cells as text, keyed by column name."""
    state = str(job.get("state", "?"))
    if job.get("reason"):
        state += f": {job['reason']}"
    submitted = job.get("submitted_at")
    return {
        "id": str(job.get("id", "-")),
        "name": str(job.get("name") or "-"),
        "holder": str(job.get("holder", "-")),
        "runner": str(job.get("runner") or "-"),
        "state": state,
        "submitted": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(submitted))
        if submitted
        else "-",
        "duration": _duration(job),
    }


def text_table(jobs: Sequence[dict[str, Any]]) -> str:
    """The listing as an aligned plain-text table."""
    if not jobs:
        return "No jobs. Submit one with %%remote --detach (at a runner or mediator in %runners)."
    rows = [row(j) for j in jobs]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in COLUMNS).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)


class JobTable(w.GridBox):  # type: ignore[misc]
    """The listing as a widget grid, state in colour; its plain-text form is the text table."""

    def __init__(self, jobs: Sequence[dict[str, Any]]) -> None:
        self.jobs = list(jobs)
        cells = [w.HTML(f"<b>{html.escape(c)}</b>") for c in COLUMNS]
        for job in self.jobs:
            r = row(job)
            for column in COLUMNS:
                text = html.escape(r[column])
                if column == "state":
                    colour = _STATE_COLOURS.get(str(job.get("state")), "inherit")
                    text = f'<span style="color:{colour}">●</span> {text}'
                cells.append(w.HTML(text))
        super().__init__(
            cells,
            layout=w.Layout(
                grid_template_columns=f"repeat({len(COLUMNS)}, auto)", grid_gap="0.2em 1em"
            ),
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is not None:
            bundle["text/plain"] = text_table(self.jobs)
        return bundle
