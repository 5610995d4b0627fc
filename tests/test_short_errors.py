"""What a failed cell shows: one line for an interrupt, never didomagic's own frames."""

from __future__ import annotations

import os
import traceback

from IPython.utils.capture import capture_output

import didomagic
from didomagic.errors import CellInterrupted, without_our_frames

PACKAGE = os.path.dirname(os.path.abspath(didomagic.__file__))


def _frames(exc: BaseException) -> list[str]:
    return [frame.filename for frame in traceback.extract_tb(exc.__traceback__)]


def test_a_local_cell_error_shows_the_cells_frames_only(shell, ns):
    with capture_output() as shown:
        result = shell.run_cell("%%remote --local\ndef risky(x):\n    return 1 / x\nrisky(0)")
    error = result.error_in_exec
    assert isinstance(error, ZeroDivisionError)
    frames = _frames(error)  # the magic's own frame stays, hidden (__tracebackhide__) ...
    assert [f for f in frames if f.startswith(PACKAGE)] == [os.path.join(PACKAGE, "magics.py")]
    assert any("<remote --local>" in f for f in frames)
    text = shown.stdout + shown.stderr  # ... so the traceback a user sees has none
    assert "ZeroDivisionError" in text and "didomagic" not in text, text


def test_an_interrupt_is_one_line():
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as exc:
        short = without_our_frames(exc)
    assert isinstance(short, CellInterrupted) and isinstance(short, KeyboardInterrupt)
    assert short._render_traceback_() == ["CellInterrupted: Interrupted."]


def test_a_remote_interrupt_is_one_line(shell, ns, module_runner):
    from didomagic.api import raise_for_status
    from didomagic.protocol import Result, Status

    try:
        raise_for_status(Result("c", Status.INTERRUPTED), "gpu-1")
    except CellInterrupted as exc:
        lines = exc._render_traceback_()
    assert lines == ["CellInterrupted: Interrupted on runner gpu-1; the remote session is kept."]
