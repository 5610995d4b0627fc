"""notebooks/quickstart.ipynb executed by a real Jupyter client against a real runner."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from didomagic.config import Config
from didomagic.urls import ConnectionURL

from .conftest import TIMEOUT, start_mediator, wait_until

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOK = NOTEBOOKS / "quickstart.ipynb"


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(out.get("data", {}).get("text/plain", ""))
        parts.append(" ".join(out.get("traceback", [])))
        parts.append(out.get("ename", ""))
    return "\n".join(parts)


def test_quickstart_runs_end_to_end_on_a_command_line_runner(runner_factory, monkeypatch):
    runner = runner_factory(name="nb")
    monkeypatch.setenv("DIDOMAGIC_RUNNER", runner.url)  # inherited by the notebook kernel
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb,
        timeout=4 * TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    text = {i: _text(c) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    everything = "\n".join(text.values())
    assert "ran in process" in everything and "{'mean': 2.999, 'std': 1.0}" in everything
    assert "back in the notebook: {'mean'" in everything
    assert all(f"step {i}" in everything for i in range(3))
    assert any("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))
    assert "still on the runner:" in everything and "in the notebook? False" in everything
    assert "ZeroDivisionError" in everything and "RemoteError" in everything
    assert "CellTimeout" in everything and "the session is still alive" in everything
    assert "True" in text[max(text)]  # --local computed the same stats
    assert "embedded runner" not in everything  # it ran on the runner we started
    assert "session" in runner.log and "opened" in runner.log


def test_the_pool_notebook_uses_tags_and_map(runner_factory, tmp_path, private_config):
    mediator = start_mediator(tmp_path / "mediator")
    try:
        for name, tags in (("cpu-1", "cpu"), ("gpu-1", "gpu"), ("gpu-2", "gpu")):
            runner_factory("--tags", tags, "--mediator", mediator.runner_url, name=name)
        from didomagic.client import query
        from didomagic.loop import background_loop

        url = ConnectionURL.parse(mediator.url)
        wait_until(
            lambda: len(background_loop().run(query(url))[0].runners) == 3,
            "three runners registered",
        )
        private_config.unlink(missing_ok=True)
        Config().add("lab", url)  # the kernel inherits DIDOMAGIC_CONFIG
        nb = nbformat.read(NOTEBOOKS / "pool.ipynb", as_version=4)
        NotebookClient(nb, timeout=4 * TIMEOUT, kernel_name="python3").execute()
    finally:
        private_config.unlink(missing_ok=True)
        assert mediator.stop() == 0, mediator.log
    text = [_text(c) for c in nb.cells if c.cell_type == "code"]
    listing = text[1]
    assert all(name in listing for name in ("cpu-1", "gpu-1", "gpu-2")) and "via lab" in listing
    assert "this cell ran on gpu-" in text[2] and "back in the notebook: gpu-" in text[3]
    assert "('cpu-1', 'Linux')" in text[5]
    assert "NoMatchingRunner" in text[6] and "gpu-2 [gpu] linux: up" in text[6]
    assert "squares: [0, 1, 4, 9, 16, 25, 36, 49, 64, 81, 100, 121]" in text[7]
    assert "runners used: ['cpu-1', 'gpu-1', 'gpu-2']" in text[7]
    assert "[1, 2, 3]" in text[8]
    # In a kernel the progress is a widget, replaced at the cell's end by its final state
    # as static text and HTML: that is what the saved notebook keeps, not a dead widget.
    outputs = [out for c in nb.cells for out in c.get("outputs", [])]
    live = [
        (i, o["data"].get("text/plain", "")[:80])
        for i, c in enumerate(nb.cells)
        for o in c.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
    ]
    assert not live, f"cells keep a live widget: {live}"
    finals = [o for o in outputs if "didomagic-progress" in o.get("data", {}).get("text/html", "")]
    assert finals and any("didomagic: done on gpu-" in o["data"]["text/plain"] for o in finals)
