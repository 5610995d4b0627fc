"""Discovery on a real local network: real multicast between two network namespaces.

The test makes three namespaces: a runner's host, a notebook's host, and one
holding the bridge that joins them (veth pairs). Addresses come from a
private test range and exist only inside those namespaces, which the test
removes at the end, so nothing it sends can leave them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from didomagic.urls import ConnectionURL

from .conftest import LOGS, SECRETS, TIMEOUT, skip_missing, wait_until

SUBNET = "10.231.7"
"""A private /24 that exists only inside the test's namespaces."""


@dataclass
class Lan:
    """Two hosts on one bridge: ``runner_ns`` and ``client_ns`` (namespace names)."""

    runner_ns: str
    client_ns: str
    runner_ip: str
    client_ip: str

    def run(self, namespace: str, *command: str, **kw) -> subprocess.Popen[bytes]:
        """Start ``command`` inside a namespace (``nsenter``, which keeps /sys as it is)."""
        return subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{namespace}", *command], stdin=subprocess.DEVNULL, **kw
        )


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=TIMEOUT)


@pytest.fixture
def lan() -> Iterator[Lan]:
    if os.geteuid() != 0:
        skip_missing("network namespaces need root")
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            skip_missing(f"no {tool} (Debian packages iproute2 and util-linux)")
    tag = f"dd{os.getpid() % 100000}"
    runner_ns, client_ns, bridge_ns = f"{tag}r", f"{tag}c", f"{tag}b"
    made: list[str] = []
    try:
        for ns in (runner_ns, client_ns, bridge_ns):
            ip("netns", "add", ns)
            made.append(ns)
        ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        for ns, end, address in ((runner_ns, "r", 1), (client_ns, "c", 2)):
            ip(
                "link",
                "add",
                f"{tag}{end}",
                "netns",
                ns,
                "type",
                "veth",
                "peer",
                "name",
                f"{tag}{end}b",
                "netns",
                bridge_ns,
            )
            ip("-n", bridge_ns, "link", "set", f"{tag}{end}b", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{SUBNET}.{address}/24", "dev", f"{tag}{end}")
            ip("-n", ns, "link", "set", f"{tag}{end}", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", f"{tag}{end}")  # mDNS
        ip("-n", bridge_ns, "link", "set", "br0", "up")
        yield Lan(runner_ns, client_ns, f"{SUBNET}.1", f"{SUBNET}.2")
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=TIMEOUT)


CLIENT = textwrap.dedent(
    """
    import json, sys
    from IPython.testing.globalipapp import start_ipython
    from IPython.utils.capture import capture_output
    from didomagic import lan

    token = sys.argv[1]
    ip = start_ipython()
    ip.run_line_magic("load_ext", "didomagic")
    found = lan.discover(3.0)
    with capture_output() as listing:
        ip.run_line_magic("runners", "discover --timeout 3")
    with capture_output() as added:
        ip.run_line_magic("runners", f"add lan-gpu --token {token}")
    result = ip.run_cell(
        "%%remote --runner lan-gpu\\nimport os\\nwhere = os.environ['DIDOMAGIC_RUNNER_NAME']"
    )
    with capture_output() as again:
        ip.run_line_magic("runners", "discover --timeout 3")
    print(json.dumps({
        "found": [f.__dict__ | {"tags": list(f.tags)} for f in found],
        "listing": listing.stdout, "added": added.stdout, "again": again.stdout,
        "ok": result.success, "where": ip.user_ns.get("where"),
    }))
    from didomagic.api import default_pool
    default_pool().close()
    """
)


def test_a_notebook_discovers_an_advertised_runner_and_runs_a_cell_on_it(lan, tmp_path):
    state, log_path = tmp_path / "state", tmp_path / "runner.log"
    with open(log_path, "wb") as log:
        runner = lan.run(
            lan.runner_ns,
            sys.executable,
            "-m",
            "runner",
            "--host",
            lan.runner_ip,
            "--port",
            "0",
            "--state-dir",
            str(state),
            "--name",
            "lan-gpu",
            "--tags",
            "gpu,a100",
            "--advertise",
            stdout=subprocess.PIPE,
            stderr=log,
        )
    LOGS.append(log_path)
    try:
        assert runner.stdout is not None
        url = ConnectionURL.parse(runner.stdout.readline().decode().strip())
        SECRETS.add(url.token)
        wait_until(  # the URL is printed first; the announcement follows its mDNS probes
            lambda: "advertising lan-gpu" in log_path.read_text(), "the runner to advertise"
        )
        script = tmp_path / "client.py"
        script.write_text(CLIENT)
        client = lan.run(
            lan.client_ns,
            sys.executable,
            str(script),
            url.token,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "DIDOMAGIC_CONFIG": str(tmp_path / "config.json")},
        )
        out, err = client.communicate(timeout=TIMEOUT * 3)
        assert client.returncode == 0, err.decode()[-3000:]
        seen = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=TIMEOUT)
    assert seen["found"] == [
        {
            "name": "lan-gpu",
            "role": "runner",
            "host": lan.runner_ip,
            "port": url.port,
            "tags": ["gpu", "a100"],
            "fingerprint": url.fingerprint,
        }
    ]
    assert url.token not in out.decode()  # the announcement never carries the token
    assert "lan-gpu" in seen["listing"] and "CONFIGURED" in seen["listing"]
    assert "added lan-gpu" in seen["added"]
    assert seen["ok"] and seen["where"] == "lan-gpu"  # pinned to the advertised fingerprint
    row = next(line for line in seen["again"].splitlines() if line.startswith("lan-gpu"))
    assert row.rstrip().endswith("yes")  # now in the list
