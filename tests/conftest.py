"""Shared fixtures: real runner processes and an IPython shell with didomagic loaded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

TIMEOUT = 30.0 * float(os.environ.get("DIDOMAGIC_TEST_TIMEOUT_SCALE", "1"))
"""The one timeout scale of the suite, in seconds (raise it on slow machines)."""


@dataclass
class RunnerProcess:
    """A ``didomagic-runner`` subprocess and what it printed."""

    process: subprocess.Popen[bytes]
    url: str
    state_dir: Path
    log_path: Path

    @property
    def log(self) -> str:
        """Everything the runner has logged so far."""
        return self.log_path.read_text()

    def stop(self) -> int:
        """SIGTERM, then wait; return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=TIMEOUT)
        finally:
            if self.process.stdout:
                self.process.stdout.close()


def start_runner(tmp: Path, *args: str, env: dict[str, str] | None = None) -> RunnerProcess:
    """Start ``didomagic-runner --port 0`` and wait for the connection URL it prints."""
    tmp.mkdir(parents=True, exist_ok=True)
    state = tmp / "state"
    log_path = tmp / "runner.log"
    command = [sys.executable, "-m", "runner", "--port", "0", "--state-dir", str(state), *args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()  # printed once listening
    if not line:
        process.wait(timeout=TIMEOUT)
        raise RuntimeError(f"runner did not start:\n{log_path.read_text()}")
    return RunnerProcess(process, line, state, log_path)


@pytest.fixture
def runner_factory(tmp_path: Path) -> Iterator[Callable[..., RunnerProcess]]:
    """Start runners on demand; every one is stopped (and must exit 0) at teardown."""
    started: list[RunnerProcess] = []

    def factory(*args: str, name: str = "r", **kw: dict[str, str]) -> RunnerProcess:
        runner = start_runner(tmp_path / f"{name}{len(started)}", "--name", name, *args, **kw)
        started.append(runner)
        return runner

    yield factory
    for runner in started:
        killed = runner.process.poll() is not None
        code = runner.stop()
        if not killed:
            assert code == 0, runner.log


@pytest.fixture(scope="module")
def module_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    """One runner shared by a test module (for tests that do not disturb it)."""
    runner = start_runner(
        tmp_path_factory.mktemp("runner"), "--name", "shared", "--warm-kernels", "2"
    )
    yield runner
    assert runner.stop() == 0, runner.log


@pytest.fixture(scope="session")
def shell():  # type: ignore[no-untyped-def]
    """An IPython shell with didomagic loaded (the same machinery as a notebook kernel)."""
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython()
    ip.run_line_magic("load_ext", "didomagic")
    yield ip
    from didomagic.api import default_pool

    default_pool().close()


@pytest.fixture
def ns(shell):  # type: ignore[no-untyped-def]
    """A clean user namespace for one test."""
    hidden = set(shell.user_ns_hidden)
    for name in [n for n in shell.user_ns if n not in hidden]:
        del shell.user_ns[name]
    return shell.user_ns
