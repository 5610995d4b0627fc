"""The runner kernel's import hook for the notebook's own modules (see ``didomagic.localcode``).

A :class:`NotebookFinder` at the front of ``sys.meta_path`` imports the
notebook's first-party modules from the sources the cells' code bundles
brought, and asks the notebook for one it has not seen (over the request
channel, ``runner.asking``) when the notebook's manifest says it can serve
that name: a top-level name among the notebook's importable first-party
modules, or a listed child of a package it served. Any other name is left to
the kernel's own finders at no cost, so the runner's environment is used for
everything else.

Before each cell, :func:`apply_bundle` takes the cell's bundle: new sources are
kept by digest, and a module already imported whose digest changed is
reloaded, the way IPython's ``autoreload`` does it (a new version that fails to
run is reported and the old one kept until the next cell tries again): the module object is
re-executed in place (so ``helpers.f`` is the new code), functions of the old
version get the new code and stay the module's (so ``from helpers import f``
done earlier, or a value holding ``f``, runs the new code too, and ``f`` still
pickles by reference), methods of its old classes are
updated, and names in the namespace bound to its old classes are rebound.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import linecache
import logging
import os
import sys
from collections.abc import Iterable, MutableMapping, Sequence
from types import FunctionType, ModuleType
from typing import Any

from didomagic.serialize import describe
from runner import asking

logger = logging.getLogger("didomagic.kernel")

RESOURCE = "module"


class CodeStore:
    """The notebook's modules as this kernel knows them: manifest entries and sources."""

    def __init__(self, base: str) -> None:
        self.base = base
        """Where the notebook's project root is placed here (module files are named under it)."""
        self.entries: dict[str, dict[str, Any]] = {}
        self.sources: dict[str, bytes] = {}
        self.roots: frozenset[str] = frozenset()
        self.parents: set[str] = set()
        """Every dotted prefix of a module sent (a namespace package may have no entry)."""
        self.loaded: dict[str, str] = {}
        """Digest of the source each module was last executed from."""
        self.misses: set[str] = set()
        """Names the notebook did not have, during this cell (asked again next cell)."""
        self.asked = 0
        """Asks sent to the notebook (tests and the benchmark read it)."""
        self.failed: dict[str, str] = {}
        """This cell's failed imports of notebook modules: the error, as described, → module."""

    def filename(self, entry: dict[str, Any]) -> str:
        """How a module's file is named here: under :attr:`base` when it is project-relative."""
        shown = str(entry.get("file") or entry["name"])
        return shown if os.path.isabs(shown) else os.path.join(self.base, shown)

    def take(self, entries: Sequence[dict[str, Any]], sources: Iterable[tuple[Any, Any]]) -> None:
        """Keep manifest ``entries`` and ``sources`` ((digest, bytes) pairs)."""
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                self.entries[entry["name"]] = entry
                parts = entry["name"].split(".")
                self.parents.update(".".join(parts[:i]) for i in range(1, len(parts)))
        for digest, data in sources:
            self.sources[digest] = bytes(data)

    def may_ask(self, name: str) -> bool:
        """Whether the notebook can serve ``name``, by what it told us (no round trip)."""
        if name in self.misses:
            return False
        parent, _, child = name.rpartition(".")
        if not parent:
            return name in self.roots
        package = self.entries.get(parent)
        return bool(package and package.get("package") and child in package.get("children", ()))

    def fetch(self, name: str) -> bool:
        """Ask the notebook for ``name`` (a package comes with its submodules)."""
        if not asking.available():
            return False
        self.asked += 1
        try:
            reply = asking.ask(RESOURCE, name)
        except asking.ChannelError as exc:
            logger.debug("could not ask for module %s: %s", name, exc)
            return False
        if reply.status == asking.REFUSED:  # say why, rather than a bare "No module named"
            raise ModuleNotFoundError(
                f"No module named {name!r} here, and the notebook side did not send it: "
                f"{reply.message}",
                name=name,
            )
        if not reply.found:
            self.misses.add(name)
            return False
        entries = list(reply.meta.get("modules") or [])
        digests = list(reply.meta.get("sources") or [])
        self.take(entries, zip(digests, reply.parts, strict=False))
        return name in self.entries

    def namespace_parent(self, name: str) -> bool:
        """True when ``name`` has no file but modules under it were sent (a namespace package)."""
        return name in self.parents and name not in self.entries

    def source_of(self, name: str) -> tuple[dict[str, Any], bytes] | None:
        """The entry and source of ``name``, asking the notebook when it is not here yet."""
        entry = self.entries.get(name)
        if entry is None or entry.get("digest") not in self.sources:
            if entry is None and not self.may_ask(name):
                return None
            if not self.fetch(name):
                return None
            entry = self.entries.get(name)
            if entry is None or entry.get("digest") not in self.sources:
                return None
        return entry, self.sources[entry["digest"]]


class NotebookLoader(importlib.abc.Loader):
    """Executes a notebook module from its shipped source, under its notebook-relative name."""

    def __init__(self, store: CodeStore) -> None:
        self.store = store

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        spec = module.__spec__
        assert spec is not None
        found = self.store.source_of(spec.name)
        if found is None:
            raise ImportError(f"the source of {spec.name} is gone", name=spec.name)
        entry, source = found
        filename = spec.origin or self.store.filename(entry)
        text = source.decode("utf-8", "replace")
        linecache.cache[filename] = (len(source), None, text.splitlines(True), filename)
        try:
            code = compile(source, filename, "exec", dont_inherit=True)
            self.store.loaded[spec.name] = entry["digest"]
            exec(code, module.__dict__)
        except Exception as exc:
            self.store.failed[describe(exc)] = spec.name
            raise

    def get_source(self, name: str) -> str | None:
        """The module's source, for tracebacks and ``inspect``."""
        found = self.store.source_of(name)
        return found[1].decode("utf-8", "replace") if found else None

    def is_package(self, name: str) -> bool:
        """Whether ``name`` is a package."""
        entry = self.store.entries.get(name)
        return bool(entry and entry.get("package"))


class NotebookFinder(importlib.abc.MetaPathFinder):
    """Finds the notebook's first-party modules; leaves every other name to the next finder."""

    def __init__(self, store: CodeStore) -> None:
        self.store = store
        self.loader = NotebookLoader(store)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        found = self.store.source_of(fullname)
        if found is None:
            if self.store.namespace_parent(fullname):  # as the import system makes them
                spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
                spec.submodule_search_locations = []
                return spec
            return None
        entry = found[0]
        package = bool(entry.get("package"))
        filename = self.store.filename(entry)
        spec = importlib.util.spec_from_loader(
            fullname, self.loader, origin=filename, is_package=package
        )
        if spec is None:
            return None
        spec.has_location = True  # __file__ is the module's (notebook-relative) file
        if package:
            spec.submodule_search_locations = [os.path.dirname(filename)]
        return spec


_store: CodeStore | None = None


def install(base: str | None = None) -> CodeStore:
    """Put the finder first on ``sys.meta_path`` (once); return the kernel's store."""
    global _store
    if _store is None:
        _store = CodeStore(base or os.getcwd())
        sys.meta_path.insert(0, NotebookFinder(_store))
    return _store


def store() -> CodeStore:
    """The kernel's code store (installing the finder if needed)."""
    return install()


def new_cell() -> None:
    """A cell starts: names the notebook lacked may exist now."""
    if _store is not None:
        _store.misses.clear()
        _store.failed.clear()


def explain(reason: str) -> str | None:
    """Why a value did not load, when a notebook module it needs failed to import here."""
    for text, module in store().failed.items():
        if reason.endswith(text):
            return f"needs the notebook's module {module}, which failed on the runner: {text}"
    return None


def apply_bundle(
    parts: Sequence[memoryview | bytes], namespace: MutableMapping[str, Any]
) -> dict[str, str]:
    """Take a cell's code bundle; reload changed modules; return failures by module name."""
    code = store()
    head = json.loads(bytes(parts[0]))
    entries = list(head.get("modules") or [])
    digests = list(head.get("sources") or [])
    code.take(entries, zip(digests, parts[1:], strict=False))
    code.roots = frozenset(str(r) for r in head.get("roots") or ())
    changed = sorted(
        name
        for name, digest in code.loaded.items()
        if name in sys.modules and code.entries.get(name, {}).get("digest", digest) != digest
    )
    failures: dict[str, str] = {}
    for name in changed:
        error = _reload(name, namespace)
        if error is not None:
            failures[name] = error
    return failures


def _reload(name: str, namespace: MutableMapping[str, Any]) -> str | None:
    """Reload one module in place and carry its new code to what holds the old."""
    module = sys.modules[name]
    old = dict(module.__dict__)
    try:
        importlib.reload(module)
    except Exception as exc:  # as autoreload does: keep the old code, say why, retry next cell
        module.__dict__.clear()  # a half-run new version leaves nothing behind
        module.__dict__.update(old)
        sys.modules[name] = module
        return f"kept its previous version: the new one failed on the runner with {describe(exc)}"
    classes: dict[int, type] = {}
    for attr, before in old.items():
        after = module.__dict__.get(attr)
        if before is after or after is None:
            continue
        if (
            isinstance(before, FunctionType)
            and isinstance(after, FunctionType)
            and before.__module__ == name
            and _update_function(before, after)
        ):
            module.__dict__[attr] = before  # one object, new code: pickles by reference
        elif isinstance(before, type) and isinstance(after, type) and before.__module__ == name:
            _update_class(before, after)
            classes[id(before)] = after
    if classes:
        for key, value in list(namespace.items()):
            if isinstance(value, type) and id(value) in classes:
                namespace[key] = classes[id(value)]
    logger.debug("reloaded %s", name)
    return None


def _update_function(old: FunctionType, new: FunctionType) -> bool:
    """Give the old function the new one's code; False when their closures differ."""
    try:
        old.__code__ = new.__code__
    except ValueError:
        return False
    old.__defaults__ = new.__defaults__
    old.__kwdefaults__ = new.__kwdefaults__
    old.__doc__ = new.__doc__
    old.__dict__.update(new.__dict__)
    return True


def _update_class(old: type, new: type) -> None:
    """Give the old class's methods the new code, so its existing instances use it."""
    for attr, after in new.__dict__.items():
        before = old.__dict__.get(attr)
        if isinstance(before, FunctionType) and isinstance(after, FunctionType):
            _update_function(before, after)
        elif before is None and isinstance(after, FunctionType):
            with contextlib.suppress(AttributeError, TypeError):
                setattr(old, attr, after)
