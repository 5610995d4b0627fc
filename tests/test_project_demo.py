"""notebooks/project_demo/ executed by a real Jupyter client: every remote cell on a real runner.

The project is copied to a temporary folder first, so the files its cells
write back land there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from .conftest import TIMEOUT
from .test_notebook import _text

DEMO = Path(__file__).resolve().parent.parent / "notebooks" / "project_demo"


def test_the_project_demo_runs_under_remote_end_to_end(runner_factory, monkeypatch, tmp_path):
    runner = runner_factory(name="demo")
    monkeypatch.setenv("DIDOMAGIC_RUNNER", runner.url)  # inherited by the notebook kernel
    project = tmp_path / "project_demo"
    shutil.copytree(DEMO, project)
    folder = project / "notebooks"
    nb = nbformat.read(folder / "demo.ipynb", as_version=4)
    NotebookClient(
        nb,
        timeout=4 * TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(folder)}},
    ).execute()
    text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    assert "summary: {'mean': " in text and "'min': " in text
    assert "data folder: ['measurements.csv']" in text
    assert "working in notebooks with the data in data" in text
    assert "seen here: [30]" in text
    assert "files from the runner: plot.png" in text and "30 days" in text
    last = nb.cells[-1]
    assert any("image/png" in out.get("data", {}) for out in last.get("outputs", []))
    assert (folder / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "Error" not in text, text
    assert "session" in runner.log and "opened" in runner.log
