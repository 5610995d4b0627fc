"""Launched runners on two Slurm GPU nodes, each on its own network (namespaces on a bridge).

slurmctld, munged and the mediator live in one network namespace, a slurmd
with two fake GPUs in each of two others; a fourth holds the bridge. The
notebook side runs inside the mediator's namespace too: nothing outside the
namespaces ever connects to their addresses.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from .conftest import TIMEOUT, start_mediator, wait_until
from .netns import network, require_namespaces
from .slurm_cluster import Node, require_slurm, start_cluster

CLIENT = """
import json, sys, threading
from didomagic.api import RemoteSession
from didomagic.client import Requirements
from didomagic.protocol import Execute
from didomagic.serialize import unpack
from didomagic.urls import ConnectionURL

url = ConnectionURL.parse(sys.argv[1])
code = "import os\\nseen = (os.environ['SLURMD_NODENAME'], os.environ['CUDA_VISIBLE_DEVICES'])"
barrier, results = threading.Barrier(2), []

def one():
    session = RemoteSession(url, Requirements(tags=("gpu",)))
    result, buffers = session.execute(Execute("c", code, fetch=("seen",)), [], lambda o: None)
    assert result.status.value == "ok", result.error
    results.append([*unpack([memoryview(b) for b in buffers[0]]), session.runner_name])
    barrier.wait()  # both sessions open at once: the second cannot reuse the first runner
    session.close()

threads = [threading.Thread(target=one) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(results))
"""


def test_two_sessions_get_runners_on_two_hosts(tmp_path, monkeypatch):
    require_slurm()
    require_namespaces()
    net = network(3)
    try:
        ctl, n1, n2 = net.members
        nodes = (Node("n1", n1.address, 2, n1.prefix), Node("n2", n2.address, 2, n2.prefix))
        cluster = start_cluster(
            tmp_path / "slurm",
            nodes,
            controller=(socket.gethostname(), ctl.address),
            controller_prefix=ctl.prefix,
        )
        try:
            monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
            mediator = start_mediator(
                tmp_path / "mediator",
                "--host", ctl.address,
                "--launcher", "slurm",
                "--slurm-gres", "gpu:2",
                "--slurm-idle", "30",
                "--launcher-poll", "0.2",
                "--slurm-output", str(tmp_path / "slurm-%j.out"),
                "--slurm-runner-args", "--heartbeat 0.5",
                prefix=ctl.prefix,
            )  # fmt: skip
            try:
                done = subprocess.run(
                    [*ctl.prefix, sys.executable, "-c", CLIENT, mediator.url],
                    capture_output=True,
                    text=True,
                    timeout=2 * TIMEOUT,
                    env={**os.environ},
                )
                assert done.returncode == 0, done.stderr[-3000:] + mediator.log[-3000:]
                results = json.loads(done.stdout)
                assert sorted(node for node, _, _ in results) == ["n1", "n2"]
                assert all(gpus == "0,1" for _, gpus, _ in results)  # each job: its node's two
                jobs = [runner.removeprefix("slurm-") for _, _, runner in results]
                assert all(cluster.state(job) == "RUNNING" for job in jobs)  # idle, not exited
            finally:
                assert mediator.stop() == 0, mediator.log
            wait_until(lambda: not cluster.alive(), "the mediator to cancel its runner jobs")
            assert all(cluster.state(job) == "CANCELLED" for job in jobs)
        finally:
            cluster.stop()
    finally:
        net.stop()
