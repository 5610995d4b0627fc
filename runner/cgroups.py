"""A memory and process-count control group per kernel, where the host lets us make one.

Works with cgroup v2 when the runner's own group has the memory and pids
controllers enabled for its children (a delegated group), and with cgroup v1
when the runner may create groups under its own ``memory`` and ``pids``
groups. Elsewhere :func:`find` returns None and limits fall back to rlimits.

A kernel joins its groups itself before it execs (see :mod:`runner.confine`),
so not even its first child escapes them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("didomagic.runner")

ROOT = Path("/sys/fs/cgroup")
REMOVE_WAIT = 2.0
"""Seconds to wait for a stopped kernel's processes to leave its groups."""

PREFIX = "didomagic-"
"""Groups are named ``didomagic-<runner pid>-<kernel id>``, so stale ones can be found."""


@dataclass(frozen=True)
class Hierarchy:
    """Where this runner may create kernel groups, and which cgroup version they are."""

    version: int
    memory: Path
    """The parent directory for memory groups (the same as ``pids`` on v2)."""
    pids: Path

    def describe(self) -> str:
        """A line for ``--check-sandbox``."""
        if self.version == 2:
            return f"cgroup v2 under {self.memory}"
        return f"cgroup v1 under {self.memory} and {self.pids}"


def _own_groups() -> dict[str, str]:
    """Controller name (``""`` for v2) to this process's group path."""
    groups: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                groups[controller] = path
    return groups


def _can_create(parent: Path, needed: tuple[str, ...]) -> bool:
    probe = parent / f"{PREFIX}probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        return all((probe / name).exists() for name in needed)
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


def find() -> Hierarchy | None:
    """The cgroup hierarchy this runner can use for its kernels, or None."""
    if not ROOT.is_dir():
        return None
    groups = _own_groups()
    if "" in groups and (ROOT / "cgroup.controllers").exists():  # unified (v2) at the root
        parent = ROOT / groups[""].lstrip("/")
        if _can_create(parent, ("memory.max", "pids.max")):
            return Hierarchy(2, parent, parent)
    if "memory" in groups and "pids" in groups:
        memory = ROOT / "memory" / groups["memory"].lstrip("/")
        pids = ROOT / "pids" / groups["pids"].lstrip("/")
        if _can_create(memory, ("memory.limit_in_bytes",)) and _can_create(pids, ("pids.max",)):
            return Hierarchy(1, memory, pids)
    return None


def _read_counter(path: Path, key: str) -> int:
    """``key N`` from a flat-keyed cgroup file, 0 when absent."""
    with contextlib.suppress(OSError, ValueError):
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


class KernelGroups:
    """The groups of one kernel: created with its limits, removed after it stops."""

    def __init__(
        self, hierarchy: Hierarchy, name: str, memory: int | None, processes: int | None
    ) -> None:
        self.hierarchy = hierarchy
        self.memory = hierarchy.memory / name
        self.pids = hierarchy.pids / name
        self.dirs = [self.memory] if self.memory == self.pids else [self.memory, self.pids]
        for path in self.dirs:
            path.mkdir()
        v2 = hierarchy.version == 2
        if memory is not None:
            if v2:
                (self.memory / "memory.max").write_text(str(memory))
                with contextlib.suppress(OSError):  # no swap beyond the limit either
                    (self.memory / "memory.swap.max").write_text("0")
            else:
                (self.memory / "memory.limit_in_bytes").write_text(str(memory))
                with contextlib.suppress(OSError):
                    (self.memory / "memory.memsw.limit_in_bytes").write_text(str(memory))
        if processes is not None:
            (self.pids / "pids.max").write_text(str(processes))

    @property
    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files the kernel writes its pid to before it execs."""
        return [str(path / "cgroup.procs") for path in self.dirs]

    def memory_exceeded(self) -> bool:
        """True once the kernel has been killed, or refused memory, for the memory limit."""
        if self.hierarchy.version == 2:
            events = self.memory / "memory.events"
            return _read_counter(events, "oom_kill") > 0 or _read_counter(events, "max") > 0
        oom = _read_counter(self.memory / "memory.oom_control", "oom_kill")
        with contextlib.suppress(OSError, ValueError):
            return oom > 0 or int((self.memory / "memory.failcnt").read_text()) > 0
        return oom > 0

    def processes_exceeded(self) -> bool:
        """True once a fork was refused for the process limit."""
        return _read_counter(self.pids / "pids.events", "max") > 0

    def remove(self) -> None:
        """Kill what is left in the groups and remove them."""
        for path in self.dirs:
            deadline = time.monotonic() + REMOVE_WAIT
            while True:  # killed members take a moment to leave the group
                _kill_members(path)
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        logger.warning("could not remove %s: processes are still in it", path)
                        break
                    time.sleep(0.01)


def _kill_members(group: Path) -> None:
    with contextlib.suppress(OSError):
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)


def remove_stale(hierarchy: Hierarchy) -> None:
    """Remove kernel groups left by runners that are gone (killed with SIGKILL)."""
    for parent in {hierarchy.memory, hierarchy.pids}:
        for group in parent.glob(f"{PREFIX}*-*"):
            pid = group.name.split("-")[1]
            if not pid.isdigit():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # its runner still runs
            except ProcessLookupError:
                pass
            except OSError:
                continue
            _kill_members(group)
            with contextlib.suppress(OSError):
                group.rmdir()
                logger.info("removed %s, left behind by a runner that is gone", group)
