"""Progress: widget state transitions on the widget objects, the text fallback, Cancel."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from IPython.utils.capture import capture_output

import didomagic.progress as progress_module
from didomagic.api import RemoteSession
from didomagic.progress import TextProgress, WidgetProgress, make_progress
from didomagic.protocol import Execute, Status
from didomagic.serialize import pack_names
from didomagic.urls import ConnectionURL

MB100 = 100_000_000


def test_widget_follows_every_state():
    p = WidgetProgress()
    assert p.state_label.value == "connecting" and p.bar.layout.display == "none"
    p.connecting("127.0.0.1:1")
    p.queued(2)
    assert p.state_label.value == "queued (position 2)"
    p.chose({"name": "big", "tags": ["gpu", "a100"]})
    assert "big [gpu,a100]" in p.runner_label.value and p.state_label.value == "running"
    p.transfer("sending", MB100 // 2, MB100)
    assert p.state_label.value == "sending" and p.bar.layout.display == ""
    assert p.bar.value == pytest.approx(0.5) and "50.0 MB" in p.bytes_label.value
    p.transfer("sending", MB100, MB100)
    p.running()
    assert p.state_label.value == "running" and p.bar.layout.display == "none"
    p.transfer("receiving", 1000, 1000)  # small: no bar
    assert p.state_label.value == "receiving" and p.bar.layout.display == "none"
    p.finish(True)
    assert p.state_label.value == "done" and p.cancel_button.layout.display == "none"
    assert p.summary().startswith("didomagic: done on big [gpu,a100], ")
    assert "sent 100.0 MB, received 1.0 kB" in p.summary()
    bundle = p.box._repr_mimebundle_()
    assert bundle["text/plain"] == p.summary()
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_widget_failure_and_item_counts():
    p = WidgetProgress()
    p.counted(3, 12, 1)
    assert p.bar.layout.display == "" and p.bar.value == pytest.approx(0.25)
    assert p.state_label.value == "running (3/12 done, 1 failed)"
    p.finish(False, "item 4 failed")
    assert p.state_label.value == "failed (item 4 failed)" and p.bar.bar_style == "danger"


def test_the_cancel_button_calls_back_once():
    p = WidgetProgress()
    calls = []
    p.on_cancel = lambda: calls.append(1)
    p.cancel_button.click()
    assert calls == [1] and p.cancel_button.disabled


def test_text_fallback_is_quiet_for_quick_cells_and_brief_for_slow_ones():
    quick = TextProgress(io.StringIO())
    quick.connecting("h:1")
    quick.chose({"name": "r"})
    quick.transfer("sending", 100, 100)
    quick.running()
    quick.tick()
    quick.finish(True)
    assert quick.stream.getvalue() == ""

    slow = TextProgress(io.StringIO())
    slow.connecting("h:1")
    slow.queued(1)
    slow.chose({"name": "r", "tags": ["gpu"]})
    slow.transfer("sending", 0, MB100)
    for done in range(0, MB100 + 1, MB100 // 100):  # a hundred frame updates ...
        slow.transfer("sending", done, MB100)
    slow.running()
    slow.started -= progress_module.SLOW_CELL + 1
    for _ in range(50):  # ... and many ticks print only a handful of lines
        slow.tick()
    slow.finish(False, "ValueError raised")
    lines = slow.stream.getvalue().splitlines()
    assert lines[0] == "didomagic: queued (position 1) at h:1"
    assert lines[1] == "didomagic: sending 100.0 MB (r [gpu])"
    assert lines[2].startswith("didomagic: sent 100.0 MB in ")
    assert lines[3] == "didomagic: running on r [gpu] ..."
    assert lines[4].startswith("didomagic: failed on r [gpu] in ") and "ValueError" in lines[4]
    assert len(lines) == 5


def test_make_progress_honours_the_environment(monkeypatch):
    monkeypatch.setenv("DIDOMAGIC_PROGRESS", "text")
    assert isinstance(make_progress(), TextProgress)
    monkeypatch.setenv("DIDOMAGIC_PROGRESS", "sparkles")
    with pytest.raises(ValueError, match="widget, text, none or auto"):
        make_progress()
    monkeypatch.delenv("DIDOMAGIC_PROGRESS")
    assert isinstance(make_progress(), TextProgress)  # no kernel here: no widget frontend


def test_cancel_interrupts_a_real_remote_cell(module_runner):
    session = RemoteSession(ConnectionURL.parse(module_runner.url))
    p = WidgetProgress()
    seen = []

    def on_output(output):
        seen.append(output.content.get("text", ""))
        if "started" in seen[-1]:
            p.cancel_button.click()  # what a click in the notebook does

    code = "import time\nprint('started', flush=True)\ntime.sleep(60)"
    result, _ = session.execute(Execute("c", code), [], on_output, p)
    assert result.status is Status.INTERRUPTED and p.state == "failed"
    result, _ = session.execute(Execute("d", "x = 1"), [], lambda o: None, p)
    assert result.status is Status.OK  # the session goes on
    session.close()


def test_a_large_transfer_reports_bytes_live(module_runner):
    session = RemoteSession(ConnectionURL.parse(module_runner.url))
    p = TextProgress(io.StringIO())
    packed, _ = pack_names({"a": np.ones(20_000_000 // 8)}, ["a"])
    request = Execute("t", "b = a * 2", tuple(x.header for x in packed), fetch=("b",))
    started = time.monotonic()
    result, _ = session.execute(request, [x.parts for x in packed], lambda o: None, p)
    assert result.status is Status.OK and time.monotonic() - started < 60
    text = p.stream.getvalue()
    assert "sending 20.0 MB" in text and "sent 20.0 MB in" in text
    assert "receiving 20.0 MB" in text and "received 20.0 MB in" in text
    assert p.sent >= 20_000_000 and p.received >= 20_000_000  # the array and its pickle
    session.close()


def test_the_magic_prints_the_text_fallback_for_a_slow_cell(shell, ns, module_runner, monkeypatch):
    monkeypatch.setattr(progress_module, "SLOW_CELL", 0.2)
    with capture_output() as cap:
        result = shell.run_cell(
            f"%%remote --runner {module_runner.url}\nimport time\ntime.sleep(1)"
        )
    assert result.success
    assert "didomagic: running on shared ..." in cap.stderr
    assert "didomagic: done on shared in " in cap.stderr


def test_a_mediators_launch_note_shows_in_the_row_and_the_text():
    note = "launching a runner: Slurm job 12, pending (Resources)"
    row = WidgetProgress()
    row.queued(0, note)
    assert row.state_label.value == f"waiting ({note})"
    text = TextProgress(io.StringIO())
    text.connecting("127.0.0.1:4941")
    text.queued(0, note)
    assert text.stream.getvalue() == f"didomagic: {note} (at 127.0.0.1:4941)\n"
