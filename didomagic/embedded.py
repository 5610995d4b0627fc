"""The embedded default runner: a private runner subprocess for notebooks with none configured.

It listens on 127.0.0.1 on a free port with its own token and certificate in a
temporary state directory, and stops when the notebook kernel exits: at exit
normally, and through its closed standard input if the kernel is killed. It
runs in a session of its own, so the notebook's stop button (SIGINT to the
kernel's process group) never reaches it, and it removes its state directory
(token, private key) when it stops.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from didomagic.errors import RunnerStartError
from didomagic.urls import ConnectionURL

logger = logging.getLogger("didomagic.embedded")

START_TIMEOUT = 90.0
"""Seconds the subprocess may take to print its connection URL."""


class EmbeddedRunner:
    """A runner subprocess owned by this process."""

    def __init__(self) -> None:
        self.state_dir = Path(tempfile.mkdtemp(prefix="didomagic-embedded-"))
        self.log_path = self.state_dir / "runner.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.url: ConnectionURL | None = None

    def start(self) -> ConnectionURL:
        """Start the subprocess and wait for its connection URL."""
        source_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
        env.pop("DIDOMAGIC_TOKEN", None)
        command = [
            sys.executable,
            "-m",
            "runner",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--name",
            "embedded",
            "--state-dir",
            str(self.state_dir),
            "--warm-kernels",
            "1",
            "--exit-on-stdin-eof",
            "--remove-state-on-exit",
            "--session-grace",  # it stops with this kernel: no session to come back to
            "0",
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=self.state_dir,
                env=env,
                start_new_session=True,  # the kernel's SIGINT (stop button) stays with the kernel
            )
        atexit.register(self.stop)
        assert self.process.stdout is not None
        # The runner prints its URL once listening; if it dies first, stdout closes.
        timer = threading.Timer(START_TIMEOUT, self.process.kill)
        timer.start()
        try:
            line = self.process.stdout.readline().decode().strip()
        finally:
            timer.cancel()
        if not line:
            self.stop()
            raise RunnerStartError(
                "The embedded runner did not start. Its log says:\n" + self._log_tail()
            )
        self.url = ConnectionURL.parse(line)
        return self.url

    @property
    def alive(self) -> bool:
        """True while the subprocess runs."""
        return self.process is not None and self.process.poll() is None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop the subprocess (it shuts its kernels down) and remove its state."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            assert process.stdin is not None
            process.stdin.close()  # the runner stops on end of input
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if process is not None and process.stdout is not None:
            process.stdout.close()
        atexit.unregister(self.stop)
        shutil.rmtree(self.state_dir, ignore_errors=True)
