"""Several runners: descriptions, %runners, tag and OS matching, least-loaded choice, queues.

Real runner processes on loopback, reached directly (the mediator has its own
module).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading

import pytest
from IPython.utils.capture import capture_output

import didomagic
from didomagic.api import RemoteSession, SessionPool
from didomagic.client import open_connection, query
from didomagic.config import Config
from didomagic.errors import NoMatchingRunner, RunnerBusy
from didomagic.loop import background_loop
from didomagic.progress import TextProgress
from didomagic.protocol import Execute
from didomagic.urls import ConnectionURL

from .conftest import TIMEOUT


def describe(url: str) -> dict:
    info, latency = background_loop().run(query(ConnectionURL.parse(url)))
    assert info.role == "runner" and latency > 0
    return info.runners[0]


@pytest.fixture
def config(private_config):
    """An empty runner list for one test."""
    private_config.unlink(missing_ok=True)
    yield Config()
    private_config.unlink(missing_ok=True)


def test_a_runner_describes_itself_without_taking_a_slot(runner_factory):
    runner = runner_factory("--tags", "gpu,a100", "--max-sessions", "1", "--max-queue", "3")
    d = describe(runner.url)
    assert d["name"] == "r" and d["tags"] == ["gpu", "a100"] and d["status"] == "up"
    assert d["os"] == "linux" and d["arch"] and d["python"].count(".") == 2
    assert d["cpus"] >= 1 and 0 < d["memory_free"] <= d["memory_total"]
    assert isinstance(d["gpus"], list)  # nvidia-smi decides; none on a machine without it
    assert (d["sessions"], d["max_sessions"], d["queue"], d["max_queue"]) == (0, 1, 0, 3)
    # A query takes no slot: the one slot is still free for a session.
    connection = background_loop().run(open_connection(ConnectionURL.parse(runner.url)))
    try:
        assert connection.welcome.runner["sessions"] == 1
        assert describe(runner.url)["sessions"] == 1
    finally:
        background_loop().run(connection.close())


def test_runners_add_list_remove(shell, ns, runner_factory, config, private_config):
    gpu = runner_factory("--tags", "gpu", name="gpubox")
    with capture_output() as cap:
        shell.run_line_magic("runners", f"add {gpu.url}")  # the name comes from the runner
        shell.run_line_magic("runners", "add wss://127.0.0.1:1/#token=t --name gone")
    assert "added gpubox" in cap.stdout
    assert stat.S_IMODE(private_config.stat().st_mode) == 0o600
    saved = json.loads(private_config.read_text())["runners"]
    assert [r["name"] for r in saved] == ["gpubox", "gone"]
    with capture_output() as cap:
        shell.run_line_magic("runners", "--text")
    table = cap.stdout
    header, up, down = table.splitlines()[:3]
    for column in ("NAME", "ADDRESS", "TAGS", "STATUS", "LATENCY", "OS", "CPUS", "GPUS", "QUEUE"):
        assert column in header
    assert "gpubox" in up and "gpu" in up and "up" in up and "linux/" in up and " ms" in up
    assert "gone" in down and "unreachable" in down
    with capture_output() as cap:
        shell.run_line_magic("runners", "remove gone")
    assert [e.name for e in Config().entries] == ["gpubox"]
    with capture_output() as cap:
        result = shell.run_cell("%runners remove nosuch")
    assert "No runner called 'nosuch'" in str(result.error_in_exec) and "gpubox" in str(
        result.error_in_exec
    )
    with capture_output() as cap:
        result = shell.run_cell("%runners frobnicate")
    assert not result.success and "%runners add URL" in cap.stderr + cap.stdout


def test_tags_and_os_choose_the_runner(shell, ns, runner_factory, config):
    cpu = runner_factory("--tags", "cpu", name="cpubox")
    gpu = runner_factory("--tags", "gpu,a100", name="gpubox")
    config.add("cpubox", ConnectionURL.parse(cpu.url))
    config.add("gpubox", ConnectionURL.parse(gpu.url))
    where = "import os\nwhere = os.environ['DIDOMAGIC_RUNNER_NAME']"
    for options, expected in [
        ("--tags gpu", "gpubox"),
        ("--tags a100,gpu", "gpubox"),
        ("--tags cpu --os linux", "cpubox"),
        ("--runner cpubox", "cpubox"),
    ]:
        result = shell.run_cell(f"%%remote {options}\n{where}")
        assert result.success, result.error_in_exec
        assert ns["where"] == expected, options
    with capture_output():
        result = shell.run_cell("%%remote --tags tpu\nx = 1")
    error = result.error_in_exec
    assert isinstance(error, NoMatchingRunner)
    assert "No runner has the tag tpu" in str(error)
    assert "cpubox [cpu] linux: up" in str(error) and "gpubox [gpu,a100] linux: up" in str(error)
    with capture_output():
        result = shell.run_cell("%%remote --tags gpu --os windows\nx = 1")
    assert isinstance(result.error_in_exec, NoMatchingRunner) and "OS windows" in str(
        result.error_in_exec
    )


def test_the_least_loaded_match_wins(runner_factory, config):
    a = runner_factory("--tags", "gpu", "--max-sessions", "2", name="a")
    b = runner_factory("--tags", "gpu", "--max-sessions", "2", name="b")
    config.add("a", ConnectionURL.parse(a.url))
    config.add("b", ConnectionURL.parse(b.url))
    busy = RemoteSession(ConnectionURL.parse(a.url))
    busy.execute(Execute("c0", "x = 1"), [], lambda output: None)  # a: 1 of 2 slots used
    try:
        pool = SessionPool()
        chosen = pool.session(tags=("gpu",))
        chosen.execute(Execute("c1", "x = 1"), [], lambda output: None)
        assert chosen.runner_name == "b"
        # The open session on b is reused while it matches: remote state carries over.
        assert pool.session(tags=("gpu",)) is chosen
        pool.close()
    finally:
        busy.close()


class _QueueWatch(TextProgress):
    """Text progress that also signals each queue position it shows."""

    def __init__(self) -> None:
        super().__init__(stream=__import__("io").StringIO())
        self.positions: list[int] = []
        self.changed = threading.Condition()

    def queued(self, position: int) -> None:
        super().queued(position)
        with self.changed:
            self.positions.append(position)
            self.changed.notify_all()

    def wait_for(self, positions: list[int]) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.positions == positions, TIMEOUT), (
                self.positions
            )


def test_a_full_runner_queues_in_order_then_refuses(runner_factory):
    runner = runner_factory("--max-sessions", "1", "--max-queue", "2", "--warm-kernels", "2")
    url = ConnectionURL.parse(runner.url)
    first = RemoteSession(url)
    first.execute(Execute("c0", "x = 1"), [], lambda output: None)
    watches = [_QueueWatch(), _QueueWatch()]
    sessions = [RemoteSession(url), RemoteSession(url)]
    order: list[int] = []
    threads = []

    def run(i: int) -> None:
        sessions[i].execute(Execute(f"q{i}", "x = 1"), [], lambda output: None, watches[i])
        order.append(i)

    threads.append(threading.Thread(target=run, args=(0,)))
    threads[0].start()
    watches[0].wait_for([1])
    threads.append(threading.Thread(target=run, args=(1,)))
    threads[1].start()
    watches[1].wait_for([2])
    # Queue full: the next one is refused at once, naming both limits.
    with pytest.raises(RunnerBusy, match=r"--max-sessions.*--max-queue 2"):
        RemoteSession(url).execute(Execute("c9", "x = 1"), [], lambda output: None)
    assert "queued (position 1)" in watches[0].stream.getvalue()
    first.close()  # the first in line gets the slot; the second moves up
    threads[0].join(TIMEOUT)
    assert order == [0]
    watches[1].wait_for([2, 1])
    sessions[0].close()
    threads[1].join(TIMEOUT)
    assert order == [0, 1]
    sessions[1].close()


def test_a_runner_without_a_queue_refuses_at_once(runner_factory):
    runner = runner_factory("--max-sessions", "1")
    url = ConnectionURL.parse(runner.url)
    holder = RemoteSession(url)
    holder.execute(Execute("c0", "x = 1"), [], lambda output: None)
    try:
        with pytest.raises(RunnerBusy, match="queues none"):
            background_loop().run(open_connection(url))
    finally:
        holder.close()


def test_run_and_run_async_call_a_function_remotely(runner_factory):
    runner = runner_factory(name="fn")
    pool = SessionPool()

    def scale(x, factor=2):
        import os

        return x * factor, os.environ["DIDOMAGIC_RUNNER_NAME"]

    assert didomagic.run(scale, 21, runner=runner.url, pool=pool) == (42, "fn")
    assert didomagic.run(scale, 2, factor=5, runner=runner.url, pool=pool) == (10, "fn")

    def fails():
        raise ValueError("bad input 7")

    with pytest.raises(ValueError, match="bad input 7") as info:
        didomagic.run(fails, runner=runner.url, pool=pool)
    note = "\n".join(info.value.__notes__)
    assert "Remote traceback (runner fn)" in note and "in fails" in note

    async def together():
        return await asyncio.gather(
            didomagic.run_async(scale, 1, runner=runner.url, pool=pool),
            didomagic.run_async(scale, 2, runner=runner.url, pool=pool),
        )

    assert asyncio.run(together()) == [(2, "fn"), (4, "fn")]
    pool.close()


def test_the_magics_and_the_api_agree_on_the_default(shell, ns, runner_factory, config):
    one = runner_factory(name="one")
    config.add("one", ConnectionURL.parse(one.url))
    with capture_output() as cap:
        shell.run_line_magic("runners", "use one")
    assert "now run on one" in cap.stdout
    try:
        result = shell.run_cell("%%remote\nimport os\nwhere = os.environ['DIDOMAGIC_RUNNER_NAME']")
        assert result.success and ns["where"] == "one"
        assert didomagic.run(lambda: __import__("os").environ["DIDOMAGIC_RUNNER_NAME"]) == "one"
        with capture_output():
            result = shell.run_cell("%runners use nosuch")
        assert "No runner called 'nosuch'" in str(result.error_in_exec)
    finally:
        with capture_output():
            shell.run_line_magic("runners", "use --clear")


def _fake_nvidia_smi(tmp_path, monkeypatch) -> str:
    """An ``nvidia-smi`` on PATH that answers like one with a single H100 (no GPU here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 81559, 1024'\n")
    script.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    monkeypatch.setenv("PATH", path)
    return path


def test_gpus_are_reported_from_nvidia_smi(runner_factory, tmp_path, monkeypatch, shell, config):
    from didomagic.runners_view import text_table
    from runner import resources

    _fake_nvidia_smi(tmp_path, monkeypatch)
    assert resources.gpus() == [
        {
            "index": 0,
            "name": "NVIDIA H100 80GB HBM3",
            "memory_total": 81559 << 20,
            "memory_used": 1024 << 20,
        }
    ]
    runner = runner_factory("--tags", "gpu", name="h100")  # inherits the PATH
    assert describe(runner.url)["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    config.add("h100", ConnectionURL.parse(runner.url))
    table = text_table(didomagic.runners())
    assert "NVIDIA H100 80GB HBM3 (85.5 GB)" in table


def test_the_runner_table_widget_sets_the_default(runner_factory, config):
    from didomagic.runners_view import RunnerTable

    a = runner_factory(name="a")
    config.add("a", ConnectionURL.parse(a.url))
    config.add("gone", ConnectionURL.parse("wss://127.0.0.1:1/#token=t"))
    chosen = []
    table = RunnerTable(didomagic.runners(), None, chosen.append)
    assert table.buttons["a"].description == "Use" and table.buttons["gone"].disabled
    table.buttons["a"].click()
    assert chosen == ["a"] and table.buttons["a"].description == "Default"
    assert "cells without --runner or --tags run on" in table.note.value
    assert "* a" in table._repr_mimebundle_()["text/plain"]
