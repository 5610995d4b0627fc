"""didomagic and its baselines, measured side by side in one run.

    python3 dev.py bench                    # the full suite (about 10 minutes; 1 GB arrays)
    python3 dev.py bench --quick            # the same measurements, small and few
    python3 dev.py bench --only relay,cells # some groups only (names: GROUPS below)

Prints a table of medians, p90s and the bars of issue 16 as ratios, each
marked met or not, and writes the same as JSON (``--json PATH``, default
``benchmarks/results.json``). Groups, in the order they run:

- ``baselines``: a bare jupyter_client ``execute`` round trip to a local
  kernel, ipyparallel with one local engine (``view.execute``, push, pull),
  a TLS websocket stream with ``websockets`` and a plain blocking TLS socket
  stream between two processes;
- ``cells``: the trivial warm ``%%remote`` cell, a new session's first cell,
  1,000 small variables, concurrent sessions, the embedded runner from nothing;
- ``transfer``: arrays into a cell and returned, an unchanged re-run;
- ``relay``: the same runner through a mediator's relay and direct
  (:mod:`benchmarks.relay`);
- ``features``: local modules and file reads in use, each feature's cost to
  the trivial cell when unused, remote widget messages per second
  (:mod:`benchmarks.features`);
- ``packages``: cached and cold package environments (:mod:`benchmarks.packages`);
- ``mediator``: the mediator at scale, 500 runners and 5,000 waiting sessions
  (:mod:`benchmarks.mediator_scale`).

didomagic is measured through the real ``%%remote`` magic in an IPython
shell, against real runner and mediator processes. docs/performance.md says
what each row and bar means.
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
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import mediator_scale
from benchmarks.features import feature_bars
from benchmarks.localcode import local_code_bars, local_code_measures
from benchmarks.packages import package_measures, package_ratios
from benchmarks.relay import relay_bars, relay_measures
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


WARM_KERNELS = 2
"""Kernels the benchmark's runners keep started and waiting."""


def start_runner(
    *extra: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A runner on a free port with two warm kernels (plus ``extra`` flags); its URL.

    ``cwd``: the checkout it runs from (first on its ``PYTHONPATH``); ``env``: added
    to its environment.
    """
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
            str(WARM_KERNELS),
            "--max-sessions",
            "16",
            "--log-level",
            "WARNING",
            "--remove-state-on-exit",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=None
        if cwd is None and env is None
        else {
            **os.environ,
            **({"PYTHONPATH": str(cwd)} if cwd is not None else {}),
            **(env or {}),
        },
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


class Didomagic:
    """The shared notebook shell and runner of the didomagic groups, started on first use."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._url = ""
        self._shell: Any = None

    @property
    def url(self) -> str:
        """The runner's URL (a runner with defaults, two warm kernels)."""
        if self._process is None:
            self._process, self._url = start_runner()
        return self._url

    @property
    def pid(self) -> int:
        """The runner's process id."""
        assert self.url and self._process is not None
        return self._process.pid

    @property
    def shell(self) -> Any:
        """An IPython shell with didomagic loaded, progress display off."""
        if self._shell is None:
            from IPython.testing.globalipapp import start_ipython

            self._shell = start_ipython()
            self._shell.run_line_magic("load_ext", "didomagic")
            os.environ["DIDOMAGIC_PROGRESS"] = "none"
        return self._shell

    def cell(self, code: str, options: str = "") -> None:
        """Run one ``%%remote`` cell on the runner; a failure stops the benchmark."""
        result = self.shell.run_cell(f"%%remote --runner {self.url} {options}\n{code}")
        if not result.success:
            raise RuntimeError(f"bench cell failed: {result.error_in_exec}")

    def close(self) -> None:
        """Close the sessions and stop the runner."""
        if self._process is not None:
            from didomagic.api import default_pool

            default_pool().close()
            stop(self._process)
            self._process = None


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a runner or mediator this benchmark started."""
    process.terminate()
    process.wait(timeout=60)


INTERLEAVED_IPP = "baseline: ipyparallel view.execute, interleaved with the trivial cell"


def trivial_beside_ipyparallel(dm: Didomagic, reps: int) -> list[Measure]:
    """The trivial cell and ipyparallel's ``view.execute``, one after the other in each round.

    This host's speed drifts by tens of percent within a minute; taken in turns, both
    see the same drift, so their ratio holds where two separate runs would not.
    """
    try:
        engine = Ipp()
    except ImportError:
        engine = None
    ours: list[float] = []
    theirs: list[float] = []
    try:
        for rep in range(reps + 3):
            ipp_time = (
                timed(lambda: engine.view.execute("x = 1", block=True), 1, 0) if engine else []
            )
            cell_time = timed(lambda: dm.cell("x = 1"), 1, 0)
            if rep >= 3:  # warm-up rounds
                ours += cell_time
                theirs += ipp_time
    finally:
        if engine is not None:
            engine.close()
    out = [Measure("didomagic: trivial warm %%remote cell (x = 1)", "ms", ours)]
    if theirs:
        out.append(Measure(INTERLEAVED_IPP, "ms", theirs))
    return out


def cell_measures(dm: Didomagic, reps: int) -> list[Measure]:
    """The trivial cell, a new session's first cell, 1,000 small variables, concurrency."""
    from didomagic.api import default_pool

    url = dm.url
    dm.cell("x = 1")  # the session takes a warm kernel; the runner starts another
    _wait_for_a_warm_kernel(url, WARM_KERNELS)  # no kernel booting beside the measure
    out = trivial_beside_ipyparallel(dm, reps)
    new: list[float] = []
    for _ in range(max(2, reps // 10)):
        default_pool().close()
        _wait_for_a_warm_kernel(url, WARM_KERNELS)
        new += timed(lambda: dm.cell("x = 1"), 1, warmup=0)
    out.append(Measure("didomagic: first cell of a new session (warm pool)", "ms", new))
    ns = dm.shell.user_ns
    for i in range(1000):
        ns[f"v{i}"] = i
    many = "sum([" + ", ".join(f"v{i}" for i in range(1000)) + "])"
    out.append(
        Measure(
            "didomagic: a cell reading 1,000 small variables",
            "ms",
            timed(lambda: dm.cell(f"total = {many}"), max(3, reps // 5)),
        )
    )
    for i in range(1000):
        del ns[f"v{i}"]
    out.append(concurrent_sessions(url, 8, max(5, reps // 2)))
    return out


def transfer_measures(dm: Didomagic, sizes: list[int]) -> list[Measure]:
    """Arrays into a cell and returned, an unchanged re-run, the runner's memory meanwhile."""
    ns = dm.shell.user_ns
    dm.cell("import numpy as np")
    out = []
    for size in sizes:
        ns["a"] = np.ones(size // 8)
        idle = _rss(dm.pid, "VmRSS")
        sends = []
        for rep in range(3):
            ns["a"][0] = rep  # changed in place each time: the whole array travels
            sends += timed(lambda: dm.cell("n = a.nbytes"), 1, warmup=0)
        peak = _rss(dm.pid, "VmHWM") - idle
        out.append(
            Measure(f"didomagic: {_mb(size)} array into a cell", "MB/s", _rates(size, sends))
        )
        rerun = timed(lambda: dm.cell("n = a.nbytes"), 3, warmup=0)
        out.append(Measure(f"didomagic: re-run with the {_mb(size)} input unchanged", "ms", rerun))
        out.append(
            Measure(f"didomagic: peak runner RSS over idle, {_mb(size)} in", "MB", [peak / 1e6])
        )
        del ns["a"]
        dm.cell(f"big = np.ones({size // 8})\ndel a")
        # Changed in place by each cell, so it all comes back whatever the unchanged check does.
        back = timed(lambda: dm.cell("big[0] += 1", "--no-sync --pull big"), 3, warmup=0)
        out.append(Measure(f"didomagic: {_mb(size)} array returned", "MB/s", _rates(size, back)))
        ns.pop("big", None)
        dm.cell("del big", "--no-sync")
    return out


def feature_measures(
    dm: Didomagic, reps: int, quick: bool, failures: dict[str, str]
) -> list[Measure]:
    """Local modules and file reads in use, every feature's cost unused, the widget rate.

    A widget cell that never ends goes into ``failures``; the group's other
    rows are kept.
    """
    from benchmarks.features import unused_costs, widget_rates
    from benchmarks.files_bench import file_read_measures
    from didomagic.api import default_pool

    out = local_code_measures(dm.shell, dm.url, reps, Measure, _wait_for_a_warm_kernel)
    out += file_read_measures(dm.shell, dm.url, 20_000_000 if quick else 100_000_000)
    default_pool().close()
    out += unused_costs(dm.shell, dm.url, reps)
    out += widget_rates(dm.url, 200 if quick else 2000, failures)
    return out


def websocket_path_measures(shell: Any, size: int) -> list[Measure]:
    """The same array in and out on a ``--no-bulk`` runner: the websocket path, for the A/B."""
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


def _wait_for_a_warm_kernel(url: str, count: int = 1, timeout: float = 60.0) -> None:
    """Ask the runner until ``count`` kernels are started and waiting (its info says)."""
    from didomagic.client import query
    from didomagic.loop import background_loop
    from didomagic.urls import ConnectionURL

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info, _ = background_loop().run(query(ConnectionURL.parse(url)))
        if info.runners and info.runners[0].get("warm_kernels", 0) >= count:
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
            cwd=tempfile.mkdtemp(prefix="didomagic-bench-nb-"),  # a folder with nothing in it
        )
        samples.append(float(out.stdout.strip().splitlines()[-1]))
    return Measure("didomagic: first cell, embedded runner from nothing", "ms", samples)


# --------------------------------------------------------------------------- report


def ratios(measures: list[Measure]) -> list[tuple[str, float, str]]:
    """Every bar (issue 16) as a ratio or a difference from this run: (what, value, bar).

    A row appears when the measures it needs are in the run (``--only`` leaves
    some groups out).
    """
    by = {m.name: m for m in measures}
    found = []

    def get(prefix: str) -> Measure | None:
        return next((m for n, m in by.items() if n.startswith(prefix)), None)

    trivial = get("didomagic: trivial")
    ipp = get(INTERLEAVED_IPP) or get("baseline: ipyparallel view.execute")
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
    found += relay_bars(measures)
    found += local_code_bars({m.name: m.median for m in measures})
    found += feature_bars(measures)
    found += package_ratios(measures)
    found += mediator_scale.bars_of(measures)
    return found


def meets(value: float, bar: str) -> bool | None:
    """Whether ``value`` meets a bar such as ``<= 1.2`` or ``>= 0.8``; None for ``-``."""
    for op, test in (
        ("<=", float.__le__),
        (">=", float.__ge__),
        ("<", float.__lt__),
        (">", float.__gt__),
    ):
        if bar.startswith(op):
            return bool(test(float(value), float(bar[len(op) :])))
    return None


def show(measures: list[Measure], bars: list[tuple[str, float, str]]) -> str:
    """The table: every measure, then every ratio with its bar and whether it is met."""
    lines = [f"{'measure':<72} {'median':>10} {'p90':>10}  unit"]
    for m in measures:
        scale = 1e3 if m.unit == "ms" else 1
        lines.append(f"{m.name:<72} {m.median * scale:>10.2f} {m.p90 * scale:>10.2f}  {m.unit}")
    lines.append("")
    lines.append(f"{'ratio (same run)':<72} {'value':>10}  {'bar':<8} met")
    for what, value, bar in bars:
        met = {True: "yes", False: "NO", None: ""}[meets(value, bar)]
        lines.append(f"{what:<72} {value:>10.2f}  {bar:<8} {met}".rstrip())
    return "\n".join(lines)


GROUPS = ("baselines", "cells", "transfer", "relay", "features", "packages", "mediator")
"""The parts of the suite, in the order they run (``--only`` picks some)."""


def run_group(group: str, dm: Didomagic, quick: bool, failures: dict[str, str]) -> list[Measure]:
    """The measures of one group; what could not be measured goes into ``failures``."""
    reps = 10 if quick else 50
    sizes = [20_000_000] if quick else [100_000_000, 1_000_000_000]
    if group == "baselines":
        out = [bare_jupyter_client(reps), *ipyparallel_measures(reps, sizes)]
        out.append(raw_websocket_throughput(sizes[-1]))
        out.append(
            Measure(
                f"baseline: raw blocking TLS socket, {_mb(sizes[-1])} in 1 MiB writes",
                "MB/s",
                _rates(sizes[-1], blocking_tls_throughput(sizes[-1])),
            )
        )
        return out
    if group == "cells":
        out = cell_measures(dm, reps)
        return [*out, first_cell_from_nothing(1 if quick else 3)]
    if group == "transfer":
        return [*transfer_measures(dm, sizes), *websocket_path_measures(dm.shell, sizes[-1])]
    if group == "relay":
        return relay_measures(dm.shell, reps, sizes[-1])
    if group == "features":
        return feature_measures(dm, reps, quick, failures)
    if group == "packages":
        return package_measures(reps)
    assert group == "mediator"
    return mediator_scale.measures(mediator_scale.run(*((20, 200) if quick else (500, 5000))))


def _groups(text: str) -> list[str]:
    chosen = [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in chosen if g not in GROUPS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown group {', '.join(unknown) or '(none)'}; choose from {', '.join(GROUPS)}"
        )
    return chosen


def main(argv: list[str] | None = None) -> int:
    """Run the groups asked for, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and few: about a minute")
    parser.add_argument(
        "--only",
        type=_groups,
        default=list(GROUPS),
        metavar="GROUP[,GROUP]",
        help=f"run only these groups ({', '.join(GROUPS)}; default: all)",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results.json")
    args = parser.parse_args(argv)
    measures: list[Measure] = []
    durations: dict[str, float] = {}
    failures: dict[str, str] = {}
    dm = Didomagic()
    try:
        for group in (g for g in GROUPS if g in args.only):
            started = time.perf_counter()
            try:
                measures += run_group(group, dm, args.quick, failures)
            except Exception as exc:  # the other groups still run; the exit status says so
                traceback.print_exc()
                failures[group] = f"{type(exc).__name__}: {exc}"
            durations[group] = time.perf_counter() - started
            if group in ("cells", "transfer", "features"):
                from didomagic.api import default_pool

                default_pool().close()  # the next group starts from no open session
    finally:
        dm.close()
    bars = ratios(measures)
    print(show(measures, bars))
    print("\nseconds per group: " + ", ".join(f"{g} {s:.0f}" for g, s in durations.items()))
    for what, why in failures.items():
        print(f"NOT MEASURED: {what}: {why}")
    machine = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "quick": args.quick,
        "groups": list(durations),
        "seconds": durations,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "machine": machine,
                "measures": [asdict(m) | {"median": m.median, "p90": m.p90} for m in measures],
                "ratios": [
                    {"what": w, "value": v, "bar": b, "met": meets(v, b)} for w, v, b in bars
                ],
                "failures": failures,
            },
            indent=2,
        )
    )
    print(f"\nwritten to {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
