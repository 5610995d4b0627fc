"""Who gets in and what they may touch: mutual TLS, safe results, jobs per client."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from IPython.utils.capture import capture_output

import didomagic
from didomagic import api, detached
from didomagic.config import Config
from didomagic.errors import AuthenticationFailed, JobError
from didomagic.loop import background_loop
from didomagic.urls import ConnectionURL

from .conftest import TIMEOUT


def issue(ca_dir: Path, name: str, out: Path) -> tuple[Path, Path, Path]:
    """``didomagic-runner gen-client-cert``: (CA certificate, client cert, client key)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runner",
            "gen-client-cert",
            "--ca-dir",
            str(ca_dir),
            "--name",
            name,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--client-ca" in done.stdout and "%runners add URL --client-cert" in done.stdout
    return ca_dir / "client-ca-cert.pem", out / f"{name}-cert.pem", out / f"{name}-key.pem"


def cell(url: str, code: str = "b = a * 2", **ns: object) -> dict[str, object]:
    pool = api.SessionPool()
    try:
        namespace = dict(ns or {"a": 21})
        api.run_cell(api.CellSpec(code), namespace, runner=url, pool=pool)
        return namespace
    finally:
        pool.close()


def test_mutual_tls_admits_only_certificates_the_ca_signed(tmp_path, runner_factory, shell, ns):
    ca, cert, key = issue(tmp_path / "ca", "alice", tmp_path / "alice")
    _, stranger_cert, stranger_key = issue(tmp_path / "other-ca", "mallory", tmp_path / "m")
    runner = runner_factory("--client-ca", str(ca))
    url = ConnectionURL.parse(runner.url)
    with pytest.raises(AuthenticationFailed, match="requires a client certificate"):
        cell(str(url))
    with pytest.raises(AuthenticationFailed, match="it did not accept"):
        cell(
            str(
                ConnectionURL(
                    url.host,
                    url.port,
                    url.token,
                    url.fingerprint,
                    str(stranger_cert),
                    str(stranger_key),
                )
            )
        )
    assert " opened from " not in runner.log  # no session was ever opened
    with capture_output() as cap:
        shell.run_line_magic(
            "runners", f"add {url} --name mtls --client-cert {cert} --client-key {key}"
        )
    assert "added mtls" in cap.stdout
    ns["a"] = 21
    result = shell.run_cell("%%remote --runner mtls\nb = a * 2")
    assert result.success, result.error_in_exec
    assert ns["b"] == 42
    # The runner's own sessions (its detached jobs) pass its --client-ca too.
    entry_url = str(Config().get("mtls").url)
    job = didomagic.submit(pow, 2, 10, runner=entry_url)
    assert job.wait(timeout=TIMEOUT)["state"] == "done" and job.result() == 1024


def test_safe_results_refuse_what_would_run_code_and_keep_plain_data(
    tmp_path, runner_factory, shell, ns
):
    runner = runner_factory()
    with capture_output():
        shell.run_line_magic("runners", f"add {runner.url} --name careful --safe-results")
    marker = tmp_path / "ran-on-the-client"
    with capture_output() as cap:
        result = shell.run_cell(
            "%%remote --runner careful\nimport numpy as np\n"
            "plain = {'n': 1, 'xs': [1.5, 'two', b'3'], 'arr': np.arange(4.0)}\n"
            "class Evil:\n"
            "    def __reduce__(self):\n"
            f"        return (open, ({str(marker)!r}, 'w'))\n"
            "evil = Evil()"
        )
    assert result.success, result.error_in_exec
    assert ns["plain"]["xs"] == [1.5, "two", b"3"] and list(ns["plain"]["arr"]) == [0, 1, 2, 3]
    assert "evil" not in ns and not marker.exists()
    assert "'evil' was not synced: refused by safe-results" in cap.stderr


def test_one_client_cannot_see_or_touch_another_clients_jobs(tmp_path, runner_factory):
    runner = runner_factory()
    url = ConnectionURL.parse(runner.url)
    run = background_loop().run
    mine = didomagic.submit(pow, 3, 4, runner=runner.url, name="mine")
    assert mine.wait(timeout=TIMEOUT)["state"] == "done"
    own_config = os.environ["DIDOMAGIC_CONFIG"]
    os.environ["DIDOMAGIC_CONFIG"] = str(tmp_path / "someone-else" / "config.json")
    try:
        assert run(detached.list_async(url)) == []
        assert run(detached.list_async(url, [mine.id])) == []
        for attempt in (detached.pull_async, detached.cancel_async, detached.delete_async):
            with pytest.raises(JobError, match="No job"):
                run(attempt(url, mine.id))
        theirs = didomagic.submit(pow, 2, 2, runner=runner.url)
        assert [j["id"] for j in run(detached.list_async(url))] == [theirs.id]
    finally:
        os.environ["DIDOMAGIC_CONFIG"] = own_config
    assert [j["id"] for j in run(detached.list_async(url))] == [mine.id]
    assert mine.result() == 81  # untouched by the other client's attempts


def test_a_mediator_with_client_ca_admits_certified_clients_and_runners(tmp_path):
    from .conftest import start_mediator, start_runner, wait_until

    ca, cert, key = issue(tmp_path / "ca", "alice", tmp_path / "alice")
    _, runner_cert, runner_key = issue(tmp_path / "ca", "gpu-box", tmp_path / "box")
    mediator = start_mediator(tmp_path / "m", "--client-ca", str(ca))
    joined = ConnectionURL.parse(mediator.runner_url)
    joined = ConnectionURL(
        joined.host,
        joined.port,
        joined.token,
        joined.fingerprint,
        str(runner_cert),
        str(runner_key),
    )
    runner = start_runner(tmp_path / "r", "--name", "box", "--mediator", str(joined))
    try:
        wait_until(lambda: "registered" in runner.log, "the certified runner to join")
        client = ConnectionURL.parse(mediator.url)
        with pytest.raises(AuthenticationFailed, match="requires a client certificate"):
            cell(str(client))
        certified = ConnectionURL(
            client.host, client.port, client.token, client.fingerprint, str(cert), str(key)
        )
        assert cell(str(certified))["b"] == 42  # relayed to the runner and back
    finally:
        assert runner.stop() == 0, runner.log
        assert mediator.stop() == 0, mediator.log


def test_client_certificate_paths_are_checked_when_the_runner_is_added(tmp_path):
    from didomagic.errors import ConfigurationError

    url = "wss://127.0.0.1:9/#token=t"
    with pytest.raises(ConfigurationError, match=r"No such file: .*missing\.pem"):
        api.add_runner(url, "x", client_cert=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigurationError, match="--client-key needs --client-cert"):
        api.add_runner(url, "x", client_key=str(tmp_path / "k.pem"))
