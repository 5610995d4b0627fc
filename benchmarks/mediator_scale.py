"""The mediator at scale: hundreds of runners, thousands of waiting sessions.

    python -m benchmarks.mediator_scale [--runners 500] [--sessions 5000]

A real mediator process; this process plays every runner and every client
over real TLS websockets. Fake runners are light: they register a
description, and answer each :class:`~didomagic.protocol.Dial` by opening the
relay connection and then never welcoming the session, so every session stays
waiting at the mediator (relayed, unanswered) until the end.

Measured:

- **registration storm**: all runners dial in at once; seconds until the last
  is registered;
- **pick**: seconds from a client's hello to the chosen runner's Dial, one
  hello at a time. First during the ramp, as the waiting sessions grow from 0
  to ``--sessions`` (connections for the next hellos open meanwhile, and the
  mediator's garbage collector pauses as its heap grows); then
  up to :data:`STEADY` more with all of them waiting, each once the mediator is
  quiet (the figure the target, p99 under 10 ms, is about);
- **mediator memory**: its resident set after the storm and with every
  session waiting.

The mediator's connection and handshake limits (``--max-connections``,
``--max-handshakes``, where it has them) are raised to fit the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from didomagic.client import dial
from didomagic.protocol import (
    PROTOCOL_VERSION,
    Dial,
    Hello,
    Link,
    Register,
    Registered,
    Role,
    Session,
    cloudpickle_version,
    python_version,
)
from didomagic.urls import ConnectionURL
from runner.link import REGISTER_PATH, RELAY_PATH, TICKET_HEADER

STEADY = 500
"""Picks measured once every session waits (one at a time, each on a quiet mediator)."""

DIAL_WAIT = 30.0
"""Seconds a hello may wait for its Dial before the run counts as broken."""

CONNECTING = 16
"""Client connections opened ahead of the hello being measured."""


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class FakeRunners:
    """Many runner links in one event loop; each Dial opens a relay that is then left alone."""

    url: ConnectionURL
    slots: int
    dials: asyncio.Queue[float] = field(default_factory=asyncio.Queue)
    links: list[Any] = field(default_factory=list)
    relays: list[Any] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def register(self, index: int) -> None:
        """Dial in as runner ``index`` and register; then serve its link in the background."""
        ws = await dial(self.url, REGISTER_PATH)
        link = Link(Role.RUNNER)
        description = {
            "name": f"fake-{index}",
            "tags": ["bench"],
            "os": "linux",
            "python": python_version(),
            "cpus": 1,
            "status": "up",
            "sessions": 0,
            "max_sessions": self.slots,
            "queue": 0,
            "max_queue": 0,
        }
        await ws.send(link.send(Register(f"fake{index:08x}", description, 3600.0)))
        reply = link.receive(await ws.recv())
        assert isinstance(reply, Registered), reply
        self.links.append(ws)
        task = asyncio.create_task(self._serve(ws, link))
        self.tasks.add(task)

    async def _serve(self, ws: Any, link: Link) -> None:
        with contextlib.suppress(Exception):
            async for text in ws:
                message = link.receive(text)
                if isinstance(message, Dial):
                    self.dials.put_nowait(time.perf_counter())
                    task = asyncio.create_task(self._relay(message.ticket))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)

    async def _relay(self, ticket: str) -> None:
        self.relays.append(await dial(self.url, RELAY_PATH, {TICKET_HEADER: ticket}))


def _hello() -> str:
    session = Session(Role.CLIENT)
    return session.send(
        Hello(PROTOCOL_VERSION, python_version(), cloudpickle_version(), "bench", tags=("bench",))
    )


async def measure(
    client_url: ConnectionURL, runner_url: ConnectionURL, runners: int, sessions: int, pid: int
) -> dict[str, Any]:
    """Run the storm and the picks against the mediator at ``pid``; return the figures."""
    gc.disable()  # this process's own pauses are not the mediator's: keep them out
    steady_picks = steady_count(sessions)
    slots = -(-(sessions + steady_picks) // runners)  # enough that every pick succeeds
    fakes = FakeRunners(runner_url, slots)
    started = time.perf_counter()
    await asyncio.gather(*(fakes.register(i) for i in range(runners)))
    storm = time.perf_counter() - started
    after_storm = rss(pid)

    hello = _hello()
    opened: asyncio.Queue[Any] = asyncio.Queue(CONNECTING)
    clients: list[Any] = []

    async def open_all() -> None:
        for _ in range(sessions):
            await opened.put(await dial(client_url))

    async def pick(ws: Any) -> float:
        clients.append(ws)
        sent = time.perf_counter()
        await ws.send(hello)
        return await asyncio.wait_for(fakes.dials.get(), DIAL_WAIT) - sent

    async def settled(count: int) -> None:
        while len(fakes.relays) < count:  # every session so far relayed and waiting
            await asyncio.sleep(0.01)

    opener = asyncio.create_task(open_all())
    ramp = [await pick(await opened.get()) for _ in range(sessions)]
    await opener
    await settled(sessions)
    waiting = rss(pid)
    steady = []
    for _ in range(steady_picks):
        ws = await dial(client_url)
        await settled(len(clients))
        steady.append(await pick(ws))
    for ws in clients + fakes.relays + fakes.links:
        ws.transport.abort()
    for task in list(fakes.tasks):
        task.cancel()
    gc.enable()
    return {
        "runners": runners,
        "sessions": sessions,
        "registration_storm_s": storm,
        "ramp_pick_p50_s": percentile(ramp, 0.5),
        "ramp_pick_p99_s": percentile(ramp, 0.99),
        "ramp_pick_max_s": max(ramp),
        "ramp_pick_samples": ramp,
        "pick_p50_s": percentile(steady, 0.5),
        "pick_p99_s": percentile(steady, 0.99),
        "pick_max_s": max(steady),
        "pick_samples": steady,
        "mediator_rss_after_storm": after_storm,
        "mediator_rss_with_all_waiting": waiting,
    }


def steady_count(sessions: int) -> int:
    """How many picks are measured once every session waits."""
    return max(1, min(STEADY, sessions // 10))


def _room(runners: int, sessions: int) -> list[str]:
    """Connection limits raised for the run, where this mediator has such flags.

    Every session, the steady picks' too, holds two connections at the end
    (the client's and the runner's relay).
    """
    flags = subprocess.run(
        [sys.executable, "-m", "runner", "mediator", "--help"], capture_output=True, text=True
    ).stdout
    room = []
    for flag, value in (
        ("--max-connections", 2 * (sessions + steady_count(sessions)) + runners + 100),
        ("--max-handshakes", runners + 100),
    ):
        if flag in flags:
            room += [flag, str(value)]
    return room


def run(runners: int, sessions: int) -> dict[str, Any]:
    """Start a mediator, measure, stop it; the figures as a dict."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the mediator inherits it
    room = _room(runners, sessions)
    with tempfile.TemporaryDirectory() as state:
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
                *room,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        try:
            assert process.stdout is not None
            client_url = ConnectionURL.parse(process.stdout.readline().decode().strip())
            runner_url = ConnectionURL.parse(process.stdout.readline().decode().strip())
            idle = rss(process.pid)
            figures = asyncio.run(measure(client_url, runner_url, runners, sessions, process.pid))
            figures["mediator_rss_idle"] = idle
            return figures
        finally:
            stop(process)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


STOP_WAIT = 5.0
"""Seconds the mediator gets to stop by itself before it is killed."""


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after :data:`STOP_WAIT`: its shutdown is not what is measured.

    (With thousands of relayed sessions whose peers vanished, a graceful stop
    takes tens of seconds, most of a short run.)
    """
    process.terminate()
    try:
        process.wait(timeout=STOP_WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=60)


def report(figures: dict[str, Any]) -> str:
    """The figures in a few lines."""
    mb = 1 << 20
    return "\n".join(
        [
            f"mediator at scale: {figures['runners']} runners, {figures['sessions']} sessions",
            f"  registration storm        {figures['registration_storm_s']:8.2f} s",
            f"  pick, ramp p50/p99/max    {figures['ramp_pick_p50_s'] * 1e3:8.2f} / "
            f"{figures['ramp_pick_p99_s'] * 1e3:.2f} / {figures['ramp_pick_max_s'] * 1e3:.2f} ms",
            f"  pick, all waiting         {figures['pick_p50_s'] * 1e3:8.2f} / "
            f"{figures['pick_p99_s'] * 1e3:.2f} / {figures['pick_max_s'] * 1e3:.2f} ms",
            f"  mediator RSS idle         {figures['mediator_rss_idle'] / mb:8.1f} MB",
            f"  ... after the storm       {figures['mediator_rss_after_storm'] / mb:8.1f} MB",
            f"  ... all sessions waiting  {figures['mediator_rss_with_all_waiting'] / mb:8.1f} MB",
        ]
    )


def measures(figures: dict[str, Any]) -> list[Any]:
    """Rows for the benchmark suite's table (``benchmarks.bench.Measure``)."""
    from benchmarks.bench import Measure

    scale = f"{figures['runners']} runners, {figures['sessions']} sessions waiting"
    return [
        Measure(f"mediator: pick a runner ({scale})", "ms", figures["pick_samples"]),
        Measure(
            f"mediator: pick a runner, ramp to {figures['sessions']} waiting",
            "ms",
            figures["ramp_pick_samples"],
        ),
        Measure(
            f"mediator: registration storm of {figures['runners']} runners",
            "s",
            [figures["registration_storm_s"]],
        ),
        Measure(
            f"mediator: RSS with {figures['sessions']} sessions waiting",
            "MB",
            [figures["mediator_rss_with_all_waiting"] / 1e6],
        ),
    ]


def bars_of(measures: list[Any]) -> list[tuple[str, float, str]]:
    """The suite's pass marks from its rows: p99 pick under 10 ms, the storm under 5 s."""
    found = []
    for m in measures:
        if m.name.startswith("mediator: pick a runner ("):
            found.append(
                ("mediator pick a runner, p99 (ms)", percentile(m.samples, 0.99) * 1e3, "< 10")
            )
        elif m.name.startswith("mediator: registration storm"):
            found.append(("mediator registration storm (s)", m.median, "< 5"))
    return found


def main(argv: list[str] | None = None) -> int:
    """Measure and print; ``--json PATH`` writes the figures too."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    figures = run(args.runners, args.sessions)
    print(report(figures))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
