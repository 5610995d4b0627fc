"""The package installer the runner drives: uv where it is available, else pip.

Both do the same two steps (see ``runner.envs``): :meth:`Installer.plan` asks
what a requirement set needs on top of the runner's own environment (a dry
run against the runner's interpreter, which changes nothing), and
:meth:`Installer.install` puts exactly those distributions into a target
directory, without dependencies. Wheels only: no package's build script runs
in the runner. Each runs as an asyncio subprocess, so the event loop never
waits on it; its output lines are handed to a callback as they come.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import importlib.metadata
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

INSTALL_TIMEOUT = 900.0
"""Seconds one installer run may take before it is stopped."""

ERROR_LINES = 30
"""Lines of the installer's output kept for the message of a failure."""

LINE_LIMIT = 1 << 20
"""The longest output line read from the installer (a longer one fails the install)."""

Line = Callable[[str], None]

_PLANNED = re.compile(r"^\s*\+\s+([A-Za-z0-9._-]+)==(\S+)")
"""A line of uv's dry run naming a distribution it would install: `` + name==1.0``."""


class InstallFailed(Exception):
    """The installer refused or failed; the message is its own output."""


async def _run(argv: list[str], on_line: Line, env: dict[str, str]) -> tuple[int, list[str]]:
    """Run ``argv``; hand each output line to ``on_line``; return the status and the lines."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        limit=LINE_LIMIT,
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(INSTALL_TIMEOUT):
            async for raw in process.stdout:
                line = raw.decode(errors="replace").strip()
                if line:
                    lines.append(line)
                    on_line(line)
            status = await process.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise InstallFailed(
            f"the installer ran longer than {INSTALL_TIMEOUT:g} s and was stopped"
        ) from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    return status, lines


def _failure(lines: Sequence[str]) -> InstallFailed:
    return InstallFailed("\n".join(lines[-ERROR_LINES:]) or "the installer failed silently")


class Installer(abc.ABC):
    """One installer: how to plan and how to install."""

    label = ""
    """What ``%runners`` shows, e.g. ``uv 0.13.9``."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def _env(self) -> dict[str, str]:
        return {**os.environ, "NO_COLOR": "1"}

    @abc.abstractmethod
    async def plan(
        self, requirements: Sequence[str], options: list[str], on_line: Line
    ) -> list[str]:
        """``name==version`` of each distribution to install on top of the base."""

    @abc.abstractmethod
    async def install(
        self, pins: Sequence[str], target: Path, options: list[str], on_line: Line
    ) -> None:
        """Install exactly ``pins`` (no dependencies) into ``target``."""


class UvInstaller(Installer):
    """``uv pip install``, with a persistent cache in the runner's state directory."""

    def __init__(self, cache_dir: Path, uv: str, version: str) -> None:
        super().__init__(cache_dir)
        self.uv = uv
        self.label = version

    def _argv(self, options: list[str]) -> list[str]:
        return [
            self.uv,
            "pip",
            "install",
            "--python",
            sys.executable,
            "--cache-dir",
            str(self.cache_dir),
            "--only-binary",
            ":all:",
            "--no-progress",
            *options,
        ]

    async def plan(
        self, requirements: Sequence[str], options: list[str], on_line: Line
    ) -> list[str]:
        """A dry run against the runner's interpreter: what it would add or replace."""
        # A dry run changes nothing, so an externally managed base (a distribution's own
        # Python) may be asked too.
        argv = [*self._argv(options), "--dry-run", "--break-system-packages", "--", *requirements]
        status, lines = await _run(argv, on_line, self._env())
        if status != 0:
            raise _failure(lines)
        return [f"{m[1]}=={m[2]}" for m in map(_PLANNED.match, lines) if m]

    async def install(
        self, pins: Sequence[str], target: Path, options: list[str], on_line: Line
    ) -> None:
        """``--target`` with ``--no-deps``: the plan already holds every dependency."""
        argv = [*self._argv(options), "--target", str(target), "--no-deps", "--", *pins]
        status, lines = await _run(argv, on_line, self._env())
        if status != 0:
            raise _failure(lines)


class PipInstaller(Installer):
    """``pip install``: the fallback where uv is not available (slower, same result)."""

    label = "pip"

    def _argv(self, options: list[str]) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--only-binary",
            ":all:",
            "--cache-dir",
            str(self.cache_dir),
            *options,
        ]

    async def plan(
        self, requirements: Sequence[str], options: list[str], on_line: Line
    ) -> list[str]:
        """``--dry-run --report``: the distributions pip would install."""
        with tempfile.TemporaryDirectory(prefix="didomagic-pip-") as tmp:
            report = Path(tmp) / "report.json"
            argv = [
                *self._argv(options),
                "--dry-run",
                "--break-system-packages",  # a dry run changes nothing
                "--quiet",
                "--report",
                str(report),
                *requirements,
            ]
            status, lines = await _run(argv, on_line, self._env())
            if status != 0:
                raise _failure(lines)
            body = json.loads(report.read_text())
        return [
            f"{item['metadata']['name']}=={item['metadata']['version']}"
            for item in body.get("install", [])
        ]

    async def install(
        self, pins: Sequence[str], target: Path, options: list[str], on_line: Line
    ) -> None:
        """``--target`` with ``--no-deps``."""
        argv = [*self._argv(options), "--target", str(target), "--no-deps", *pins]
        status, lines = await _run(argv, on_line, self._env())
        if status != 0:
            raise _failure(lines)


def find_uv() -> tuple[str, str] | None:
    """The uv binary the ``uv`` package ships and its label (``uv 0.13.9``), or None."""
    try:
        import uv

        path = uv.find_uv_bin()
    except (ImportError, OSError):
        return None
    try:
        version = importlib.metadata.version("uv")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return str(path), f"uv {version}"


def pick_installer(choice: str, cache_dir: Path | None = None) -> tuple[Installer, str]:
    """The installer for ``--installer`` (auto, uv or pip), with a note when it falls back."""
    cache = cache_dir or Path()
    if choice in ("auto", "uv"):
        found = find_uv()
        if found is not None:
            return UvInstaller(cache, *found), ""
        if choice == "uv":
            raise SystemExit(
                "didomagic-runner: --installer uv: the 'uv' package is not installed "
                "(pip install uv)"
            )
        return PipInstaller(cache), "uv is not available (pip install uv): installing with pip"
    return PipInstaller(cache), ""
