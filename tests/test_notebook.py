"""notebooks/quickstart.ipynb executed by a real Jupyter client against a real runner."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from .conftest import TIMEOUT

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


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
