"""Network namespaces joined by a bridge, for tests that need several "hosts" on one machine.

Each namespace is held open by an ``unshare --net sleep infinity`` process
(no names under /var/run/netns, nothing to clean but those processes). The
bridge lives in a namespace of its own, so the host's network never changes:
each member gets a veth pair whose one end is in the bridge's namespace and
whose other end, with an address from a private test range, is in the member.
Processes are started inside with ``nsenter --net=/proc/PID/ns/net`` (not
``ip netns exec``, which remounts /sys; slurmd then fails). Stopping the
holder processes removes the namespaces and their links.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

from .conftest import TIMEOUT, skip_missing, wait_until

SUBNET = "10.213.77"
"""The private /24 used inside the namespaces, never on the host."""


@dataclass
class Namespace:
    """One network namespace: the process holding it, and its address (if a member)."""

    holder: subprocess.Popen[bytes]
    address: str = ""

    @property
    def prefix(self) -> tuple[str, ...]:
        """Prefix a command with this to run it inside."""
        return ("nsenter", f"--net=/proc/{self.holder.pid}/ns/net")

    def run(self, *argv: str) -> None:
        """Run a command inside and wait for it."""
        subprocess.run([*self.prefix, *argv], check=True, capture_output=True, timeout=TIMEOUT)


@dataclass
class Network:
    """A bridge namespace and the member namespaces joined to it."""

    bridge: Namespace
    members: list[Namespace] = field(default_factory=list)

    def stop(self) -> None:
        """Stop every holder by pid: the namespaces and their links go with them."""
        for ns in [*self.members, self.bridge]:
            if ns.holder.poll() is None:
                ns.holder.send_signal(signal.SIGTERM)
            ns.holder.wait(timeout=TIMEOUT)


def require_namespaces() -> None:
    """Skip (fail under CI) without unshare, nsenter and ip."""
    missing = [c for c in ("unshare", "nsenter", "ip") if shutil.which(c) is None]
    if missing:
        skip_missing(f"{', '.join(missing)} not found (Debian packages util-linux, iproute2)")


def _holder() -> Namespace:
    holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
    own = os.readlink("/proc/self/ns/net")  # "net:[inode]": the namespace's identity

    def entered() -> bool:  # unshare has made the namespace and exec'd sleep
        try:
            return os.readlink(f"/proc/{holder.pid}/ns/net") != own
        except OSError:
            return False

    wait_until(entered, "a new network namespace")
    return Namespace(holder)


def network(members: int) -> Network:
    """A bridge and ``members`` namespaces on it, addressed ``SUBNET.1`` onwards."""
    net = Network(_holder())
    try:
        net.bridge.run("ip", "link", "add", "br0", "type", "bridge")
        net.bridge.run("ip", "link", "set", "br0", "up")
        for i in range(members):
            ns = _holder()
            ns.address = f"{SUBNET}.{i + 1}"
            net.members.append(ns)
            port = f"p{i}"
            net.bridge.run(
                "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", str(ns.holder.pid),
            )  # fmt: skip
            net.bridge.run("ip", "link", "set", port, "master", "br0", "up")
            ns.run("ip", "addr", "add", f"{ns.address}/24", "dev", "eth0")
            ns.run("ip", "link", "set", "eth0", "up")
            ns.run("ip", "link", "set", "lo", "up")
    except BaseException:
        net.stop()
        raise
    return net
