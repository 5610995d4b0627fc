"""didomagic in a real JupyterLab, driven through Debian's chromium by playwright.

One JupyterLab server (127.0.0.1, a token, a free port) and one browser serve
the whole module. The tests type nothing into a fake: they run cells in
notebooks, click the widgets' real DOM elements and read what the page shows.
Screenshots go to a folder the run prints at the end.

Needs ``/usr/bin/chromium`` (Debian's package): the browser is never downloaded.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

from didomagic.config import Config
from didomagic.urls import ConnectionURL

from .conftest import TIMEOUT, skip_missing, start_runner

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LIGHT, DARK = "JupyterLab Light", "JupyterLab Dark"
MS = int(TIMEOUT * 1000)

pytestmark = pytest.mark.timeout(int(6 * TIMEOUT))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _notebook(path: Path, *sources: str) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, path)


class Lab:
    """A JupyterLab server subprocess, stopped by pid at the end of the module."""

    def __init__(self, root: Path, home: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.token = secrets.token_hex(16)
        (home / "labconfig").mkdir(parents=True)
        (home / "labconfig" / "page_config.json").write_text(
            json.dumps(
                {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
            )
        )
        env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(home),
            "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
            "DIDOMAGIC_PROGRESS": "widget",
        }
        env.pop("DIDOMAGIC_RUNNER", None)  # cells run on the kernel's embedded runner
        self.log_path = home / "lab.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "jupyterlab",
                    "--no-browser",
                    "--allow-root",
                    "--expose-app-in-browser",
                    "--ServerApp.ip=127.0.0.1",
                    f"--ServerApp.port={self.port}",
                    "--ServerApp.port_retries=0",
                    f"--IdentityProvider.token={self.token}",
                    f"--ServerApp.root_dir={root}",
                    "--LabApp.news_url=None",
                    "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                    "--LabApp.extension_manager=readonly",
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        deadline = time.monotonic() + 2 * TIMEOUT
        while True:
            try:
                urllib.request.urlopen(f"{self.base}/api/status?token={self.token}", timeout=1)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = self.log_path.read_text()
                    raise RuntimeError(f"JupyterLab did not start:\n{log}") from None
                time.sleep(0.2)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, notebook: str) -> str:
        return f"{self.base}/lab/tree/{notebook}?token={self.token}&reset"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Page:
    """The browser page with one notebook open, and the JupyterLab app behind it."""

    def __init__(self, page: Any, lab: Lab, shots: Path) -> None:
        self.page = page
        self.lab = lab
        self.shots = shots
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, notebook: str) -> None:
        """Load JupyterLab with ``notebook`` open and wait for its kernel."""
        self.page.goto(self.lab.url(notebook))
        self.page.wait_for_function(
            "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
            " const k = w && w.sessionContext && w.sessionContext.session"
            " && w.sessionContext.session.kernel;"
            " return k && k.connectionStatus === 'connected' && k.status === 'idle'; }",
            timeout=2 * MS,
        )

    def js(self, body: str, arg: Any = None) -> Any:
        """Evaluate ``body`` (a function body) with ``app``, ``panel`` and ``nb`` defined."""
        return self.page.evaluate(
            "async (arg) => { const app = window.jupyterapp;"
            " const panel = app.shell.currentWidget; const nb = panel.content;" + body + "}",
            arg,
        )

    def add(self, source: str) -> int:
        """Append a code cell; return its index."""
        return int(
            self.js(
                "const n = nb.model.cells.length;"
                " nb.model.sharedModel.insertCell(n, {cell_type: 'code', source: arg});"
                " return n;",
                source,
            )
        )

    def start(self, index: int) -> None:
        """Run cell ``index`` without waiting for it."""
        self.js(
            "nb.activeCellIndex = arg;"
            " window.__running = app.commands.execute('notebook:run-cell'); return true;",
            index,
        )

    def wait(self) -> None:
        """Wait for the cell started last to finish."""
        self.js("await window.__running; return true;")
        self.page.wait_for_function(
            "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"
            " === 'idle'",
            timeout=MS,
        )

    def run(self, source: str) -> int:
        """Append a cell, run it and wait for it; return its index."""
        index = self.add(source)
        self.start(index)
        self.wait()
        return index

    def output(self, index: int) -> Any:
        """The output area of cell ``index`` (a playwright locator)."""
        return self.page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-OutputArea")

    def text(self, index: int) -> str:
        return str(self.output(index).inner_text())

    def shot(self, name: str, index: int | None = None) -> Path:
        path = self.shots / f"{name}.png"
        if index is None:
            self.page.screenshot(path=path)
        else:
            self.page.locator(".jp-Notebook .jp-Cell").nth(index).screenshot(path=path)
        return path

    def theme(self, name: str) -> None:
        self.js(
            "await app.commands.execute('apputils:change-theme', {theme: arg}); return 1;", name
        )
        self.page.wait_for_function(
            "(t) => document.body.dataset.jpThemeName === t", arg=name, timeout=MS
        )
        self.page.wait_for_selector("#jupyterlab-splash", state="detached", timeout=MS)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if not CHROMIUM.exists():
        skip_missing("chromium is not installed (/usr/bin/chromium, Debian's chromium)")
    root = tmp_path_factory.mktemp("lab-root")
    server = Lab(root, tmp_path_factory.mktemp("lab-home"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")

    def tell() -> None:  # on the terminal, whatever -s says: capture is off for this line
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"\nbrowser screenshots: {folder}")

    request.addfinalizer(tell)
    return folder


@pytest.fixture(scope="module")
def browser(lab: Lab, shots: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # an empty user-data dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=BROWSER_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield Page(context.new_page(), lab, shots)
        finally:
            context.close()


@pytest.fixture(scope="module")
def lab_runner(
    lab: Lab, tmp_path_factory: pytest.TempPathFactory, private_config: Path
) -> Iterator[str]:
    """A command-line runner in the notebooks' runner list, as "lab-box"."""
    runner = start_runner(tmp_path_factory.mktemp("browser-runner"), "--name", "lab-box")
    Config().add("lab-box", ConnectionURL.parse(runner.url))
    yield "lab-box"
    private_config.unlink(missing_ok=True)
    assert runner.stop() == 0, runner.log


@pytest.fixture(scope="module")
def scratch(browser: Page, lab: Lab) -> Page:
    """A notebook with didomagic loaded, on its kernel's embedded runner."""
    _notebook(lab.root / "scratch.ipynb", "%load_ext didomagic")
    browser.open("scratch.ipynb")
    browser.start(0)
    browser.wait()
    return browser


def test_the_progress_row_shows_state_and_elapsed_time(scratch: Page) -> None:
    cell = scratch.add("%%remote\nimport time\nprint('working', flush=True)\ntime.sleep(2)")
    scratch.start(cell)
    row = scratch.output(cell).locator(".widget-hbox", has_text="Cancel")
    row.wait_for(timeout=MS)
    scratch.output(cell).get_by_text("working").first.wait_for(timeout=MS)
    scratch.page.wait_for_function(
        "(i) => document.querySelectorAll('.jp-Notebook .jp-OutputArea')[i].innerText"
        ".includes('running')",
        arg=cell,
        timeout=MS,
    )
    live = row.inner_text()
    assert "running" in live and "embedded" in live and " s" in live
    scratch.shot("progress-live", cell)
    scratch.wait()
    final = scratch.text(cell)
    assert "✔ done" in final and "embedded" in final
    assert "Error displaying widget" not in final
    scratch.shot("progress-done", cell)


STOPPED = (
    "import time\nprint('started', flush=True)\ntry:\n    time.sleep(30)\n"
    "finally:\n    print('stopped at', repr(time.time()), flush=True)"
)
"""A remote cell that says when it stopped (the runner shares this machine's clock)."""


def stopped_at(text: str) -> float:
    """When the :data:`STOPPED` cell stopped on the runner."""
    return float(text.split("stopped at ")[1].split()[0])


def test_cancel_stops_a_remote_cell_in_under_a_second(scratch: Page) -> None:
    cell = scratch.add("%%remote\n" + STOPPED)
    scratch.start(cell)
    scratch.output(cell).get_by_text("started").first.wait_for(timeout=MS)
    cancel = scratch.output(cell).locator("button", has_text="Cancel")
    clicked = time.time()
    cancel.click()
    scratch.output(cell).get_by_text("CellInterrupted").first.wait_for(timeout=MS)
    scratch.shot("cancelled", cell)
    scratch.wait()
    text = scratch.text(cell)
    took = stopped_at(text) - clicked
    assert took < 1.0, f"the remote cell stopped {took:.2f} s after the click"
    assert "■ cancelled" in text and "Traceback" not in text and "didomagic/" not in text


def test_the_stop_button_interrupts_and_the_next_cell_runs_on_the_embedded_runner(
    scratch: Page,
) -> None:
    scratch.run("%%remote\nbefore = 41")
    cell = scratch.add("%%remote\nimport time\nprint('sleeping', flush=True)\ntime.sleep(30)")
    scratch.start(cell)
    scratch.output(cell).get_by_text("sleeping").first.wait_for(timeout=MS)
    scratch.page.locator("jp-button[data-command='notebook:interrupt-kernel']").first.click()
    scratch.wait()
    text = scratch.text(cell)
    assert "CellInterrupted" in text and "Traceback" not in text, text
    lines = [line for line in text.splitlines() if "Interrupted" in line]
    assert len(lines) == 1, text
    after = scratch.run("%%remote\nprint('still', before + 1)")
    assert "still 42" in scratch.text(after)  # the same embedded runner, state kept
    assert "had stopped" not in scratch.text(after)


def test_a_remote_tqdm_bar_reaches_100_percent(scratch: Page) -> None:
    cell = scratch.run(
        "%%remote\nimport time\nfrom tqdm.auto import tqdm\n"
        "for i in tqdm(range(10)):\n    time.sleep(0.05)"
    )
    bar = scratch.output(cell).locator(".widget-hprogress").last
    bar.wait_for(timeout=MS)
    text = scratch.text(cell)
    assert "100%" in text and "10/10" in text, text
    scratch.shot("tqdm", cell)


def test_a_remote_slider_moved_in_the_browser_changes_a_value_on_the_runner(
    scratch: Page,
) -> None:
    cell = scratch.run(
        "%%remote --no-sync\nimport ipywidgets as w\nmoves = []\n"
        "slider = w.IntSlider(description='remote')\n"
        "slider.observe(lambda change: moves.append(change['new']), 'value')\nslider"
    )
    handle = scratch.output(cell).locator(".noUi-handle")
    handle.wait_for(timeout=MS)
    handle.focus()
    for _ in range(3):
        scratch.page.keyboard.press("ArrowRight")
    scratch.shot("slider", cell)
    check = scratch.run("%%remote --no-sync\nprint('on the runner:', slider.value, moves[-1:])")
    assert "on the runner: 3 [3]" in scratch.text(check), scratch.text(check)


def test_the_use_button_of_runners_sets_the_default(scratch: Page, lab_runner: str) -> None:
    cell = scratch.run("%runners")
    use = scratch.output(cell).locator(f"button[title*='on {lab_runner} by default']")
    use.wait_for(timeout=MS)
    for width in (800, 1400, 2000):
        scratch.page.set_viewport_size({"width": width, "height": 1000})
        for theme in (LIGHT, DARK):
            scratch.theme(theme)
            _assert_nothing_cut(scratch, cell)
            scratch.shot(f"runners-{width}-{theme.split()[-1].lower()}", cell)
    scratch.theme(LIGHT)
    scratch.page.set_viewport_size({"width": 1400, "height": 1000})
    use.click()
    scratch.page.wait_for_function(
        "(t) => Array.from(document.querySelectorAll('button'))"
        ".some(b => b.title.includes(t) && b.innerText.includes('Default'))",
        arg=f"on {lab_runner} by default",
        timeout=MS,
    )
    check = scratch.run(
        "from didomagic.api import default_pool\nprint('default:', default_pool().default)"
    )
    assert f"default: {lab_runner}" in scratch.text(check)
    ran = scratch.run("%%remote\nprint('ran')\n")
    assert lab_runner in scratch.text(ran)  # the progress row names the runner used
    frozen = scratch.output(cell)
    assert frozen.locator("button").count() == 0  # the next cell froze the table ...
    assert lab_runner in frozen.inner_text() and "default" in frozen.inner_text()  # ... as text
    scratch.run("%runners use --clear")


def test_the_progress_row_holds_from_800_to_2000_px_in_both_themes(scratch: Page) -> None:
    ended = [
        scratch.run("%%remote\nx = 1"),
        scratch.run("%%remote\nraise ValueError('no')"),
    ]
    cell = scratch.add("%%remote\nimport time\nprint('long', flush=True)\ntime.sleep(30)")
    scratch.start(cell)
    scratch.output(cell).get_by_text("long").first.wait_for(timeout=MS)
    for width in (800, 2000):
        scratch.page.set_viewport_size({"width": width, "height": 1000})
        for theme in (LIGHT, DARK):
            scratch.theme(theme)
            scratch.shot(f"progress-live-{width}-{theme.split()[-1].lower()}", cell)
            _assert_row_fits(scratch, cell)
            for index in ended:
                scratch.shot(f"progress-{index}-{width}-{theme.split()[-1].lower()}", index)
    scratch.theme(LIGHT)
    scratch.page.set_viewport_size({"width": 1400, "height": 1000})
    scratch.output(cell).locator("button", has_text="Cancel").click()
    scratch.wait()
    ends = [
        next(line[0] for line in scratch.text(i).splitlines() if line[:1] in "✔✖■○●")
        for i in (*ended, cell)
    ]
    assert ends == ["✔", "✖", "■"], ends


def _assert_row_fits(page: Page, cell: int) -> None:
    """The live row: the Cancel button whole, elapsed time visible, nothing past the edge."""
    problems = page.js(
        "const out = document.querySelectorAll('.jp-Notebook .jp-OutputArea')[arg];"
        " const row = Array.from(out.querySelectorAll('.widget-hbox'))"
        "   .find(r => r.innerText.includes('Cancel'));"
        " if (!row) return ['no live row'];"
        " const edge = out.getBoundingClientRect().right + 1; const bad = [];"
        " for (const e of row.children) {"
        "   const box = e.getBoundingClientRect();"
        "   if (box.width > 0 && box.right > edge) bad.push('past the edge: ' + e.innerText);"
        "   if (e.scrollWidth > e.clientWidth + 1 && e.tagName === 'BUTTON')"
        "     bad.push('cut: ' + e.innerText);"
        " }"
        " if (!/\\d+\\.\\d s/.test(row.innerText)) bad.push('no elapsed time: ' + row.innerText);"
        " return bad;",
        cell,
    )
    assert not problems, problems


def _assert_nothing_cut(page: Page, cell: int) -> None:
    """No button's text is cut, and no table cell wraps onto a second line."""
    problems = page.js(
        "const out = document.querySelectorAll('.jp-Notebook .jp-Cell')[arg];"
        " const bad = [];"
        " for (const b of out.querySelectorAll('.jp-OutputArea button'))"
        "   if (b.scrollWidth > b.clientWidth + 1) bad.push('button ' + b.innerText);"
        " for (const c of out.querySelectorAll('.widget-gridbox .widget-html-content')) {"
        "   const line = parseFloat(getComputedStyle(c).lineHeight) || 20;"
        "   if (c.getBoundingClientRect().height > 1.6 * line) bad.push('wrapped ' + c.innerText);"
        " }"
        " return bad;",
        cell,
    )
    assert not problems, problems


def test_a_saved_and_reopened_notebook_shows_final_text_not_errors(
    browser: Page, lab: Lab, lab_runner: str
) -> None:
    _notebook(
        lab.root / "saved.ipynb",
        "%load_ext didomagic",
        "%%remote\nanswer = 6 * 7\nprint('remote says', answer)",
        "%runners",
        "print('after', answer)",
    )
    browser.open("saved.ipynb")
    for index in range(4):
        browser.start(index)
        browser.wait()
    browser.js("await app.commands.execute('docmanager:save'); return 1;")
    browser.js("await panel.sessionContext.shutdown(); return 1;")
    browser.open("saved.ipynb")  # a fresh page: the kernel and its widgets are gone
    browser.page.get_by_text("remote says 42").first.wait_for(timeout=MS)
    text = browser.page.locator(".jp-Notebook").inner_text()
    browser.shot("reopened")
    assert "Error displaying widget" not in text and "model not found" not in text
    assert "✔ done" in text and "embedded" in text  # the progress row's final state
    assert lab_runner in text and "latency" in text  # the %runners table, as a static table


def test_the_quickstart_notebook_runs_with_no_javascript_errors(browser: Page, lab: Lab) -> None:
    shutil.copy(NOTEBOOKS / "quickstart.ipynb", lab.root / "quickstart.ipynb")
    browser.errors.clear()
    browser.open("quickstart.ipynb")
    cells = int(browser.js("return nb.model.cells.length;"))
    for index in range(cells):
        if browser.js("return nb.model.cells.get(arg).type;", index) != "code":
            continue
        browser.start(index)
        browser.wait()
    text = browser.page.locator(".jp-Notebook").inner_text()
    browser.shot("quickstart")
    assert "still on the runner:" in text and "ZeroDivisionError" in text
    assert "Error displaying widget" not in text
    assert browser.errors == [], browser.errors
