"""A/B of the runner's event loop: uvloop against asyncio's (``DIDOMAGIC_NO_UVLOOP=1``).

::

    .venv/bin/python -m benchmarks.event_loops_ab [--size BYTES] [--rounds N] [--no-relay]

Starts one runner on each loop and measures them in turns, round after round
(interleaved, each first every other round, so a busy machine weighs on both
alike): the trivial cell, a value of ``--size`` bytes into a cell and returned.
Then the same through a mediator's relay, a mediator on each loop (with its
runner on uvloop). The notebook side stays on its default loop throughout.
Prints medians per loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench import start_runner, timed
from didomagic import api, eventloops
from didomagic.loop import background_loop

LOOPS = {"uvloop": "", "asyncio": "1"}
"""Each loop and the value of DIDOMAGIC_NO_UVLOOP that selects it."""


@contextmanager
def loop_env(value: str) -> Iterator[None]:
    """DIDOMAGIC_NO_UVLOOP set to ``value`` for the processes started inside."""
    before = os.environ.get(eventloops.DISABLE_ENV)
    os.environ[eventloops.DISABLE_ENV] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(eventloops.DISABLE_ENV, None)
        else:
            os.environ[eventloops.DISABLE_ENV] = before


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time process ``pid`` has used (all its threads, no children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(url: str, pool: api.SessionPool, size: int, pid: int) -> dict[str, float]:
    """On ``url``: the trivial cell (median of 20, ms); ``size`` bytes in and out (MB/s), and
    the CPU time process ``pid`` (the runner, or the relaying mediator) spent per GB of them.
    CPU time says more than wall time on a busy machine."""
    ns: dict[str, Any] = {}

    def cell(code: str, **spec: Any) -> None:
        api.run_cell(api.CellSpec(code, **spec), ns, runner=url, pool=pool)

    trivial = statistics.median(timed(lambda: cell("x = 1"), 20, warmup=3)) * 1e3
    cell("import numpy as np")
    ns["a"] = np.ones(size // 8)
    ns["a"][0] = time.time()  # content no session has seen: the whole array travels
    cpu = cpu_seconds(pid)
    into = timed(lambda: cell("n = a.nbytes"), 1, warmup=0)[0]
    cpu_in = (cpu_seconds(pid) - cpu) / (size / 1e9)
    ns.clear()
    cell(f"big = np.ones({size // 8})\nbig[0] = __import__('time').time()\ndel a", sync=False)
    cpu = cpu_seconds(pid)
    back = timed(lambda: cell("pass", pull=("big",), sync=False), 1, warmup=0)[0]
    cpu_out = (cpu_seconds(pid) - cpu) / (size / 1e9)
    ns.clear()
    cell("del big", sync=False)
    return {
        "trivial ms": trivial,
        "in MB/s": size / into / 1e6,
        "out MB/s": size / back / 1e6,
        "CPU s/GB in": cpu_in,
        "CPU s/GB out": cpu_out,
    }


def compare(urls: dict[str, tuple[str, int]], size: int, rounds: int, what: str) -> None:
    """Interleave ``rounds`` rounds over ``urls`` (one URL and the pid to watch per loop)
    and print the medians."""
    pools = {name: api.SessionPool() for name in urls}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
    try:
        for n in range(rounds):
            order = list(urls) if n % 2 == 0 else list(reversed(urls))  # neither always first
            for name in order:
                url, pid = urls[name]
                results[name].append(one_round(url, pools[name], size, pid))
    finally:
        for pool in pools.values():
            pool.close()
    for name, rows in results.items():
        medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        shown = ", ".join(
            f"{k} {v:.2f}" if "CPU" in k else f"{k} {v:.1f}" for k, v in medians.items()
        )
        print(f"{what}, {name:8s}: {shown}   ({rounds} rounds, {size / 1e6:g} MB)", flush=True)


def wait_for_pool(url: str, timeout: float = 60.0) -> None:
    """Ask the mediator at ``url`` until a runner is up in its pool."""
    from didomagic.client import query
    from didomagic.urls import ConnectionURL

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runners = background_loop().run(query(ConnectionURL.parse(url)))[0].runners
        if any(r.get("status") == "up" for r in runners):
            return
        time.sleep(0.2)
    raise RuntimeError(f"no runner came up at {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-relay", action="store_true")
    args = parser.parse_args(argv)
    os.environ["DIDOMAGIC_PROGRESS"] = "none"
    background_loop()  # the notebook side's loop, made before the variable changes
    processes = []
    try:
        urls = {}
        for name, value in LOOPS.items():
            with loop_env(value):
                process, url = start_runner()
            processes.append(process)
            urls[name] = (url, process.pid)
        compare(urls, args.size, args.rounds, "direct")
        if not args.no_relay:
            from tests.conftest import start_mediator

            relayed = {}
            for name, value in LOOPS.items():
                tmp = Path(tempfile.mkdtemp(prefix="didomagic-bench-mediator-"))
                mediator = start_mediator(tmp, env={eventloops.DISABLE_ENV: value})
                processes.append(mediator.process)
                with loop_env(""):
                    process, _ = start_runner("--mediator", mediator.runner_url, "--name", name)
                processes.append(process)
                relayed[name] = (mediator.url, mediator.process.pid)
                wait_for_pool(mediator.url)
            compare(relayed, args.size, args.rounds, "relay (mediator's loop)")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
