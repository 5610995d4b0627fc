"""Through the mediator's relay and direct to the same runner, side by side in one run.

A real mediator and one real runner joined to it (``--mediator``), both
started from the command line. The same notebook shell runs its cells two
ways, interleaved so the host's load weighs on both alike: with the
mediator's client URL as ``--runner`` (the mediator picks the runner and
relays every byte of the session) and with the runner's own URL (direct).
Each way has its own session and kernel on the same runner.

Measured each way: the trivial warm cell, an array into a cell (changed in
place before each cell, so it all travels) and an array returned (changed
in place by the cell, so it all comes back). Bars (issue 16): the trivial
cell through the relay at most 1.3x the direct one, the transfers through
the relay at least 0.8x the direct rate, both directions.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

TRIVIAL = "relay: trivial warm cell"
INTO = "array into a cell"
BACK = "array returned"
ROUTES = ("through the mediator", "direct to the runner")
RELAYED, DIRECT = ROUTES


def start_mediator(state: str) -> tuple[subprocess.Popen[bytes], str, str]:
    """``didomagic-runner mediator`` on a free port; its client URL and its runner URL."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runner",
            "mediator",
            "--port",
            "0",
            "--state-dir",
            state,
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    client_url = process.stdout.readline().decode().strip()
    runner_url = process.stdout.readline().decode().strip()
    if not runner_url:
        process.wait(timeout=60)
        raise RuntimeError("the mediator did not start (its log went to stderr above)")
    return process, client_url, runner_url


def wait_until_up(client_url: str, name: str, timeout: float = 60.0) -> None:
    """Ask the mediator until the runner called ``name`` is registered and up."""
    from didomagic.client import query
    from didomagic.loop import background_loop
    from didomagic.urls import ConnectionURL

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info, _ = background_loop().run(query(ConnectionURL.parse(client_url)))
        if any(r.get("name") == name and r.get("status") == "up" for r in info.runners):
            return
        time.sleep(0.05)
    raise RuntimeError(f"runner {name} was not up at the mediator within {timeout:g} s")


def relay_measures(shell: Any, reps: int, size: int) -> list[Any]:
    """The rows above, each route beside the other (``benchmarks.bench.Measure``)."""
    from benchmarks.bench import Measure, _mb, _rates, start_runner, stop
    from didomagic.api import default_pool

    state = tempfile.TemporaryDirectory(prefix="didomagic-bench-mediator-")
    mediator, client_url, runner_url = start_mediator(state.name)
    runner = None
    try:
        runner, direct_url = start_runner("--mediator", runner_url, "--name", "bench-relayed")
        wait_until_up(client_url, "bench-relayed")
        urls = {RELAYED: client_url, DIRECT: direct_url}
        ns = shell.user_ns

        def cell(route: str, code: str, options: str = "") -> float:
            started = time.perf_counter()
            result = shell.run_cell(f"%%remote --runner {urls[route]} {options}\n{code}")
            elapsed = time.perf_counter() - started
            if not result.success:
                raise RuntimeError(f"bench cell failed ({route}): {result.error_in_exec}")
            return elapsed

        samples: dict[tuple[str, str], list[float]] = {}

        def interleaved(what: str, rounds: int, run: Any) -> None:
            for rep in range(rounds):  # each route goes first every other round
                for route in ROUTES if rep % 2 == 0 else ROUTES[::-1]:
                    samples.setdefault((what, route), []).append(run(route))

        for route in ROUTES:
            for _ in range(3):
                cell(route, "x = 1")
            cell(route, "import numpy as np")
        interleaved(TRIVIAL, reps, lambda route: cell(route, "x = 1"))
        ns["a"] = np.ones(size // 8)

        def send(route: str) -> float:
            ns["a"][0] += 1  # changed in place: the whole array travels
            return cell(route, "n = a.nbytes")

        interleaved(INTO, 3, send)
        del ns["a"]
        for route in ROUTES:
            cell(route, f"big = np.ones({size // 8})\ndel a")
        interleaved(BACK, 3, lambda route: cell(route, "big[0] += 1", "--no-sync --pull big"))
        ns.pop("big", None)
        for route in ROUTES:
            cell(route, "del big", "--no-sync")
    finally:
        default_pool().close()
        if runner is not None:
            stop(runner)
        stop(mediator)
        state.cleanup()
    rows = [Measure(f"{TRIVIAL}, {route}", "ms", samples[(TRIVIAL, route)]) for route in ROUTES]
    for what in (INTO, BACK):
        for route in ROUTES:
            rates = _rates(size, samples[(what, route)])
            rows.append(Measure(f"relay: {_mb(size)} {what}, {route}", "MB/s", rates))
    return rows


def relay_bars(measures: list[Any]) -> list[tuple[str, float, str]]:
    """Relay over direct, from this run's rows: the trivial cell's time and each rate."""
    by = {m.name: m for m in measures}
    found = []
    relayed, direct = by.get(f"{TRIVIAL}, {RELAYED}"), by.get(f"{TRIVIAL}, {DIRECT}")
    if relayed and direct:
        found.append(
            ("relay: trivial cell, mediator / direct", relayed.median / direct.median, "<= 1.3")
        )
    for name, m in by.items():
        if name.startswith("relay: ") and name.endswith(f", {RELAYED}") and m.unit == "MB/s":
            peer = by.get(name.removesuffix(RELAYED) + DIRECT)
            if peer:
                what = name.removeprefix("relay: ").removesuffix(f", {RELAYED}")
                found.append(
                    (f"relay: {what}, mediator / direct", m.median / peer.median, ">= 0.8")
                )
    return found
