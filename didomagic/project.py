"""The notebook's project folder: where it is, and which of its paths a runner may touch.

The *project root* is the notebook's working directory, or the nearest parent
holding ``.git`` or ``pyproject.toml`` (``DIDOMAGIC_PROJECT_ROOT`` overrides
it). A runner names files by their path relative to that root, a string from
the peer: :meth:`Project.resolve` turns it into a path only if it stays inside
the root, also after following symlinks, and is not excluded.

Excluded from serving: ``.git``, virtual environments (any folder holding
``pyvenv.cfg``, and ``.venv``/``venv``), ``__pycache__``, ``.ipynb_checkpoints``
and whatever the project's ``.gitignore`` files ignore (read with
``pathspec``, exactly as git reads them). Files a cell writes may come back
even where ``.gitignore`` ignores them (an ``output/`` folder usually is), but
never into the always-excluded folders.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pathspec

from didomagic import firstparty
from didomagic.errors import FileRefused

ROOT_ENV = "DIDOMAGIC_PROJECT_ROOT"
"""Environment variable naming the project root explicitly."""

ALWAYS_EXCLUDED = frozenset({".git", "__pycache__", ".ipynb_checkpoints", ".venv", "venv"})
"""Folder names never served and never written back into."""


def find_root(cwd: Path | None = None) -> Path:
    """The project root for a notebook working in ``cwd`` (see the module docstring).

    The same root the notebook's code is shipped from (:func:`firstparty.project_root`),
    unless ``DIDOMAGIC_PROJECT_ROOT`` names one.
    """
    explicit = os.environ.get(ROOT_ENV)
    if explicit:
        return Path(explicit).expanduser().resolve()
    return firstparty.project_root(cwd)


def clean_relative(name: str) -> str:
    """A peer's relative path in normal form; raise FileRefused unless it stays below the root."""
    if not isinstance(name, str) or "\x00" in name or "\\" in name:
        raise FileRefused(f"{name!r} is not a relative path")
    normal = posixpath.normpath(name) if name else "."
    if posixpath.isabs(normal) or normal == ".." or normal.startswith("../"):
        raise FileRefused(f"{name!r} leaves the project root")
    return normal


@dataclass(frozen=True)
class Entry:
    """One entry of a folder listing, as the runner's mirror shows it."""

    name: str
    is_dir: bool
    size: int
    mtime_ns: int


class Project:
    """A project root and its rules: what may be served, what may be written back."""

    def __init__(self, root: Path, cwd: Path | None = None) -> None:
        self.root = root.resolve()
        where = (cwd or Path.cwd()).resolve()
        self.cwd = (
            where.relative_to(self.root).as_posix() if where.is_relative_to(self.root) else "."
        )
        """The notebook's working directory relative to the root ("." at the root)."""
        self._ignores: dict[str, pathspec.PathSpec | None] = {}

    @classmethod
    def here(cls) -> Project:
        """The project of a notebook working in the current directory."""
        return cls(find_root(), Path.cwd())

    # -- rules

    def _ignore_spec(self, folder: str) -> pathspec.PathSpec | None:
        """The rules of ``folder``'s own ``.gitignore`` (cached; None if it has none)."""
        if folder not in self._ignores:
            path = self.root / folder / ".gitignore"
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            self._ignores[folder] = pathspec.GitIgnoreSpec.from_lines(lines) if lines else None
        return self._ignores[folder]

    def ignored(self, relative: str, is_dir: bool) -> bool:
        """True if a ``.gitignore`` of the project ignores ``relative`` (or a folder above it)."""
        parts = relative.split("/")
        for depth in range(1, len(parts) + 1):
            sub_is_dir = is_dir or depth < len(parts)
            for cut in range(depth):
                folder = "/".join(parts[:cut]) or "."
                spec = self._ignore_spec(folder)
                if spec is None:
                    continue
                inner = "/".join(parts[cut:depth]) + ("/" if sub_is_dir else "")
                if spec.match_file(inner):
                    return True
        return False

    def always_excluded(self, relative: str) -> bool:
        """True for paths in ``.git``, virtual environments, ``__pycache__`` and the like."""
        parts = [] if relative == "." else relative.split("/")
        if any(part in ALWAYS_EXCLUDED for part in parts):
            return True
        folder = self.root
        for part in parts[:-1]:
            folder = folder / part
            if (folder / "pyvenv.cfg").exists():
                return True
        return bool(parts) and (self.root / relative / "pyvenv.cfg").exists()

    def excluded(self, relative: str, is_dir: bool) -> bool:
        """True if ``relative`` is never served to a runner."""
        return self.always_excluded(relative) or (
            relative != "." and self.ignored(relative, is_dir)
        )

    # -- paths from the peer

    def resolve(self, name: str, must_exist: bool = True) -> Path:
        """The real path of ``name`` (relative to the root); raise FileRefused if not servable.

        Raises FileNotFoundError (``must_exist``) when it does not exist.
        """
        relative = clean_relative(name)
        path = self.root / relative
        real = path.resolve(strict=False)
        if not real.is_relative_to(self.root):
            raise FileRefused(f"{name!r} leads outside the project root (through a symlink)")
        if self.excluded(relative, path.is_dir()):
            raise FileRefused(f"{name!r} is excluded from serving (.git, a venv or .gitignore)")
        if must_exist and not path.exists():
            raise FileNotFoundError(f"no such file in the notebook's project: {name!r}")
        return path

    def writable(self, name: str) -> Path:
        """Where a file the runner wrote goes; raise FileRefused unless it may go there.

        Never through a symlink, never into the always-excluded folders.
        """
        relative = clean_relative(name)
        if relative == "." or self.always_excluded(relative):
            raise FileRefused(f"{name!r} is not written back (.git, a venv or __pycache__)")
        path = self.root / relative
        if not path.parent.resolve(strict=False).is_relative_to(self.root):
            raise FileRefused(f"{name!r} leads outside the project root (through a symlink)")
        if path.is_symlink():
            raise FileRefused(f"{name!r} is a symlink here; not written through it")
        return path

    def relative(self, user_path: str) -> str:
        """A path as the cell writes it (relative to the notebook's folder) made root-relative."""
        return clean_relative(posixpath.join(self.cwd, user_path))

    # -- listings

    def listing(self, name: str) -> list[Entry]:
        """The servable entries of folder ``name``."""
        folder = self.resolve(name)
        if not folder.is_dir():
            raise NotADirectoryError(f"not a folder in the notebook's project: {name!r}")
        base = clean_relative(name)
        entries = []
        with os.scandir(folder) as scan:
            for item in scan:
                relative = item.name if base == "." else f"{base}/{item.name}"
                try:
                    if item.is_symlink() and not Path(item.path).resolve().is_relative_to(
                        self.root
                    ):
                        continue
                    info = item.stat()
                    is_dir = item.is_dir()
                except OSError:
                    continue
                if self.excluded(relative, is_dir):
                    continue
                entries.append(
                    Entry(item.name, is_dir, 0 if is_dir else info.st_size, info.st_mtime_ns)
                )
        return sorted(entries, key=lambda e: e.name)

    def walk(self, limit: int) -> Iterator[tuple[str, Entry]]:
        """Up to ``limit`` servable entries of the project, breadth first: ``(folder, entry)``.

        The notebook's own folder comes first, then the rest of the tree.
        """
        queue = [self.cwd] + ([] if self.cwd == "." else ["."])
        seen = set(queue)
        count = 0
        while queue and count < limit:
            folder = queue.pop(0)
            try:
                entries = self.listing(folder)
            except (OSError, FileRefused):
                continue
            for entry in entries:
                relative = entry.name if folder == "." else f"{folder}/{entry.name}"
                if entry.is_dir and relative not in seen:
                    seen.add(relative)
                    queue.append(relative)
                yield folder, entry
                count += 1
                if count >= limit:
                    return
