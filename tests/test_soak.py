"""Soak: 20 concurrent sessions x 50 cells with values both ways on one real runner.

Nothing may be lost or cross between sessions, and the runner's memory must
come back near where it started once the sessions have closed.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from didomagic import api

from .conftest import kernel_count, rss, wait_until

SESSIONS = 20
CELLS = 50


def session(url: str, index: int, failures: list[str]) -> None:
    pool = api.SessionPool()
    try:
        api.run_cell(api.CellSpec(f"mine = {index}", sync=False), {}, runner=url, pool=pool)
        for cell in range(CELLS):
            payload = os.urandom(10_000 + index * 100 + cell)
            ns: dict[str, object] = {"x": (index, cell, payload)}
            if cell % 10 == 9:  # now and then a large array: the cached path
                ns["arr"] = np.full(300_000, index * 1000 + cell, dtype=np.float64)
                code = "y = (mine, x, float(arr[0]))\narr = arr + 1"
            else:
                code = "y = (mine, x, len(x[2]))"
            api.run_cell(api.CellSpec(code), ns, runner=url, pool=pool)
            third = float(index * 1000 + cell) if "arr" in ns else len(payload)
            if ns["y"] != (index, (index, cell, payload), third):
                failures.append(f"session {index} cell {cell}: got {ns['y']!r:.80}")
            if "arr" in ns and ns["arr"][0] != index * 1000 + cell + 1:  # type: ignore[index]
                failures.append(f"session {index} cell {cell}: array came back wrong")
    except Exception as exc:  # reported by the test, with the session it happened in
        failures.append(f"session {index}: {type(exc).__name__}: {exc}")
    finally:
        pool.close()


def test_twenty_sessions_of_fifty_cells_lose_and_cross_nothing(runner_factory):
    runner = runner_factory("--max-sessions", str(SESSIONS), "--warm-kernels", str(SESSIONS))
    pid = runner.process.pid
    wait_until(lambda: kernel_count(pid) >= SESSIONS, "the warm kernels", timeout=180)
    start = rss(pid)
    failures: list[str] = []
    threads = [
        threading.Thread(target=session, args=(runner.url, i, failures)) for i in range(SESSIONS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a session hung"
    assert failures == []
    log = runner.log
    assert log.count(" opened from ") == SESSIONS
    assert log.count(" ok in ") == SESSIONS * (CELLS + 1)
    wait_until(lambda: runner.log.count(" closed\n") == SESSIONS, "every session to close")
    # The runner collects a stopped kernel's leftovers a moment after it stops.
    wait_until(
        lambda: rss(pid) < start + (48 << 20),
        f"runner memory to come back within 48 MiB of its start ({start / 1e6:.0f} MB)",
        timeout=15,
    )
    print(f"\nrunner RSS: {start / 1e6:.0f} MB before, {rss(pid) / 1e6:.0f} MB after")
