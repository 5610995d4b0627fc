"""Opening files in directories a kernel can reach, without following what it planted there.

A kernel shares its exchange directory with the runner (and, without
``--sandbox bwrap``, runs as the runner's user, so it can write anywhere the
runner can). Whatever it leaves where the runner is about to write or read —
a symbolic link to another file, a FIFO, a directory — must neither be
written through nor block the runner's event loop. So the runner:

- creates every file it writes with ``O_CREAT | O_EXCL | O_NOFOLLOW``: a name
  that already exists fails at once, and a link is never followed;
- opens every file it reads with ``O_NOFOLLOW | O_NONBLOCK`` and reads it only
  if it is a regular file (opening a FIFO that way never waits for a writer).

Either failure is an :class:`UnsafeFile` that says what was found.
"""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path
from typing import IO

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafeFile(Exception):
    """A path the runner writes or reads holds something it did not put there."""


def create_new(path: Path) -> IO[bytes]:
    """A new file at ``path`` (mode 0600) for writing; raise if anything is there already."""
    try:
        fd = os.open(path, _CREATE, 0o600)
    except FileExistsError:
        raise UnsafeFile(
            f"{path} already exists (a file, link or FIFO the runner did not create); "
            "nothing was written through it"
        ) from None
    except OSError as exc:
        raise UnsafeFile(f"cannot create {path}: {exc.strerror}") from None
    return open(fd, "wb")


def replace_new(path: Path) -> IO[bytes]:
    """Remove what is at ``path`` (never following a link), then :func:`create_new` it."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # a directory planted there, say
        raise UnsafeFile(f"cannot replace {path}: {exc.strerror}") from None
    return create_new(path)


def open_regular(path: Path) -> int:
    """A descriptor of the regular file at ``path``, opened for reading without waiting."""
    try:
        fd = os.open(path, _READ)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise UnsafeFile(f"cannot open {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFile(f"{path} is not a regular file; it was not read")
    return fd


def map_regular(path: Path) -> memoryview:
    """Map the regular file at ``path`` read-only (an empty view for an empty file)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(fd, size, access=mmap.ACCESS_READ))
    finally:
        os.close(fd)
