#!/usr/bin/env python3
"""Project tasks that work on a fresh machine with only Python 3.11+.

    python3 dev.py quickstart   run notebooks/quickstart.ipynb end to end on the embedded runner
    python3 dev.py test         run the whole test suite
    python3 dev.py pool         start a mediator and three runners here, run notebooks/pool.ipynb
    python3 dev.py bench [--quick] [--only GROUPS]  didomagic and its baselines side by side
                                                     (benchmarks/, docs/performance.md)

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
POOL_NOTEBOOK = ROOT / "notebooks" / "pool.ipynb"


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


def pool() -> int:
    """Start a local mediator with three runners and execute the pool notebook against it."""
    return _in_venv(str(Path(__file__)), "_pool")


def _pool() -> int:
    """(Inside .venv.) The pool demo: processes up, notebook run, processes down."""
    import signal
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="didomagic-pool-"))
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str, lines: int = 1) -> list[str]:
        log = open(work / f"{len(processes)}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            [sys.executable, "-m", "runner", *args, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        processes.append(process)
        assert process.stdout is not None
        urls = [process.stdout.readline().decode().strip() for _ in range(lines)]
        if not all(urls):
            raise SystemExit(f"a didomagic process did not start; see {log.name}")
        return urls

    try:
        client_url, runner_url = start("mediator", "--state-dir", str(work / "m"), lines=2)
        for name, tags in (("cpu-1", "cpu"), ("gpu-1", "gpu"), ("gpu-2", "gpu")):
            start(
                "--name",
                name,
                "--tags",
                tags,
                "--max-sessions",
                "2",
                "--mediator",
                runner_url,
                "--state-dir",
                str(work / name),
            )
        print(f"started a mediator and three runners (logs in {work})", flush=True)
        config = work / "config.json"
        os.environ["DIDOMAGIC_CONFIG"] = str(config)
        import time

        from didomagic.api import add_runner
        from didomagic.client import query
        from didomagic.loop import background_loop
        from didomagic.urls import ConnectionURL

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the runners register as they come up
            info, _ = background_loop().run(query(ConnectionURL.parse(client_url)))
            if sum(d.get("status") == "up" for d in info.runners) == 3:
                break
            time.sleep(0.1)
        add_runner(client_url)
        return _execute(str(POOL_NOTEBOOK))
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=60)


def bench(args: list[str]) -> int:
    """Run the benchmark suite (``--quick``: small and few; ``--only relay,cells``: some groups)."""
    return _in_venv("-m", "benchmarks.bench", *args)


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
    """Dispatch ``quickstart`` / ``test`` / ``pool``."""
    tasks = {"quickstart": quickstart, "test": test, "pool": pool}
    if argv[:1] == ["_execute"]:
        return _execute(argv[1])
    if argv[:1] == ["_pool"]:
        return _pool()
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    if len(argv) != 1 or argv[0] not in tasks:
        print(__doc__, file=sys.stderr)
        return 2
    return tasks[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
