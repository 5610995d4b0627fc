"""What a runner tells about its machine: OS, CPUs, memory and GPUs.

Runners report this themselves (in the welcome, in answers to a query, and to
a mediator); clients never guess it. GPUs come from ``nvidia-smi`` when it is
on the PATH; a machine without it reports none.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
from typing import Any

from runner import slurm

logger = logging.getLogger("didomagic.runner")

NVIDIA_SMI_TIMEOUT = 5.0
"""Seconds ``nvidia-smi`` may take before the runner reports no GPUs."""


def memory() -> tuple[int | None, int | None]:
    """Total and available physical memory in bytes (``None`` where the OS does not say)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if "kB" in line}
        return info.get("MemTotal"), info.get("MemAvailable", info.get("MemFree"))
    except OSError:
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        free = os.sysconf("SC_AVPHYS_PAGES") * page if sys.platform != "darwin" else None
        return total, free
    except (ValueError, OSError, AttributeError):
        return None, None


def gpus() -> list[dict[str, Any]]:
    """The NVIDIA GPUs ``nvidia-smi`` lists: model and memory (total, used) in bytes."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [
                smi,
                "--query-gpu=index,name,memory.total,memory.used",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi failed, reporting no GPUs: %s", exc)
        return []
    found = []
    for line in out.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        index, name, total, used = fields
        found.append(
            {
                "index": int(index) if index.isdigit() else index,
                "name": name,
                "memory_total": _mib(total),
                "memory_used": _mib(used),
            }
        )
    return found


def _mib(text: str) -> int | None:
    try:
        return int(float(text) * (1 << 20))
    except ValueError:
        return None


def machine() -> dict[str, Any]:
    """The parts of a runner's description that describe the machine, measured now."""
    total, free = memory()
    return {
        "os": platform.system().lower(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_total": total,
        "memory_free": free,
        "gpus": gpus(),
        **slurm.job_description(os.environ),  # the Slurm job it runs in, if any
    }
