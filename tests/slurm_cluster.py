"""A real, private Slurm cluster for tests: munged, slurmctld and slurmd in the foreground.

Everything lives under one temporary directory: the configuration, munge's
key and socket, Slurm's state, spool and logs, and the character devices
that stand in for GPUs (``mknod PATH c 1 3``: Slurm refuses plain files for
``File=`` and drops a GPU without one). Daemons run with ``-D`` as tracked
subprocesses and are stopped by pid. The commands reach this cluster only
through ``SLURM_CONF`` in :attr:`SlurmCluster.env`.

Facts measured on Debian 12's Slurm 22.05 that the configuration relies on:
``proctrack/linuxproc`` and ``task/none`` (no cgroups needed), accounting and
job completion off, ``SlurmUser=root``, munge's socket directory mode 755.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runner.slurm import FINAL_STATES

from .conftest import TIMEOUT, skip_missing, wait_until

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "squeue", "scancel", "sinfo", "mknod")


def require_slurm() -> None:
    """Skip (fail under CI) unless this process is root and Slurm and munge are installed."""
    missing = [c for c in (*DAEMONS, *COMMANDS) if shutil.which(c) is None]
    if missing:
        skip_missing(
            f"{', '.join(missing)} not found (Debian packages slurmctld slurmd slurm-client munge)"
        )
    if os.geteuid() != 0:
        skip_missing("the Slurm tests need root: slurmd runs jobs as their user (SlurmUser=root)")


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SlurmCluster:
    """A running private cluster: its directory, the commands' environment, its daemons."""

    root: Path
    env: dict[str, str]
    prefix: tuple[str, ...] = ()
    """Where commands run (the controller's network namespace, if it has one)."""
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, *argv: str) -> str:
        """Run a Slurm command against this cluster; return its standard output."""
        return subprocess.run(
            [*self.prefix, *argv],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=TIMEOUT,
        ).stdout

    def jobs(self) -> dict[str, dict[str, str]]:
        """Every job slurmctld remembers: id → state, reason, name."""
        found = {}
        for job in json.loads(self.run("squeue", "--json", "-t", "all"))["jobs"]:
            state = job["job_state"]
            found[str(job["job_id"])] = {
                "state": state[0] if isinstance(state, list) else state,
                "reason": job.get("state_reason", ""),
                "name": job.get("name", ""),
            }
        return found

    def alive(self) -> list[str]:
        """Ids of jobs not yet ended (pending, running, or completing: still being killed)."""
        return [i for i, j in self.jobs().items() if j["state"] not in FINAL_STATES]

    def state(self, job_id: str) -> str:
        """One job's state."""
        return self.jobs().get(job_id, {}).get("state", "")

    def wait_idle(self, nodes: Sequence[str]) -> None:
        """Until every node reports idle."""

        def idle() -> bool:
            try:
                out = self.run("sinfo", "-h", "-N", "-o", "%N %t")
            except subprocess.CalledProcessError:
                return False
            states = dict(line.split() for line in out.splitlines() if line.strip())
            return all(states.get(n) == "idle" for n in nodes)

        wait_until(idle, f"Slurm nodes {', '.join(nodes)} idle")

    def stop(self) -> None:
        """Cancel every job, then stop the daemons by pid (slurmd, slurmctld, munged)."""
        try:
            if self.alive():
                self.run("scancel", *self.alive())
                wait_until(lambda: not self.alive(), "every job cancelled")
        except (subprocess.SubprocessError, AssertionError, OSError):
            pass  # stop the daemons whatever state the jobs are in
        for process in reversed(self.daemons):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass(frozen=True)
class Node:
    """One slurmd: its name, address, GPUs, and how to start a process in its network."""

    name: str
    address: str = "127.0.0.1"
    gpus: int = 2
    prefix: tuple[str, ...] = ()
    """Command prefix, e.g. ``nsenter --net=/proc/PID/ns/net`` for a network namespace."""


def start_cluster(
    root: Path,
    nodes: Sequence[Node] = (Node("localhost"),),
    controller: tuple[str, str] = ("localhost", "127.0.0.1"),
    controller_prefix: tuple[str, ...] = (),
) -> SlurmCluster:
    """Write the configuration under ``root``, start the daemons, wait for idle nodes."""
    for sub in ("etc", "state", "log", "run", "dev", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    munge = root / "munge"
    munge.chmod(0o755)  # munged refuses a socket directory others cannot search
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    socket_path = munge / "munge.socket.2"
    conf = root / "etc" / "slurm.conf"
    cpus = os.cpu_count() or 1
    lines = [
        "ClusterName=didomagic-test",
        f"SlurmctldHost={controller[0]}({controller[1]})",
        "SlurmUser=root",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "AuthType=auth/munge",
        f"AuthInfo=socket={socket_path}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}-%n",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd'}-%n.pid",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd'}-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "MpiDefault=none",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "GresTypes=gpu",
        "ReturnToService=2",
        "MinJobAge=300",
        "KillWait=2",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
    ]
    gres = ["AutoDetect=off"]
    for node in nodes:
        lines.append(
            f"NodeName={node.name} NodeAddr={node.address} CPUs={cpus} RealMemory=1000 "
            f"Gres=gpu:fake:{node.gpus} State=UNKNOWN"
        )
        for i in range(node.gpus):
            device = root / "dev" / f"{node.name}-gpu{i}"
            if not device.exists():
                subprocess.run(["mknod", str(device), "c", "1", "3"], check=True)
        devices = root / "dev" / f"{node.name}-gpu[0-{node.gpus - 1}]"
        gres.append(f"NodeName={node.name} Name=gpu Type=fake File={devices}")
    names = ",".join(n.name for n in nodes)
    lines.append(f"PartitionName=batch Nodes={names} Default=YES MaxTime=INFINITE State=UP")
    conf.write_text("\n".join(lines) + "\n")
    (root / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(root, env, tuple(controller_prefix))
    try:
        _daemon(
            cluster,
            "munged",
            "munged",
            "-F",
            "-f",
            f"--socket={socket_path}",
            f"--key-file={key}",
            f"--log-file={root / 'log' / 'munged.log'}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}",
            prefix=controller_prefix,
        )
        wait_until(socket_path.exists, "munged's socket")
        _daemon(cluster, "slurmctld", "slurmctld", "-D", "-f", str(conf), prefix=controller_prefix)
        for node in nodes:
            _daemon(
                cluster,
                f"slurmd-{node.name}",
                "slurmd",
                "-D",
                "-f",
                str(conf),
                "-N",
                node.name,
                prefix=node.prefix,
            )
        cluster.wait_idle([n.name for n in nodes])
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _daemon(cluster: SlurmCluster, log: str, *argv: str, prefix: Sequence[str] = ()) -> None:
    with open(cluster.root / "log" / f"{log}.out", "wb") as out:
        cluster.daemons.append(
            subprocess.Popen(
                [*prefix, *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=cluster.env,
            )
        )
