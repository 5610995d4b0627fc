"""The notebook's own modules travel with its cells: real runners, real kernels, a real folder.

Each test makes a notebook folder in tmp, makes it the IPython shell's working
directory and puts it on ``sys.path`` (as Jupyter does for a notebook), and
runs cells under ``%%remote`` on runners that have none of its files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from IPython.utils.capture import capture_output

from didomagic import localcode

from .conftest import TIMEOUT, start_mediator, wait_until


def write(path: Path, text: str) -> Path:
    """Write a source file, moving its mtime on so an edit within a tick is still seen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(textwrap.dedent(text))
    if path.stat().st_mtime_ns <= old:
        os.utime(path, ns=(old + 1_000_000, old + 1_000_000))
    return path


@pytest.fixture
def notebook(tmp_path, shell, ns, monkeypatch):
    """A notebook folder: the shell's cwd and first on sys.path; its modules forgotten after."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        module = sys.modules.get(name)
        if str(tmp_path) in str(getattr(module, "__file__", "") or ""):
            del sys.modules[name]


def remote(shell, url: str, cell: str, options: str = ""):
    """Run ``cell`` under ``%%remote``; return the result and what it printed."""
    with capture_output() as cap:
        result = shell.run_cell(f"%%remote --runner {url} {options}\n{cell}")
    return result, cap


def local(shell, cell: str) -> None:
    result = shell.run_cell(cell)
    assert result.success, result.error_in_exec


def ok(result, cap) -> None:
    assert result.success, cap.stdout + cap.stderr


HELPERS = """
    import other

    def double(x):
        return 2 * x

    def triple(x):
        return other.times(3, x)
"""


def test_import_helpers_and_from_pkg_sub(shell, ns, notebook, runner_factory):
    write(notebook / "helpers.py", HELPERS)
    write(notebook / "other.py", "def times(k, x):\n    return k * x\n")
    write(notebook / "pkg" / "__init__.py", "from .sub import f\nfrom . import deep\n")
    write(notebook / "pkg" / "sub.py", "from .deep.leaf import g\n\ndef f(x):\n    return g(x) + 1\n")
    write(notebook / "pkg" / "deep" / "__init__.py", "")
    write(notebook / "pkg" / "deep" / "leaf.py", "def g(x):\n    return x * 10\n")
    runner = runner_factory()
    local(shell, "import helpers\nx = 21")
    ok(*remote(shell, runner.url, "y = helpers.double(x)\nz = helpers.triple(x)"))
    assert ns["y"] == 42 and ns["z"] == 63
    # Not imported in the notebook: asked for by the runner's import hook.
    ok(*remote(shell, runner.url, "from pkg.sub import f\nfrom pkg import deep\nw = f(2)"))
    assert ns["w"] == 21
    ok(
        *remote(
            shell,
            runner.url,
            "import pkg.deep.leaf, inspect\n"
            "where = (pkg.deep.leaf.__file__, helpers.__file__)\n"
            "src = inspect.getsource(pkg.deep.leaf.g)",
        )
    )
    leaf, helpers_file = ns["where"]
    assert leaf.endswith(os.path.join("pkg", "deep", "leaf.py")) and str(notebook) not in leaf
    assert helpers_file.endswith("helpers.py")
    assert "return x * 10" in ns["src"]
