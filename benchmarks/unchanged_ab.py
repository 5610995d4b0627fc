"""A/B: re-running a cell whose large input is unchanged, interleaved between runners.

    python3 -m benchmarks.unchanged_ab                     # clean-page check on vs off
    python3 -m benchmarks.unchanged_ab --baseline /work/main   # and a runner from that checkout

Each runner gets its own session holding the same array; rounds alternate
between them (trivial cell, then the re-run), so a loaded machine slows both
alike. Prints medians, the re-run's cost over the trivial cell, and what the
notebook's own hash of the input costs alone (the part a re-run cannot skip).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import numpy as np

from benchmarks.bench import start_runner, timed
from didomagic import serialize
from didomagic.versions import version


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=1e9, help="bytes of the array")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--baseline", type=Path, help="also a runner from this checkout")
    args = parser.parse_args(argv)

    here = Path(__file__).resolve().parent.parent
    setups = {"check on": (here, {}), "check off": (here, {"DIDOMAGIC_PAGEMAP": "off"})}
    if args.baseline is not None:
        setups["baseline"] = (args.baseline.resolve(), {})
    runners = {
        name: start_runner("--warm-kernels", "1", cwd=cwd, env=env)
        for name, (cwd, env) in setups.items()
    }
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    shell.run_line_magic("load_ext", "didomagic")
    os.environ["DIDOMAGIC_PROGRESS"] = "none"
    shell.user_ns["a"] = np.ones(int(args.size) // 8)

    def cell(url: str, code: str) -> None:
        result = shell.run_cell(f"%%remote --runner {url}\n{code}")
        if not result.success:
            raise RuntimeError(f"cell failed: {result.error_in_exec}")

    trivial: dict[str, list[float]] = {name: [] for name in runners}
    rerun: dict[str, list[float]] = {name: [] for name in runners}
    hashed: list[float] = []  # the notebook's own hash of the input: what a re-run must pay
    packed = serialize.pack("a", shell.user_ns["a"])
    try:
        for _, url in runners.values():
            timed(lambda url=url: cell(url, "x = 1"), 3)
            cell(url, "n = a.nbytes")  # a travels once
        for _ in range(args.rounds):
            for name, (_, url) in runners.items():
                trivial[name] += timed(lambda url=url: cell(url, "x = 1"), 1, warmup=0)
                rerun[name] += timed(lambda url=url: cell(url, "n = a.nbytes"), 1, warmup=0)
            hashed += timed(lambda: version(packed.parts), 1, warmup=0)
        print(f"{args.size / 1e9:g} GB input, {args.rounds} interleaved rounds (medians, ms)")
        for name in runners:
            t, r = statistics.median(trivial[name]), statistics.median(rerun[name])
            print(
                f"  {name:10} trivial {t * 1e3:6.1f}  re-run {r * 1e3:6.1f}  +{(r - t) * 1e3:5.1f}"
            )
        print(f"  the notebook's hash of the input alone: {statistics.median(hashed) * 1e3:.1f}")
    finally:
        for process, _ in runners.values():
            process.terminate()
        for process, _ in runners.values():
            process.wait(timeout=60)


if __name__ == "__main__":
    main()
