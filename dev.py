#!/usr/bin/env python3
"""Project tasks that work on a fresh machine with only Python 3.11+.

    python3 dev.py quickstart   run notebooks/quickstart.ipynb end to end on the embedded runner
    python3 dev.py test         run the whole test suite

Each creates ``.venv`` and installs the project with its test extras the first
time (again when pyproject.toml changes), then runs inside it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def venv_python() -> Path:
    """The virtual environment's interpreter."""
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_environment() -> Path:
    """Create .venv and install the project into it, unless already up to date."""
    if sys.version_info < (3, 11):
        sys.exit(f"didomagic needs Python 3.11 or newer; this is {sys.version.split()[0]}.")
    python = venv_python()
    if not python.exists():
        print("creating .venv ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    stamp = VENV / ".didomagic-installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != wanted:
        print("installing didomagic and its test dependencies into .venv ...", flush=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
        stamp.write_text(wanted)
    return python


def _in_venv(*args: str) -> int:
    python = ensure_environment()
    env = {k: v for k, v in os.environ.items() if k != "DIDOMAGIC_RUNNER"}
    return subprocess.run([str(python), *args], cwd=ROOT, env=env).returncode


def quickstart() -> int:
    """Execute the quick-start notebook headless and print what each cell showed."""
    return _in_venv(str(Path(__file__)), "_execute", str(NOTEBOOK))


def test() -> int:
    """Run the whole suite; a run that collects no test fails."""
    code = _in_venv("-m", "pytest", "-p", "no:cacheprovider", "tests")
    if code == 5:
        print("pytest collected no tests: failing on purpose.", file=sys.stderr)
        return 1
    return code


def _execute(path: str) -> int:
    """(Inside .venv.) Run a notebook with nbclient and print its outputs as text."""
    import nbformat
    from nbclient import NotebookClient

    notebook = Path(path)
    nb = nbformat.read(notebook, as_version=4)
    print(f"executing {notebook.relative_to(ROOT)} with a Jupyter kernel ...\n", flush=True)
    NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(notebook.parent)}},
    ).execute()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        print(f"In [{cell.execution_count}]: " + cell.source.replace("\n", "\n         "))
        for out in cell.outputs:
            if out.output_type == "stream":
                print(out.text, end="")
            elif out.output_type == "error":
                print(f"{out.ename}: {out.evalue}")
            else:
                data = out.get("data", {})
                shown = data.get("text/plain", "")
                if "image/png" in data:
                    shown = f"[image/png, {len(data['image/png']) * 3 // 4} bytes] {shown}"
                print(f"Out: {shown}")
        print()
    executed = notebook.with_suffix(".out.ipynb")
    nbformat.write(nb, executed)
    print(f"done: every cell ran; the executed notebook is {executed.relative_to(ROOT)}")
    return 0


def main(argv: list[str]) -> int:
    """Dispatch ``quickstart`` / ``test``."""
    tasks = {"quickstart": quickstart, "test": test}
    if argv[:1] == ["_execute"]:
        return _execute(argv[1])
    if len(argv) != 1 or argv[0] not in tasks:
        print(__doc__, file=sys.stderr)
        return 2
    return tasks[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
