"""Package environments layered over the runner's own, built once and cached.

Theory of operation
-------------------
A cell may ask for packages (``%%remote --pip``, ``--requirements``,
``--packages match``). The runner answers with an *environment*: a directory
of installed distributions that the kernel puts in front of its ``sys.path``,
while ipykernel, the agent and everything else the runner has stay where they
are (the base). Installing is the runner's job, never the kernel's: it works
for ``--no-network`` kernels, and a ``--sandbox bwrap`` kernel sees the cache
read-only.

A set of requirements is keyed by a hash of (Python, platform, the base's
distributions, the normalised sorted requirements, the index options). For a
new key the runner

1. asks the installer what the set needs *on top of the base*: a dry run
   against the runner's own interpreter (``uv pip install --dry-run``, or
   ``pip install --dry-run --report``), so that what the base already satisfies
   is neither downloaded nor installed again;
2. installs exactly those distributions, without dependencies, into
   ``<root>/<key>/site`` (``--target``), from wheels only: no build script of
   any package runs outside a kernel's box;
3. writes ``env.json`` and renames the directory into place, so a half-built
   environment is never used.

Requirements the base satisfies exactly (every ``name==version`` already
installed) cost nothing: no installer runs. Two sessions that ask for one key
while it builds share one build. Beyond ``--env-cache-size`` (a number of
environments, or bytes with a K/M/G suffix) the least recently used
environments are removed, never one a session holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from runner.installer import Installer, InstallFailed, pick_installer

logger = logging.getLogger("didomagic.runner")

MAX_REQUIREMENTS = 200
"""The most requirements one cell may name."""

MAX_REQUIREMENT_LENGTH = 400
"""The longest requirement string accepted."""

ENV_FILE = "env.json"
SITE_DIR = "site"

Report = Callable[[int, str], None]
"""Progress of a build: (distributions being installed, the installer's last line)."""


class PackageRequestError(Exception):
    """A cell's package request cannot be served; ``ename`` names the kind for the client."""

    def __init__(self, ename: str, message: str) -> None:
        super().__init__(message)
        self.ename = ename


@dataclass(frozen=True)
class InstallSettings:
    """How the runner installs packages (from the command line)."""

    allow: bool = True
    installer: str = "auto"
    """``auto`` (uv where available, else pip), ``uv`` or ``pip``."""
    find_links: tuple[str, ...] = ()
    no_index: bool = False
    max_envs: int | None = 20
    """Environments kept at most (None: no count limit)."""
    max_bytes: int | None = None
    """Bytes of environments kept at most (None: no size limit)."""


@dataclass
class Env:
    """One environment: ``site`` holds its distributions (None: the base has them all)."""

    key: str
    requirements: tuple[str, ...]
    site: Path | None
    installed: tuple[str, ...] = ()
    nbytes: int = 0
    users: int = 0
    last_used: float = field(default_factory=time.time)


def normalise(requirements: Sequence[str]) -> tuple[str, ...]:
    """Validate and normalise requirement strings; sorted, one per distribution.

    Raise :class:`PackageRequestError` for anything that is not a plain
    requirement on a named distribution (URLs and paths are refused: a peer's
    string never becomes a path here).
    """
    if len(requirements) > MAX_REQUIREMENTS:
        raise PackageRequestError(
            "PackageRequestError",
            f"a cell may ask for at most {MAX_REQUIREMENTS} packages, this one asks for "
            f"{len(requirements)}",
        )
    chosen: dict[str, str] = {}
    for text in requirements:
        if len(text) > MAX_REQUIREMENT_LENGTH:
            raise PackageRequestError(
                "PackageRequestError", f"requirement too long ({len(text)} characters)"
            )
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            raise PackageRequestError(
                "PackageRequestError", f"not a valid requirement {text!r}: {exc}"
            ) from None
        if req.url:
            raise PackageRequestError(
                "PackageRequestError",
                f"{text!r} names a URL or path; ask for packages by name and version (the "
                "runner installs from its own index)",
            )
        name = canonicalize_name(req.name)
        req.name = name
        chosen[name] = str(req)  # a later request for the same distribution wins
    return tuple(sorted(chosen.values()))


def names_of(requirements: Sequence[str]) -> dict[str, str]:
    """Canonical distribution name → requirement string."""
    return {canonicalize_name(Requirement(r).name): r for r in requirements}


def base_distributions() -> dict[str, str]:
    """Canonical name → version of every distribution in the runner's own environment."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    return found


def satisfied_by(requirements: Sequence[str], installed: dict[str, str]) -> list[str]:
    """The requirements that ``installed`` (name → version) does not satisfy."""
    missing = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = installed.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            missing.append(text)
    return missing


def _builder_alive(name: str) -> bool:
    """Whether the runner building ``.<key>-<pid>`` (sharing this state directory) still runs."""
    pid = name.rsplit("-", 1)[-1]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: not ours to judge
    return int(pid) != os.getpid()


def _tree_bytes(path: Path) -> int:
    total = 0
    for parent, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


class EnvCache:
    """The runner's environments: looked up, built once per key, evicted least recently used."""

    def __init__(self, root: Path, cache_dir: Path, settings: InstallSettings) -> None:
        self.root = root.absolute()
        self.cache_dir = cache_dir.absolute()
        self.settings = settings
        self.installer: Installer | None = None
        self.note = ""
        """Why the installer is not the preferred one (uv), if it is not."""
        if settings.allow:
            self.installer, self.note = pick_installer(settings.installer, self.cache_dir)
            if self.note:
                logger.warning("packages: %s", self.note)
        self.envs: dict[str, Env] = {}
        self.builds = 0
        """Environments built by this runner process (reuse does not count)."""
        self._building: dict[str, asyncio.Future[Env]] = {}
        self._listeners: dict[str, list[Report]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._base: dict[str, str] | None = None
        self._fingerprint = ""

    def prepare(self) -> None:
        """Create the directories and load the environments a previous run left (blocking)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for entry in self.root.iterdir():
            if entry.name.startswith("."):
                if not _builder_alive(entry.name):
                    shutil.rmtree(entry, ignore_errors=True)  # an interrupted build
                continue
            env = self._load(entry)
            if env is not None:
                self.envs[env.key] = env

    def _load(self, directory: Path) -> Env | None:
        try:
            body = json.loads((directory / ENV_FILE).read_text())
            last_used = (directory / ENV_FILE).stat().st_mtime
            return Env(
                key=directory.name,
                requirements=tuple(body["requirements"]),
                site=directory / SITE_DIR,
                installed=tuple(body["installed"]),
                nbytes=int(body["nbytes"]),
                last_used=last_used,
            )
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("packages: removing unreadable environment %s", directory)
            shutil.rmtree(directory, ignore_errors=True)
            return None

    def describe(self) -> dict[str, Any]:
        """What the runner says about installs: whether, with what, how many environments."""
        return {
            "install": self.installer is not None,
            "installer": self.installer.label if self.installer else "",
            "environments": sum(1 for e in self.envs.values() if e.site is not None),
            "builds": self.builds,
        }

    async def base(self) -> dict[str, str]:
        """The base's distributions (measured once, off the event loop)."""
        if self._base is None:
            self._base = await asyncio.to_thread(base_distributions)
            listing = json.dumps(sorted(self._base.items())).encode()
            self._fingerprint = hashlib.sha256(listing).hexdigest()
        return self._base

    def key(self, requirements: Sequence[str]) -> str:
        """The cache key of a normalised requirement set on this runner."""
        body = {
            "python": sys.version,
            "implementation": sys.implementation.name,
            "platform": sysconfig.get_platform(),
            "base": self._fingerprint,
            "requirements": list(requirements),
            "find_links": list(self.settings.find_links),
            "no_index": self.settings.no_index,
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]

    async def acquire(self, requirements: Sequence[str], report: Report) -> Env:
        """The environment for ``requirements`` (normalised), built if needed; held until
        :meth:`release`.

        Raise :class:`PackageRequestError` when installs are off and the base
        lacks something, or when the installer fails (its own message).
        """
        base = await self.base()
        missing = satisfied_by(requirements, base)
        key = self.key(requirements)
        if not missing:
            env = self.envs.get(key) or Env(key, tuple(requirements), None)
        elif self.installer is None:
            raise PackageRequestError(
                "InstallsDisabled",
                "this runner does not install packages (it was started with --no-install) "
                f"and its environment lacks {', '.join(missing)}; ask its owner to install "
                "them, or use a runner that installs packages",
            )
        else:
            env = await self._get(key, requirements, report)
        env.users += 1
        env.last_used = time.time()
        if env.site is not None:
            with contextlib.suppress(OSError):
                os.utime(env.site.parent / ENV_FILE)
        return env

    def release(self, env: Env) -> None:
        """A session no longer uses ``env``."""
        env.users = max(0, env.users - 1)

    async def _get(self, key: str, requirements: Sequence[str], report: Report) -> Env:
        env = self.envs.get(key)
        if env is not None:
            return env
        building = self._building.get(key)
        if building is None:
            building = asyncio.get_running_loop().create_future()
            self._building[key] = building
            self._listeners[key] = []
            building.add_done_callback(_retrieve)
            task = asyncio.create_task(self._build(key, tuple(requirements), building))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            logger.info("packages: waiting for the build of %s started by another session", key)
        listeners = self._listeners.get(key, [])
        listeners.append(report)
        try:
            return await asyncio.shield(building)
        finally:
            with contextlib.suppress(ValueError):
                listeners.remove(report)

    def _broadcast(self, key: str, count: int, line: str) -> None:
        for listener in list(self._listeners.get(key, ())):
            listener(count, line)

    async def _build(
        self, key: str, requirements: tuple[str, ...], done: asyncio.Future[Env]
    ) -> None:
        assert self.installer is not None
        started = time.perf_counter()
        work = self.root / f".{key}-{os.getpid()}"
        logger.info("packages: building environment %s for %s", key, ", ".join(requirements))
        try:
            note = f" ({self.note})" if self.note else ""
            self._broadcast(key, 0, f"resolving {len(requirements)} requirements{note}")
            plan = await self.installer.plan(
                requirements, self._options(), lambda line: self._broadcast(key, 0, line)
            )
            if not plan:
                env = Env(key, requirements, None)
            else:
                shutil.rmtree(work, ignore_errors=True)
                site = work / SITE_DIR
                site.mkdir(parents=True)
                self._broadcast(key, len(plan), f"installing {len(plan)} packages")
                await self.installer.install(
                    plan, site, self._options(), lambda line: self._broadcast(key, len(plan), line)
                )
                nbytes = await asyncio.to_thread(_tree_bytes, site)
                body = {"requirements": list(requirements), "installed": plan, "nbytes": nbytes}
                (work / ENV_FILE).write_text(json.dumps(body))
                final = self.root / key
                await asyncio.to_thread(shutil.rmtree, final, True)
                os.replace(work, final)
                env = Env(key, requirements, final / SITE_DIR, tuple(plan), nbytes)
                self.builds += 1
            self.envs[key] = env
            logger.info(
                "packages: built environment %s for %s in %.0f ms (%d installed)",
                key,
                ", ".join(requirements),
                (time.perf_counter() - started) * 1e3,
                len(env.installed),
            )
            done.set_result(env)
            await self._evict(keep=key)
        except InstallFailed as exc:
            logger.info("packages: could not build %s: %s", key, exc)
            done.set_exception(PackageRequestError("PackageInstallError", str(exc)))
        except Exception as exc:
            logger.exception("packages: building %s failed", key)
            done.set_exception(
                PackageRequestError("PackageInstallError", f"the runner could not install: {exc}")
            )
        finally:
            self._building.pop(key, None)
            self._listeners.pop(key, None)
            if work.exists():
                await asyncio.to_thread(shutil.rmtree, work, True)
            if not done.done():
                done.cancel()

    def _options(self) -> list[str]:
        options: list[str] = []
        for folder in self.settings.find_links:
            options += ["--find-links", folder]
        if self.settings.no_index:
            options.append("--no-index")
        return options

    async def _evict(self, keep: str) -> None:
        """Remove least recently used environments beyond the cap (never one in use, nor
        ``keep``, the one just built)."""
        built = sorted(
            (e for e in self.envs.values() if e.site is not None), key=lambda e: e.last_used
        )
        count, nbytes = len(built), sum(e.nbytes for e in built)
        max_envs, max_bytes = self.settings.max_envs, self.settings.max_bytes
        for env in built:
            over = (max_envs is not None and count > max_envs) or (
                max_bytes is not None and nbytes > max_bytes
            )
            if not over:
                break
            if env.users or env.key == keep:
                continue
            assert env.site is not None
            del self.envs[env.key]
            count, nbytes = count - 1, nbytes - env.nbytes
            logger.info(
                "packages: evicted the least recently used environment %s (--env-cache-size)",
                env.key,
            )
            await asyncio.to_thread(shutil.rmtree, env.site.parent, True)


def _retrieve(future: asyncio.Future[Env]) -> None:
    """Mark a build's failure as seen, even when every session that waited for it left."""
    if not future.cancelled():
        future.exception()
