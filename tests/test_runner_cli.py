"""The runner as a user starts it: command line, URL, log, shutdown, certificates, refusals."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from didomagic import api
from didomagic.client import tls_context
from didomagic.errors import RunnerBusy
from didomagic.urls import ConnectionURL

from .conftest import TIMEOUT, start_runner


def test_start_prints_the_url_and_keeps_the_token_out_of_the_log(tmp_path):
    url_file = tmp_path / "url"
    runner = start_runner(tmp_path / "r", "--url-file", str(url_file), "--tags", "cpu,test")
    try:
        url = ConnectionURL.parse(runner.url)
        assert url_file.read_text().strip() == runner.url
        assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
        log = runner.log
        assert f"listening on {url.address}" in log and "tags: cpu,test" in log
        assert url.fingerprint in log
        assert url.token not in log
    finally:
        assert runner.stop() == 0
    assert not url_file.exists()


def test_the_token_is_generated_once_and_kept(tmp_path):
    first = start_runner(tmp_path / "r")
    first.stop()
    again = start_runner(tmp_path / "r")
    again.stop()
    first_url, again_url = ConnectionURL.parse(first.url), ConnectionURL.parse(again.url)
    assert (first_url.token, first_url.fingerprint) == (again_url.token, again_url.fingerprint)
    explicit = start_runner(tmp_path / "e", env={"DIDOMAGIC_TOKEN": "from-the-env"})
    explicit.stop()
    assert ConnectionURL.parse(explicit.url).token == "from-the-env"


def test_sigterm_ends_sessions_and_removes_kernels_and_scratch(tmp_path):
    runner = start_runner(tmp_path / "r", "--warm-kernels", "2")
    pool = api.SessionPool()
    there: dict[str, object] = {}
    api.run_cell(
        api.CellSpec("import os\npid = os.getpid()\nwhere = os.getcwd()"),
        there,
        runner=runner.url,
        pool=pool,
    )
    assert os.path.isdir(str(there["where"]))
    runner.process.send_signal(signal.SIGTERM)
    assert runner.process.wait(timeout=TIMEOUT) == 0
    assert not os.path.exists(str(there["where"]))
    with pytest.raises(ProcessLookupError):
        os.kill(int(str(there["pid"])), 0)
    assert "stopped" in runner.log
    pool.close()
    runner.stop()


def test_gen_cert_writes_a_certificate_and_prints_its_fingerprint(tmp_path):
    from runner.certs import fingerprint_file

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "gen-cert",
            "--out",
            str(tmp_path),
            "--host",
            "runner.example",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    ).stdout
    fingerprint = fingerprint_file(tmp_path / "runner-cert.pem")
    assert fingerprint in out
    assert stat.S_IMODE((tmp_path / "runner-key.pem").stat().st_mode) == 0o600


def test_a_given_certificate_is_used(tmp_path):
    from runner.certs import generate

    cert, key, fingerprint = generate(tmp_path / "c", ["127.0.0.1"])
    runner = start_runner(tmp_path / "r", "--certfile", str(cert), "--keyfile", str(key))
    try:
        assert ConnectionURL.parse(runner.url).fingerprint == fingerprint
    finally:
        runner.stop()


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--max-sessions", "0"], "must be at least 1"),
        (["--port", "-5"], "must be 0 or more"),
        (["--certfile", "c.pem"], "both --certfile and --keyfile"),
        (["--token", " "], "non-empty"),
    ],
)
def test_bad_flags_are_refused_clearly(tmp_path, args, complaint):
    done = subprocess.run(
        [sys.executable, "-m", "runner", "--port", "0", "--state-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode != 0 and complaint in done.stderr


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer ", "Basic abc"])
def test_missing_or_wrong_token_gets_401_at_the_handshake(module_runner, header):
    url = ConnectionURL.parse(module_runner.url)

    async def attempt() -> int:
        context = await tls_context(url)
        headers = {"Authorization": header} if header else {}
        with pytest.raises(InvalidStatus) as info:
            async with connect(
                url.websocket_uri, ssl=context, additional_headers=headers, proxy=None
            ):
                pass
        return info.value.response.status_code

    assert asyncio.run(attempt()) == 401


def test_a_full_runner_refuses_with_a_clear_busy_error(runner_factory):
    runner = runner_factory("--max-sessions", "1", "--warm-kernels", "1")
    first, second = api.SessionPool(), api.SessionPool()
    try:
        api.run_cell(api.CellSpec("x = 1"), {}, runner=runner.url, pool=first)
        with pytest.raises(RunnerBusy, match="--max-sessions"):
            api.run_cell(api.CellSpec("x = 1"), {}, runner=runner.url, pool=second)
    finally:
        first.close()
        second.close()


def test_python_dash_m_runner_shows_help():
    done = subprocess.run(
        [sys.executable, "-m", "runner", "--help"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0 and "--warm-kernels" in done.stdout and "gen-cert" in done.stdout


def test_a_runner_removes_what_a_killed_runner_left_behind(runner_factory):
    import tempfile

    first = runner_factory("--warm-kernels", "0")  # no orphaned kernel left writing there
    pid = first.process.pid
    first.process.kill()
    first.process.wait(timeout=30)
    roots = [Path(tempfile.gettempdir()), Path("/dev/shm")]
    left = [p for root in roots if root.is_dir() for p in root.glob(f"didomagic-runner-{pid}-*")]
    assert left  # SIGKILL gives it no chance to clean up
    runner_factory()
    assert not [p for p in left if p.exists()]
