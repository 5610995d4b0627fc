"""Put this process in its box, then exec the kernel: ``python -m runner.confine SPEC -- ARGV``.

``SPEC`` is JSON written by :mod:`runner.sandbox`:

- ``cgroup_procs``: ``cgroup.procs`` files to join (memory and process limits);
- ``rlimits``: ``{"RLIMIT_CPU": [soft, hard], ...}``;
- ``no_network``: move into a new network namespace (no interfaces up, not even
  loopback), inside a new user namespace when not root.

All of it happens before ``exec``, in a single-threaded process, so the
kernel and everything it starts are confined from their first instruction.
Unix sockets with a path (the kernel's IPC channels) still work across
network namespaces, which is why the kernel keeps talking to its runner.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
from typing import Any

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000

EXIT_CONFINE_FAILED = 71
"""Exit status when the box could not be set up (the reason is on standard error)."""


def enter_network_namespace() -> None:
    """Leave every network: a new network namespace (and user namespace when not root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    as_root = os.geteuid() == 0
    flags = CLONE_NEWNET if as_root else CLONE_NEWNET | CLONE_NEWUSER
    if libc.unshare(flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare(network namespace) failed: {os.strerror(errno)}")
    if not as_root:  # keep our own uid and gid inside the new user namespace
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{uid} {uid} 1")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{gid} {gid} 1")


def apply(spec: dict[str, Any]) -> None:
    """Join the cgroups, set the rlimits and leave the network, as ``spec`` says."""
    pid = str(os.getpid())
    for procs in spec.get("cgroup_procs", []):
        with open(procs, "w") as f:
            f.write(pid)
    for name, (soft, hard) in spec.get("rlimits", {}).items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if spec.get("no_network"):
        enter_network_namespace()


def main(argv: list[str]) -> int:
    """Apply the spec in ``argv[0]`` and exec the command after ``--``."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m runner.confine SPEC_JSON -- COMMAND...", file=sys.stderr)
        return 2
    try:
        apply(json.loads(argv[0]))
    except (OSError, ValueError) as exc:
        print(f"didomagic: could not confine the kernel: {exc}", file=sys.stderr)
        return EXIT_CONFINE_FAILED
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
