"""Two checkouts' cell latency, measured interleaved in one run, with ipyparallel beside them.

    python -m benchmarks.latency_ab OLD_CHECKOUT NEW_CHECKOUT [--rounds 12]

Each checkout gets a notebook process of its own (an IPython shell with
didomagic loaded from that checkout) and a runner started from it. Rounds
alternate between them, and between each round ipyparallel's ``view.execute``
is timed too, so load on a shared machine falls on all three alike. Per round:
ten trivial ``%%remote`` cells (``x = 1``), ten ``RemoteSession.execute`` calls
without the magic, and two cells reading 1,000 small variables. Prints medians
and 25th percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = (("trivial", 10), ("session", 10), ("many", 2))
"""What one round measures, and how many times."""

_NOTEBOOK = r"""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
os.environ["DIDOMAGIC_PROGRESS"] = "none"
from benchmarks.bench import start_runner
process, url = start_runner()
from IPython.testing.globalipapp import start_ipython
shell = start_ipython()
shell.run_line_magic("load_ext", "didomagic")
for i in range(1000):
    shell.user_ns[f"v{i}"] = i
many = "total = sum([" + ", ".join(f"v{i}" for i in range(1000)) + "])"
def cell(code):
    result = shell.run_cell(f"%%remote --runner {url}\n{code}")
    if not result.success:
        raise RuntimeError(result.error_in_exec)
for _ in range(5):
    cell("x = 1")
cell(many)
from didomagic.api import default_pool
from didomagic.protocol import Execute
session = default_pool().session(url)
print("ready", flush=True)
for line in sys.stdin:
    what, count = line.split()
    samples = []
    for _ in range(int(count)):
        started = time.perf_counter()
        if what == "trivial":
            cell("x = 1")
        elif what == "many":
            cell(many)
        else:
            session.execute(Execute("c", "x = 1"), [], lambda output: None)
        samples.append(time.perf_counter() - started)
    print(json.dumps(samples), flush=True)
default_pool().close()
process.terminate()
"""


def _start(checkout: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", _NOTEBOOK],
        cwd=checkout,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(checkout)},
    )
    assert process.stdout is not None
    while (line := process.stdout.readline()) and line.strip() != "ready":
        pass
    if not line:
        raise RuntimeError(f"the notebook process for {checkout} did not start")
    return process


def _ask(process: subprocess.Popen[str], what: str, count: int) -> list[float]:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(f"{what} {count}\n")
    process.stdin.flush()
    return [float(s) for s in json.loads(process.stdout.readline())]


def _line(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    return (
        f"{name:<40} median {statistics.median(ordered) * 1e3:8.2f} ms"
        f"   p25 {ordered[len(ordered) // 4] * 1e3:8.2f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    from benchmarks.bench import Ipp

    checkouts = [args.old.resolve(), args.new.resolve()]
    processes = [_start(c) for c in checkouts]
    ipp = Ipp()
    samples: dict[tuple[int, str], list[float]] = {}
    baseline: list[float] = []
    try:
        for _ in range(5):
            ipp.view.execute("x = 1", block=True)
        for round_ in range(args.rounds):
            order = [0, 1] if round_ % 2 == 0 else [1, 0]
            for what, count in WORKLOADS:
                for i in order:
                    samples.setdefault((i, what), []).extend(_ask(processes[i], what, count))
                if what == "trivial":
                    for _ in range(count):
                        started = time.perf_counter()
                        ipp.view.execute("x = 1", block=True)
                        baseline.append(time.perf_counter() - started)
    finally:
        ipp.close()
        for process in processes:
            assert process.stdin is not None
            process.stdin.close()
            process.wait(timeout=60)
    print(_line("ipyparallel view.execute", baseline))
    for what, _ in WORKLOADS:
        for i, checkout in enumerate(checkouts):
            print(_line(f"{what} ({checkout.name})", samples[(i, what)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
