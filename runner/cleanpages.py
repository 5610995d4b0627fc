"""Which bytes of the values the agent loaded cannot have changed since: clean mapped pages.

The agent loads a value's buffers straight from the file the runner wrote,
through a private copy-on-write mapping (``mmap.ACCESS_COPY``, i.e.
``MAP_PRIVATE``; see :func:`didomagic.serialize.map_file`). A page of such a
mapping that was never written still shows the file's bytes; the first write
to it gives this process a private anonymous copy. The runner never rewrites a
file once written (new bytes go to a new file, renamed into place), so a byte
that lies on a page still backed by the file holds what it held when the
value was loaded, and need not be hashed again to know it.

Linux tells which pages those are, without privileges, in
``/proc/self/pagemap``: one 64-bit entry per virtual page, where bit 61 says
"file page (or shared anonymous)", bit 62 "swapped" and bit 63 "present". A
page of a private file mapping is *clean* when its entry has bit 61, or is
neither present nor swapped (never touched, or a file page the kernel
dropped: either way the file's bytes); it is *dirty* (a private copy, in RAM
or in swap) otherwise. Reading the flags of 1 GiB is 2 MiB of reads.

:class:`MappedFiles` records the mappings the agent made and answers, for a
buffer, which runs of it are clean (:meth:`MappedFiles.clean_runs`, the hook
:func:`didomagic.versions.fingerprint` uses). Wherever the answer is not
certain (no pagemap, not Linux, a buffer outside every recorded mapping, a
pagemap that failed the :func:`probe` at start, ``DIDOMAGIC_PAGEMAP=off``) it
answers ``None`` and the buffer's bytes are hashed as before.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import logging
import mmap
import os
import struct
import sys
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("runner.cleanpages")

PAGEMAP = "/proc/self/pagemap"
"""This process's page flags (Linux)."""

PAGEMAP_ENV = "DIDOMAGIC_PAGEMAP"
"""Environment variable: ``off`` hashes every buffer; a path reads page flags there instead."""

MIN_BYTES = 1 << 20
"""Buffers smaller than this are hashed: reading their flags would cost as much."""

MAX_RUNS = 64
"""A buffer cut into more clean runs than this is hashed whole (the runs would cost more)."""

_ENTRY = 8
_PRESENT, _SWAPPED, _FILE = 0x80, 0x40, 0x20  # bits 63, 62, 61: in the entry's top byte
_TOP = 7 if sys.byteorder == "little" else 0
_DIRTY = bytes(
    1 if flags & (_PRESENT | _SWAPPED) and not flags & _FILE else 0 for flags in range(256)
)
"""Maps an entry's top byte to 1 for a private copy (present or swapped, not a file page)."""


class PageFlags:
    """Reads which pages of this process are private copies, from a pagemap file.

    ``pages_per_read``: entries read at once (the default, 1 MiB of them, covers
    512 MiB of 4 KiB pages), so a huge value never needs a huge read.
    """

    def __init__(self, path: str = PAGEMAP, pages_per_read: int = 1 << 17) -> None:
        self.path = path
        self.page = mmap.PAGESIZE
        self.pages_per_read = pages_per_read
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def close(self) -> None:
        """Close the pagemap file."""
        os.close(self._fd)

    def dirty_pages(
        self, address: int, length: int, limit: int = MAX_RUNS
    ) -> list[tuple[int, int]] | None:
        """The runs of dirty pages over ``length`` bytes at ``address``, as byte ranges.

        Ranges are relative to ``address``, clipped to ``[0, length)``. ``None``
        if the flags could not be read in full, or there are more than ``limit`` runs.
        """
        first = address // self.page
        last = (address + length + self.page - 1) // self.page
        runs: list[list[int]] = []  # page numbers from ``first``, end exclusive
        for at in range(first, last, self.pages_per_read):
            count = min(self.pages_per_read, last - at)
            try:
                entries = os.pread(self._fd, count * _ENTRY, at * _ENTRY)
            except OSError:
                return None
            if len(entries) != count * _ENTRY:
                return None
            marks = entries[_TOP::_ENTRY].translate(_DIRTY)
            start = marks.find(1)
            while start != -1:  # bytes.find is a memchr: far quicker than a regex over the marks
                end = marks.find(0, start)
                end = count if end == -1 else end
                if runs and runs[-1][1] == at - first + start:  # goes on from the last read
                    runs[-1][1] = at - first + end
                elif len(runs) == limit:
                    return None
                else:
                    runs.append([at - first + start, at - first + end])
                start = marks.find(1, end)
        base = first * self.page - address
        return [
            (max(0, base + start * self.page), min(length, base + end * self.page))
            for start, end in runs
        ]


def probe(flags: PageFlags, directory: Path | None = None) -> bool:
    """True if ``flags`` tells a written page of a private file mapping from a read one.

    Maps a two-page temporary file copy-on-write, reads the first page and
    writes the second: only the second may read dirty. A pagemap that hides
    its flags (a sandbox that answers zeros, say) fails, and then nothing is
    ever taken as clean.
    """
    page = flags.page
    try:
        with tempfile.TemporaryFile(dir=directory) as file:
            file.write(b"\0" * (2 * page))
            file.flush()
            mapping = mmap.mmap(file.fileno(), 2 * page, access=mmap.ACCESS_COPY)
            try:
                view = memoryview(mapping)
                try:
                    _ = view[0]  # faults the first page in, as a file page
                    view[page] = 1  # the second becomes a private copy
                    address = address_of(view)
                    runs = None if address is None else flags.dirty_pages(address, 2 * page)
                finally:
                    view.release()
            finally:
                mapping.close()
    except (OSError, ValueError, BufferError):
        return False
    return runs == [(page, 2 * page)]


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def address_of(view: memoryview) -> int | None:
    """The address of a contiguous buffer's first byte (read-only ones too); None if not one."""
    buffer = _PyBuffer()
    try:
        _get_buffer(view, ctypes.byref(buffer), 0)  # PyBUF_SIMPLE: contiguous bytes
    except (BufferError, TypeError, ValueError):
        return None
    try:
        return buffer.buf
    finally:
        _release_buffer(ctypes.byref(buffer))


@dataclass
class _Mapping:
    start: int
    end: int
    serial: int
    alive: bool = True


class MappedFiles:
    """The private file mappings this process made for values, and which of their bytes are clean.

    ``flags`` None: nothing is ever clean (every buffer is hashed).
    """

    def __init__(self, flags: PageFlags | None) -> None:
        self.flags = flags
        self._index: tuple[tuple[int, ...], tuple[_Mapping, ...]] = ((), ())
        """The mappings by start address. A mapping can be freed on any thread, even in
        the middle of :meth:`register`: it is only marked dead then, and pruned here."""
        self._serials = itertools.count(1)

    def register(self, view: memoryview) -> None:
        """Record a whole-file mapping from :func:`didomagic.serialize.map_file`.

        It must be copy-on-write (``ACCESS_COPY``) of a file nobody rewrites.
        Forgotten when the mapping is freed, and never confused with a later
        one at the same address: each mapping gets a serial number of its own.
        """
        if self.flags is None or not isinstance(view.obj, mmap.mmap) or view.nbytes == 0:
            return
        start = address_of(view)
        if start is None:
            return
        entry = _Mapping(start, start + view.nbytes, next(self._serials))
        weakref.finalize(view.obj, _forget, entry)
        mappings = sorted([*(m for m in self._index[1] if m.alive), entry], key=lambda m: m.start)
        self._index = (tuple(m.start for m in mappings), tuple(mappings))

    def clean_runs(self, view: memoryview) -> list[tuple[int, int, bytes]] | None:
        """The runs of ``view`` that still hold their file's bytes, with a token naming those bytes.

        Each run is ``(start, end, token)``, offsets into ``view``; the token
        names the mapping and the bytes' place in it, so two equal tokens mean
        equal bytes. ``None`` when nothing is known (hash the whole buffer).
        """
        starts, mappings = self._index
        if self.flags is None or view.nbytes < MIN_BYTES or not mappings:
            return None
        address = address_of(view)
        if address is None:
            return None
        at = bisect.bisect(starts, address) - 1
        mapping = mappings[at] if at >= 0 else None
        if mapping is None or not mapping.alive or address + view.nbytes > mapping.end:
            return None
        dirty = self.flags.dirty_pages(address, view.nbytes, MAX_RUNS - 1)
        if dirty is None:
            return None
        runs, clean_from = [], 0
        for start, end in [*dirty, (view.nbytes, view.nbytes)]:
            if start > clean_from:
                where = address - mapping.start + clean_from
                token = struct.pack("<QQQ", mapping.serial, where, start - clean_from)
                runs.append((clean_from, start, token))
            clean_from = end
        return runs


def _forget(mapping: _Mapping) -> None:
    """(When the mapping is freed.) Nothing lies there any more."""
    mapping.alive = False


def from_environment(directory: Path | None = None) -> MappedFiles:
    """The clean-page check for this process: on where the pagemap works, else hashing.

    ``DIDOMAGIC_PAGEMAP=off`` turns it off; another value is read as the
    pagemap's path (tests use it to stand in for a pagemap that lies).
    ``directory``: where the probe's temporary file goes.
    """
    path = os.environ.get(PAGEMAP_ENV, PAGEMAP)
    if path == "off":
        return MappedFiles(None)
    try:
        flags = PageFlags(path)
    except OSError as exc:
        log.debug("no page flags at %s (%s): every buffer is hashed", path, exc)
        return MappedFiles(None)
    if not probe(flags, directory):
        log.debug("%s does not tell written pages from clean ones: every buffer is hashed", path)
        flags.close()
        return MappedFiles(None)
    return MappedFiles(flags)
