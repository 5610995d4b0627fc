"""Shared fixtures: real runner processes and an IPython shell with didomagic loaded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

SECRETS: set[str] = set()
"""Every token a runner or mediator of this test session printed."""

LOGS: list[Path] = []
"""Every runner's and mediator's log: none may contain any of :data:`SECRETS`."""

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
"""Set by CI: a test that needs a missing system package fails instead of skipping."""

TIMEOUT = 30.0 * float(os.environ.get("DIDOMAGIC_TEST_TIMEOUT_SCALE", "1"))
"""The one timeout scale of the suite, in seconds (raise it on slow machines)."""


def skip_missing(reason: str) -> NoReturn:
    """Skip a test whose system package is missing here; under ``CI=true`` fail instead.

    ``.ci/run`` installs every system package the suite needs, so in CI a
    missing one is a broken CI script, never a silently untested feature.
    """
    if IN_CI:
        pytest.fail(f"CI=true and {reason}: .ci/run must install it", pytrace=False)
    pytest.skip(reason)


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
        except subprocess.TimeoutExpired:
            self.process.kill()  # never leave it behind
            self.process.wait()
            raise AssertionError(
                f"it did not stop within {TIMEOUT:g} s of SIGTERM; killed. Its log:\n"
                + self.log_path.read_text()[-4000:]
            ) from None
        finally:
            if self.process.stdout:
                self.process.stdout.close()


def start_runner(
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> RunnerProcess:
    """Start ``didomagic-runner --port 0`` and wait for the connection URL it prints.

    ``preexec_fn`` runs in the child before the runner starts (e.g. to lower an rlimit).
    """
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
            preexec_fn=preexec_fn,
        )
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()  # printed once listening
    LOGS.append(log_path)
    if not line:
        process.wait(timeout=TIMEOUT)
        raise RuntimeError(f"runner did not start:\n{log_path.read_text()}")
    _remember_token(line)
    return RunnerProcess(process, line, state, log_path)


def _remember_token(url: str) -> None:
    from didomagic.urls import ConnectionURL

    SECRETS.add(ConnectionURL.parse(url).token)


@dataclass
class MediatorProcess:
    """A ``didomagic-runner mediator`` subprocess and the two URLs it printed."""

    process: subprocess.Popen[bytes]
    url: str
    runner_url: str
    state_dir: Path
    log_path: Path

    @property
    def log(self) -> str:
        """Everything the mediator has logged so far."""
        return self.log_path.read_text()

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.url.split("/")[2].rsplit(":", 1)[1])

    stop = RunnerProcess.stop


def start_mediator(
    tmp: Path, *args: str, prefix: Sequence[str] = (), env: dict[str, str] | None = None
) -> MediatorProcess:
    """Start ``didomagic-runner mediator`` and wait for the two URLs it prints.

    ``prefix`` runs it through another command (``nsenter --net=...``) that execs it;
    ``env`` is added to its environment.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    state = tmp / "state"
    log_path = tmp / "mediator.log"
    command = [*prefix, sys.executable, "-m", "runner", "mediator", "--state-dir", str(state)]
    command += args
    if "--port" not in args:
        command += ["--port", "0"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
    assert process.stdout is not None
    client_url = process.stdout.readline().decode().strip()
    runner_url = process.stdout.readline().decode().strip()
    LOGS.append(log_path)
    if not runner_url:
        process.wait(timeout=TIMEOUT)
        raise RuntimeError(f"mediator did not start:\n{log_path.read_text()}")
    _remember_token(client_url)
    _remember_token(runner_url)
    return MediatorProcess(process, client_url, runner_url, state, log_path)


def wait_until(condition: Callable[[], object], what: str, timeout: float = TIMEOUT) -> object:
    """Poll ``condition`` (a cross-process state: no event to await) until it is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found  # it has just exited
    for task in tasks:
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in map(int, kids):
            found |= {kid} | _descendants(kid)
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""  # it has just exited


def kernel_count(pid: int) -> int:
    """How many kernel processes (``python -m runner.kernel_main``) run under process ``pid``."""
    return sum(1 for child in _descendants(pid) if b"runner.kernel_main" in _cmdline(child))


@pytest.fixture
def runner_factory(tmp_path: Path) -> Iterator[Callable[..., RunnerProcess]]:
    """Start runners on demand; every one is stopped (and must exit 0) at teardown."""
    started: list[RunnerProcess] = []

    def factory(*args: str, name: str = "r", **kw: Any) -> RunnerProcess:
        runner = start_runner(tmp_path / f"{name}{len(started)}", "--name", name, *args, **kw)
        started.append(runner)
        return runner

    yield factory
    for runner in started:
        code = runner.stop()
        if code != -signal.SIGKILL:  # a test that kills a runner does so with SIGKILL
            assert code == 0, runner.log


@pytest.fixture(scope="module")
def module_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    """One runner shared by a test module (for tests that do not disturb it)."""
    runner = start_runner(
        tmp_path_factory.mktemp("runner"),
        "--name",
        "shared",
        "--warm-kernels",
        "2",
        "--max-sessions",
        "8",
    )
    yield runner
    assert runner.stop() == 0, runner.log


@pytest.fixture(scope="session", autouse=True)
def private_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test uses its own config file, never the user's runner list."""
    path = tmp_path_factory.mktemp("config") / "config.json"
    old = os.environ.get("DIDOMAGIC_CONFIG")
    os.environ["DIDOMAGIC_CONFIG"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DIDOMAGIC_CONFIG", None)
    else:
        os.environ["DIDOMAGIC_CONFIG"] = old


@pytest.fixture(scope="session")
def shell():  # type: ignore[no-untyped-def]
    """An IPython shell with didomagic loaded (the same machinery as a notebook kernel)."""
    from IPython.testing.globalipapp import start_ipython

    ip = start_ipython()
    ip.run_line_magic("load_ext", "didomagic")
    yield ip
    from didomagic.api import default_pool

    default_pool().close()


@pytest.fixture(autouse=True)
def notebook_folder(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Each test's notebook works in an empty folder of its own (a remote cell's working
    directory mirrors it, and the files the cell writes come back there, not into the checkout)."""
    folder = tmp_path_factory.mktemp("notebook")
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def ns(shell):  # type: ignore[no-untyped-def]
    """A clean user namespace for one test."""
    hidden = set(shell.user_ns_hidden)
    for name in [n for n in shell.user_ns if n not in hidden]:
        del shell.user_ns[name]
    return shell.user_ns


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After the whole suite: no token may appear in any runner's or mediator's log."""
    logs = [log for log in dict.fromkeys(LOGS) if log.exists()]
    leaks = [
        f"{log} contains a token ({secret[:4]}...)"
        for log in logs
        for secret in SECRETS
        if secret in log.read_text(errors="replace")
    ]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and logs:
        reporter.write_line(
            f"token check: {len(logs)} runner and mediator logs, {len(SECRETS)} tokens: "
            + ("LEAKED\n  " + "\n  ".join(leaks) if leaks else "none appears in any log")
        )
    if leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
