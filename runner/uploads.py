"""Where a cell's incoming values are written: exchange files and the session's value cache.

An :class:`Upload` writes the binary frames of a cell's values straight into
files the kernel's agent maps; a :class:`ValueCache` keeps the large values a
session holds, so an unchanged one is not sent again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path
from typing import IO, Any

from didomagic import serialize
from didomagic.errors import ProtocolError
from didomagic.protocol import Execute
from runner import agent, safefiles

RELEASE_AFTER = 1.0
"""Seconds into a cell after which the files its values replaced are let go (see ValueCache).

By then the kernel has, as a rule, rebound the names (its first step: if
not, it frees the pages itself, as it would without this); a cell that ends
sooner lets go of them as it ends. A long cell never holds them long.
"""


class UploadRefused(ProtocolError):
    """A value could not be written where it belongs (something was planted there)."""


class Upload:
    """Writes incoming values straight into files the kernel's agent maps.

    A value with a digest goes to the session's cache (written under a
    temporary name and renamed into place, so a file a kernel has mapped is
    never rewritten); one declared ``cached`` is the cached file of the same
    name and digest. Other values go to one temporary exchange file.

    Files are created when the first byte of their value arrives, with
    ``O_EXCL | O_NOFOLLOW`` (see :mod:`runner.safefiles`), and a cache file is
    closed as soon as the next value starts: whatever a cell declares, an
    upload holds at most two descriptors.
    """

    def __init__(self, request: Execute, exchange: Path, cache: ValueCache) -> None:
        self.request = request
        self.cache = cache
        self.paths: list[Path] = []
        self.keep: list[bool] = []
        self.offsets: list[int] = []
        self.digesters: dict[int, serialize.Digester] = {}
        self._shared_path = exchange / agent.INPUT_FILE  # one Path, not one per small value
        self._shared: IO[bytes] | None = None
        self._uses_shared = False
        self._current: tuple[int, IO[bytes]] | None = None
        self._created: set[int] = set()  # cache values whose part file this upload made
        shared_size = 0
        for i, header in enumerate(request.values):
            if header.cached:
                path = cache.lookup(header.name, header.digest)
                if path is None:
                    raise ProtocolError(
                        f"value {header.name!r} was declared cached, but this session does "
                        "not hold it"
                    )
                self.offsets.append(0)
            elif header.digest:
                path = cache.directory / f"{header.digest}.bin.part-{i}"
                self.offsets.append(0)
                self.digesters[i] = serialize.Digester(header.sizes)
            else:  # small or one-off values share one file: creating files is what costs
                path = self._shared_path
                self._uses_shared = True
                self.offsets.append(shared_size)
                shared_size += header.nbytes
            self.paths.append(path)
            self.keep.append(bool(header.digest))

    def write(self, value: int, data: memoryview) -> None:
        """Write the next bytes of value ``value`` (values arrive in order)."""
        digester = self.digesters.get(value)
        if digester is None:
            if self._shared is None:
                self._shared = self._create(value, replace=True)
            self._shared.write(data)
            return
        if self._current is None or self._current[0] != value:
            self._close_current()
            self._current = (value, self._create(value))
            self._created.add(value)
        self._current[1].write(data)
        digester.update(data)

    def _create(self, value: int, replace: bool = False) -> IO[bytes]:
        path = self.paths[value]
        try:
            return safefiles.replace_new(path) if replace else safefiles.create_new(path)
        except safefiles.UnsafeFile as exc:
            raise UploadRefused(
                f"cannot write value {self.request.values[value].name!r}: {exc}"
            ) from None

    def _close_current(self) -> None:
        if self._current is not None:
            self._current[1].close()
            self._current = None

    def verify(self) -> None:
        """Raise ProtocolError if a value's bytes do not match the digest it was declared with.

        The cache trusts digests, so a value that lied about its own would
        otherwise be handed out later in place of what a cell declares.
        """
        for i, digester in self.digesters.items():
            header = self.request.values[i]
            if digester.hexdigest() != header.digest:
                raise ProtocolError(
                    f"the bytes of value {header.name!r} do not match the digest it was "
                    "declared with; nothing of it was kept"
                )

    def close(self, keep: bool = True) -> None:
        """Close the files; move completed cache files into place (``keep``) or remove them."""
        self._close_current()
        try:
            if keep:  # values without bytes still need their (empty) files
                for i in self.digesters.keys() - self._created:
                    self._create(i).close()
                    self._created.add(i)
                if self._uses_shared and self._shared is None:
                    self._shared = self._create(self.paths.index(self._shared_path), True)
        finally:
            if self._shared is not None:
                self._shared.close()
                if not keep:
                    self._shared_path.unlink(missing_ok=True)
        for i in sorted(self._created):
            header = self.request.values[i]
            if not keep:
                self.paths[i].unlink(missing_ok=True)
                continue
            try:
                self.paths[i] = self.cache.store(header.name, header.digest, self.paths[i])
            except OSError as exc:
                raise UploadRefused(
                    f"cannot keep value {header.name!r} in the session's cache: {exc}"
                ) from None
        self._created.clear()

    def described(self) -> list[dict[str, Any]]:
        """The values as the agent reads them in the cell's description."""
        text = {id(p): str(p) for p in self.paths}  # each distinct path made a string once
        return [
            {
                "name": v.name,
                "sizes": list(v.sizes),
                "path": text[id(path)],
                "offset": offset,
                "keep": keep,
            }
            for v, path, offset, keep in zip(
                self.request.values, self.paths, self.offsets, self.keep, strict=True
            )
        ]


class ValueCache:
    """The large values a session holds, by name: the bytes of the last one sent.

    Lives as long as the session (moved into a replaced kernel's cache
    directory), in the cache directory of the session's kernel, removed with
    the session.

    A file a newer value replaces is *retired*: its name goes at once, but
    the cache keeps it open until :meth:`release`. Freeing a memory-backed
    file's pages costs about 150 ms per GB, paid by whoever lets go of it
    last; without this that is the kernel, when it rebinds the name as the
    next cell starts. Held here, the kernel's unmapping is quick and the
    pages are freed on a thread of the runner's, once the cell ran or
    :data:`RELEASE_AFTER` seconds into it, whichever comes first.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, exist_ok=True)  # a kernel's cache directory, empty
        self.entries: dict[str, tuple[str, Path]] = {}
        self._retired: list[int] = []
        """Descriptors of replaced files, closed by :meth:`release`."""

    def move_to(self, directory: Path) -> None:
        """Keep the cached values in ``directory`` from now on (a replaced kernel's cache)."""
        directory.mkdir(mode=0o700, exist_ok=True)
        for name, (digest, path) in list(self.entries.items()):
            moved = directory / path.name
            if path.exists():  # two names holding the same bytes share one file
                os.replace(path, moved)
            if moved.exists():
                self.entries[name] = (digest, moved)
            else:
                del self.entries[name]
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory = directory

    def lookup(self, name: str, digest: str) -> Path | None:
        """The file holding ``name`` with this digest, if the session has it."""
        entry = self.entries.get(name)
        return entry[1] if entry is not None and entry[0] == digest else None

    def store(self, name: str, digest: str, written: Path) -> Path:
        """Make ``written`` the cached bytes of ``name``; drop what it replaces."""
        path = self.directory / f"{digest}.bin"
        self._retire(path)
        os.replace(written, path)
        old = self.entries.get(name)
        self.entries[name] = (digest, path)
        if old is not None and old[1] != path and old[1] not in self._paths():
            self._retire(old[1])
            old[1].unlink(missing_ok=True)
        return path

    def _retire(self, path: Path) -> None:
        """Keep the file at ``path`` (about to lose its name) open until :meth:`release`."""
        with contextlib.suppress(OSError):  # none there: nothing to free later
            self._retired.append(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))

    def release(self) -> threading.Thread | None:
        """Let go of the retired files on a thread (freeing their pages takes a while).

        Returns that thread (join it to wait), or None when nothing was retired.
        """
        retired, self._retired = self._retired, []
        if not retired:
            return None
        thread = threading.Thread(
            target=_close_all, args=(retired,), name="didomagic-cache-release", daemon=True
        )
        thread.start()
        return thread

    def _paths(self) -> set[Path]:
        return {path for _, path in self.entries.values()}

    def clear(self) -> None:
        """Remove every cached file."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.entries.clear()
        self.release()


def _close_all(descriptors: list[int]) -> None:
    for fd in descriptors:
        with contextlib.suppress(OSError):
            os.close(fd)
