"""Limits per session, each exceeded by a real cell on a real runner started with the flag.

Every test checks three things: the message names the limit, the runner goes
on serving (a legitimate cell runs afterwards), and a second session on the
same runner is untouched. Mechanisms this host lacks skip with the reason.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys

import pytest
from IPython.utils.capture import capture_output

from didomagic import api
from didomagic.errors import CellTimeout, KernelDied, RemoteError
from runner import sandbox

from .conftest import skip_missing

HOST = sandbox.probe()


def remote(shell, url: str, cell: str):
    with capture_output() as cap:
        result = shell.run_cell(f"%%remote --runner {url}\n{cell}")
    return result, cap


class OtherSession:
    """A second notebook's session on the same runner, holding a value."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pool = api.SessionPool()
        api.run_cell(
            api.CellSpec("kept = 'other session'", sync=False), {}, runner=url, pool=self.pool
        )

    def still_there(self) -> bool:
        ns: dict[str, object] = {}
        api.run_cell(api.CellSpec("back = kept"), ns, runner=self.url, pool=self.pool)
        self.pool.close()
        return ns["back"] == "other session"


def test_check_sandbox_names_every_mechanism_and_how_limits_are_enforced():
    done = subprocess.run(
        [sys.executable, "-m", "runner", "--check-sandbox", "--memory-limit", "1G"],
        capture_output=True,
        text=True,
        check=True,
    )
    for mechanism in ("rlimits", "cgroups", "network namespace", "bubblewrap", "disk quota"):
        assert mechanism in done.stdout
    assert "memory limit 1 GiB via " in done.stdout
    print(done.stdout)  # shows in -rA / on failure: what this host offers


@pytest.mark.parametrize(
    "mechanism",
    [
        pytest.param(
            "cgroup",
            marks=pytest.mark.skipif(HOST.cgroups is None, reason="no writable cgroup here"),
        ),
        "rlimit",
    ],
)
def test_memory_limit_ends_the_cell_and_names_the_limit(shell, ns, runner_factory, mechanism):
    flags = ["--memory-limit", "300M"] + (["--no-cgroups"] if mechanism == "rlimit" else [])
    runner = runner_factory(*flags)
    with capture_output() as listing:
        shell.run_line_magic("runners", f"add {runner.url} --name boxed")
        shell.run_line_magic("runners", "--text")
    assert "memory limit 300 MiB" in listing.stdout  # %runners shows what a session may use
    shell.run_line_magic("runners", "remove boxed")
    other = OtherSession(runner.url)
    result, cap = remote(shell, runner.url, "big = b'x' * (700 << 20)")
    error = result.error_in_exec
    # A cgroup kills the kernel; RLIMIT_DATA makes the allocation fail instead.
    assert isinstance(error, KernelDied | RemoteError), cap.stdout
    assert re.search(r"memory limit (is )?300 MiB", str(error)), str(error)
    assert isinstance(error, KernelDied if mechanism == "cgroup" else RemoteError)
    assert "big" not in ns
    result, _ = remote(shell, runner.url, "after = 1 + 1")
    assert result.success and ns["after"] == 2
    assert other.still_there()


def test_cpu_time_limit_stops_the_kernel_and_names_the_limit(shell, ns, runner_factory):
    runner = runner_factory("--cpu-time-limit", "4")
    other = OtherSession(runner.url)
    result, _ = remote(shell, runner.url, "while True:\n    pass")
    error = result.error_in_exec
    assert isinstance(error, KernelDied) and "CPU time limit 4 s exceeded" in str(error)
    result, _ = remote(shell, runner.url, "after = 3")
    assert result.success and ns["after"] == 3
    assert other.still_there()


def test_max_file_size_fails_the_write_and_names_the_limit(shell, ns, runner_factory):
    runner = runner_factory("--max-file-size", "1M")
    result, _ = remote(
        shell,
        runner.url,
        "small = open('ok.bin', 'wb').write(b'x' * 1000)\n"
        "open('big.bin', 'wb').write(b'x' * (2 << 20))",
    )
    error = result.error_in_exec
    assert isinstance(error, RemoteError) and "max file size is 1 MiB (--max-file-size)" in str(
        error
    )
    assert ns["small"] == 1000  # what the cell bound before failing came back
    result, _ = remote(shell, runner.url, "import os\nsize = os.path.getsize('ok.bin')")
    assert result.success and ns["size"] == 1000  # same kernel, same scratch


def test_max_processes_refuses_forks_and_names_the_limit(shell, ns, runner_factory):
    if HOST.cgroups is None and HOST.root:
        pytest.skip("root without a writable cgroup: RLIMIT_NPROC does not bind root")
    runner = runner_factory("--max-processes", "40")
    other = OtherSession(runner.url)
    result, _ = remote(
        shell,
        runner.url,
        "import subprocess\nchildren = []\ntry:\n"
        "    for _ in range(200):\n"
        "        children.append(subprocess.Popen(['sleep', '60']))\n"
        "finally:\n"
        "    started = len(children)\n"
        "    for c in children:\n        c.kill(); c.wait()\n"
        "    del children",
    )
    error = result.error_in_exec
    assert isinstance(error, RemoteError), error
    assert "allows 40 processes per session (--max-processes)" in str(error)
    assert 0 < ns["started"] < 40
    result, _ = remote(shell, runner.url, "import subprocess\nrc = subprocess.call(['true'])")
    assert result.success and ns["rc"] == 0  # room again once they are gone
    assert other.still_there()


def test_disk_quota_stops_the_kernel_and_the_next_cell_starts_empty(shell, ns, runner_factory):
    runner = runner_factory("--disk-quota", "5M")
    other = OtherSession(runner.url)
    result, _ = remote(
        shell,
        runner.url,
        "import time\nwith open('fill.bin', 'wb') as f:\n"
        "    for _ in range(20):\n        f.write(b'x' * (1 << 20)); f.flush()\n"
        "time.sleep(60)",
    )
    error = result.error_in_exec
    assert isinstance(error, KernelDied) and "disk quota 5 MiB exceeded" in str(error)
    result, _ = remote(shell, runner.url, "import os\nleft = os.listdir('.')")
    assert result.success and ns["left"] == []
    assert other.still_there()


@pytest.mark.skipif(HOST.network is not None, reason=f"no network namespace: {HOST.network}")
def test_no_network_cuts_the_kernel_off_even_from_loopback(shell, ns, runner_factory):
    runner = runner_factory("--no-network")
    port = int(runner.url.split("/")[2].rsplit(":", 1)[1])
    result, _ = remote(
        shell,
        runner.url,
        "import socket\ntry:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
        "    reached = 'yes'\nexcept OSError as exc:\n    reached = str(exc)\n"
        "answer = 6 * 7",
    )
    assert result.success, result.error_in_exec
    assert "unreachable" in ns["reached"] and ns["answer"] == 42


def test_a_fresh_session_starts_in_an_empty_scratch_directory(shell, ns, runner_factory):
    runner = runner_factory()
    first = api.SessionPool()
    try:
        mine: dict[str, object] = {}
        api.run_cell(
            api.CellSpec(
                "import os, tempfile\nopen('left.txt', 'w').write('x')\n"
                "where = os.getcwd()\ntmp = tempfile.gettempdir()"
            ),
            mine,
            runner=runner.url,
            pool=first,
        )
        assert mine["tmp"] == mine["where"]  # temporary files count against the scratch
    finally:
        first.close()
    os.remove("left.txt")  # it came back into the notebook's folder, which the scratch mirrors
    result, _ = remote(shell, runner.url, "import os\nseen = os.listdir('.')\nhere = os.getcwd()")
    assert result.success and ns["seen"] == [] and ns["here"] != mine["where"]


def test_bwrap_shows_the_kernel_only_its_environment_and_scratch(shell, ns, runner_factory):
    if HOST.bwrap is not None:
        skip_missing(f"no bubblewrap: {HOST.bwrap}")
    runner = runner_factory("--sandbox", "bwrap")
    other = OtherSession(runner.url)  # another session's scratch exists on the host now
    result, _ = remote(
        shell,
        runner.url,
        f"import os, sys\nstate_seen = os.path.exists({str(runner.state_dir)!r})\n"
        "kernel_dir = os.path.dirname(os.getcwd())\n"
        "neighbours = os.listdir(os.path.dirname(kernel_dir))\n"
        "mine = os.path.basename(kernel_dir)\n"
        "open('written.txt', 'w').write('scratch is writable')\n"
        "write_env = os.access(sys.prefix, os.W_OK)\nwrite_etc = os.access('/etc', os.W_OK)",
    )
    assert result.success, result.error_in_exec
    assert ns["state_seen"] is False  # nothing of the runner's own files
    assert ns["neighbours"] == [ns["mine"]]  # no other session's directory
    assert ns["write_env"] is False and ns["write_etc"] is False
    with capture_output():  # interrupts reach a kernel inside bubblewrap
        result = shell.run_cell(
            f"%%remote --runner {runner.url} --timeout 1\nimport time\ntime.sleep(30)"
        )
    assert isinstance(result.error_in_exec, CellTimeout)
    assert other.still_there()


def _box(tmp_path, host: sandbox.Host, **limits) -> sandbox.Box:
    from runner.limits import Limits

    return sandbox.Box(Limits(**limits), host, "didomagic-0-test", tmp_path, tmp_path)


def test_without_cgroups_memory_and_processes_fall_back_to_rlimits(tmp_path):
    import json

    host = sandbox.Host(rlimits=True, cgroups=None, bwrap="absent", network="absent", root=False)
    box = _box(tmp_path, host, memory=1 << 30, processes=50, cpu_time=9)
    spec = json.loads(box.prefix[box.prefix.index("--") - 1])
    assert spec["rlimits"]["RLIMIT_DATA"] == [1 << 30, 1 << 30]
    assert spec["rlimits"]["RLIMIT_NPROC"][0] > 50  # per user: what runs now, plus 50
    assert spec["rlimits"]["RLIMIT_CPU"] == [9, 9 + sandbox.CPU_GRACE]
    assert spec["rlimits"]["RLIMIT_CORE"] == [0, 0]
    assert "cgroup_procs" not in spec and box.interrupt_mode == "signal"


def test_limits_the_host_cannot_enforce_are_refused_with_the_reason():
    from runner.limits import Limits

    root = sandbox.Host(
        rlimits=True,
        cgroups=None,
        bwrap="'bwrap' is not on PATH",
        network="no namespaces here",
        root=True,
    )
    with pytest.raises(sandbox.SandboxUnavailable, match="RLIMIT_NPROC does not bind root"):
        sandbox.check(Limits(processes=10), root)
    with pytest.raises(sandbox.SandboxUnavailable, match="--no-network: no namespaces here"):
        sandbox.check(Limits(no_network=True), root)
    with pytest.raises(sandbox.SandboxUnavailable, match="--sandbox bwrap: 'bwrap' is not"):
        sandbox.check(Limits(sandbox="bwrap"), root)


def test_bwrap_binds_only_the_environment_read_only_and_the_session_dirs(tmp_path):
    scratch, private = tmp_path / "scratch", tmp_path / "private"
    argv = sandbox.bwrap_argv(scratch, private, no_network=True)
    pairs = list(itertools.pairwise(argv))
    first_bind = min(i for i, a in enumerate(argv) if a.startswith("--ro-bind"))
    assert argv.index("--tmpfs") < first_bind  # else /tmp would hide an environment under it
    assert ("--bind", str(scratch)) in pairs and ("--bind", str(private)) in pairs
    assert ("--ro-bind", sys.prefix) in pairs and ("--tmpfs", "/tmp") in pairs
    assert "--share-net" not in argv and "--unshare-all" in argv
    assert "--share-net" in sandbox.bwrap_argv(scratch, private, no_network=False)
    binds = [b for a, b in pairs if a in ("--bind", "--ro-bind", "--ro-bind-try")]
    assert not any(b in ("/", "/home", "/root") for b in binds)


def test_the_runner_refuses_to_start_with_a_limit_the_host_lacks(tmp_path):
    import os

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path),
            "--sandbox",
            "bwrap",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        env={**os.environ, "PATH": str(tmp_path / "no-tools-here")},  # so no bwrap
    )
    assert done.returncode != 0 and done.stdout == ""
    assert "cannot start: --sandbox bwrap:" in done.stderr


def test_cgroup_v2_groups_get_their_limits_and_report_what_hit_them(tmp_path):
    """The v2 file layout, on a plain directory (this host may only have v1)."""
    from runner import cgroups

    hierarchy = cgroups.Hierarchy(2, tmp_path, tmp_path)
    groups = cgroups.KernelGroups(hierarchy, "didomagic-1-k1", memory=1 << 30, processes=64)
    group = tmp_path / "didomagic-1-k1"
    assert (group / "memory.max").read_text() == str(1 << 30)
    assert (group / "memory.swap.max").read_text() == "0"
    assert (group / "pids.max").read_text() == "64"
    assert groups.procs_files == [str(group / "cgroup.procs")]
    assert not groups.memory_exceeded() and not groups.processes_exceeded()
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
    (group / "pids.events").write_text("max 3\n")
    assert groups.memory_exceeded() and groups.processes_exceeded()
