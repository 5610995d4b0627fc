"""The notebook's side of its files: serving them to a runner, and taking back what a cell wrote.

Three parts, one per moment of a cell:

- before: :func:`bundle_value` makes the :class:`~didomagic.filebundle.Bundle`
  that travels with the cell: where the notebook works in its project, the
  project's tree for a new session, the ``--files`` sent up front (only those
  the runner does not hold already), and the files served earlier that changed
  here since.
- during: :func:`serve` answers the kernel's ``file`` asks on the request
  channel (a file's bytes, or a folder's listing), only for what
  :class:`~didomagic.project.Project` allows; with ``--safe-results`` only what
  ``--files`` lists. A refusal is logged here and raises ``PermissionError``
  in the cell.
- after: :func:`take_back` writes the files the cell created or changed into
  the notebook's folder and says so in one line; one that changed here since
  the runner was served it is not overwritten (``--get`` overwrites it).

What a runner session was served is kept per session (the responder's state),
so an unchanged file is not sent twice and a changed one is noticed. A cell
whose bundle would say nothing new (no tree, no ``--files``, no ``--get``,
nothing stale, the same folder and limits as the last bundle the session's
kernel got) sends none: the kernel's agent sets its mirror up from the last one.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import mmap
import os
import pickle
import re
import sys
import threading
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from didomagic import localcode, serialize
from didomagic.errors import ConfigurationError, FileRefused, FilesTooLarge
from didomagic.filebundle import (
    DEFAULT_FILES_LIMIT,
    FILES_VALUE,
    RESOURCE,
    TREE_LIMIT,
    Bundle,
    FileOptions,
    SentFile,
)
from didomagic.project import ROOT_ENV, Project, clean_relative, find_root
from didomagic.resources import Reply, Request, register_handler

logger = logging.getLogger("didomagic.client")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``20M``, ``1G``, ``512KiB`` or a plain number of bytes."""
    match = _SIZE.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigurationError(f"not a size: {text!r} (write e.g. 20M, 1G or 512KiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(nbytes: int) -> str:
    """``1.5 GiB``, ``20 MiB``, ``3 KiB`` or ``10 B``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


@dataclass
class Ledger:
    """What a runner session holds of the notebook's files: ``path -> (size, mtime_ns, digest)``."""

    held: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    tree_sent: bool = False
    diverged: set[str] = field(default_factory=set)
    """Files changed on both sides: the runner keeps its version until ``--get`` takes it."""
    kept: tuple[Any, ...] | None = None
    """What the last bundle the session's kernel surely got said (None: not known)."""
    pending: tuple[Any, ...] | None = None
    """What the bundle of the cell under way says."""

    def record(self, rel: str, path: Path, digest: str) -> None:
        """The session now holds ``path``'s current content (whose digest is ``digest``)."""
        info = path.stat()
        self.held[rel] = (info.st_size, info.st_mtime_ns, digest)
        self.diverged.discard(rel)

    def stale(self, project: Project) -> list[str]:
        """Files the session holds that changed (or went) here since; they are asked for again."""
        changed = []
        for rel, (size, mtime_ns, _) in self.held.items():
            if rel in self.diverged:
                continue
            try:
                info = (project.root / rel).stat()
            except OSError:
                changed.append(rel)
                continue
            if (info.st_size, info.st_mtime_ns) != (size, mtime_ns):
                changed.append(rel)
        return changed


@dataclass
class _Policy:
    """What the handler serves during the current cell."""

    project: Project
    safe: bool = False
    listed: frozenset[str] = frozenset()
    files_limit: int = DEFAULT_FILES_LIMIT


_policy_lock = threading.Lock()
_policy: _Policy | None = None


def _set_policy(policy: _Policy) -> None:
    global _policy
    with _policy_lock:
        _policy = policy


def ledger_of(state: MutableMapping[str, Any], project: Project) -> Ledger:
    """The ledger of ``project`` kept in a runner session's responder state."""
    ledgers = state.setdefault(RESOURCE, {})
    ledger = ledgers.get(project.root)
    if not isinstance(ledger, Ledger):
        ledger = ledgers[project.root] = Ledger()
    return ledger


# --------------------------------------------------------------------------- reading


def _digest(view: memoryview | bytes) -> str:
    return xxhash.xxh3_128(view).hexdigest()


def _map(path: Path) -> memoryview:
    """A file's bytes without reading them into memory (the page cache serves them)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ))


def _too_big(what: str, items: Sequence[tuple[str, int]], limit: int) -> str:
    biggest = sorted(items, key=lambda item: -item[1])[:3]
    named = ", ".join(f"{rel} ({format_size(size)})" for rel, size in biggest)
    return (
        f"{what} over --files-limit {format_size(limit)}: {named}. Raise it "
        "(%%remote --files-limit 4G), or read the data on the runner from where it lives."
    )


def serve(request: Request) -> Reply:
    """Answer one ``file`` ask: ``{"op": "read", "have": digest}`` or ``{"op": "list"}``."""
    with _policy_lock:
        policy = _policy
    if policy is None:
        return Reply.refused("the notebook serves no files outside a %%remote cell")
    # whether the runner is trusted is the session's own fact; the rest is the cell's
    safe = policy.safe or bool(request.state.get(localcode.SAFE_RESULTS))
    try:
        rel = clean_relative(request.name)
        if safe and rel not in policy.listed:
            raise FileRefused(
                f"{rel!r} was not listed with --files, and this runner is added with "
                "--safe-results: only listed files are served to it"
            )
        path = policy.project.resolve(rel)
        if request.args.get("op") == "list":
            entries = [[e.name, e.is_dir, e.size, e.mtime_ns] for e in policy.project.listing(rel)]
            return Reply.found(json.dumps(entries).encode())
        if not path.is_file():
            return Reply.not_found(f"{rel!r} is not a file in the notebook's project")
        size = path.stat().st_size
        if size > policy.files_limit:
            raise FileRefused(_too_big("a file", [(rel, size)], policy.files_limit))
        view = _map(path)
        digest = _digest(view)
        ledger_of(request.state, policy.project).record(rel, path, digest)
        info = path.stat()
        meta = {"size": size, "mtime_ns": info.st_mtime_ns, "digest": digest}
        if request.args.get("have") == digest:
            return Reply.found(meta={**meta, "unchanged": True})
        return Reply.found(view, meta=meta)
    except FileNotFoundError as exc:
        return Reply.not_found(str(exc))
    except (FileRefused, NotADirectoryError) as exc:
        return Reply.refused(str(exc))


register_handler(RESOURCE, serve)


# --------------------------------------------------------------------------- before a cell

_projects: dict[tuple[str, str | None], Project] = {}
_roots: dict[Path, str] = {}
"""Each project root's tag in a bundle (its path hashed once)."""


def _here() -> Project:
    """The project of the notebook's working directory now (kept: it reads .gitignore files).

    Kept per working directory (and ``DIDOMAGIC_PROJECT_ROOT``), as the code index
    keeps its root: a cell does not look for the root's markers again.
    """
    key = (os.getcwd(), os.environ.get(ROOT_ENV))
    project = _projects.get(key)
    if project is None:
        cwd = Path(key[0])
        project = _projects[key] = Project(find_root(cwd), cwd)
    return project


def _expand(project: Project, patterns: Iterable[str]) -> list[str]:
    """Root-relative files matching ``--files`` patterns (relative to the notebook's folder)."""
    found: dict[str, None] = {}
    for pattern in patterns:
        base = project.root / project.cwd
        matches = sorted(glob.glob(pattern, root_dir=base, recursive=True))
        if not matches:
            raise ConfigurationError(f"--files {pattern!r} matches no file in {base}")
        for match in matches:
            rel = project.relative(match)
            if (project.root / rel).is_dir():
                continue
            found[rel] = None
    return list(found)


def bundle_value(
    state: MutableMapping[str, Any],
    options: FileOptions,
    *,
    safe: bool = False,
    lazy: bool = True,
    project: Project | None = None,
    skip_unchanged: bool = False,
) -> serialize.Packed | None:
    """The files' part of a cell, packed as the value :data:`FILES_VALUE`; set the serving policy.

    ``skip_unchanged``: None instead when the bundle would say nothing the
    session's kernel does not hold (call :func:`cell_ended` after the cell).
    Raises :class:`FilesTooLarge` (nothing sent) when the ``--files`` to send
    are over ``--files-limit``, and :class:`FileRefused` for a listed path
    that is not served (outside the root, excluded).
    """
    project = project or _here()
    ledger = ledger_of(state, project)
    stale = ledger.stale(project)  # kept in the ledger: what the runner saw, until it asks again
    listed = _expand(project, options.send)
    files: dict[str, SentFile] = {}
    sizes: list[tuple[str, int]] = []
    for rel in listed:
        path = project.resolve(rel)
        view = _map(path)
        digest = _digest(view)
        info = path.stat()
        held = ledger.held.get(rel)
        fresh = held is None or held[2] != digest
        files[rel] = SentFile(
            info.st_size, info.st_mtime_ns, digest, pickle.PickleBuffer(view) if fresh else None
        )
        if fresh:
            sizes.append((rel, info.st_size))
        ledger.record(rel, path, digest)
    if sum(size for _, size in sizes) > options.files_limit:
        raise FilesTooLarge(_too_big("--files together are", sizes, options.files_limit))
    tree = None
    if lazy and not ledger.tree_sent and not safe:  # placeholders need a notebook to fill them
        tree = [
            (folder, e.name, e.is_dir, e.size, e.mtime_ns) for folder, e in project.walk(TREE_LIMIT)
        ]
        ledger.tree_sent = True
    _set_policy(_Policy(project, safe, frozenset(listed), options.files_limit))
    root = _roots.get(project.root)
    if root is None:
        root = _roots[project.root] = (
            f"{_digest(str(project.root).encode())[:12]}/{project.root.name or 'root'}"
        )
    get = [project.relative(pattern) for pattern in options.get]
    said = (root, project.cwd, tuple(get), options.return_limit, lazy, safe)
    ledger.pending = said
    if skip_unchanged and said == ledger.kept and not (tree or files or stale or get):
        return None
    bundle = Bundle(
        root=root,
        cwd=project.cwd,
        tree=tree,
        files=files,
        stale=stale,
        get=get,
        return_limit=options.return_limit,
        lazy=lazy,
    )
    buffers: list[pickle.PickleBuffer] = []  # plain pickle: a Bundle is importable on both sides
    stream = pickle.dumps(
        bundle, protocol=serialize.PICKLE_PROTOCOL, buffer_callback=buffers.append
    )
    return serialize.Packed(FILES_VALUE, (memoryview(stream), *(b.raw() for b in buffers)))


def cell_ended(state: MutableMapping[str, Any], *, kept: bool) -> None:
    """A cell of the session ended: its kernel holds its bundle (``kept``), or not surely.

    Not kept (the kernel was replaced, or the cell's fate is unknown): the next
    cell sends its bundle, and the tree again if the kernel was replaced.
    """
    for ledger in state.get(RESOURCE, {}).values():
        if isinstance(ledger, Ledger):
            ledger.kept = ledger.pending if kept else None


def kernel_replaced(state: MutableMapping[str, Any]) -> None:
    """The session's kernel was replaced: its mirror is new, the tree goes again."""
    cell_ended(state, kept=False)
    for ledger in state.get(RESOURCE, {}).values():
        if isinstance(ledger, Ledger):
            ledger.tree_sent = False


# --------------------------------------------------------------------------- after a cell


def take_back(
    returned: list[tuple[str, Sequence[Any]]],
    state: MutableMapping[str, Any] | None,
    options: FileOptions,
    *,
    safe: bool = False,
    project: Project | None = None,
) -> list[tuple[str, Sequence[Any]]]:
    """Write the files a cell sent back into the notebook's folder; return the other values."""
    others = [(name, parts) for name, parts in returned if name != FILES_VALUE]
    ours = [parts for name, parts in returned if name == FILES_VALUE]
    if not ours:
        return others
    project = project or _here()
    ledger = ledger_of(state, project) if state is not None else Ledger()
    try:
        files, mtimes, left = _returned_files(serialize.unpack(ours[0], safe))
    except Exception as exc:
        _note(f"the files the runner sent back could not be read: {exc}")
        return others
    patterns = [project.relative(p) for p in options.get]
    forced = {rel for rel in files if any(fnmatch.fnmatchcase(rel, p) for p in patterns)}
    written, conflicts, refused = [], [], []
    for rel, data in sorted(files.items()):
        try:
            path = project.writable(rel)
        except FileRefused as exc:
            logger.warning("not writing a file a runner sent back: %s", exc)
            refused.append(rel)
            continue
        held = ledger.held.get(rel)
        if path.exists() and held is not None and rel not in forced:
            info = path.stat()
            moved = (info.st_size, info.st_mtime_ns) != held[:2]
            if moved and _digest(path.read_bytes()) != held[2]:
                conflicts.append(rel)
                ledger.diverged.add(rel)
                continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".didomagic-tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        mtime_ns = mtimes.get(rel)
        if isinstance(mtime_ns, int):
            os.utime(path, ns=(mtime_ns, mtime_ns))
        ledger.record(rel, path, _digest(data))
        written.append((rel, len(data)))
    if written:
        _note(f"files from the runner: {_sizes(project, written)}")
    if left:
        limit = format_size(options.return_limit)
        _note(
            f"left on the runner (over --return-limit {limit}): "
            f"{_sizes(project, sorted(left.items()))}; "
            f"fetch with %%remote --get {_shown(project, sorted(left)[0])}"
        )
    if conflicts:
        named = ", ".join(_shown(project, r) for r in conflicts)
        _note(
            f"not written, changed here since the runner read it: {named} "
            f"(%%remote --get {_shown(project, conflicts[0])} overwrites it)"
        )
    if refused:
        _note(f"not written back (excluded paths): {', '.join(refused)}")
    return others


def _returned_files(back: Any) -> tuple[dict[str, bytes], dict[str, int], dict[str, int]]:
    """The runner's files dict, checked: paths are strings, contents bytes, sizes integers."""
    if not isinstance(back, dict):
        raise TypeError(f"expected a dict, got {type(back).__name__}")
    files, mtimes, left = back.get("files", {}), back.get("mtimes", {}), back.get("left", {})
    if not (
        all(isinstance(k, str) and isinstance(v, bytes) for k, v in files.items())
        and all(isinstance(k, str) and type(v) is int for k, v in mtimes.items())
        and all(isinstance(k, str) and type(v) is int for k, v in left.items())
    ):
        raise TypeError("expected {path: bytes} files, {path: int} times and sizes")
    return files, mtimes, left


def _note(text: str) -> None:
    print(f"didomagic: {text}", file=sys.stderr)


def _sizes(project: Project, items: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{_shown(project, rel)} ({format_size(n)})" for rel, n in items)


def _shown(project: Project, rel: str) -> str:
    """A root-relative path as the user sees it: relative to the notebook's folder."""
    return os.path.relpath(rel, project.cwd) if project.cwd != "." else rel
