"""Progress of a remote cell: a compact widget in a notebook, a few plain lines elsewhere.

A :class:`Progress` is driven from the notebook's main thread with the cell's
events: ``connecting``, ``queued`` (position k, or a mediator's note on a
runner it launches), the ``runner`` chosen, ``sending`` / ``receiving``
bytes, ``running`` (``reconnecting`` attempt k when the connection dropped),
and finally ``done`` or ``failed``. :class:`WidgetProgress` shows them as one
ipywidgets row with a Cancel button; :class:`TextProgress` prints a line only
for what is worth a line (a queue position or launch note, a large transfer, a
cell still running after a few seconds and then its end), so quick cells print
nothing. :func:`make_progress`
picks one (``DIDOMAGIC_PROGRESS=widget|text|none`` overrides the choice).
"""

from __future__ import annotations

import html
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import ipywidgets as w

from didomagic import look

PROGRESS_ENV = "DIDOMAGIC_PROGRESS"
"""``widget``, ``text``, ``none`` or ``auto`` (the default)."""

LARGE_TRANSFER = 16 << 20
"""Transfers at least this big get a progress bar (widget) or lines (text)."""

SLOW_CELL = 3.0
"""Seconds after which the text fallback says where a still-running cell runs."""

REFRESH = 0.1
"""Least seconds between two redraws of the widget for byte counts and elapsed time."""


def format_bytes(n: float) -> str:
    """``1.5 MB``-style size (decimal units, like the transfer rates)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def packages_text(count: int) -> str:
    """``1 package``, ``3 packages``."""
    return f"{count} package" + ("" if count == 1 else "s")


def runner_label(description: dict[str, Any]) -> str:
    """``name [tag,tag]`` for a runner description."""
    tags = ",".join(description.get("tags") or ())
    return f"{description.get('name', '?')}" + (f" [{tags}]" if tags else "")


class Progress:
    """The state of one remote cell, as events arrive; subclasses show it.

    ``on_cancel`` is called (from any thread) when the user asks to cancel.
    """

    def __init__(self) -> None:
        self.state = "connecting"
        self.detail = ""
        self.runner = ""
        self.started = time.monotonic()
        self.sent = 0
        self.received = 0
        self.transfer_total = 0
        self.items: tuple[int, int, int] | None = None
        self.install_count = 0
        self.install_line = ""
        self.install_started = 0.0
        self.install_seconds = 0.0
        self.on_cancel: Callable[[], None] = lambda: None

    @property
    def elapsed(self) -> float:
        """Seconds since the cell started."""
        return time.monotonic() - self.started

    def connecting(self, target: str) -> None:
        """Opening a session with ``target``."""
        self._set("connecting", target)

    def queued(self, position: int, note: str = "") -> None:
        """Waiting in the runner's queue at ``position`` (1 is next), or as ``note`` says.

        A mediator launching a runner for the session sends a note instead of a
        position ("launching a runner: Slurm job 12, pending (Resources)").
        """
        if note:
            self._set("waiting", note)
        else:
            self._set("queued", f"position {position}")

    def chose(self, description: dict[str, Any]) -> None:
        """The session is open on this runner."""
        self.runner = runner_label(description)
        self._set("running", "")

    def transfer(self, direction: str, done: int, total: int) -> None:
        """``done`` of ``total`` bytes moved; ``direction`` is "sending" or "receiving"."""
        if direction == "sending":
            self.sent = done
        else:
            self.received = done
        self.transfer_total = total
        if self.state != direction:
            self._set(direction, "")
        elif done >= total:
            self._refresh(force=True)
        else:
            self._refresh()

    def installing(self, count: int, line: str, done: bool = False) -> None:
        """The runner installs ``count`` packages for the cell (0: still resolving).

        ``line`` is the installer's latest output line; ``done``: they are in
        place and the cell runs now.
        """
        if self.state != "installing" and not done:
            self.install_started = time.monotonic()
        self.install_count = max(self.install_count, count)
        if done:
            self.install_seconds = time.monotonic() - self.install_started
            self._installed()
            self._set("running", "")
            return
        listed = line.startswith(("+ ", "- "))  # one distribution of the installer's list
        if line and not (listed and self.install_line):
            self.install_line = line
        self._set("installing", "")

    def install_text(self) -> str:
        """``installing 3 packages, 1.2 s: <the installer's last line>``."""
        what = (
            f"installing {packages_text(self.install_count)}"
            if self.install_count
            else "resolving packages"
        )
        seconds = time.monotonic() - self.install_started
        return f"{what}, {seconds:.1f} s" + (f": {self.install_line}" if self.install_line else "")

    def _installed(self) -> None:
        """The packages are in place (see :attr:`install_seconds`)."""

    def counted(self, done: int, total: int, failed: int = 0) -> None:
        """``done`` of ``total`` items finished, ``failed`` of them failed (for map)."""
        first = self.items is None
        self.items = (done, total, failed)
        if first:
            self._set("running", "")
        self.detail = f"{done}/{total} done" + (f", {failed} failed" if failed else "")
        self._counted()

    def _counted(self) -> None:
        """Show a new item count."""

    def reconnecting(self, attempt: int) -> None:
        """The connection dropped; attempt ``attempt`` to take the session back."""
        from didomagic.reconnect import reconnect_text

        self._set("reconnecting", reconnect_text(attempt))

    def reattached(self) -> None:
        """The session is back; missed outputs follow and the cell goes on."""
        self._set("running", "reconnected")

    def running(self) -> None:
        """Every input byte is on the runner; the cell runs."""
        if self.state != "running":
            self._set("running", "")

    def finish(self, ok: bool, message: str = "") -> None:
        """The cell ended (``ok``) or failed with ``message``."""
        self._set("done" if ok else "failed", message)

    def cancelled(self, message: str = "") -> None:
        """The cell was interrupted (Cancel, the stop button) or abandoned."""
        self._set("cancelled", message)

    def tick(self) -> None:
        """Time passed with no event (updates elapsed time)."""
        self._refresh()

    def _set(self, state: str, detail: str) -> None:
        self.state, self.detail = state, detail
        self._changed()

    def _changed(self) -> None:
        """Show the new state."""

    def _refresh(self, force: bool = False) -> None:
        """Show new byte counts or elapsed time (may be throttled)."""

    def summary(self) -> str:
        """One line: runner, state, elapsed, bytes."""
        where = f" on {self.runner}" if self.runner else ""
        detail = f" ({self.detail})" if self.detail else ""
        if self.state == "installing":
            detail = f" ({self.install_text()})"
        moved = ""
        if self.sent or self.received:
            moved = f", sent {format_bytes(self.sent)}, received {format_bytes(self.received)}"
        return f"didomagic: {self.state}{detail}{where}, {self.elapsed:.1f} s{moved}"


class NoProgress(Progress):
    """Shows nothing (``DIDOMAGIC_PROGRESS=none``)."""


class TextProgress(Progress):
    """A few plain lines on standard error, only for what takes time."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream
        self.printed = 0
        self._transfer_started = 0.0
        self._announced_running = False

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stderr
        print(f"didomagic: {text}", file=stream, flush=True)
        self.printed += 1

    def _changed(self) -> None:
        if self.state == "installing":
            if self.install_count and not self._announced_install:
                self._announced_install = True
                what = packages_text(self.install_count)
                self._print(f"installing {what} on {self.runner} ...")
            return
        if self.state == "queued":
            self._print(f"queued ({self.detail}) at {self.detail_target()}")
        elif self.state == "reconnecting":
            self._print(f"{self.detail} ({self.detail_target()})")
        elif self.detail == "reconnected":
            self._print(f"reconnected to {self.detail_target()}; the cell goes on")
        elif self.state == "waiting":
            self._print(f"{self.detail} (at {self.detail_target()})")
        elif self.state in ("sending", "receiving"):
            self._transfer_started = time.monotonic()
            if self.transfer_total >= LARGE_TRANSFER:
                verb = "sending" if self.state == "sending" else "receiving"
                self._print(f"{verb} {format_bytes(self.transfer_total)} ({self.runner})")
        elif self.state in ("done", "failed", "cancelled") and self.printed:
            detail = f": {self.detail}" if self.detail else ""
            self._print(f"{self.state} on {self.runner} in {self.elapsed:.1f} s{detail}")

    def _counted(self) -> None:
        assert self.items is not None
        done, total, _ = self.items
        quarter = 4 * done // max(total, 1)
        if done and quarter != self._quarter:
            self._quarter = quarter
            self._print(f"{self.detail} ({self.elapsed:.1f} s)")

    _quarter = 0
    _announced_install = False

    def _installed(self) -> None:
        if self._announced_install:
            what = packages_text(self.install_count)
            said = f": {self.install_line}" if self.install_line else ""
            self._print(f"installed {what} in {self.install_seconds:.1f} s{said}")

    def detail_target(self) -> str:
        """Where the session is queued (the runner once known, else the address)."""
        return self.runner or self._target

    _target = "the runner"

    def connecting(self, target: str) -> None:
        """Remember the address for the queue line; print nothing."""
        self._target = target
        super().connecting(target)

    def _refresh(self, force: bool = False) -> None:
        if (
            force
            and self.state in ("sending", "receiving")
            and self.transfer_total >= LARGE_TRANSFER
        ):
            seconds = max(time.monotonic() - self._transfer_started, 1e-9)
            rate = self.transfer_total / seconds
            verb = "sent" if self.state == "sending" else "received"
            self._print(
                f"{verb} {format_bytes(self.transfer_total)} in {seconds:.1f} s "
                f"({format_bytes(rate)}/s)"
            )
        if self.state == "running" and not self._announced_running and self.elapsed > SLOW_CELL:
            self._announced_running = True
            self._print(f"running on {self.runner} ...")


class WidgetProgress(Progress):
    """One compact ipywidgets row: state symbol and text, runner, elapsed, Cancel, bar, bytes.

    Fixed parts (symbol, runner, elapsed, the Cancel button) never shrink; a
    long state text (a failure's reason) is cut with an ellipsis, its full
    text in the tooltip; in a narrow notebook the row wraps between parts, so
    nothing is cut or pushed off it. Numbers use tabular figures. When the
    cell ends, the row is replaced by a static copy of its final state, so a
    saved notebook shows text instead of a widget that no longer exists.
    """

    def __init__(self) -> None:
        super().__init__()
        fixed = w.Layout(flex="0 0 auto")
        numbers = {"font_variant": look.TABULAR}
        self.state_icon = w.Label("○", layout=w.Layout(flex="0 0 auto", width="1.2em"))
        self.runner_label = w.HTML("<b>didomagic</b>", layout=fixed)
        self.elapsed_label = w.Label(
            "0.0 s", style=numbers, layout=w.Layout(flex="0 0 auto", min_width="4.5em")
        )
        self.state_label = w.Label(
            "connecting", layout=w.Layout(flex="0 1 auto", min_width="6.5em", overflow="hidden")
        )
        self.bar = w.FloatProgress(
            value=0.0,
            min=0.0,
            max=1.0,
            layout=w.Layout(width="160px", flex="0 0 auto", display="none"),
        )
        self.bytes_label = w.Label("", style=numbers, layout=fixed)
        self.cancel_button = w.Button(
            description="Cancel",
            icon="stop",
            tooltip="Interrupt the remote cell (like the stop button)",
            layout=w.Layout(width="auto", min_width="max-content", flex="0 0 auto"),
        )
        self.cancel_button.on_click(lambda _: self._cancel())
        self.box = _SummaryBox(
            self,
            [
                self.state_icon,
                self.state_label,
                self.runner_label,
                self.elapsed_label,
                self.cancel_button,  # before the byte counts: it never moves as they grow
                self.bar,
                self.bytes_label,
            ],
            layout=w.Layout(
                align_items="center", grid_gap="0.2em 0.7em", flex_flow="row wrap", width="100%"
            ),
        )
        self._handle: Any = None
        self._drawn = 0.0
        self._moving_since = 0.0
        self._look()

    def show(self) -> WidgetProgress:
        """Display the row in the current cell's output."""
        from IPython.display import display

        self._handle = display(self.box, display_id=True)
        return self

    def _cancel(self) -> None:
        self.cancel_button.disabled = True
        self.cancel_button.description = "Cancelling"
        self.on_cancel()

    def _look(self) -> None:
        symbol, colour = look.state_look(self.state)
        self.state_icon.value = symbol
        self.state_icon.style.text_color = colour
        self.state_label.style.text_color = colour
        self.state_label.style.font_weight = "bold" if self.state in FINAL else ""

    def _changed(self) -> None:
        state = self.state + (f" ({self.detail})" if self.detail else "")
        if self.state == "reconnecting":
            state = self.detail  # "connection lost; reconnecting (3)…"
        self.state_label.value = self.install_text() if self.state == "installing" else state
        self.state_label.tooltip = state
        self._look()
        if self.runner:
            self.runner_label.value = f"<b>{html.escape(self.runner)}</b>"
        if self.state in ("sending", "receiving"):
            self._moving_since = time.monotonic()
        large = self.transfer_total >= LARGE_TRANSFER and self.state in ("sending", "receiving")
        large = large or (self.items is not None and self.state == "running")
        self.bar.layout.display = "" if large else "none"
        if self.state in FINAL:
            self.cancel_button.layout.display = "none"
            self.bar.layout.display = "none"
            self.bar.bar_style = "success" if self.state == "done" else "danger"
        self._refresh(force=True)
        if self.state in FINAL and self._handle is not None:
            self._freeze()

    def _freeze(self) -> None:
        """Replace the live row by its static final state (what a saved notebook keeps)."""
        moved = ""
        if self.sent or self.received:
            moved = f"↑ {format_bytes(self.sent)}  ↓ {format_bytes(self.received)}"
        static = look.progress_html(
            self.state,
            self.detail,
            self.runner,
            self.elapsed_label.value,
            moved,
            title=self.summary(),
        )
        self._handle.update({"text/plain": self.summary(), "text/html": static}, raw=True)
        self._handle = None
        self.box.close()

    def _counted(self) -> None:
        assert self.items is not None
        self.runner_label.value = f"<b>didomagic map of {self.items[1]}</b>"
        self._changed()

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < REFRESH:
            return
        self._drawn = now
        self.elapsed_label.value = f"{self.elapsed:.1f} s"
        if self.state == "installing":
            self.state_label.value = self.install_text()
        if self.state in ("sending", "receiving") and self.transfer_total:
            done = self.sent if self.state == "sending" else self.received
            self.bar.value = min(1.0, done / self.transfer_total)
            self.bytes_label.value = transfer_text(
                self.state, done, self.transfer_total, now - self._moving_since
            )
        elif self.sent or self.received:
            self.bytes_label.value = f"↑ {format_bytes(self.sent)}  ↓ {format_bytes(self.received)}"
        if self.items is not None:
            done, total, _ = self.items
            self.bar.value = done / max(total, 1)


FINAL = ("done", "failed", "cancelled")
"""The states a cell ends in."""


def transfer_text(direction: str, done: int, total: int, seconds: float) -> str:
    """``↑ 50.0 MB of 100.0 MB · 50% · 25.0 MB/s · 2 s left`` for a transfer under way."""
    arrow = "↑" if direction == "sending" else "↓"
    percent = 100 * done / total if total else 100.0
    text = f"{arrow} {format_bytes(done)} of {format_bytes(total)} · {percent:3.0f}%"
    if seconds > 0.2 and done:
        rate = done / seconds
        text += f" · {format_bytes(rate)}/s"
        if done < total:
            text += f" · {look.format_duration((total - done) / rate)} left"
    return text


class _SummaryBox(w.HBox):  # type: ignore[misc]
    """An HBox whose plain-text form is the progress summary (what a saved notebook shows)."""

    def __init__(self, progress: Progress, children: list[Any], **kw: Any) -> None:
        super().__init__(children, **kw)
        self._progress = progress

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is not None:
            bundle["text/plain"] = self._progress.summary()
        return bundle


def widgets_available() -> bool:
    """True inside a Jupyter kernel with ipywidgets installed (a frontend may show widgets)."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        if shell is None or not getattr(shell, "kernel", None):
            return False
    except ImportError:
        return False
    return True


def make_progress(kind: str | None = None) -> Progress:
    """The progress display for this environment, or the one ``kind`` names."""
    kind = (kind or os.environ.get(PROGRESS_ENV) or "auto").lower()
    if kind == "auto":
        kind = "widget" if widgets_available() else "text"
    if kind == "widget":
        return WidgetProgress().show()
    if kind == "text":
        return TextProgress()
    if kind == "none":
        return NoProgress()
    raise ValueError(f"{PROGRESS_ENV} must be widget, text, none or auto, got {kind!r}")
