"""How each limit is enforced on this host, and the box every kernel starts in.

Mechanisms, strongest first, each used where the host offers it:

- **cgroups** (v2 delegated, or v1 writable): memory and process count per kernel;
- **rlimits** (always on POSIX): CPU time, file size and no core dumps; memory
  (``RLIMIT_DATA``) and processes (``RLIMIT_NPROC``, per user) where no cgroup;
- **network namespace**: ``--no-network``;
- **bubblewrap** (``--sandbox bwrap``): the kernel sees the Python environment
  and the runner's package environments (at :data:`ENVIRONMENTS`) read-only, its
  scratch directory and private directory writable, its
  session's value cache read-only, a private ``/tmp`` and ``/dev``, and nothing
  of the runner's home or state directory, other sessions' caches or other
  kernels' directories (their connection files and sockets);
- **disk quota**: the runner measures the scratch directory while a cell runs.

``didomagic-runner --check-sandbox`` prints :func:`report`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import site
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from runner import cgroups
from runner import limits as limits_mod
from runner.limits import Limits, format_size

CPU_GRACE = 5
"""Seconds between the soft CPU limit (SIGXCPU) and the hard one (SIGKILL)."""

PROBE_TIMEOUT = 20.0

_NETWORK_PROBE = f"""
import errno, socket
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1)
except OSError as exc:
    raise SystemExit(0 if exc.errno == {errno.ENETUNREACH} else 3)
raise SystemExit(4)
"""


class SandboxUnavailable(Exception):
    """A limit or sandbox was asked for that this host cannot enforce (the message says why)."""


@dataclass(frozen=True)
class Host:
    """What this host offers to confine kernels."""

    rlimits: bool
    cgroups: cgroups.Hierarchy | None
    bwrap: str | None
    """Why bubblewrap cannot be used, or None when it works."""
    network: str | None
    """Why a network namespace cannot be made, or None when it works."""
    root: bool


def _confine_argv(spec: dict[str, object]) -> list[str]:
    return [sys.executable, "-m", "runner.confine", json.dumps(spec), "--"]


def _run_probe(argv: list[str]) -> str | None:
    """None when ``argv`` exits 0, else why not (its error output)."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT, env=_python_env()
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if done.returncode == 0:
        return None
    return (
        done.stderr.strip().splitlines()[-1]
        if done.stderr.strip()
        else (f"exit status {done.returncode}")
    )


SOURCE_ROOT = str(Path(__file__).resolve().parent.parent)
"""Where the ``runner`` package lives: kernels and probes import it from there."""


def runner_pythonpath() -> str:
    """``PYTHONPATH`` for a child Python that must import ``runner`` (kernels, probes)."""
    return os.pathsep.join(p for p in (SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p)


def _python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": runner_pythonpath()}


def probe_network() -> str | None:
    """None when a kernel can be cut off from every network here, else the reason."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are a Linux feature; this is {sys.platform}"
    reason = _run_probe(
        [*_confine_argv({"no_network": True}), sys.executable, "-c", _NETWORK_PROBE]
    )
    return None if reason is None else f"could not make a network namespace: {reason}"


def probe_bwrap() -> str | None:
    """None when bubblewrap is installed and works here, else the reason."""
    path = shutil.which("bwrap")
    if path is None:
        return "'bwrap' is not on PATH: install bubblewrap (e.g. apt install bubblewrap)"
    reason = _run_probe([path, "--ro-bind", "/", "/", "--unshare-all", "true"])
    return None if reason is None else f"bwrap does not work here: {reason}"


def probe(network: bool = True, bwrap: bool = True, use_cgroups: bool = True) -> Host:
    """Find out what this host offers (``network``/``bwrap``: run those probes, ~50 ms each).

    ``use_cgroups=False`` leaves cgroups out even where one is writable (``--no-cgroups``).
    """
    return Host(
        rlimits=os.name == "posix",
        cgroups=cgroups.find() if os.name == "posix" and use_cgroups else None,
        bwrap=probe_bwrap() if bwrap else "not probed",
        network=probe_network() if network else "not probed",
        root=os.name == "posix" and os.geteuid() == 0,
    )


def check(limits: Limits, host: Host) -> None:
    """Raise :class:`SandboxUnavailable` when ``limits`` ask for what ``host`` cannot do."""
    if limits.sandbox == "bwrap" and host.bwrap is not None:
        raise SandboxUnavailable(f"--sandbox bwrap: {host.bwrap}")
    if limits.no_network and limits.sandbox != "bwrap" and host.network is not None:
        raise SandboxUnavailable(f"--no-network: {host.network}")
    if not host.rlimits and any(
        v is not None for v in (limits.memory, limits.cpu_time, limits.file_size, limits.processes)
    ):
        raise SandboxUnavailable(
            "--memory-limit, --cpu-time-limit, --max-file-size and --max-processes need a "
            "POSIX host (resource limits); this is " + sys.platform
        )
    if limits.processes is not None and host.cgroups is None and host.root:
        raise SandboxUnavailable(
            "--max-processes: this runner runs as root and no cgroup is writable, and "
            "RLIMIT_NPROC does not bind root; run the runner as another user, or give it a "
            "delegated cgroup"
        )


def _user_tasks() -> int:
    """Processes and threads this user runs now (what RLIMIT_NPROC counts)."""
    uid, count = os.getuid(), 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":", 1) for line in status.read_text().splitlines() if ":" in line
            )
        except OSError:
            continue
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            count += int(fields.get("Threads", "1"))
    return count


class Box:
    """How one kernel is confined: the command prefix it starts with, and what broke it."""

    def __init__(
        self,
        limits: Limits,
        host: Host,
        name: str,
        scratch: Path,
        private: Path,
        cache: Path | None = None,
        hide: tuple[Path, ...] = (),
        environments: Path | None = None,
    ):
        self.limits = limits
        self.scratch = scratch
        self.environments = environments if limits.sandbox == "bwrap" else None
        """The runner's package environments, shown read-only at :data:`ENVIRONMENTS`."""
        self.groups: cgroups.KernelGroups | None = None
        use_groups = host.cgroups is not None and (
            limits.memory is not None or limits.processes is not None
        )
        spec: dict[str, object] = {"rlimits": self._rlimits(use_groups)}
        if use_groups:
            assert host.cgroups is not None
            self.groups = cgroups.KernelGroups(host.cgroups, name, limits.memory, limits.processes)
            spec["cgroup_procs"] = self.groups.procs_files
        bwrap = limits.sandbox == "bwrap"
        if limits.no_network and not bwrap:  # bubblewrap makes its own network namespace
            spec["no_network"] = True
        self.prefix = _confine_argv(spec)
        if bwrap:
            self.prefix += bwrap_argv(
                scratch, private, limits.no_network, cache, hide, self.environments
            )
        # bwrap does not pass signals on to the kernel: interrupt it by message
        self.interrupt_mode = "message" if bwrap else "signal"
        self.env = {"TMPDIR": str(scratch)}  # temporary files count against the disk quota

    def _rlimits(self, use_groups: bool) -> dict[str, tuple[int, int]]:
        lim = self.limits
        chosen = {"RLIMIT_CORE": (0, 0)}  # a core dump would put session memory on disk
        if lim.cpu_time is not None:
            chosen["RLIMIT_CPU"] = (lim.cpu_time, lim.cpu_time + CPU_GRACE)
        if lim.file_size is not None:
            chosen["RLIMIT_FSIZE"] = (lim.file_size, lim.file_size)
        if not use_groups and lim.memory is not None:
            chosen["RLIMIT_DATA"] = (lim.memory, lim.memory)
        if not use_groups and lim.processes is not None:
            allowed = _user_tasks() + lim.processes
            chosen["RLIMIT_NPROC"] = (allowed, allowed)
        return chosen

    def path_inside(self, path: Path) -> str:
        """Where the kernel sees ``path`` (package environments appear elsewhere in a box)."""
        if self.environments is not None and path.is_relative_to(self.environments):
            return str(ENVIRONMENTS / path.relative_to(self.environments))
        return str(path)

    def death_reason(self, returncode: int | None) -> str | None:
        """The limit that killed the kernel, as a message, or None."""
        exceeded = self.groups is not None and self.groups.memory_exceeded()
        return limits_mod.explain_death(self.limits, returncode, exceeded)

    def error_note(self, ename: str, evalue: str) -> str | None:
        """A note naming the limit behind a cell's exception, or None."""
        refused = self.groups.processes_exceeded() if self.groups is not None else None
        return limits_mod.annotate_error(self.limits, ename, evalue, refused)

    def scratch_bytes(self) -> int:
        """Bytes the scratch directory takes on disk now."""
        total = 0
        for parent, _, files in os.walk(self.scratch):
            for name in files:
                try:
                    total += os.lstat(os.path.join(parent, name)).st_blocks * 512
                except OSError:
                    continue
        return total

    def remove(self) -> None:
        """Remove the kernel's cgroups (after it has stopped)."""
        if self.groups is not None:
            self.groups.remove()


class Sandbox:
    """The runner's limits and host: makes a :class:`Box` for every kernel it starts."""

    def __init__(self, limits: Limits, host: Host) -> None:
        check(limits, host)
        self.limits = limits
        self.host = host
        self.hide: tuple[Path, ...] = ()
        """Directories of the runner (state, work roots) masked in a bubblewrap box."""
        self.environments: Path | None = None
        """The package environments' root (``runner.envs``), shown read-only in every box."""
        if host.cgroups is not None:
            cgroups.remove_stale(host.cgroups)

    def box(self, kernel_id: str, scratch: Path, private: Path, cache: Path | None = None) -> Box:
        """The box for a new kernel (its cgroups are created now)."""
        name = f"{cgroups.PREFIX}{os.getpid()}-{kernel_id}"
        return Box(
            self.limits, self.host, name, scratch, private, cache, self.hide, self.environments
        )


def _python_roots() -> list[str]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    roots.update(site.getsitepackages())
    roots.add(SOURCE_ROOT)
    return sorted(r for r in roots if Path(r).exists())


ENVIRONMENTS = Path("/didomagic-environments")
"""Where a boxed kernel sees the runner's package environments (not their host path, which
lies in the runner's state directory)."""


def bwrap_argv(
    scratch: Path,
    private: Path,
    no_network: bool,
    cache: Path | None = None,
    hide: tuple[Path, ...] = (),
    environments: Path | None = None,
) -> list[str]:
    """The bubblewrap command line that shows a kernel only what it needs.

    ``cache`` is bound read-only, and so are the package ``environments`` (at
    :data:`ENVIRONMENTS`). Each of ``hide`` (the runner's state and work
    directories) that lies inside a directory the box shows (the environment,
    say) is covered by an empty tmpfs, unless it holds one of them.
    """
    argv = ["bwrap", "--die-with-parent", "--new-session", "--unshare-all"]
    if not no_network:
        argv.append("--share-net")
    # Mounts apply in order: the private /tmp first, so binds beneath it (an environment
    # or a work directory under /tmp) land on top of it rather than being hidden.
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for system in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc"):
        argv += ["--ro-bind-try", system, system]
    roots = _python_roots()
    for root in roots:
        argv += ["--ro-bind", root, root]
    shown = [Path(r) for r in (*roots, "/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc")]
    for path in hide:  # masked where the box would show it, unless that hid Python too
        inside = any(path.is_relative_to(root) for root in shown)
        if inside and not any(root.is_relative_to(path) for root in shown):
            argv += ["--tmpfs", str(path)]
    if environments is not None:
        argv += ["--ro-bind", str(environments), str(ENVIRONMENTS)]
    argv += ["--bind", str(private), str(private), "--bind", str(scratch), str(scratch)]
    if cache is not None:
        argv += ["--ro-bind", str(cache), str(cache)]
    argv += ["--chdir", str(scratch), "--setenv", "HOME", str(scratch)]
    argv += ["--setenv", "IPYTHONDIR", str(private / "ipython")]  # not in the scratch
    # In its own PID namespace the kernel's parent is bwrap's pid 1, which ipykernel would
    # take for a dead parent; --die-with-parent ends it with the runner instead.
    argv += ["--unsetenv", "JPY_PARENT_PID"]
    argv += ["--setenv", "TMPDIR", "/tmp", "--"]
    return argv


def report(limits: Limits, host: Host) -> str:
    """What ``--check-sandbox`` prints: each mechanism, whether it is active, what it bounds."""
    yes, no = "active  ", "inactive"
    memory_by = "cgroup" if host.cgroups else "RLIMIT_DATA"
    procs_by = "cgroup pids.max" if host.cgroups else ("RLIMIT_NPROC (per user; root is exempt)")
    lines = [
        f"didomagic-runner sandbox check ({sys.platform}, "
        f"{'root' if host.root else 'uid ' + str(os.getuid() if os.name == 'posix' else '?')}):",
        f"  rlimits            {yes if host.rlimits else no}  CPU time, file size, no core "
        "dumps" + ("" if host.cgroups else "; memory (RLIMIT_DATA), processes (RLIMIT_NPROC)"),
        f"  cgroups            {yes if host.cgroups else no}  "
        + (
            f"{host.cgroups.describe()}: memory and processes per kernel"
            if host.cgroups
            else "no writable cgroup: memory and processes fall back to rlimits"
        ),
        f"  network namespace  {yes if host.network is None else no}  "
        + ("--no-network available" if host.network is None else host.network),
        f"  bubblewrap         {yes if host.bwrap is None else no}  "
        + ("--sandbox bwrap available" if host.bwrap is None else host.bwrap),
        f"  disk quota         {yes if os.name == 'posix' else no}  scratch measured every "
        f"{QUOTA_POLL:g} s while a cell runs",
        "with these flags each kernel gets: "
        + (", ".join(limits.describe()) or "no limits (see --help for the limit flags)"),
    ]
    if limits.memory is not None:
        lines.append(f"  memory limit {format_size(limits.memory)} via {memory_by}")
    if limits.processes is not None:
        lines.append(f"  max processes {limits.processes} via {procs_by}")
    lines.append(isolation(limits, host))
    try:
        check(limits, host)
    except SandboxUnavailable as exc:
        lines.append(f"cannot start with these flags: {exc}")
    return "\n".join(lines)


def isolation(limits: Limits, host: Host) -> str:
    """What sessions of one runner can see of each other with these flags, said plainly."""
    if limits.sandbox == "bwrap":
        return (
            "isolation between sessions: --sandbox bwrap: each kernel sees only its own "
            "scratch, private and cache directories; other sessions' values, other kernels' "
            "connection files and sockets, and the runner's state directory are not in its "
            "file system, and it sees no other process"
        )
    uid = os.getuid() if os.name == "posix" else "?"
    available = "available here" if host.bwrap is None else f"not available here: {host.bwrap}"
    return (
        f"isolation between sessions: NONE without --sandbox bwrap. Every kernel runs as uid "
        f"{uid}, like the runner, and one uid cannot be kept from its own files and processes: "
        "a cell can read other sessions' cached values and the runner's state directory "
        "(token, key, jobs) and trace or signal other kernels. Kernel connection files are "
        "deleted once a kernel is up and paths are not guessable, which is no boundary. "
        f"Use --sandbox bwrap ({available}) when sessions must not see each other."
    )


QUOTA_POLL = 0.5
"""Seconds between measurements of a running cell's scratch directory (--disk-quota)."""
