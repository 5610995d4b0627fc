"""One session's packages: the requirements it has asked for and the environment its kernel sees.

A session's requirement set only grows: a cell asking for more packages gets
the environment of the union (built once, cached like any other set), which
replaces the earlier one at the front of the kernel's ``sys.path`` while
the kernel keeps its state. A kernel that replaced a dead one gets the
session's environment again before its next cell. Cells that ask for nothing
new cost a comparison.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from packaging.utils import canonicalize_name

from runner.envs import (
    Env,
    EnvCache,
    PackageRequestError,
    names_of,
    normalise,
    satisfied_by,
)

logger = logging.getLogger("didomagic.runner")


class _Kernel(Protocol):
    id: str

    def path_inside(self, path: Path) -> str: ...

    async def run_silently(self, code: str) -> dict[str, Any]: ...


Progress = Callable[[int, str, bool], None]
"""Install progress for the client: (distributions, the installer's last line, done)."""


class SessionPackages:
    """The requirement set and environment of one session (see the module docstring)."""

    def __init__(self, cache: EnvCache | None) -> None:
        self.cache = cache
        self.requirements: tuple[str, ...] = ()
        self.env: Env | None = None
        self._kernel_id: str | None = None
        """The kernel in which :attr:`env` is active."""
        self._held: list[Env] = []

    async def prepare(
        self, kernel: _Kernel, requested: Sequence[str], report: Progress
    ) -> dict[str, Any] | None:
        """Make ``kernel`` see the requested packages before a cell.

        Return None when it does, else the error for the cell's result
        (``ename``, ``evalue``, ``traceback``); the session stays usable.
        """
        try:
            wanted = self._merged(requested)
        except PackageRequestError as exc:
            return _error(exc.ename, str(exc))
        if wanted != self.requirements and self.env is not None and self.cache is not None:
            visible = {**await self.cache.base(), **_versions(self.env.installed)}
            if not satisfied_by(wanted, visible):
                self.requirements = wanted  # what the kernel sees satisfies it already
        env = self.env
        if wanted == self.requirements and (
            env is None or env.site is None or self._kernel_id == kernel.id
        ):
            return None
        if wanted != self.requirements or env is None:
            if self.cache is None:
                return _error("InstallsDisabled", "this runner does not install packages")
            started = time.perf_counter()
            shown: list[int] = []  # the count of the last report, if any (none: cached)

            def relay(count: int, line: str) -> None:
                shown[:] = [count]
                report(count, line, False)

            try:
                env = await self.cache.acquire(wanted, relay)
            except PackageRequestError as exc:
                return _error(exc.ename, str(exc))
            self._held.append(env)
            if shown:
                seconds = time.perf_counter() - started
                report(len(env.installed), f"installed in {seconds:.1f} s", True)
        previous = None  # the layer this kernel sees now, if any
        if self.env is not None and self.env.site is not None and self._kernel_id == kernel.id:
            previous = kernel.path_inside(self.env.site)
        if env.site is not None or previous is not None:  # the kernel's sys.path changes
            site = kernel.path_inside(env.site) if env.site is not None else None
            reply = await kernel.run_silently(
                f"__import__('runner.agent').agent.use_packages({site!r}, {previous!r})"
            )
            if reply.get("status") != "ok":
                if env is not self.env:
                    self._drop(env)
                return _error(
                    str(reply.get("ename", "PackageVersionConflict")), str(reply.get("evalue", ""))
                )
            self._kernel_id = kernel.id
        self.env, self.requirements = env, wanted
        return None

    def _merged(self, requested: Sequence[str]) -> tuple[str, ...]:
        """The session's set with ``requested`` added (a new requirement on a name wins)."""
        if not requested:
            return self.requirements
        merged = {**names_of(self.requirements), **names_of(normalise(requested))}
        return tuple(sorted(merged.values()))

    def _drop(self, env: Env) -> None:
        self._held.remove(env)
        if self.cache is not None:
            self.cache.release(env)

    def close(self) -> None:
        """The session ended: its environments may be evicted again."""
        for env in list(self._held):
            self._drop(env)
        self.env = None


def _versions(pins: Sequence[str]) -> dict[str, str]:
    """Canonical name → version of ``name==version`` pins."""
    return {
        canonicalize_name(name): version
        for name, _, version in (pin.partition("==") for pin in pins)
    }


def _error(ename: str, message: str) -> dict[str, Any]:
    return {"ename": ename, "evalue": message, "traceback": []}
