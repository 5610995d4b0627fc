"""Packages in the benchmark: a new session whose package set is cached, and a cold build.

Three small wheels (one depending on another) are written into a folder the
runner gets as ``--find-links DIR --no-index``, so nothing is downloaded.

- *new session, cached set*: the first cell of a new session asking for the
  three packages, once their environment exists (bar: at most 100 ms over a
  new session asking for nothing, measured on the same runner);
- *cold build*: a cell in a new session asking for a set never built before
  (the requirement text differs each time, the wheels do not), with uv's
  cache warm (bar: under 3 s).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PINS = "--pip bmk-alpha --pip bmk-beta --pip bmk-gamma==1.0"


def _wheels(folder: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.wheels import write_wheel

    write_wheel(folder, "bmk-gamma", "1.0")
    write_wheel(folder, "bmk-beta", "1.0", requires=["bmk-gamma"])
    write_wheel(folder, "bmk-alpha", "1.0")


def package_measures(reps: int) -> list[Any]:
    """The package measures (see the module docstring)."""
    from IPython import get_ipython
    from IPython.testing.globalipapp import start_ipython

    from benchmarks.bench import Measure, _wait_for_a_warm_kernel, start_runner
    from didomagic.api import default_pool

    folder = Path(tempfile.mkdtemp(prefix="didomagic-bench-wheels-"))
    _wheels(folder)
    process, url = start_runner("--find-links", str(folder), "--no-index")
    shell = start_ipython() or get_ipython()  # the suite's shell, if it has started one
    shell.run_line_magic("load_ext", "didomagic")
    os.environ["DIDOMAGIC_PROGRESS"] = "none"

    def cell(options: str, code: str = "x = 1") -> float:
        default_pool().close()
        _wait_for_a_warm_kernel(url)
        started = time.perf_counter()
        result = shell.run_cell(f"%%remote --runner {url} {options}\n{code}")
        if not result.success:
            raise RuntimeError(f"bench cell failed: {result.error_in_exec}")
        return time.perf_counter() - started

    try:
        cell(
            PINS, "__import__('bmk_alpha'), __import__('bmk_beta')"
        )  # builds the set once; uv's cache warms
        plain, cached, cold = [], [], []
        for _ in range(max(3, reps // 5)):
            plain.append(cell(""))
            cached.append(cell(PINS, "__import__('bmk_alpha'), __import__('bmk_beta')"))
        for i in range(max(2, reps // 10)):
            fresh = f"--pip bmk-alpha!=0.0.{i} --pip bmk-beta --pip bmk-gamma==1.0"
            cold.append(cell(fresh, "__import__('bmk_alpha'), __import__('bmk_beta')"))
    finally:
        default_pool().close()
        process.terminate()
        process.wait(timeout=60)
    return [
        Measure("didomagic: new session, no packages (package runner)", "ms", plain),
        Measure("didomagic: new session, cached set of 3 packages", "ms", cached),
        Measure("didomagic: cold build of 3 small wheels (local uv cache)", "ms", cold),
    ]


def package_ratios(measures: list[Any]) -> list[tuple[str, float, str]]:
    """The package bars, from this run's measures."""
    by = {m.name: m for m in measures}
    plain = by.get("didomagic: new session, no packages (package runner)")
    cached = by.get("didomagic: new session, cached set of 3 packages")
    cold = by.get("didomagic: cold build of 3 small wheels (local uv cache)")
    found = []
    if plain and cached:
        extra = (cached.median - plain.median) * 1e3
        found.append(("new session, cached package set - no packages (ms)", extra, "<= 100"))
    if cold:
        found.append(("cold build of 3 small wheels, whole cell (s)", cold.median, "< 3"))
    return found
