"""The limits a runner puts on every session's kernel, and how they read to a user.

Pure data and text: :mod:`runner.sandbox` decides how each limit is enforced
on this host, :mod:`runner.confine` applies them as the kernel starts.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``512M``, ``2G``, ``2GiB``, ``1.5g`` or a plain number of bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (write e.g. 512M, 2G or 2GiB)")
    number, unit = match.groups()
    value = int(float(number) * _UNITS[unit.lower()])
    if value < 1:
        raise ValueError(f"a size must be at least 1 byte, got {text!r}")
    return value


def format_size(nbytes: int) -> str:
    """``2 GiB``, ``512 MiB``, ``100 KiB`` or ``10 B``: how limits are named in messages."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


@dataclass(frozen=True)
class Limits:
    """What one session's kernel may use; None means no limit."""

    memory: int | None = None
    """Bytes of memory (--memory-limit)."""
    cpu_time: int | None = None
    """CPU seconds over the kernel's life (--cpu-time-limit)."""
    file_size: int | None = None
    """Bytes of any one file the kernel writes (--max-file-size)."""
    processes: int | None = None
    """Processes and threads the kernel may run at once (--max-processes)."""
    disk_quota: int | None = None
    """Bytes in the session's scratch directory (--disk-quota)."""
    no_network: bool = False
    """No network at all, host loopback included (--no-network)."""
    sandbox: str = "none"
    """``none`` or ``bwrap`` (bubblewrap: a private view of the file system)."""

    def describe(self) -> list[str]:
        """One phrase per limit set, e.g. ``memory limit 2 GiB``."""
        phrases = []
        if self.memory is not None:
            phrases.append(f"memory limit {format_size(self.memory)}")
        if self.cpu_time is not None:
            phrases.append(f"CPU time limit {self.cpu_time} s")
        if self.file_size is not None:
            phrases.append(f"max file size {format_size(self.file_size)}")
        if self.processes is not None:
            phrases.append(f"max processes {self.processes}")
        if self.disk_quota is not None:
            phrases.append(f"disk quota {format_size(self.disk_quota)}")
        if self.no_network:
            phrases.append("no network")
        if self.sandbox != "none":
            phrases.append(f"sandbox {self.sandbox}")
        return phrases


def death_by_signal(returncode: int | None) -> signal.Signals | None:
    """The signal that ended a process, from a Popen return code (or a shell's 128+N)."""
    if returncode is None:
        return None
    number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0
    try:
        return signal.Signals(number) if number > 0 else None
    except ValueError:
        return None


def explain_death(limits: Limits, returncode: int | None, memory_exceeded: bool) -> str | None:
    """Name the limit that killed a kernel, or None when no limit explains its death."""
    if memory_exceeded and limits.memory is not None:
        return f"kernel died: memory limit {format_size(limits.memory)} exceeded"
    if limits.cpu_time is not None and death_by_signal(returncode) is signal.SIGXCPU:
        return f"kernel died: CPU time limit {limits.cpu_time} s exceeded"
    return None


def annotate_error(
    limits: Limits, ename: str, evalue: str, fork_refused: bool | None = None
) -> str | None:
    """A note naming the limit behind a cell's exception, or None when none is likely.

    ``fork_refused``: whether the process limit refused a fork, where that is
    known (a cgroup counts it); None when only the error itself can tell.
    """
    if ename == "MemoryError" and limits.memory is not None:
        return f"the runner's memory limit is {format_size(limits.memory)} (--memory-limit)"
    if "File too large" in evalue and limits.file_size is not None:
        return f"the runner's max file size is {format_size(limits.file_size)} (--max-file-size)"
    blocked = ename == "BlockingIOError" or "Resource temporarily unavailable" in evalue
    if blocked and limits.processes is not None and fork_refused is not False:
        return f"the runner allows {limits.processes} processes per session (--max-processes)"
    return None
