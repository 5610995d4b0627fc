"""The embedded default runner, in a separate process as a notebook kernel would use it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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


def test_first_cell_starts_a_private_runner_that_stops_with_the_kernel(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DIDOMAGIC_RUNNER"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=4 * TIMEOUT,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("started an embedded runner on 127.0.0.1:") == 1  # once, then reused
    assert "RESULT 42 42" in out
    pid, state_dir = out.split("RUNNER ")[1].split()
    assert not os.path.exists(state_dir)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)
