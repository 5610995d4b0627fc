"""The embedded default runner, in a separate process as a notebook kernel would use it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import TIMEOUT

SCRIPT = textwrap.dedent("""
    from IPython.testing.globalipapp import start_ipython
    ip = start_ipython()
    ip.run_line_magic("load_ext", "didomagic")
    ip.run_cell("base = 40")
    ip.run_cell("%%remote\\nanswer = base + 2")
    ip.run_cell("%%remote\\nagain = answer")
    from didomagic.api import default_pool
    embedded = default_pool()._embedded
    print("RESULT", ip.user_ns["answer"], ip.user_ns["again"])
    print("RUNNER", embedded.process.pid, embedded.state_dir)
""")


def run_notebook_process(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as a fresh notebook process would, with no $DIDOMAGIC_RUNNER; it must pass."""
    env = {k: v for k, v in os.environ.items() if k != "DIDOMAGIC_RUNNER"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=4 * TIMEOUT,
        env=env,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_first_cell_starts_a_private_runner_that_stops_with_the_kernel(tmp_path):
    done = run_notebook_process(SCRIPT, tmp_path)
    out = done.stdout
    assert out.count("started an embedded runner on 127.0.0.1:") == 1  # once, then reused
    assert "RESULT 42 42" in out
    pid, state_dir = out.split("RUNNER ")[1].split()
    assert not os.path.exists(state_dir)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)


RESTART = textwrap.dedent("""
    import os, signal
    from IPython.testing.globalipapp import start_ipython
    ip = start_ipython()
    ip.run_line_magic("load_ext", "didomagic")
    from didomagic.api import default_pool
    ip.run_cell("%%remote\\nfirst = 1")
    embedded = default_pool()._embedded
    old_pid, old_state = embedded.process.pid, embedded.state_dir
    os.kill(old_pid, signal.SIGKILL)
    embedded.process.wait()
    ip.run_cell("%%remote\\nsecond = 2")
    new = default_pool()._embedded
    print("RESULT", ip.user_ns.get("second"), new.process.pid != old_pid)
    print("OLD", old_state, os.path.exists(old_state))
    print("SESSION", os.getsid(new.process.pid) != os.getsid(os.getpid()))
    default_pool().close()
    print("NEW", new.state_dir, os.path.exists(new.state_dir))
""")


def test_a_dead_embedded_runner_is_replaced_by_the_next_cell_with_one_notice(tmp_path):
    done = run_notebook_process(RESTART, tmp_path)
    out = done.stdout
    assert "RESULT 2 True" in out, out + done.stderr
    assert out.count("the embedded runner had stopped, so started a new one") == 1
    assert "SESSION True" in out  # its own session: the kernel's SIGINT never reaches it
    assert out.split("NEW ")[1].split()[1] == "False"  # a stopped runner leaves no state


def test_remove_state_on_exit_leaves_no_token_or_key_behind(tmp_path):
    from .conftest import start_runner

    runner = start_runner(tmp_path, "--remove-state-on-exit", "--warm-kernels", "0")
    assert any(runner.state_dir.iterdir())  # its token, certificate and key
    assert runner.stop() == 0, runner.log
    assert not runner.state_dir.exists()
