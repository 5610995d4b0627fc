"""The notebook's own code travels: which modules are first-party, and their sources.

A module is *first-party* when its source file lies under the notebook's
project root (the working directory, or its nearest parent holding ``.git``
or ``pyproject.toml``), under a ``sys.path`` entry that is not the
standard library or a site-packages directory, or under the project directory
of an editable install (``pip install -e``, named by its ``direct_url.json``).
Modules of the Python environment, and didomagic itself, never are: the runner
has its own.

Each cell carries a *code bundle* (the value :data:`~didomagic.protocol.CODE_VALUE`):
the manifest of the first-party modules the notebook has imported (and those
it served to this session), each with a content digest, plus the sources the
runner session does not hold yet. An unchanged manifest sends nothing at all.
The runner's import hook (``runner.codeimport``) imports from the bundle, asks
for a module the notebook has not imported (the ``module`` resource of the
request channel; a package comes whole, so its submodules cost no round trip),
and reloads a module whose digest changed before the cell runs.

Only the sources of first-party modules found here are served; a name from the
runner is looked up as a module name, never used as a path.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import site
import sys
import sysconfig
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote, urlparse

from didomagic.protocol import CODE_VALUE, ValueHeader
from didomagic.resources import Reply, Request, register_handler

logger = logging.getLogger("didomagic.client")

RESOURCE = "module"
"""The request channel's resource name for module sources."""

SAFE_RESULTS = "safe_results"
"""The key of a session's handler state that is True for an untrusted runner."""

TOOL_PACKAGES = frozenset({"didomagic", "runner"})
"""Top-level packages never shipped: every runner has them."""

MAX_PACKAGE_MODULES = 500
"""Most modules of a package sent in one answer (the rest are asked for when imported)."""

MAX_PACKAGE_BYTES = 16 << 20
"""Most source bytes of a package sent in one answer."""

PROJECT_MARKERS = (".git", "pyproject.toml")
"""What marks a directory as a project's root."""

SKIPPED_DIRS = frozenset({"__pycache__", ".git", ".venv", "venv", "node_modules", ".tox"})


def project_root(start: Path | None = None) -> Path:
    """The notebook's project root: the nearest of ``start`` (cwd) and its parents with a marker.

    Without any marker above it, ``start`` itself.
    """
    start = (start or Path.cwd()).resolve()
    for directory in (start, *start.parents):
        if any((directory / marker).exists() for marker in PROJECT_MARKERS):
            return directory
    return start


def _holds_distributions(directory: str) -> bool:
    """True for a directory of installed distributions (``pip install --target``, a wheel
    unpacked onto ``sys.path``): packages, installed and versioned, never local code."""
    try:
        with os.scandir(directory) as entries:
            return any(e.name.endswith(".dist-info") and e.is_dir() for e in entries)
    except OSError:
        return False


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _valid_module_name(name: str) -> bool:
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
        self._classified: dict[str, tuple[int, str | None]] = {}
        self._digests: dict[str, tuple[int, int, str, bytes | None]] = {}
        self._listings: dict[str, tuple[int, tuple[str, ...]]] = {}
        self._described: dict[tuple[str, str], tuple[int, int, ModuleSource]] = {}
        self._path_dirs: tuple[str, ...] = ()
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
        if cached is not None and cached[0] == id(module):
            return cached[1]
        path = None
        top = name.partition(".")[0]
        if top not in TOOL_PACKAGES and name != "__main__":
            path = self.first_party_file(getattr(module, "__file__", None))
        self._classified[name] = (id(module), path)
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
        if not _valid_module_name(name) or name.partition(".")[0] in TOOL_PACKAGES:
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
        """First-party modules imported here: name → source file."""
        with self.lock:
            self.served_dirs()
            found = {}
            cache = self._classified
            for name, module in list(sys.modules.items()):
                cached = cache.get(name)
                if cached is not None and cached[0] == id(module):
                    path = cached[1]
                elif module is None:
                    continue
                else:
                    path = self.classify(name, module)
                if path is not None:
                    found[name] = path
            return found


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


# --------------------------------------------------------------------------- per session


@dataclass
class CodeState:
    """What one runner session holds of the notebook's code."""

    digests: set[str] = field(default_factory=set)
    """Sources the session has (sent in a bundle or an answer)."""
    served: dict[str, str] = field(default_factory=dict)
    """Modules answered to the session's asks, name → file: watched for edits too."""
    last: tuple[Any, ...] | None = None
    """The last manifest sent (nothing goes while it is unchanged)."""
    sent: int = 0
    """Sources sent to the session so far (in bundles and answers)."""


def state_of(session_state: dict[str, Any]) -> CodeState:
    """The code state kept in a session's handler state (see ``resources.Request.state``)."""
    state = session_state.get(RESOURCE)
    if not isinstance(state, CodeState):
        state = session_state[RESOURCE] = CodeState()
    return state


def forget(session_state: dict[str, Any]) -> None:
    """The session's kernel was replaced: the next bundle sends every module again."""
    session_state.pop(RESOURCE, None)


@dataclass(frozen=True)
class Bundle:
    """A cell's code bundle: the value's header and parts, and what it hands over."""

    header: ValueHeader
    parts: tuple[memoryview, ...]
    manifest: tuple[Any, ...]
    digests: tuple[str, ...]
    sources: int
    """How many sources travel in it."""

    def commit(self, state: CodeState) -> None:
        """The bundle reached the runner: remember what it now holds."""
        state.digests.update(self.digests)
        state.last = self.manifest
        state.sent += self.sources


def bundle_for(
    state: CodeState, include: Iterable[str] = (), *, names_only: bool = False
) -> Bundle | None:
    """The code bundle for the next cell of a session, or None when nothing changed.

    ``include`` adds modules by name even if not imported here (a detached
    job's own imports); a package comes with everything under it.
    ``names_only`` (an untrusted runner) sends only the top-level names, so
    that importing one fails there with the reason, and no module.
    """
    code = index()
    with code.lock:
        modules = {} if names_only else code.imported()
        for name, path in state.served.items():
            modules.setdefault(name, path)
        for top in () if names_only else dict.fromkeys(name.partition(".")[0] for name in include):
            path = code.locate(top)  # the whole package: its parents and siblings too
            if path is not None and top not in modules:
                for entry in code.package_modules(top, path):
                    modules.setdefault(entry.name, entry.path)
        entries = []
        for name, path in sorted(modules.items()):
            try:
                entries.append(code.describe(name, path))
            except OSError:  # deleted since it was imported: the runner keeps its copy
                continue
        roots = code.roots()
        manifest = (tuple((e.name, e.digest) for e in entries), roots, str(code.root))
        if manifest == state.last:
            return None
        sources, digests = [], []
        for entry in entries:
            if entry.digest in state.digests or entry.digest in digests:
                continue
            data = code.source(entry.path, entry.digest)
            if data is None:
                continue
            sources.append(memoryview(data))
            digests.append(entry.digest)
    head = json.dumps(
        {
            "modules": [e.describe() for e in entries],
            "roots": list(roots),
            "sources": digests,
        },
        separators=(",", ":"),
    ).encode()
    parts = (memoryview(head), *sources)
    header = ValueHeader(CODE_VALUE, tuple(p.nbytes for p in parts))
    return Bundle(header, parts, manifest, tuple(digests), len(sources))


def imports_of(code: str) -> list[str]:
    """The absolute module names a piece of code imports (for a detached job's bundle)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- serving


def serve_module(request: Request) -> Reply:
    """The ``module`` resource: a first-party module's source, a package with all of its own.

    Modules it imports from other first-party packages come along too (as
    mitogen preloads), unless the session holds them already, so importing a
    module costs one round trip, not one per module. ``meta["modules"]``
    lists the manifest entries, ``meta["sources"]`` the digests of the
    sources that follow as parts, in order (those the session lacks).
    A module that is not first-party here (or does not exist) is *not
    found*, so the runner's import fails as it would here.
    """
    name = request.name
    if not _valid_module_name(name):
        return Reply.refused(f"{name[:80]!r} is not a module name")
    if request.state.get(SAFE_RESULTS):
        return Reply.refused(
            "this runner's URL says safe_results (an untrusted runner), and the notebook "
            "sends its modules only to runners it trusts"
        )
    code = index()
    with code.lock:
        path = code.locate(name)
        if path is None:
            return Reply.not_found(f"no first-party module {name!r} on the notebook side")
        state = state_of(request.state)
        sent: list[dict[str, Any]] = []
        digests: list[str] = []
        parts: list[bytes] = []
        tops = {name.partition(".")[0]}
        pending = [code.package_modules(name, path)]
        while pending and len(parts) < MAX_PACKAGE_MODULES:
            for entry in pending.pop():
                first = not sent
                data = code.source(entry.path, entry.digest)
                if data is None:
                    continue
                sent.append(entry.describe())
                state.served[entry.name] = entry.path
                if (first or entry.digest not in state.digests) and entry.digest not in digests:
                    digests.append(entry.digest)
                    parts.append(data)
                    state.digests.add(entry.digest)
                    state.sent += 1
                for imported in _IMPORT.findall(data):
                    top = (imported[0] or imported[1]).partition(b".")[0].decode()
                    if top in tops:
                        continue
                    tops.add(top)
                    related = code.locate(top)
                    if related is not None:
                        pending.append(code.package_modules(top, related))
    logger.debug("served %d module(s) for %s to a runner", len(sent), name)
    return Reply.found(*parts, meta={"modules": sent, "sources": digests})


_IMPORT = re.compile(
    rb"^[ \t]*(?:from[ \t]+([A-Za-z_][\w.]*)[ \t]+import|import[ \t]+([A-Za-z_][\w.]*))", re.M
)
"""The absolute imports in a source, roughly (a miss costs a round trip, an extra one nothing)."""


def shipped(values: Sequence[ValueHeader]) -> bool:
    """True when a cell's values already carry a code bundle."""
    return any(v.name == CODE_VALUE for v in values)


register_handler(RESOURCE, serve_module)
