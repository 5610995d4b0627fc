"""The notebook's own code travels: a code bundle with each cell, and modules on demand.

Each cell carries a *code bundle* (the value :data:`~didomagic.protocol.CODE_VALUE`):
the manifest of the first-party modules (see :mod:`didomagic.firstparty`) the
notebook has imported, and those it served to this session, each with a
content digest, plus the sources the runner session does not hold yet. An
unchanged manifest sends nothing at all. The runner's import hook
(``runner.codeimport``) imports from the bundle, asks for a module the notebook
has not imported (the ``module`` resource of the request channel; a package
comes whole, with what it imports, so its submodules cost no round trip), and
reloads a module whose digest changed before the cell runs.

Only the sources of first-party modules found here are served; a name from the
runner is looked up as a module name, never used as a path.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from didomagic.firstparty import MAX_PACKAGE_MODULES, index, project_root, valid_module_name
from didomagic.protocol import CODE_VALUE, ValueHeader
from didomagic.resources import Reply, Request, register_handler

__all__ = [
    "PUSH_BUDGET",
    "RESOURCE",
    "SAFE_RESULTS",
    "Ahead",
    "Bundle",
    "CodeState",
    "ahead",
    "bundle_for",
    "forget",
    "imports_of",
    "project_root",
    "serve_module",
    "shipped",
    "state_of",
    "warm_up",
]

logger = logging.getLogger("didomagic.client")

PUSH_BUDGET = 4 << 20
"""Source bytes a cell's bundle carries at most; the runner asks for the rest as needed."""

RESOURCE = "module"
"""The request channel's resource name for module sources."""

SAFE_RESULTS = "safe_results"
"""The key of a session's handler state that is True for an untrusted runner."""


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
    state: CodeState,
    include: Iterable[str] = (),
    *,
    names_only: bool = False,
    budget: int | None = None,
) -> Bundle | None:
    """The code bundle for the next cell of a session, or None when nothing changed.

    ``include`` adds modules by name even if not imported here (a detached
    job's own imports); a package comes with everything under it.
    ``names_only`` (an untrusted runner) sends only the top-level names, so
    that importing one fails there with the reason, and no module.
    ``budget`` caps the source bytes sent: the manifest still lists every
    module, and the runner asks for one beyond the budget when it needs it.
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
        sources, digests, total = [], [], 0
        for entry in entries:
            if entry.digest in state.digests or entry.digest in digests:
                continue
            data = code.source(entry.path, entry.digest)
            if data is None or (budget is not None and total + len(data) > budget):
                continue
            total += len(data)
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


@dataclass(frozen=True)
class Ahead:
    """A cell's code bundle worked out on the caller's thread, for the session state it saw.

    The I/O loop takes it instead of working the bundle out on a thread of its
    own (a hop per cell) while :meth:`holds`; else it works it out again.
    """

    state: CodeState
    seen: tuple[Any, ...]
    bundle: Bundle | None

    def holds(self, state: CodeState) -> bool:
        """True while ``state`` is the one this was worked out for, and unchanged since."""
        return state is self.state and _mark(state) == self.seen


def _mark(state: CodeState) -> tuple[Any, ...]:
    """What changes in a session's code state whenever it changes."""
    return (state.last, state.sent, len(state.served), len(state.digests))


def ahead(session_state: dict[str, Any], *, names_only: bool = False) -> Ahead:
    """The next cell's bundle (as :func:`bundle_for` with :data:`PUSH_BUDGET`), worked out now."""
    state = state_of(session_state)
    seen = _mark(state)
    return Ahead(state, seen, bundle_for(state, names_only=names_only, budget=PUSH_BUDGET))


def warm_up() -> None:
    """Classify, stat and hash the notebook's modules now, so the next bundle is quick."""
    bundle_for(CodeState())


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
    if not valid_module_name(name):
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
