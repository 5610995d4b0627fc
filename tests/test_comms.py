"""Remote widgets through a real notebook kernel: this test plays the JupyterLab frontend.

A real ipykernel (the notebook's) runs ``%%remote`` cells on a real runner;
the test reads the notebook kernel's iopub as a frontend would and sends comm
messages on its shell channel, as a slider moved or a button clicked does.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from jupyter_client.manager import KernelManager

from .conftest import TIMEOUT, RunnerProcess

VIEW = "application/vnd.jupyter.widget-view+json"


class Frontend:
    """A notebook kernel and what a frontend sees of it: every iopub message, in order."""

    def __init__(self, km: KernelManager) -> None:
        self.km = km
        self.kc = km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=TIMEOUT)
        self.seen: list[dict[str, Any]] = []

    def drain(self, until: float = 0.0) -> None:
        """Read iopub messages until none comes for a moment (or until ``until``)."""
        while True:
            timeout = max(until - time.monotonic(), 0.2)
            try:
                self.seen.append(self.kc.get_iopub_msg(timeout=timeout))
            except Exception:
                if time.monotonic() >= until:
                    return

    def execute(self, code: str, timeout: float = TIMEOUT) -> tuple[str, dict[str, Any]]:
        """Run a cell; return its request id and its reply once the kernel is idle again."""
        msg_id = self.kc.execute(code)
        reply = self.kc.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=timeout)
        self.wait_idle(msg_id, timeout)
        return msg_id, reply["content"]

    def start(self, code: str) -> str:
        """Start a cell without waiting for it."""
        return str(self.kc.execute(code))

    def wait_idle(self, msg_id: str, timeout: float = TIMEOUT) -> None:
        """Read iopub until the kernel is idle after request ``msg_id``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            self.seen.append(msg)
            if (
                msg["header"]["msg_type"] == "status"
                and msg["parent_header"].get("msg_id") == msg_id
                and msg["content"]["execution_state"] == "idle"
            ):
                return
        raise AssertionError(f"the kernel did not go idle after {msg_id}")

    def wait_for(self, predicate: Any, what: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The first iopub message (seen or next) for which ``predicate`` holds."""
        for msg in self.seen:
            if predicate(msg):
                return msg
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            self.seen.append(msg)
            if predicate(msg):
                return msg
        raise AssertionError(f"timed out waiting for {what}")

    def comm_send(self, comm_id: str, data: dict[str, Any]) -> str:
        """Send a comm message to the notebook kernel, as the frontend does; return its id."""
        msg = self.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        self.kc.shell_channel.send(msg)
        return str(msg["header"]["msg_id"])

    def opened(self, model_name: str) -> list[dict[str, Any]]:
        """The comm_open messages of widget models called ``model_name``."""
        return [
            m
            for m in self.seen
            if m["header"]["msg_type"] == "comm_open"
            and m["content"]["data"].get("state", {}).get("_model_name") == model_name
        ]

    def text(self, parent: str | None = None) -> str:
        """Everything streamed so far (for request ``parent`` only, if given)."""
        return "".join(
            m["content"].get("text", "")
            for m in self.seen
            if m["header"]["msg_type"] == "stream"
            and (parent is None or m["parent_header"].get("msg_id") == parent)
        )

    def close(self) -> None:
        self.kc.stop_channels()


@pytest.fixture
def frontend(runner_factory: Any, tmp_path: Any, monkeypatch: Any) -> Iterator[Frontend]:
    runner: RunnerProcess = runner_factory(name="widgets")
    monkeypatch.setenv("DIDOMAGIC_RUNNER", runner.url)
    monkeypatch.setenv("DIDOMAGIC_PROGRESS", "widget")
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path))
    front = Frontend(km)
    try:
        _, reply = front.execute("%load_ext didomagic")
        assert reply["status"] == "ok", reply
        yield front
    finally:
        front.close()
        km.shutdown_kernel(now=True)


def test_a_remote_slider_moved_here_runs_its_callback_on_the_runner(frontend: Frontend) -> None:
    _, reply = frontend.execute(
        "%%remote --no-sync\n"
        "import ipywidgets as w\n"
        "moves = []\n"
        "slider = w.IntSlider(description='remote')\n"
        "def moved(change):\n"
        "    moves.append(change['new'])\n"
        "    print('moved to', change['new'])\n"
        "slider.observe(moved, 'value')\n"
        "slider"
    )
    assert reply["status"] == "ok", reply
    (opened,) = frontend.opened("IntSliderModel")
    comm_id = opened["content"]["comm_id"]
    assert opened["content"]["target_name"] == "jupyter.widget"
    shown = [m for m in frontend.seen if VIEW in m["content"].get("data", {})]
    assert any(m["content"]["data"][VIEW]["model_id"] == comm_id for m in shown)

    move = frontend.comm_send(
        comm_id, {"method": "update", "state": {"value": 7}, "buffer_paths": []}
    )
    frontend.wait_idle(move)  # the notebook kernel waits for the runner's callback
    assert "moved to 7" in frontend.text(parent=move)  # the callback's print, as its answer

    _, reply = frontend.execute("%%remote --no-sync\nprint('moves', moves, slider.value)")
    assert reply["status"] == "ok", reply
    assert "moves [7] 7" in frontend.text()


def test_a_remote_tqdm_bar_updates_live_and_reaches_100_percent(frontend: Frontend) -> None:
    _, reply = frontend.execute(
        "%%remote\n"
        "import time\n"
        "from tqdm.auto import tqdm\n"
        "for i in tqdm(range(5)):\n"
        "    time.sleep(0.1)\n"
    )
    assert reply["status"] == "ok", reply
    (bar,) = [  # not the progress row's own bar
        m
        for m in frontend.opened("FloatProgressModel")
        if m["content"]["data"]["state"]["max"] == 5
    ]
    bar_id = bar["content"]["comm_id"]
    values = [
        m["content"]["data"]["state"]["value"]
        for m in frontend.seen
        if m["header"]["msg_type"] == "comm_msg"
        and m["content"]["comm_id"] == bar_id
        and "value" in m["content"]["data"].get("state", {})
    ]
    assert values and values[-1] == 5 and len(set(values)) >= 2  # it moved, then finished
    labels = [
        m["content"]["data"]["state"]["value"]
        for m in frontend.seen
        if m["header"]["msg_type"] == "comm_msg"
        and isinstance(m["content"]["data"].get("state", {}).get("value"), str)
    ]
    assert any("100%" in label for label in labels)


def test_a_remote_output_widget_captures_remote_prints_here(frontend: Frontend) -> None:
    cell, reply = frontend.execute(
        "%%remote\n"
        "import ipywidgets as w\n"
        "out = w.Output()\n"
        "display(out)\n"
        "with out:\n"
        "    print('captured')\n"
        "print('not captured')\n"
    )
    assert reply["status"] == "ok", reply
    (opened,) = frontend.opened("OutputModel")
    out_id = opened["content"]["comm_id"]
    # The remote Output widget says it captures the messages of this very cell...
    captures = [
        m["content"]["data"]["state"]["msg_id"]
        for m in frontend.seen
        if m["header"]["msg_type"] == "comm_msg"
        and m["content"]["comm_id"] == out_id
        and "msg_id" in m["content"]["data"].get("state", {})
    ]
    assert captures[:2] == [cell, ""]
    # ... and the print inside comes between those two updates, as this cell's output.
    order = [
        ("capture", m["content"]["data"]["state"]["msg_id"])
        if m["header"]["msg_type"] == "comm_msg"
        and "msg_id" in m["content"]["data"].get("state", {})
        else ("print", m["content"]["text"])
        for m in frontend.seen
        if m["parent_header"].get("msg_id") == cell
        and m["header"]["msg_type"] in ("comm_msg", "stream")
        and (m["header"]["msg_type"] == "stream" or m["content"]["comm_id"] == out_id)
    ]
    assert order[:3] == [("capture", cell), ("print", "captured\n"), ("capture", "")], order
    assert "'out' was not synced: it is a widget, so it stays on the runner" in frontend.text()


def test_interact_draws_on_the_runner_when_its_slider_moves(frontend: Frontend) -> None:
    _, reply = frontend.execute(
        "%%remote\n"
        "from ipywidgets import interact\n"
        "@interact(x=(0, 10))\n"
        "def square(x=2):\n"
        "    print('square', x * x)\n"
    )
    assert reply["status"] == "ok", reply
    (slider,) = frontend.opened("IntSliderModel")
    move = frontend.comm_send(
        slider["content"]["comm_id"],
        {"method": "update", "state": {"value": 9}, "buffer_paths": []},
    )
    frontend.wait_idle(move)
    assert "square 81" in frontend.text(parent=move)


def test_cancel_in_the_progress_row_stops_a_running_cell_within_a_second(
    frontend: Frontend,
) -> None:
    cell = frontend.start(
        "%%remote\nimport time\nprint('started', flush=True)\ntry:\n    time.sleep(30)\n"
        "finally:\n    print('stopped at', repr(time.time()), flush=True)"
    )
    frontend.wait_for(lambda m: "started" in m["content"].get("text", ""), "the cell to start")
    buttons = [
        m
        for m in frontend.opened("ButtonModel")
        if m["content"]["data"]["state"].get("description") == "Cancel"
    ]
    assert buttons, "the progress row has a Cancel button"
    clicked = time.time()
    frontend.comm_send(
        buttons[-1]["content"]["comm_id"], {"method": "custom", "content": {"event": "click"}}
    )
    error = frontend.wait_for(
        lambda m: m["header"]["msg_type"] == "error" and m["parent_header"].get("msg_id") == cell,
        "the cell to stop",
    )
    stopped = float(frontend.text(parent=cell).split("stopped at ")[1].split()[0])
    assert stopped - clicked < 1.0, f"the remote cell stopped {stopped - clicked:.2f} s later"
    assert error["content"]["ename"] == "CellInterrupted"
    assert len(error["content"]["traceback"]) == 1  # one line, no didomagic frames
    frontend.wait_idle(cell)
    _, reply = frontend.execute("%%remote\nprint('still here', time.time() > 0)")
    assert reply["status"] == "ok" and "still here True" in frontend.text()


def test_a_remote_traceback_names_the_notebook_cell(frontend: Frontend) -> None:
    for _ in range(3):
        frontend.execute("x = 1")
    _, reply = frontend.execute("%%remote\n1 / 0")
    assert reply["status"] == "error"
    count = reply["execution_count"]
    traceback = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(reply["traceback"]))
    assert f"Cell In[{count}]" in traceback, traceback
    assert "didomagic/" not in traceback


def test_the_notebooks_own_widgets_are_undisturbed(frontend: Frontend) -> None:
    _, reply = frontend.execute(
        "import ipywidgets as w\nlocal = w.IntSlider()\nhits = []\n"
        "local.observe(lambda c: hits.append(c['new']), 'value')\nlocal"
    )
    assert reply["status"] == "ok"
    (opened,) = frontend.opened("IntSliderModel")
    frontend.execute("%%remote\nimport ipywidgets as w\nw.IntSlider()")
    move = frontend.comm_send(
        opened["content"]["comm_id"],
        {"method": "update", "state": {"value": 3}, "buffer_paths": []},
    )
    frontend.wait_idle(move)
    _, reply = frontend.execute("print('hits', hits)")
    assert "hits [3]" in frontend.text()


def test_a_reloaded_page_gets_the_remote_widgets_states_too(frontend: Frontend) -> None:
    frontend.execute("import ipywidgets as w\nlocal = w.IntSlider(value=4)\nlocal")
    frontend.execute(
        "%%remote --no-sync\nimport ipywidgets as w\nremote = w.IntSlider(value=9)\nremote"
    )
    local_id, remote_id = (m["content"]["comm_id"] for m in frontend.opened("IntSliderModel"))
    # What JupyterLab does on a reload: open the control comm, ask for every state.
    control = frontend.kc.session.msg(
        "comm_open",
        {"comm_id": "control-1", "target_name": "jupyter.widget.control", "data": {}},
        metadata={"version": "1.0.0"},
    )
    frontend.kc.shell_channel.send(control)
    ask = frontend.comm_send("control-1", {"method": "request_states"})
    answer = frontend.wait_for(
        lambda m: (
            m["header"]["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] == "control-1"
            and m["content"]["data"].get("method") == "update_states"
        ),
        "the states",
    )
    states = answer["content"]["data"]["states"]
    assert states[local_id]["state"]["value"] == 4
    assert states[remote_id]["state"]["value"] == 9
    assert states[remote_id]["model_name"] == "IntSliderModel"
    frontend.wait_idle(ask)


def test_widgets_of_an_ended_session_say_so(frontend: Frontend) -> None:
    frontend.execute("%%remote --no-sync\nimport ipywidgets as w\nw.IntSlider()")
    (slider,) = frontend.opened("IntSliderModel")
    frontend.execute(
        "from didomagic.api import default_pool\nfor s in default_pool()._sessions: s.close()"
    )
    update = frontend.wait_for(
        lambda m: (
            m["header"]["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] == slider["content"]["comm_id"]
            and m["content"]["data"].get("state", {}).get("disabled") is True
        ),
        "the slider to be disabled",
    )
    assert "ended" in update["content"]["data"]["state"]["tooltip"]
    _, reply = frontend.execute("%%remote\nprint('new session')")
    assert reply["status"] == "ok"
    assert "widget(s) it showed no longer respond" in frontend.text()
