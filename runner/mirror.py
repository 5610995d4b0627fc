"""The kernel's mirror of the notebook's project folder, filled lazily.

The kernel's scratch directory is a mirror of the notebook's project root,
and a cell runs at the notebook's place in it, so ``open('data.csv')``,
``Path.cwd().parent / 'src'`` and ``..`` mean what they mean in the notebook.

The mirror starts as a skeleton: the folders and *placeholders* of the files
the notebook side listed (sparse files of the right size and time, so
``os.path.exists`` and ``os.stat`` answer as there). An audit hook
(:func:`sys.addaudithook`) sees every ``open``, ``os.listdir``, ``os.scandir``
and ``glob.glob`` in the kernel; before one touches a placeholder or a path
the mirror does not have, it asks the notebook side for the file or the
folder's listing over the request channel and writes it into the mirror, then
the call goes on and finds it. A file the notebook does not have stays missing,
so the call raises its usual ``FileNotFoundError``; one the notebook side
refuses raises ``PermissionError`` with the reason.

Files stay in the mirror for the session, so an unchanged file travels once;
the notebook names the ones that changed since (``stale``), and those are
asked for again, with the digest held (an unchanged content is not re-sent).

After the cell, files it created or changed in the mirror go back, up to a
size limit; bigger ones are named and wait for ``--get``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from didomagic.filebundle import RESOURCE, Bundle
from didomagic.project import ALWAYS_EXCLUDED

logger = logging.getLogger("didomagic.runner.mirror")

Ask = Callable[..., Any]
"""``ask(resource, name, args, sink=...)`` of :mod:`runner.asking`."""

_WATCHED = frozenset({"open", "os.listdir", "os.scandir", "glob.glob"})
_MAGIC = frozenset("*?[")
_TEMP_NAME = re.compile(r"tmp[a-z0-9_]{8}(?![a-z0-9_])")
"""How ``tempfile`` names what it creates."""
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class Mirror:
    """One kernel's mirror of the notebook's project root, under ``base``."""

    def __init__(self, base: Path, ask: Ask | None) -> None:
        self.base = base
        """The kernel's working directory: the project root's place in the mirror."""
        self.ask = ask
        self.root: str | None = None
        """The mirror root's absolute path, once a cell named the project."""
        self.placeholders: set[str] = set()
        self.known: dict[str, tuple[int, int]] = {}
        """``(size, mtime_ns)`` of each file as the mirror last placed or reported it."""
        self.digests: dict[str, str] = {}
        self._listed: set[str] = set()
        self._absent: set[str] = set()
        self._lazy = False
        self._local = threading.local()
        self._lock = threading.RLock()
        self._hooked = False
        self._touched: set[str] = set()
        self._folders: dict[str, tuple[int, list[str]]] = {}
        self._project: str | None = None
        """Each mirror folder's time and subfolders when last scanned."""

    # -- around a cell

    def before_cell(self, bundle: Bundle) -> list[str]:
        """Set the mirror up for a cell and move into it; return problems, one line each."""
        problems: list[str] = []
        with self._quiet():
            root = self.base
            if self._project != bundle.root:  # another project (the notebook moved): start over
                self._reset()
                self._project = bundle.root
                self.root = str(root)
            self._lazy = bundle.lazy and self.ask is not None
            self._listed.clear()
            self._absent.clear()
            self._touched.clear()
            cwd = root / bundle.cwd
            cwd.mkdir(parents=True, exist_ok=True)
            os.chdir(cwd)
            for path in bundle.stale:
                self._mark_stale(path)
            skipped = 0
            for folder, name, is_dir, size, mtime_ns in bundle.tree or ():
                try:
                    self._place(_join(folder, name), is_dir, size, mtime_ns)
                except OSError:  # over a file-size limit, out of inodes: asked for when opened
                    skipped += 1
            if skipped:
                logger.info("mirror: %d entries of the project tree not placed", skipped)
            for path, sent in bundle.files.items():
                try:
                    if sent.data is not None:
                        self._write(path, [memoryview(sent.data)], sent.mtime_ns, sent.digest)
                    elif self.digests.get(path) != sent.digest:
                        problem = self._fetch(path)
                        if problem:
                            problems.append(f"--files {path}: {problem}")
                except OSError as exc:
                    problems.append(f"--files {path} could not be written here: {exc}")
        if not self._hooked:
            import sys

            sys.addaudithook(self._audit)
            self._hooked = True
        return problems

    def after_cell(self, get: list[str], limit: int) -> dict[str, Any] | None:
        """The files the cell created or changed (and ``--get`` ones), as the plain dict."""
        if self.root is None:
            return None
        with self._quiet():
            changed: dict[str, int] = {}
            wanted: list[str] = []
            temporary = self._temporary_files_here()
            for rel, size, mtime_ns in self._scan(whole=bool(get)):
                if temporary and _TEMP_NAME.match(rel) and rel.split("/")[0] not in self.known:
                    continue  # tempfile's, in the scratch directory: not the cell's output
                if get and any(fnmatch.fnmatchcase(rel, pattern) for pattern in get):
                    wanted.append(rel)
                elif self.known.get(rel) != (size, mtime_ns):
                    changed[rel] = size
                self.known[rel] = (size, mtime_ns)
            files: dict[str, bytes] = {}
            mtimes: dict[str, int] = {}
            left: dict[str, int] = {}
            total = 0
            for rel in sorted(changed, key=lambda r: changed[r]):
                if total + changed[rel] > limit:
                    left[rel] = changed[rel]
                    continue
                total += changed[rel]
                wanted.append(rel)
            for rel in wanted:
                path = os.path.join(self.root, rel)
                with contextlib.suppress(OSError), open(path, "rb") as f:
                    files[rel] = f.read()
                    mtimes[rel] = os.fstat(f.fileno()).st_mtime_ns
        if not files and not left:
            return None
        return {"files": files, "mtimes": mtimes, "left": left}

    def _temporary_files_here(self) -> bool:
        """True when ``tempfile`` puts its files in the mirror's root (TMPDIR is the scratch)."""
        import tempfile

        return os.path.realpath(tempfile.gettempdir()) == os.path.realpath(self.root or "")

    def _scan(self, whole: bool) -> list[tuple[str, int, int]]:
        """The mirror's regular files that may have changed: ``(path, size, mtime_ns)``.

        Those the cell opened to write (the hook saw them), and every file of
        a folder whose entries changed (a folder's time moves when a file is
        created, removed or renamed in it, whoever does it). ``whole``: every
        file. Placeholders are skipped.
        """
        assert self.root is not None
        found = {rel: entry for rel, *entry in self._stat_each(self._touched)}
        stack = ["."]
        while stack:
            rel_dir = stack.pop()
            folder = os.path.join(self.root, rel_dir) if rel_dir != "." else self.root
            try:
                mtime_ns = os.stat(folder).st_mtime_ns
            except OSError:
                self._folders.pop(rel_dir, None)
                continue
            known = self._folders.get(rel_dir)
            if known is not None and known[0] == mtime_ns and not whole:
                stack.extend(known[1])
                continue
            subdirs = []
            with contextlib.suppress(OSError), os.scandir(folder) as entries:
                for entry in entries:
                    rel = entry.name if rel_dir == "." else f"{rel_dir}/{entry.name}"
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name not in ALWAYS_EXCLUDED:
                            subdirs.append(rel)
                        continue
                    if (
                        rel in self.placeholders
                        or entry.name.endswith((".pyc", ".tmp-mirror"))
                        or not entry.is_file(follow_symlinks=False)
                    ):
                        continue
                    with contextlib.suppress(OSError):
                        info = entry.stat(follow_symlinks=False)
                        found[rel] = [info.st_size, info.st_mtime_ns]
            self._folders[rel_dir] = (mtime_ns, subdirs)
            stack.extend(subdirs)
        return [(rel, size, mtime_ns) for rel, (size, mtime_ns) in found.items()]

    def _stat_each(self, paths: set[str]) -> list[tuple[str, int, int]]:
        found = []
        for rel in sorted(paths):
            parts = rel.split("/")
            if any(p in ALWAYS_EXCLUDED for p in parts) or rel in self.placeholders:
                continue
            try:
                info = os.lstat(os.path.join(self.root or "", rel))
            except OSError:
                continue
            if not os.path.islink(os.path.join(self.root or "", rel)):
                found.append((rel, info.st_size, info.st_mtime_ns))
        return found

    # -- the audit hook

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event not in _WATCHED or getattr(self._local, "busy", False):
            return
        try:
            if event == "open":
                path, _, flags = args
                if isinstance(path, int):
                    return
                rel = self._relative(path)
                if rel is None:
                    return
                flags = flags if isinstance(flags, int) else 0
                if flags & _WRITING:
                    self._touched.add(rel)
                if self._lazy:
                    self._before_open(rel, flags)
            elif not self._lazy:
                return
            elif event == "glob.glob":
                rel = self._relative(args[0])
                if rel is not None:
                    self._before_glob(rel)
            else:
                path = args[0] if args and args[0] is not None else "."
                if isinstance(path, int):
                    return
                rel = self._relative(path)
                if rel is not None:
                    self._list(rel)
        except PermissionError:
            raise
        except Exception:  # never break the user's call for a failure of ours
            logger.exception("mirror: could not prepare %s %r", event, args[:1])

    def _relative(self, path: Any) -> str | None:
        """The mirror-relative POSIX path of ``path``, or None when it is outside the mirror."""
        root = self.root
        if root is None:
            return None
        try:
            full = os.path.abspath(os.fsdecode(path))
        except (TypeError, ValueError):
            return None
        if full == root:
            return "."
        if not full.startswith(root + os.sep):
            return None
        return full[len(root) + 1 :].replace(os.sep, "/")

    def _before_open(self, rel: str, flags: int) -> None:
        truncating = bool(flags & os.O_TRUNC)
        with self._lock, self._quiet():
            self._ensure_folder(_parent(rel))
            if rel in self.placeholders:
                if truncating:  # overwritten whole: its old content is not needed
                    self.placeholders.discard(rel)
                    os.chmod(os.path.join(self.root or "", rel), 0o644)
                    return
                self._raise_if_refused(self._fetch(rel))
            elif (
                not truncating
                and rel not in self._absent
                and not os.path.lexists(os.path.join(self.root or "", rel))
            ):
                self._raise_if_refused(self._fetch(rel))

    def _before_glob(self, rel: str) -> None:
        parts = rel.split("/")
        plain = []
        for part in parts:
            if _MAGIC & set(part):
                break
            plain.append(part)
        with self._lock, self._quiet():
            folder = "/".join(plain[: len(parts) - 1] if len(plain) == len(parts) else plain)
            self._ensure_folder(folder or ".")

    # -- asking the notebook side

    def _list(self, rel: str, strict: bool = True) -> None:
        """Show folder ``rel`` as the notebook has it (once per cell).

        ``strict``: a refusal raises PermissionError (the cell asked for the
        listing); otherwise the folder just stays as the mirror has it.
        """
        with self._lock, self._quiet():
            if rel in self._listed or rel in self._absent or self.ask is None:
                return
            self._listed.add(rel)
            reply = self.ask(RESOURCE, rel, {"op": "list"})
            if reply.status == "refused":
                if strict:
                    raise PermissionError(f"didomagic: the notebook side refused: {reply.message}")
                return
            if not reply.found:
                self._absent.add(rel)
                return
            entries = json.loads(bytes(reply.parts[0])) if reply.parts else []
            folder = os.path.join(self.root or "", rel)
            os.makedirs(folder, exist_ok=True)
            for name, is_dir, size, mtime_ns in entries:
                with contextlib.suppress(OSError):  # not placed: asked for when opened
                    self._place(_join(rel, name), is_dir, size, mtime_ns)

    def _ensure_folder(self, rel: str) -> None:
        """Make sure folder ``rel`` is in the mirror if the notebook has it (listing parents)."""
        if rel == "." or os.path.isdir(os.path.join(self.root or "", rel)):
            return
        self._ensure_folder(_parent(rel))
        if self._lazy:
            self._list(_parent(rel), strict=False)

    def _fetch(self, rel: str) -> str:
        """Ask the notebook for file ``rel`` and write it in; return a problem ("" if none)."""
        if self.ask is None:
            return "no request channel to the notebook"
        root = self.root or ""
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp-mirror"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with open(fd, "wb") as out:
                reply = self.ask(
                    RESOURCE,
                    rel,
                    {"op": "read", "have": self.digests.get(rel, "")},
                    sink=lambda _part, chunk: out.write(chunk),
                )
            if reply.status == "refused":
                return "refused: " + reply.message
            if not reply.found:
                self._absent.add(rel)
                self._forget(rel)
                return ""
            meta = reply.meta
            if not meta.get("unchanged"):
                os.replace(tmp, path)
            os.chmod(path, 0o644)
            mtime_ns = int(meta.get("mtime_ns", 0))
            os.utime(path, ns=(mtime_ns, mtime_ns))
            self.placeholders.discard(rel)
            self.digests[rel] = str(meta.get("digest", ""))
            info = os.stat(path)
            self.known[rel] = (info.st_size, info.st_mtime_ns)
            return ""
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @staticmethod
    def _raise_if_refused(problem: str) -> None:
        if problem:
            raise PermissionError(f"didomagic: the notebook side {problem}")

    # -- the mirror's own files

    def _place(self, rel: str, is_dir: bool, size: int, mtime_ns: int) -> None:
        """Show an entry the notebook has: a folder, or a placeholder of a file not here yet."""
        path = os.path.join(self.root or "", rel)
        if is_dir:
            os.makedirs(path, exist_ok=True)
            return
        if os.path.lexists(path) and (rel not in self.placeholders or rel in self.digests):
            return  # its content is here already (the notebook says when it changes)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o000)
        try:
            os.ftruncate(fd, size)  # sparse: the right size, no bytes
        finally:
            os.close(fd)
        os.chmod(path, 0o000)  # a reader that bypasses the hook fails rather than read zeros
        os.utime(path, ns=(mtime_ns, mtime_ns))
        self.placeholders.add(rel)
        self.known[rel] = (size, mtime_ns)

    def _write(self, rel: str, parts: list[memoryview], mtime_ns: int, digest: str) -> None:
        path = os.path.join(self.root or "", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path, 0o644)
        with open(path, "wb") as f:
            for part in parts:
                f.write(part)
        os.utime(path, ns=(mtime_ns, mtime_ns))
        self.placeholders.discard(rel)
        self.digests[rel] = digest
        info = os.stat(path)
        self.known[rel] = (info.st_size, info.st_mtime_ns)

    def _reset(self) -> None:
        """Remove what the mirror placed or fetched for the previous project; forget it all."""
        for rel in {*self.placeholders, *self.digests}:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.root or "", rel))
        self.placeholders.clear()
        self.known.clear()
        self.digests.clear()
        self._folders.clear()

    def _mark_stale(self, rel: str) -> None:
        """The notebook's file changed: ask again when next opened, saying which digest is here."""
        path = os.path.join(self.root or "", rel)
        if os.path.lexists(path):
            self.placeholders.add(rel)
            self._listed.discard(_parent(rel))

    def _forget(self, rel: str) -> None:
        """Drop a file the notebook changed or lost: asked for again when next opened."""
        path = os.path.join(self.root or "", rel)
        with contextlib.suppress(OSError):
            os.unlink(path)
        self.placeholders.discard(rel)
        self.known.pop(rel, None)
        self.digests.pop(rel, None)
        self._listed.discard(_parent(rel))

    @contextlib.contextmanager
    def _quiet(self) -> Any:
        """The mirror's own file calls do not go through its hook."""
        was = getattr(self._local, "busy", False)
        self._local.busy = True
        try:
            yield
        finally:
            self._local.busy = was


def _join(folder: str, name: str) -> str:
    return name if folder == "." else f"{folder}/{name}"


def _parent(rel: str) -> str:
    head = rel.rpartition("/")[0]
    return head or "."
