"""What the notebook's own modules cost a cell: a local package of 50 modules.

Measured through the real ``%%remote`` magic against a real runner, from a
notebook folder made in a temporary directory (its working directory and first
on ``sys.path``, as Jupyter has it):

- the first cell of a new session that imports the package, over the first
  cell of a new session that imports nothing (the package is not imported in
  the notebook, so the runner asks for it: one answer brings all 50 modules);
- the same when the notebook has imported it (the modules go with the cell);
- a later cell using the package, every module unchanged, over a trivial cell
  of a notebook with no local modules (target: at most 3 ms more). Both cells
  run interleaved in one session, where the trivial cell pays the notebook
  side's check of the modules as well; that check is measured on its own and
  added back to the difference.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODULES = 50


def make_package(folder: Path, modules: int = MODULES) -> None:
    """``bigpkg`` with ``modules`` submodules, each importing the one before it."""
    package = folder / "bigpkg"
    package.mkdir()
    (package / "__init__.py").write_text(f"from .m{modules - 1} import f\n")
    for i in range(modules):
        body = [f"from .m{i - 1} import f as previous" if i else "def previous(x):\n    return x"]
        body += [f"def f(x):\n    return previous(x) + {i}"]
        body += [f"def g{j}(x):\n    return x * {j}" for j in range(20)]
        (package / f"m{i}.py").write_text("\n\n".join(body) + "\n")


def local_code_measures(
    shell: Any,
    url: str,
    reps: int,
    measure: Callable[..., Any],
    wait_for_a_warm_kernel: Callable[[str], None],
) -> list[Any]:
    """The figures above and their bases, as ``measure(name, unit, samples, note)`` rows."""
    from didomagic import localcode
    from didomagic.api import default_pool

    def cell(code: str) -> float:
        started = time.perf_counter()
        result = shell.run_cell(f"%%remote --runner {url}\n{code}")
        elapsed = time.perf_counter() - started
        if not result.success:
            raise RuntimeError(f"bench cell failed: {result.error_in_exec}")
        return elapsed

    def fresh(code: str) -> float:
        default_pool().close()
        wait_for_a_warm_kernel(url)
        return cell(code)

    old_cwd, old_path = os.getcwd(), list(sys.path)
    with tempfile.TemporaryDirectory(prefix="didomagic-bench-code-") as tmp:
        folder = Path(tmp)
        (folder / "pyproject.toml").write_text("[project]\nname = 'bench'\n")
        make_package(folder)
        os.chdir(folder)
        sys.path.insert(0, str(folder))
        try:
            rounds = max(3, reps // 5)
            shell.run_cell("import bigpkg")
            package = {n: m for n, m in sys.modules.items() if n.partition(".")[0] == "bigpkg"}
            trivial_fresh, asked, pushed = [], [], []
            for _ in range(rounds):  # interleaved, so the host's load weighs on each alike
                for name in package:
                    del sys.modules[name]
                trivial_fresh.append(fresh("x = 1"))
                # Bound to no name: a module bound by the cell would come back and be
                # imported in the notebook too, which is not what this measures.
                asked.append(fresh("y = __import__('bigpkg').f(1)"))
                sys.modules.update(package)
                pushed.append(fresh("y = bigpkg.f(1)"))
            for _ in range(3):
                cell("x = 1")
                cell("y = bigpkg.f(1)")
            trivial, unchanged = [], []
            for _ in range(reps):  # interleaved, as above
                trivial.append(cell("x = 1"))
                unchanged.append(cell("y = bigpkg.f(1)"))
            state = localcode.CodeState()
            first = localcode.bundle_for(state)
            assert first is not None and first.sources >= MODULES
            first.commit(state)
            check = []
            for _ in range(reps):
                started = time.perf_counter()
                assert localcode.bundle_for(state) is None
                check.append(time.perf_counter() - started)
        finally:
            default_pool().close()
            os.chdir(old_cwd)
            sys.path[:] = old_path
            for name in [n for n in sys.modules if n == "bigpkg" or n.startswith("bigpkg.")]:
                del sys.modules[name]
    return [
        measure(FRESH_TRIVIAL, "ms", trivial_fresh),
        measure(ASKED, "ms", asked, "the runner asks; one answer brings every module"),
        measure(PUSHED, "ms", pushed, "the modules travel with the cell"),
        measure(TRIVIAL, "ms", trivial),
        measure(UNCHANGED, "ms", unchanged),
        measure(CHECK, "ms", check),
    ]


FRESH_TRIVIAL = "didomagic: new session, trivial first cell (local-code base)"
ASKED = f"didomagic: new session, first cell importing {MODULES} local modules"
PUSHED = f"didomagic: new session, first cell, {MODULES} local modules sent"
TRIVIAL = "didomagic: trivial cell, same session (local-code base)"
UNCHANGED = f"didomagic: later cell, {MODULES} local modules unchanged"
CHECK = f"didomagic: notebook-side check, {MODULES} unchanged modules"


def local_code_bars(medians: dict[str, float]) -> list[tuple[str, float, str]]:
    """The extra milliseconds over the matching trivial cell, with their bars."""
    found = []
    for name, base, bar in ((ASKED, FRESH_TRIVIAL, "-"), (PUSHED, FRESH_TRIVIAL, "-")):
        if name in medians and base in medians:
            label = name.removeprefix("didomagic: ")
            found.append((f"{label} - its base (ms)", (medians[name] - medians[base]) * 1e3, bar))
    if UNCHANGED in medians and TRIVIAL in medians and CHECK in medians:
        extra = medians[UNCHANGED] - medians[TRIVIAL] + medians[CHECK]
        label = UNCHANGED.removeprefix("didomagic: ")
        found.append((f"{label} - trivial cell, no modules (ms)", extra * 1e3, "<= 3"))
    return found
