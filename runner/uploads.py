"""Where a cell's incoming values are written: exchange files and the session's value cache.

An :class:`Upload` writes the binary frames of a cell's values straight into
files the kernel's agent maps; a :class:`ValueCache` keeps the large values a
session holds, so an unchanged one is not sent again.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import IO, Any

from didomagic import serialize
from didomagic.errors import ProtocolError
from didomagic.protocol import Execute
from runner import agent


class Upload:
    """Writes incoming values straight into files the kernel's agent maps.

    A value with a digest goes to the session's cache (written under a
    temporary name and renamed into place, so a file a kernel has mapped is
    never rewritten); one declared ``cached`` is the cached file of the same
    name and digest. Other values go to temporary exchange files.
    """

    def __init__(self, request: Execute, exchange: Path, cache: ValueCache) -> None:
        self.request = request
        self.cache = cache
        self.paths: list[Path] = []
        self.keep: list[bool] = []
        self.offsets: list[int] = []
        self.files: list[IO[bytes] | None] = []
        self.digesters: dict[int, serialize.Digester] = {}
        self.shared: IO[bytes] | None = None
        self.shared_size = 0
        shared_path = exchange / agent.INPUT_FILE  # one Path, not one per small value
        for i, header in enumerate(request.values):
            if header.cached:
                path = cache.lookup(header.name, header.digest)
                if path is None:
                    self.close()
                    raise ProtocolError(
                        f"value {header.name!r} was declared cached, but this session does "
                        "not hold it"
                    )
                self.paths.append(path)
                self.keep.append(True)
                self.files.append(None)
                self.offsets.append(0)
                continue
            if header.digest:
                path = cache.directory / f"{header.digest}.bin.part-{i}"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                self.files.append(open(fd, "wb"))  # noqa: SIM115 - closed in close()
                self.offsets.append(0)
                self.digesters[i] = serialize.Digester(header.sizes)
            else:  # small or one-off values share one file: creating files is what costs
                path = shared_path
                if self.shared is None:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    self.shared = open(fd, "wb")  # noqa: SIM115 - closed in close()
                self.files.append(self.shared)
                self.offsets.append(self.shared_size)
                self.shared_size += header.nbytes
            self.paths.append(path)
            self.keep.append(bool(header.digest))

    def write(self, value: int, data: memoryview) -> None:
        f = self.files[value]
        assert f is not None
        f.write(data)
        digester = self.digesters.get(value)
        if digester is not None:
            digester.update(data)

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
        for i, f in enumerate(self.files):
            if f is None:
                continue
            f.close()
            header = self.request.values[i]
            if header.digest and not header.cached and not keep:
                self.paths[i].unlink(missing_ok=True)
            elif header.digest and not header.cached:
                self.paths[i] = self.cache.store(header.name, header.digest, self.paths[i])
        if self.shared is not None:
            self.shared.close()
        self.files = [None] * len(self.files)

    def described(self) -> list[dict[str, Any]]:
        """The values as the agent reads them from ``cell.json``."""
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
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, exist_ok=True)  # a kernel's cache directory, empty
        self.entries: dict[str, tuple[str, Path]] = {}

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
        os.replace(written, path)
        old = self.entries.get(name)
        self.entries[name] = (digest, path)
        if old is not None and old[1] != path and old[1] not in self._paths():
            old[1].unlink(missing_ok=True)
        return path

    def _paths(self) -> set[Path]:
        return {path for _, path in self.entries.values()}

    def clear(self) -> None:
        """Remove every cached file."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.entries.clear()
