"""didomagic and its baselines, measured side by side in one run.

    python3 dev.py bench            # the full suite (a few minutes; 1 GB arrays)
    python3 dev.py bench --quick    # the same measurements, small and few (under a minute)

Prints a table of medians, p90s and ratios and writes the same as JSON
(``--json PATH``, default ``benchmarks/results.json``). Baselines: a bare
jupyter_client ``execute`` round trip to a local kernel, ipyparallel with one
local engine (``view.execute``, push and pull), and raw TLS websocket loopback
throughput with ``websockets``. didomagic is measured through the real
``%%remote`` magic in an IPython shell, against a real runner process. The
mediator at scale (:mod:`benchmarks.mediator_scale`: 500 runners, 5,000
waiting sessions) closes the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import mediator_scale
from benchmarks.localcode import local_code_bars, local_code_measures
from benchmarks.packages import package_measures, package_ratios
from benchmarks.tls_baseline import blocking_tls_throughput

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Measure:
    """One row of the table: samples in seconds (or a rate / a size)."""

    name: str
    unit: str
    samples: list[float]
    note: str = ""
    ratio: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def timed(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


# --------------------------------------------------------------------------- baselines


def bare_jupyter_client(reps: int) -> Measure:
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3", transport="ipc", ip=tempfile.mktemp())
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    try:
        samples = timed(lambda: kc.execute_interactive("x = 1", timeout=30), reps, warmup=3)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return Measure("baseline: jupyter_client execute round trip", "ms", samples)


class Ipp:
    """One local ipyparallel engine."""

    def __init__(self) -> None:
        import ipyparallel as ipp

        self.cluster = ipp.Cluster(n=1, log_level=40)
        self.client = self.cluster.start_and_connect_sync()
        self.client.wait_for_engines(1, timeout=60)
        self.view = self.client[0]

    def close(self) -> None:
        self.client.close()
        self.cluster.stop_cluster_sync()


def ipyparallel_measures(reps: int, sizes: list[int]) -> list[Measure]:
    try:
        ipp_engine = Ipp()
    except ImportError:
        return []
    out = []
    try:
        view = ipp_engine.view
        out.append(
            Measure(
                "baseline: ipyparallel view.execute round trip",
                "ms",
                timed(lambda: view.execute("x = 1", block=True), reps, warmup=3),
            )
        )
        for size in sizes:
            a = np.ones(size // 8)
            push = timed(lambda a=a: view.push({"a": a}, block=True), 3)
            view.execute(f"b = __import__('numpy').ones({size // 8})", block=True)
            pull = timed(lambda: view.pull("b", block=True), 3)
            out.append(
                Measure(f"baseline: ipyparallel push {_mb(size)}", "MB/s", _rates(size, push))
            )
            out.append(
                Measure(f"baseline: ipyparallel pull {_mb(size)}", "MB/s", _rates(size, pull))
            )
            del a
            view.execute("del a, b", block=True)
    finally:
        ipp_engine.close()
    return out


def _sink_server(certfile: str, keyfile: str, total: int, message: int, ports: Any) -> None:
    """(A separate process.) A TLS websocket server that says "done" after ``total`` bytes."""
    from websockets.asyncio.server import serve

    from runner import certs

    async def main() -> None:
        async def sink(ws: Any) -> None:
            received = 0
            async for frame in ws:
                received += len(frame)
                if received >= total:
                    await ws.send("done")
                    received = 0

        context = certs.server_context(Path(certfile), Path(keyfile))
        async with serve(
            sink,
            "127.0.0.1",
            0,
            ssl=context,
            compression=None,
            max_size=2 * message,
            write_limit=4 * message,
        ) as server:
            ports.put(next(iter(server.sockets)).getsockname()[1])
            await asyncio.Future()

    asyncio.run(main())


def raw_websocket_throughput(total: int, message: int = 1 << 20) -> Measure:
    """Client → server (another process), TLS on loopback, ``websockets``, 1 MiB messages."""
    import multiprocessing
    import ssl

    from websockets.asyncio.client import connect

    from runner import certs

    count = max(1, total // message)
    total = count * message  # what is actually sent
    directory = Path(tempfile.mkdtemp())
    certfile, keyfile, _ = certs.generate(directory, ["127.0.0.1"])
    payload = memoryview(np.ones(message // 8).view(np.uint8))
    ports: Any = multiprocessing.Queue()
    server = multiprocessing.Process(
        target=_sink_server, args=(str(certfile), str(keyfile), total, message, ports), daemon=True
    )
    server.start()
    port = ports.get(timeout=60)

    async def main() -> list[float]:
        client_ctx = ssl.create_default_context(cafile=str(certfile))
        client_ctx.check_hostname = False
        async with connect(
            f"wss://127.0.0.1:{port}",
            ssl=client_ctx,
            compression=None,
            max_size=2 * message,
            write_limit=4 * message,
        ) as ws:
            samples = []
            for _ in range(3):
                started = time.perf_counter()
                for _ in range(count):
                    await ws.send(payload)
                await ws.recv()
                samples.append(time.perf_counter() - started)
            return samples

    try:
        samples = asyncio.run(main())
    finally:
        server.terminate()
        server.join()
    return Measure(
        f"baseline: raw TLS websocket, {_mb(total)} in 1 MiB messages",
        "MB/s",
        _rates(total, samples),
    )


# --------------------------------------------------------------------------- didomagic


def start_runner(*extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """A runner on a free port with two warm kernels (plus ``extra`` flags); its URL."""
    state = tempfile.mkdtemp(prefix="didomagic-bench-")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runner",
            "--port",
            "0",
            "--state-dir",
            state,
            "--warm-kernels",
            "2",
            "--max-sessions",
            "16",
            "--log-level",
            "WARNING",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    return process, process.stdout.readline().decode().strip()


def _rss(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e9:g} GB" if n >= 1e9 else f"{n / 1e6:g} MB"


def _rates(size: int, seconds: list[float]) -> list[float]:
    return [size / s / 1e6 for s in seconds]


def didomagic_measures(reps: int, sizes: list[int], url: str, pid: int) -> list[Measure]:
    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    shell.run_line_magic("load_ext", "didomagic")
    os.environ["DIDOMAGIC_PROGRESS"] = "none"
    ns = shell.user_ns

    def cell(code: str) -> None:
        result = shell.run_cell(f"%%remote --runner {url}\n{code}")
        if not result.success:
            raise RuntimeError(f"bench cell failed: {result.error_in_exec}")

    out = [
        Measure(
            "didomagic: trivial warm %%remote cell (x = 1)",
            "ms",
            timed(lambda: cell("x = 1"), reps, warmup=3),
        )
    ]

    from didomagic.api import default_pool

    def new_session() -> None:
        default_pool().close()
        _wait_for_a_warm_kernel(url)
        started = time.perf_counter()
        cell("x = 1")
        new.append(time.perf_counter() - started)

    new: list[float] = []
    for _ in range(max(2, reps // 10)):
        new_session()
    out.append(Measure("didomagic: first cell of a new session (warm pool)", "ms", new))

    cell("import numpy as np")
    for size in sizes:
        ns["a"] = np.ones(size // 8)
        idle = _rss(pid, "VmRSS")
        sends = []
        for rep in range(3):
            ns["a"][0] = rep  # changed in place each time: the whole array travels
            sends += timed(lambda: cell("n = a.nbytes"), 1, warmup=0)
        peak = _rss(pid, "VmHWM") - idle
        out.append(
            Measure(f"didomagic: {_mb(size)} array into a cell", "MB/s", _rates(size, sends))
        )
        rerun = timed(lambda: cell("n = a.nbytes"), 3, warmup=0)
        out.append(Measure(f"didomagic: re-run with the {_mb(size)} input unchanged", "ms", rerun))
        out.append(
            Measure(f"didomagic: peak runner RSS over idle, {_mb(size)} in", "MB", [peak / 1e6])
        )
        del ns["a"]
        cell(f"big = np.ones({size // 8})\ndel a")
        back = timed(
            lambda: shell.run_cell(f"%%remote --runner {url} --no-sync --pull big\npass"),
            3,
            warmup=0,
        )
        out.append(Measure(f"didomagic: {_mb(size)} array returned", "MB/s", _rates(size, back)))
        ns.pop("big", None)
        cell("del big")

    for i in range(1000):
        ns[f"v{i}"] = i
    many = "sum([" + ", ".join(f"v{i}" for i in range(1000)) + "])"
    out.append(
        Measure(
            "didomagic: a cell reading 1,000 small variables",
            "ms",
            timed(lambda: cell(f"total = {many}"), max(3, reps // 5)),
        )
    )
    for i in range(1000):
        del ns[f"v{i}"]
    out.append(concurrent_sessions(url, 8, max(5, reps // 2)))
    out += local_code_measures(shell, url, reps, Measure, _wait_for_a_warm_kernel)
    from benchmarks.files_bench import file_read_measures

    out += file_read_measures(shell, url, min(sizes[0], 100_000_000))
    default_pool().close()
    return out


def websocket_path_measures(size: int) -> list[Measure]:
    """The same array in and out on a ``--no-bulk`` runner: the websocket path, for the A/B."""
    from IPython import get_ipython
    from IPython.testing.globalipapp import start_ipython

    shell = get_ipython() or start_ipython()  # (the one the didomagic group started)
    process, url = start_runner("--no-bulk")

    def cell(code: str, flags: str = "") -> None:
        if not shell.run_cell(f"%%remote --runner {url} {flags}\n{code}").success:
            raise RuntimeError(f"bench cell failed: {code}")

    try:
        cell("import numpy as np")
        shell.user_ns["a"] = np.ones(size // 8)
        sends = []
        for rep in range(3):
            shell.user_ns["a"][0] = rep
            sends += timed(lambda: cell("n = a.nbytes"), 1, warmup=0)
        cell(f"big = np.ones({size // 8})\ndel a", "--no-sync")
        back = timed(lambda: cell("pass", "--no-sync --pull big"), 3, warmup=0)
    finally:
        shell.user_ns.pop("a", None)
        shell.user_ns.pop("big", None)
        process.terminate()
        process.wait(timeout=60)
    return [
        Measure(f"didomagic --no-bulk: {_mb(size)} in (websocket)", "MB/s", _rates(size, sends)),
        Measure(f"didomagic --no-bulk: {_mb(size)} out (websocket)", "MB/s", _rates(size, back)),
    ]


def _wait_for_a_warm_kernel(url: str, timeout: float = 60.0) -> None:
    """Ask the runner until it has a kernel started and waiting (it says so in its info)."""
    from didomagic.client import query
    from didomagic.loop import background_loop
    from didomagic.urls import ConnectionURL

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info, _ = background_loop().run(query(ConnectionURL.parse(url)))
        if info.runners and info.runners[0].get("warm_kernels", 0) >= 1:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the runner had no warm kernel within {timeout:g} s")


def concurrent_sessions(url: str, sessions: int, cells: int) -> Measure:
    from didomagic.api import RemoteSession
    from didomagic.protocol import Execute
    from didomagic.urls import ConnectionURL

    parsed = ConnectionURL.parse(url)
    opened = [RemoteSession(parsed) for _ in range(sessions)]
    for s in opened:
        s.execute(Execute("w", "x = 1"), [], lambda o: None)
    barrier = threading.Barrier(sessions + 1)

    def work(session: RemoteSession) -> None:
        barrier.wait()
        for i in range(cells):
            session.execute(Execute(f"c{i}", "x = 1", fetch=("x",)), [], lambda o: None)

    threads = [threading.Thread(target=work, args=(s,)) for s in opened]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for s in opened:
        s.close()
    return Measure(
        f"didomagic: {sessions} concurrent sessions of trivial cells",
        "cells/s",
        [sessions * cells / elapsed],
    )


def first_cell_from_nothing(reps: int) -> Measure:
    script = (
        "import time, os\n"
        "os.environ.pop('DIDOMAGIC_RUNNER', None); os.environ['DIDOMAGIC_PROGRESS'] = 'none'\n"
        "from IPython.testing.globalipapp import start_ipython\n"
        "shell = start_ipython(); shell.run_line_magic('load_ext', 'didomagic')\n"
        "started = time.perf_counter()\n"
        "assert shell.run_cell('%%remote\\nx = 1').success\n"
        "print(time.perf_counter() - started)\n"
        "from didomagic.api import default_pool; default_pool().close()\n"
    )
    samples = []
    for _ in range(reps):
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            cwd=tempfile.gettempdir(),
        )
        samples.append(float(out.stdout.strip().splitlines()[-1]))
    return Measure("didomagic: first cell, embedded runner from nothing", "ms", samples)


# --------------------------------------------------------------------------- report


def ratios(measures: list[Measure]) -> list[tuple[str, float, str]]:
    """The bars (issue 16) as ratios from this run: (what, value, bar)."""
    by = {m.name: m for m in measures}
    found = []

    def get(prefix: str) -> Measure | None:
        return next((m for n, m in by.items() if n.startswith(prefix)), None)

    trivial = get("didomagic: trivial")
    ipp = get("baseline: ipyparallel view.execute")
    bare = get("baseline: jupyter_client")
    if trivial and ipp:
        found.append(
            ("trivial cell / ipyparallel view.execute", trivial.median / ipp.median, "<= 1.2")
        )
    if trivial and bare:
        found.append(
            ("trivial cell / bare jupyter_client execute", trivial.median / bare.median, "-")
        )
    new = get("didomagic: first cell of a new session")
    if trivial and new:
        found.append(("new session first cell / trivial cell", new.median / trivial.median, "< 10"))
    raw = get("baseline: raw TLS websocket")
    blocking = get("baseline: raw blocking TLS socket")
    for m in measures:
        if m.name.endswith("array into a cell") or m.name.endswith("array returned"):
            size = m.name.split(": ")[1].split(" array")[0]
            direction = "push" if "into" in m.name else "pull"
            peer = get(f"baseline: ipyparallel {direction} {size}")
            if peer:
                found.append(
                    (f"{m.name} / ipyparallel {direction}", m.median / peer.median, ">= 2")
                )
            if raw:
                found.append((f"{m.name} / raw TLS websocket", m.median / raw.median, "-"))
            if blocking:
                found.append(
                    (f"{m.name} / raw blocking TLS socket", m.median / blocking.median, ">= 0.75")
                )
        if m.name.startswith("didomagic: re-run") and trivial:
            found.append(
                (f"{m.name} - trivial cell (ms)", (m.median - trivial.median) * 1e3, "<= 50")
            )
        if m.name.startswith("didomagic: a cell reading 1,000") and trivial:
            found.append(
                (
                    "1,000 small variables - trivial cell (ms)",
                    (m.median - trivial.median) * 1e3,
                    "<= 30",
                )
            )
    return found + local_code_bars({m.name: m.median for m in measures})


def show(measures: list[Measure], bars: list[tuple[str, float, str]]) -> str:
    lines = [f"{'measure':<64} {'median':>10} {'p90':>10}  unit"]
    for m in measures:
        scale = 1e3 if m.unit == "ms" else 1
        lines.append(f"{m.name:<64} {m.median * scale:>10.2f} {m.p90 * scale:>10.2f}  {m.unit}")
    lines.append("")
    lines.append(f"{'ratio (same run)':<72} {'value':>8}  bar")
    for what, value, bar in bars:
        lines.append(f"{what:<72} {value:>8.2f}  {bar}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and few: under a minute")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results.json")
    args = parser.parse_args(argv)
    reps = 10 if args.quick else 50
    sizes = [20_000_000] if args.quick else [100_000_000, 1_000_000_000]
    measures: list[Measure] = [bare_jupyter_client(reps)]
    measures += ipyparallel_measures(reps, sizes)
    raw_size = sizes[-1] if args.quick else 1_000_000_000
    measures.append(raw_websocket_throughput(raw_size))
    measures.append(
        Measure(
            f"baseline: raw blocking TLS socket, {_mb(raw_size)} in 1 MiB writes",
            "MB/s",
            _rates(raw_size, blocking_tls_throughput(raw_size)),
        )
    )
    process, url = start_runner()
    try:
        measures += didomagic_measures(reps, sizes, url, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
    measures += websocket_path_measures(sizes[-1])
    measures += package_measures(reps)
    measures.append(first_cell_from_nothing(1 if args.quick else 3))
    scale = mediator_scale.run(*((20, 200) if args.quick else (500, 5000)))
    measures += mediator_scale.measures(scale)
    bars = ratios(measures) + package_ratios(measures) + mediator_scale.bars(scale)
    print(show(measures, bars))
    machine = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "quick": args.quick,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": machine,
                "measures": [asdict(m) | {"median": m.median, "p90": m.p90} for m in measures],
                "ratios": [{"what": w, "value": v, "bar": b} for w, v, b in bars],
            },
            indent=2,
        )
    )
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
