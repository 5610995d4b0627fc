"""What each feature costs a trivial cell when it is not used, and widget messages per second.

Issue 16: unchanged local modules, cached package environments, file reads and
remote widgets may each slow the trivial cell by at most 3 ms when unused.
Each is measured as the trivial cell with the feature as shipped minus the
same cell with the feature switched off, interleaved cell by cell so the
host's load weighs on both alike, from a notebook folder with no local
modules and no files:

- *packages*: the runner as started by default against the same runner with
  ``--no-install`` (two runner processes, the same flags otherwise);
- *local modules*: the notebook's per-cell look at its first-party modules,
  switched off in this process (there is no user switch: the runner's import
  hook stays installed either way);
- *file reads* and *widgets* have no switch at all, so their figure is the
  time the notebook side spends in their per-cell work during the trivial
  cells (the files' bundle and what comes back; the cell's identity for
  widget outputs), timed in place without changing it. Their runner side
  (the kernel's file mirror, comm forwarding) is not in it.

The widget rate: a remote cell updating an ``IntProgress`` many times, in a
real notebook kernel whose iopub this process reads as a frontend does;
messages per second arriving there, beside the same loop run in that
notebook kernel itself.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PACKAGES_ON = "features: trivial cell, runner defaults"
PACKAGES_OFF = "features: trivial cell, runner --no-install"
CODE_ON = "features: trivial cell, no local modules, check on"
CODE_OFF = "features: trivial cell, no local modules, check off"
FILES_WORK = "features: file feature's notebook-side work per trivial cell"
WIDGETS_WORK = "features: widget feature's notebook-side work per trivial cell"
REMOTE_RATE = "features: remote widget updates arriving at the notebook"
LOCAL_RATE = "features: the same widget updates in the notebook's own kernel"
REMOTE_ARRIVED = "features: remote widget updates that arrived, of those sent"
LOCAL_ARRIVED = "features: local widget updates that arrived, of those sent"


@contextlib.contextmanager
def replaced(module: Any, name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    """``module.name`` replaced for the block; a missing name fails loudly, never silently."""
    original = getattr(module, name)  # AttributeError: the benchmark must follow the code
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


class Timed:
    """Wraps functions in place, adding up the seconds spent in them (behaviour unchanged)."""

    def __init__(self, targets: list[tuple[Any, str]]) -> None:
        self.targets = targets
        self.spent = 0.0

    def take(self) -> float:
        """The seconds counted since the last take."""
        spent, self.spent = self.spent, 0.0
        return spent

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Count while inside the block."""
        with contextlib.ExitStack() as stack:
            for module, name in self.targets:
                stack.enter_context(replaced(module, name, self._wrap(getattr(module, name))))
            yield

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent += time.perf_counter() - started

        return timed


@contextlib.contextmanager
def empty_project() -> Iterator[Path]:
    """A notebook with no local modules, in a folder of its own (a git root) with nothing in it.

    The suite's own modules (``benchmarks.*``) are first-party to it, as it
    runs from the project (an editable install), so they are taken out of
    ``sys.modules`` for the block: the notebook then has imported no local
    module, and nothing imports inside the block.
    """
    here = os.getcwd()
    own = {n: m for n, m in sys.modules.items() if n.partition(".")[0] in OWN_PACKAGES}
    with tempfile.TemporaryDirectory(prefix="didomagic-bench-empty-") as tmp:
        (Path(tmp) / ".git").mkdir()
        os.chdir(tmp)
        for name in own:
            del sys.modules[name]
        try:
            yield Path(tmp)
        finally:
            sys.modules.update(own)
            os.chdir(here)


OWN_PACKAGES = ("benchmarks", "tests", "dev")
"""The project's top-level modules the suite itself may have imported."""


def unused_costs(shell: Any, url: str, reps: int) -> list[Any]:
    """The trivial cell with each feature on and off (see the module docstring)."""
    from benchmarks.bench import Measure, start_runner, stop
    from didomagic import api, comms, files, localcode

    def cell(target: str) -> float:
        started = time.perf_counter()
        result = shell.run_cell(f"%%remote --runner {target}\nx = 1")
        elapsed = time.perf_counter() - started
        if not result.success:
            raise RuntimeError(f"bench cell failed: {result.error_in_exec}")
        return elapsed

    no_install, no_install_url = start_runner("--no-install")
    names = (PACKAGES_ON, PACKAGES_OFF, CODE_ON, CODE_OFF, FILES_WORK, WIDGETS_WORK)
    rows: dict[str, list[float]] = {n: [] for n in names}
    file_work = Timed([(files, "bundle_value"), (files, "take_back")])
    widget_work = Timed([(comms, "cell_identity")])
    try:
        with empty_project():
            for target in (url, no_install_url):
                for _ in range(3):
                    cell(target)

            def timed_work() -> float:
                with file_work.active(), widget_work.active():
                    elapsed = cell(url)
                rows[FILES_WORK].append(file_work.take())
                rows[WIDGETS_WORK].append(widget_work.take())
                return elapsed

            def check_off() -> float:
                with replaced(localcode, "shipped", lambda values: True):
                    return cell(url)

            order: list[tuple[str, Callable[[], float]]] = [
                (PACKAGES_ON, lambda: cell(url)),
                (PACKAGES_OFF, lambda: cell(no_install_url)),
                (CODE_ON, timed_work),
                (CODE_OFF, check_off),
            ]
            for rep in range(reps):  # A B C D, then D C B A: no variant always goes first
                for name, run in order if rep % 2 == 0 else reversed(order):
                    rows[name].append(run())
    finally:
        api.default_pool().close()
        stop(no_install)
    return [Measure(name, "ms", samples) for name, samples in rows.items()]


WIDGET_CELL = """\
import ipywidgets
bar = ipywidgets.IntProgress(max={n})
display(bar)
for i in range({n}):
    bar.value = i + 1
"""


def widget_rates(url: str, updates: int, failures: dict[str, str], reps: int = 3) -> list[Any]:
    """Updates per second reaching the frontend: a remote cell's widget, and a local one's.

    A cell that never ends stops the measurement (its notebook kernel is stuck):
    the rounds before it are kept and the reason goes into ``failures``.
    """
    from jupyter_client.manager import KernelManager

    from benchmarks.bench import Measure

    env = {k: v for k, v in os.environ.items() if not k.startswith("DIDOMAGIC_")}
    env |= {"DIDOMAGIC_RUNNER": url, "DIDOMAGIC_PROGRESS": "none"}
    remote: list[tuple[float, float]] = []
    local: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="didomagic-bench-widgets-") as tmp:
        km = KernelManager(kernel_name="python3")
        km.start_kernel(cwd=tmp, env=env)
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            _run(kc, "%load_ext didomagic")
            _run(kc, "%%remote\nx = 1")
            body = WIDGET_CELL.format(n=updates)
            for _ in range(reps):
                remote.append(_update_rate(kc, "%%remote --no-sync\n" + body, updates))
                local.append(_update_rate(kc, body, updates))
        except WidgetRateFailed as exc:
            failures["features: widget rate"] = f"{exc} (after {len(remote)} good rounds)"
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
    note = f"{updates} IntProgress updates, comm_msg on the notebook kernel's iopub"
    if not remote or not local:
        return []
    return [
        Measure(REMOTE_RATE, "msgs/s", [rate for rate, _ in remote], note),
        Measure(REMOTE_ARRIVED, "fraction", [share for _, share in remote], note),
        Measure(LOCAL_RATE, "msgs/s", [rate for rate, _ in local], note),
        Measure(LOCAL_ARRIVED, "fraction", [share for _, share in local], note),
    ]


class WidgetRateFailed(RuntimeError):
    """A widget cell never finished, or too few of its updates arrived for a rate."""


CELL_WAIT = 120.0
"""Seconds a widget cell may take before the measurement gives up on it."""


def _run(kc: Any, code: str) -> list[tuple[float, dict[str, Any]]]:
    """Run ``code`` in the notebook kernel; its iopub messages until idle (fails on an error)."""
    msg_id = kc.execute(code)
    seen: list[tuple[float, dict[str, Any]]] = []
    deadline = time.monotonic() + CELL_WAIT
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            comms = sum(m["msg_type"] == "comm_msg" for _, m in seen)
            raise WidgetRateFailed(
                f"the cell did not finish within {CELL_WAIT:g} s ({comms} comm messages "
                f"had arrived): {code.splitlines()[0]!r}"
            ) from None
        seen.append((time.perf_counter(), msg))
        if msg["msg_type"] == "error":
            raise RuntimeError(f"bench cell failed: {msg['content']['evalue']}")
        if (
            msg["msg_type"] == "status"
            and msg["parent_header"].get("msg_id") == msg_id
            and msg["content"]["execution_state"] == "idle"
        ):
            return seen


def _update_rate(kc: Any, code: str, updates: int) -> tuple[float, float]:
    """Value updates of the cell's progress bar arriving per second, from its comm_open on,
    and the fraction of the ``updates`` that arrived before the cell ended."""
    seen = _run(kc, code)
    opened = next(
        (at, m["content"]["comm_id"])
        for at, m in seen
        if m["msg_type"] == "comm_open"
        and m["content"]["data"].get("state", {}).get("_model_name") == "IntProgressModel"
    )
    arrived = [
        at
        for at, m in seen
        if m["msg_type"] == "comm_msg"
        and m["content"]["comm_id"] == opened[1]
        and "value" in m["content"]["data"].get("state", {})
    ]
    if len(arrived) < 2:
        raise WidgetRateFailed(f"only {len(arrived)} of {updates} widget updates arrived")
    return len(arrived) / (arrived[-1] - opened[0]), len(arrived) / updates


def feature_bars(measures: list[Any]) -> list[tuple[str, float, str]]:
    """Each feature's cost to the trivial cell when unused (ms), and the widget rate's ratio."""
    by = {m.name: m for m in measures}
    found = []
    for what, on, off in (
        ("packages", PACKAGES_ON, PACKAGES_OFF),
        ("local modules", CODE_ON, CODE_OFF),
    ):
        if on in by and off in by:
            extra = (by[on].median - by[off].median) * 1e3
            found.append((f"unused {what}: trivial cell, on - off (ms)", extra, "<= 3"))
    for what, name in (("file reads", FILES_WORK), ("widgets", WIDGETS_WORK)):
        if name in by:
            found.append(
                (f"unused {what}: notebook-side work per cell (ms)", by[name].median * 1e3, "<= 3")
            )
    if REMOTE_ARRIVED in by:
        share = by[REMOTE_ARRIVED].median
        found.append(("remote widget updates that reached the notebook (fraction)", share, ">= 1"))
    if REMOTE_RATE in by and LOCAL_RATE in by:
        found.append(
            (
                "widget updates per second, remote / local kernel",
                by[REMOTE_RATE].median / by[LOCAL_RATE].median,
                "-",
            )
        )
    return found
