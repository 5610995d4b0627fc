"""Which packages a cell asks the runner for, and what to say when one is missing there.

``%%remote --pip SPEC`` (repeatable) and ``--requirements FILE`` name them
explicitly; ``--packages match`` (or ``DIDOMAGIC_PACKAGES=match`` for every
cell) pins the notebook's own version of each distribution the cell imports
and of each one its values' pickles reference. A distribution installed in
editable mode (the project itself) is never pinned: its code travels as local
code, and only its declared dependencies are pinned. Nor is didomagic's own
stack (IPython, ipykernel, cloudpickle, ...): the runner's kernel runs on it.

Only requirement lines travel, never index options or credentials: a runner
installs from its own index configuration.
"""

from __future__ import annotations

import ast
import importlib.metadata
import io
import json
import os
import pickletools
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from didomagic.errors import ConfigurationError
from didomagic.namespace import transform_cell

PACKAGES_ENV = "DIDOMAGIC_PACKAGES"
"""``match`` makes ``--packages match`` every cell's default; ``none`` (or unset) does not."""

_OWN_STACK_ROOT = "didomagic"

_MISSING = re.compile(r"No module named '([^']+)'")


def default_mode() -> str:
    """The notebook-wide ``--packages`` default: ``match`` or ``none``."""
    mode = os.environ.get(PACKAGES_ENV, "none").strip().lower() or "none"
    if mode not in ("match", "none"):
        raise ConfigurationError(f"{PACKAGES_ENV} must be 'match' or 'none', got {mode!r}")
    return mode


def check_requirement(text: str) -> str:
    """``text`` if it is a requirement on a named distribution; else ConfigurationError."""
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        raise ConfigurationError(f"--pip {text!r} is not a valid requirement: {exc}") from None
    if req.url:
        raise ConfigurationError(
            f"--pip {text!r} names a URL or a path; runners install by name and version from "
            "their own index (give them --find-links for local wheels)"
        )
    return text


def read_requirements(path: str | Path, on_skip: Callable[[str], None] | None = None) -> list[str]:
    """The requirement lines of a requirements file (``-r`` includes followed).

    Option lines (``--index-url``, ``-f``, ...) are skipped and reported to
    ``on_skip``: the runner uses its own index, and credentials never travel.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"--requirements {path}: {exc.strerror or exc}") from None
    found: list[str] = []
    for raw in text.replace("\\\n", "").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            found += read_requirements(path.parent / line.split(None, 1)[1], on_skip)
        elif line.startswith("-"):
            if on_skip is not None:
                on_skip(line.split()[0])
        else:
            found.append(check_requirement(line))
    return found


# --------------------------------------------------------------------------- match


_MAGIC_IMPORTS = {"matplotlib": "matplotlib", "pylab": "matplotlib"}
"""Line magics that import a package: ``%matplotlib inline`` needs matplotlib."""


def imported_modules(code: str, transform: Callable[[str], str] = transform_cell) -> set[str]:
    """Top-level names of the absolute imports anywhere in a cell (and of its magics')."""
    try:
        tree = ast.parse(transform(code))
    except SyntaxError:
        return set()
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "run_line_magic"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value in _MAGIC_IMPORTS
        ):
            found.add(_MAGIC_IMPORTS[node.args[0].value])
    return found


_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING"}
_MEMO_PUT = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}
_SUBIMPORT = {("cloudpickle.cloudpickle", "subimport"), ("cloudpickle.cloudpickle", "_import")}


def pickled_modules(stream: bytes | memoryview) -> set[str]:
    """Top-level names of the modules a pickle stream imports when it loads.

    Classes and functions by reference (``GLOBAL``, ``STACK_GLOBAL``) and
    modules cloudpickle pickles by reference (``subimport``).
    """
    found: set[str] = set()
    recent: list[str | None] = []  # what each op pushed (a string, or None)
    memo: dict[int, str | None] = {}
    subimport = False
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(bytes(stream))):
            name = op.name
            if name in _MEMO_PUT:
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = recent[-1] if recent else None
                continue
            value: str | None = None
            if name in _STRINGS:
                value = str(arg)
                if subimport:
                    found.add(value.split(".")[0])
                    subimport = False
            elif name in _MEMO_GET:
                value = memo.get(int(arg))
            elif name in ("GLOBAL", "STACK_GLOBAL", "INST"):
                if name == "STACK_GLOBAL":
                    module, attr = (recent[-2], recent[-1]) if len(recent) >= 2 else (None, None)
                else:
                    module, _, attr = str(arg).partition(" ")
                if module:
                    found.add(module.split(".")[0])
                    subimport = (module, attr) in _SUBIMPORT
            recent.append(value)
            del recent[:-4]
    except Exception:  # a stream genops cannot walk: what was found so far
        pass
    return found


@cache
def _distributions(path: tuple[str, ...]) -> dict[str, list[str]]:
    del path  # the cache key: a changed sys.path can change the answer
    return {k: list(v) for k, v in importlib.metadata.packages_distributions().items()}


@cache
def _editable_roots(path: tuple[str, ...]) -> dict[Path, str]:
    """Project directory → name of each distribution installed in editable mode."""
    del path  # the cache key, as for _distributions
    roots = {}
    for dist in importlib.metadata.distributions():
        text = dist.read_text("direct_url.json")
        if not text or not _editable(dist):
            continue
        url = str(json.loads(text).get("url", ""))
        if url.startswith("file://"):
            roots[Path(urllib.parse.unquote(url.removeprefix("file://")))] = dist.metadata["Name"]
    return roots


def _editable_owner(module: str) -> str | None:
    """The editable distribution whose project directory holds an imported ``module``."""
    where = getattr(sys.modules.get(module), "__file__", None)
    if not where:
        return None
    file = Path(where)
    for root, name in _editable_roots(tuple(sys.path)).items():
        if file.is_relative_to(root):
            return name
    return None


def distributions_of(modules: Iterable[str]) -> set[str]:
    """The installed distributions that provide these top-level modules (stdlib left out).

    A module of a project installed in editable mode counts as its distribution's
    even where the installer recorded only a ``.pth`` file (hatchling, PEP 660).
    """
    mapping = _distributions(tuple(sys.path))
    found = set()
    for module in modules:
        if module in sys.stdlib_module_names or module in ("__main__", "builtins"):
            continue
        owners = mapping.get(module) or [_editable_owner(module)]
        found.update(name for name in owners if name)
    return found


def _editable(dist: importlib.metadata.Distribution) -> bool:
    text = dist.read_text("direct_url.json")
    if not text:
        return False
    try:
        return bool(json.loads(text).get("dir_info", {}).get("editable"))
    except (ValueError, AttributeError):
        return False


def _declared(dist: importlib.metadata.Distribution) -> list[Requirement]:
    """A distribution's dependencies that apply here (no extras)."""
    found = []
    for text in dist.requires or ():
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            found.append(req)
    return found


@cache
def own_stack() -> frozenset[str]:
    """didomagic and everything it depends on: the runner's kernel already runs on these."""
    names: set[str] = set()
    todo = [_OWN_STACK_ROOT, "ipykernel"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in names:
            continue
        names.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        todo += [req.name for req in _declared(dist)]
    return frozenset(names)


@cache
def _installed(name: str, path: tuple[str, ...]) -> tuple[str, bool, tuple[str, ...]] | None:
    """(version, editable, dependency names) of an installed distribution, or None."""
    del path  # the cache key, as for _distributions
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    return dist.version, _editable(dist), tuple(req.name for req in _declared(dist))


def pins_for(distributions: Iterable[str]) -> list[str]:
    """``name==version`` of each distribution as installed here (editable ones: their deps)."""
    pins: dict[str, str] = {}
    skip = own_stack()
    todo = list(distributions)
    seen: set[str] = set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or name in skip:
            continue
        seen.add(name)
        found = _installed(name, tuple(sys.path))
        if found is None:
            continue
        version, editable, dependencies = found
        if editable:  # the project itself: its code travels, its dependencies install
            todo += dependencies
            continue
        pins[name] = f"{name}=={version}"
    return sorted(pins.values())


def match(
    code: str, streams: Iterable[bytes | memoryview], transform: Callable[[str], str]
) -> list[str]:
    """``--packages match``: pins for what the cell imports and its values' pickles need."""
    modules = imported_modules(code, transform)
    for stream in streams:
        modules |= pickled_modules(stream)
    return pins_for(distributions_of(modules))


def requested(
    pip: Sequence[str],
    mode: str,
    code: str,
    streams: Iterable[bytes | memoryview],
    transform: Callable[[str], str] = transform_cell,
) -> tuple[str, ...]:
    """What a cell asks the runner for: its explicit pins, then the matched ones not named."""
    if mode != "match":
        return tuple(pip)
    named = {canonicalize_name(Requirement(p).name) for p in pip}
    matched = [p for p in match(code, streams, transform) if p.split("==")[0] not in named]
    return (*pip, *matched)


# --------------------------------------------------------------------------- hints


def notebook_version(module: str) -> tuple[str, str] | None:
    """The distribution (not editable, not stdlib) that gives this notebook ``module``."""
    top = module.split(".")[0]
    for name in sorted(distributions_of([top])):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if not _editable(dist):
            return str(dist.metadata["Name"]), dist.version
    return None


def missing_module_hint(message: str, runner: str) -> str | None:
    """For ``No module named 'x'`` on a runner when the notebook has x: what to do, else None."""
    found = _MISSING.search(message)
    if found is None:
        return None
    module = found.group(1)
    dist = notebook_version(module)
    if dist is None:
        return None
    name, version = dist
    return (
        f"No module named {module!r} on runner {runner}; the notebook has {name} {version}: "
        f"add --pip {name}=={version} or --packages match"
    )


def hint_failures(failures: Mapping[str, str], runner: str) -> dict[str, str]:
    """Values that failed for a missing module: the same hint added to their reason."""
    hinted = {}
    for name, reason in failures.items():
        hint = missing_module_hint(reason, runner)
        hinted[name] = f"{reason}; {hint}" if hint else reason
    return hinted
