"""Which of the notebook's modules are first-party, and what they are: files, digests, names.

A module is *first-party* when its source file lies under the notebook's
project root (the working directory, or its nearest parent holding ``.git``
or ``pyproject.toml``), under a ``sys.path`` entry that is not the
standard library or a site-packages directory, or under the project directory
of an editable install (``pip install -e``, named by its ``direct_url.json``).
Modules of the Python environment, and didomagic itself, never are: the runner
has its own.

:class:`CodeIndex` answers these questions for every cell, cheaply: its
caches are checked with one ``stat`` per first-party file. What travels to a
runner, and when, is :mod:`didomagic.localcode`'s business.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import operator
import os
import site
import sys
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote, urlparse

TOOL_PACKAGES = frozenset({"didomagic", "runner"})
"""Top-level packages never shipped: every runner has them."""

MAX_PACKAGE_MODULES = 500
"""Most modules of a package sent in one answer (the rest are asked for when imported)."""

MAX_PACKAGE_BYTES = 16 << 20
"""Most source bytes of a package sent in one answer."""

PROJECT_MARKERS = (".git", "pyproject.toml")
"""What marks a directory as a project's root."""

SKIPPED_DIRS = frozenset({"__pycache__", ".git", ".venv", "venv", "node_modules", ".tox"})
"""Directories never taken for packages."""


def _holds_distributions(directory: str) -> bool:
    """True for a directory of installed distributions (``pip install --target``, a wheel
    unpacked onto ``sys.path``): packages, installed and versioned, never local code."""
    try:
        with os.scandir(directory) as entries:
            return any(e.name.endswith(".dist-info") and e.is_dir() for e in entries)
    except OSError:
        return False


def project_root(start: Path | None = None) -> Path:
    """The notebook's project root: the nearest of ``start`` (cwd) and its parents with a marker.

    Without any marker above it, ``start`` itself.
    """
    start = (start or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        if any((directory / marker).exists() for marker in PROJECT_MARKERS):
            return directory
    return start


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def valid_module_name(name: str) -> bool:
    """True for a dotted name of identifiers (never a path), of a sane length."""
    return bool(name) and len(name) <= 512 and all(p.isidentifier() for p in name.split("."))


@dataclass(frozen=True)
class ModuleSource:
    """One first-party module as the runner gets it: name, shown path, digest, package facts."""

    name: str
    path: str
    """The file here (absolute)."""
    file: str
    """How the runner names the file: relative to the project root when under it."""
    digest: str
    package: bool
    children: tuple[str, ...] = ()
    """A package's submodule names (the runner asks for these only)."""

    def describe(self) -> dict[str, Any]:
        """The manifest entry (JSON)."""
        entry: dict[str, Any] = {
            "name": self.name,
            "file": self.file,
            "digest": self.digest,
            "package": self.package,
        }
        if self.package:
            entry["children"] = list(self.children)
        return entry


class CodeIndex:
    """What this notebook process counts as first-party, with cheap caches for every cell.

    Classification is cached per module object, digests per (file, size,
    mtime), directory listings per directory mtime: an unchanged notebook pays
    a dictionary lookup per module and a ``stat`` per first-party file.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        """Held while the caches are used (cells and the runner's asks may overlap)."""
        self._site = self._site_dirs()
        self._dirs_key: tuple[Any, ...] | None = None
        self._dirs: tuple[str, ...] = ()
        self._editable_key: tuple[str, ...] | None = None
        self._editable: tuple[str, ...] = ()
        self._editable_names: frozenset[str] = frozenset()
        self._classified: dict[str, tuple[object, str | None]] = {}
        """name → (the module object, its first-party file): the object, not its id, since a
        module removed from ``sys.modules`` frees its id for the next one."""
        self._digests: dict[str, tuple[int, int, str, bytes | None]] = {}
        self._listings: dict[str, tuple[int, tuple[str, ...]]] = {}
        self._described: dict[tuple[str, str], tuple[int, int, ModuleSource]] = {}
        self._path_dirs: tuple[str, ...] = ()
        self._imported: tuple[Any, list[str], list[Any], dict[str, str]] | None = None
        """The last :meth:`imported` answer, and the ``sys.modules`` it was worked out from."""
        self.root = project_root()

    # -- where first-party code lives

    @staticmethod
    def _site_dirs() -> tuple[str, ...]:
        """Directories of the Python environment: the standard library and site-packages."""
        dirs = {sysconfig.get_path(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
        dirs.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
        dirs.add(site.getusersitepackages())
        for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix}:
            dirs.add(os.path.join(prefix, "lib"))
            dirs.add(os.path.join(prefix, "lib64"))
        return tuple(sorted({os.path.realpath(d) for d in dirs if d}))

    def _in_environment(self, path: str) -> bool:
        parts = path.split(os.sep)
        if "site-packages" in parts or "dist-packages" in parts:
            return True
        return any(path == d or path.startswith(d + os.sep) for d in self._site)

    def served_dirs(self) -> tuple[str, ...]:
        """The directories first-party modules may come from (resolved), most specific first."""
        cwd = os.getcwd()
        key = (cwd, tuple(sys.path))
        with self.lock:
            if key == self._dirs_key:
                return self._dirs
            self.root = project_root(Path(cwd))
            found: list[str] = [str(self.root)]
            on_path = []
            for entry in sys.path:
                real = os.path.realpath(entry or cwd)
                if (
                    os.path.isdir(real)
                    and not self._in_environment(real)
                    and not _holds_distributions(real)
                ):
                    found.append(real)
                    on_path.append(real)
            found.extend(self.editable_dirs())
            self._dirs = tuple(dict.fromkeys(found))
            self._path_dirs = tuple(dict.fromkeys(on_path))
            self._dirs_key = key
            self._classified.clear()
            return self._dirs

    def editable_dirs(self) -> tuple[str, ...]:
        """Project directories of the editable installs visible to this Python."""
        key = tuple(sys.path)
        if key == self._editable_key:
            return self._editable
        dirs, names = [], set()
        for dist in importlib.metadata.distributions():
            try:
                text = dist.read_text("direct_url.json")
            except Exception:
                continue
            if not text:
                continue
            try:
                info = json.loads(text)
            except ValueError:
                continue
            url = urlparse(str(info.get("url", "")))
            if url.scheme == "file" and (info.get("dir_info") or {}).get("editable"):
                path = os.path.realpath(unquote(url.path))
                if os.path.isdir(path) and dist.metadata["Name"] not in ("didomagic",):
                    dirs.append(path)
                    names.update(_top_level_names(dist, path))
        self._editable_key, self._editable = key, tuple(dirs)
        self._editable_names = frozenset(names - TOOL_PACKAGES)
        return self._editable

    def first_party_file(self, path: str | None) -> str | None:
        """``path`` resolved when it is a first-party ``.py`` source, else None."""
        if not path or not path.endswith(".py"):
            return None
        real = os.path.realpath(path)
        if self._in_environment(real):
            return None
        for directory in self.served_dirs():
            if real.startswith(directory + os.sep):
                return real
        return None

    def classify(self, name: str, module: ModuleType) -> str | None:
        """The first-party source file of an imported module, or None (cached per module)."""
        cached = self._classified.get(name)
        if cached is not None and cached[0] is module:
            return cached[1]
        path = None
        top = name.partition(".")[0]
        if top not in TOOL_PACKAGES and name != "__main__":
            path = self.first_party_file(getattr(module, "__file__", None))
        self._classified[name] = (module, path)
        return path

    # -- sources

    def read(self, path: str) -> tuple[str, bytes | None]:
        """The digest of a file (and its bytes when just read); cached by size and mtime."""
        st = os.stat(path)
        cached = self._digests.get(path)
        if cached is not None and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            return cached[2], cached[3]
        data = Path(path).read_bytes()
        digest = _digest(data)
        self._digests[path] = (st.st_size, st.st_mtime_ns, digest, data)
        return digest, data

    def source(self, path: str, digest: str) -> bytes | None:
        """The bytes of ``path`` if they still have ``digest``."""
        now, data = self.read(path)
        if now != digest:
            return None
        if data is None:
            data = Path(path).read_bytes()
        return data

    def listing(self, directory: str) -> tuple[str, ...]:
        """Module names directly in ``directory``: ``x.py`` files and packages (cached)."""
        try:
            mtime = os.stat(directory).st_mtime_ns
        except OSError:
            return ()
        cached = self._listings.get(directory)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        names = []
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    stem, ext = os.path.splitext(entry.name)
                    if entry.is_file() and ext == ".py" and stem.isidentifier():
                        if stem != "__init__":
                            names.append(stem)
                    elif (
                        entry.is_dir()
                        and entry.name.isidentifier()
                        and entry.name not in SKIPPED_DIRS
                        and os.path.isfile(os.path.join(entry.path, "__init__.py"))
                    ):
                        names.append(entry.name)
        except OSError:
            return ()
        result = tuple(sorted(set(names)))
        self._listings[directory] = (mtime, result)
        return result

    def roots(self) -> tuple[str, ...]:
        """Top-level module names importable from the first-party directories on sys.path."""
        self.served_dirs()
        names: set[str] = set()
        for directory in self._path_dirs:
            names.update(self.listing(directory))
        self.editable_dirs()
        return tuple(sorted((names | self._editable_names) - TOOL_PACKAGES))

    def first_party_dir(self, real: str) -> bool:
        """True when directory ``real`` lies inside a first-party directory."""
        if self._in_environment(real):
            return False
        return any(real == d or real.startswith(d + os.sep) for d in self.served_dirs())

    def describe(self, name: str, path: str) -> ModuleSource:
        """The manifest entry of first-party module ``name`` whose file is ``path`` (cached)."""
        st = os.stat(path)
        cached = self._described.get((name, path))
        if cached is not None and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            entry = cached[2]
            if not entry.package or self.listing(os.path.dirname(path)) == entry.children:
                return entry
        entry = self._describe(name, path)
        self._described[(name, path)] = (st.st_size, st.st_mtime_ns, entry)
        return entry

    def _describe(self, name: str, path: str) -> ModuleSource:
        digest, _ = self.read(path)
        package = os.path.basename(path) == "__init__.py"
        children = self.listing(os.path.dirname(path)) if package else ()
        try:
            relative = os.path.relpath(path, self.root)
        except ValueError:
            relative = path
        shown = path if relative.startswith("..") else relative
        return ModuleSource(name, path, shown, digest, package, children)

    def locate(self, name: str) -> str | None:
        """The first-party source file that ``import name`` would load here, or None.

        Found with the import system's own path finder, over the first-party
        directories on ``sys.path`` (a submodule: its package's directory).
        """
        if not valid_module_name(name) or name.partition(".")[0] in TOOL_PACKAGES:
            return None
        parent, _, _ = name.rpartition(".")
        module = sys.modules.get(name)
        if module is not None:
            return self.classify(name, module)
        if parent:
            parent_file = self.locate(parent)
            if parent_file is None or os.path.basename(parent_file) != "__init__.py":
                return None
            search = [os.path.dirname(parent_file)]
        else:
            cwd = os.getcwd()
            search = [
                real
                for real in (os.path.realpath(e or cwd) for e in sys.path)
                if self.first_party_dir(real)
            ]
        spec = importlib.machinery.PathFinder.find_spec(name, search)
        if spec is None and not parent and name in self._editable_names:
            spec = importlib.util.find_spec(name)  # an editable install's own finder
        origin = spec.origin if spec is not None else None
        return self.first_party_file(origin)

    def package_modules(self, name: str, path: str) -> list[ModuleSource]:
        """A package and every module under it (capped), or one module alone."""
        first = self.describe(name, path)
        if not first.package:
            return [first]
        found, total = [first], 0
        pending = [(name, os.path.dirname(path), first.children)]
        while pending and len(found) < MAX_PACKAGE_MODULES and total < MAX_PACKAGE_BYTES:
            package, directory, children = pending.pop()
            for child in children:
                full = f"{package}.{child}"
                init = os.path.join(directory, child, "__init__.py")
                plain = os.path.join(directory, child + ".py")
                module_file = init if os.path.isfile(init) else plain
                if self.first_party_file(module_file) is None:
                    continue
                entry = self.describe(full, os.path.realpath(module_file))
                found.append(entry)
                total += os.path.getsize(module_file)
                if entry.package:
                    pending.append((full, os.path.dirname(module_file), entry.children))
        return found[:MAX_PACKAGE_MODULES]

    def imported(self) -> dict[str, str]:
        """First-party modules imported here: name → source file.

        Kept while ``sys.modules`` holds the same names bound to the same
        objects and the first-party directories are the same: an unchanged
        notebook pays two list copies, not a lookup per module.
        """
        with self.lock:
            self.served_dirs()
            now = dict(sys.modules)  # one copy: another thread may be importing
            names, modules = list(now), list(now.values())
            kept = self._imported
            if (
                kept is not None
                and kept[0] == self._dirs_key
                and kept[1] == names
                and len(kept[2]) == len(modules)
                and all(map(operator.is_, kept[2], modules))
            ):
                return dict(kept[3])
            found = {}
            cache = self._classified
            for name, module in now.items():
                cached = cache.get(name)
                if cached is not None and cached[0] is module:
                    path = cached[1]
                elif module is None:
                    continue
                else:
                    path = self.classify(name, module)
                if path is not None:
                    found[name] = path
            self._imported = (self._dirs_key, names, modules, found)
            return dict(found)


_index: CodeIndex | None = None


def index() -> CodeIndex:
    """This process's :class:`CodeIndex`."""
    global _index
    if _index is None:
        _index = CodeIndex()
    return _index


def _top_level_names(dist: importlib.metadata.Distribution, project: str) -> set[str]:
    """The top-level modules an editable install provides (its metadata, or its layout)."""
    text = dist.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip().isidentifier()}
    names: set[str] = set()
    for directory in (project, os.path.join(project, "src")):
        if os.path.isdir(directory):
            for entry in os.listdir(directory):
                stem, ext = os.path.splitext(entry)
                package = os.path.isfile(os.path.join(directory, entry, "__init__.py"))
                if (ext == ".py" or package) and stem.isidentifier() and stem != "setup":
                    names.add(stem)
    return names
