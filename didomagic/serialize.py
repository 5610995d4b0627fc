"""Packing values for the wire and unpacking them, one name at a time.

A value becomes *parts*: a cloudpickle stream (protocol 5) and the out-of-band
buffers it refers to, so array memory is never copied into the pickle. Parts
are flat byte ``memoryview`` objects; the wire protocol moves them as binary
frames and the runner keeps them in one file per value, laid end to end.

A name that cannot be pickled or unpickled does not stop the others: the
functions here return the failures by name with the reason.
"""

from __future__ import annotations

import mmap
import os
import pickle
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import cloudpickle
import xxhash

from didomagic.protocol import ValueHeader

PICKLE_PROTOCOL = 5


@dataclass(frozen=True)
class Packed:
    """One value ready to travel: its name and its parts (pickle stream first)."""

    name: str
    parts: tuple[memoryview, ...]

    @cached_property
    def header(self) -> ValueHeader:
        """The header that declares this value on the wire."""
        return ValueHeader(self.name, tuple(p.nbytes for p in self.parts))

    @cached_property
    def nbytes(self) -> int:
        """Total size of the parts."""
        return sum(p.nbytes for p in self.parts)

    def digest(self) -> str:
        """XXH3-128 of the parts (sizes included), to tell whether a value changed."""
        h = xxhash.xxh3_128()
        for part in self.parts:
            h.update(part.nbytes.to_bytes(8, "little"))
            h.update(part)
        return h.hexdigest()


def _flat(buffer: pickle.PickleBuffer | bytes | bytearray | memoryview) -> memoryview:
    view = buffer.raw() if isinstance(buffer, pickle.PickleBuffer) else memoryview(buffer)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def describe(exc: BaseException) -> str:
    """A one-line reason for a failure, as shown to the user."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def pack(name: str, value: Any) -> Packed:
    """Pickle one value with out-of-band buffers; raise if it cannot be pickled."""
    buffers: list[pickle.PickleBuffer] = []
    stream = cloudpickle.dumps(value, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append)
    return Packed(name, (memoryview(stream), *(_flat(b) for b in buffers)))


def pack_names(
    namespace: Mapping[str, Any], names: Iterable[str]
) -> tuple[list[Packed], dict[str, str]]:
    """Pack every name bound in ``namespace``; return the packed values and the failures."""
    packed: list[Packed] = []
    failures: dict[str, str] = {}
    for name in names:
        if name not in namespace:
            continue
        try:
            packed.append(pack(name, namespace[name]))
        except Exception as exc:
            failures[name] = f"could not be pickled: {describe(exc)}"
    return packed, failures


def unpack(parts: Sequence[bytes | bytearray | memoryview]) -> Any:
    """Rebuild a value from its parts (pickle stream first, then its buffers)."""
    return pickle.loads(parts[0], buffers=parts[1:])


def unpack_into(
    namespace: MutableMapping[str, Any], values: Iterable[tuple[str, Sequence[Any]]]
) -> dict[str, str]:
    """Unpickle ``(name, parts)`` pairs into ``namespace``; return the failures by name."""
    failures: dict[str, str] = {}
    for name, parts in values:
        try:
            namespace[name] = unpack(parts)
        except Exception as exc:
            failures[name] = f"could not be unpickled: {describe(exc)}"
    return failures


# --------------------------------------------------------------------------- files


def write_values(path: Path, values: Sequence[Sequence[memoryview]]) -> list[int]:
    """Write several values' parts end to end into one file; return each value's offset.

    One file for many values: creating a file costs far more than writing a
    small value, so a cell with a thousand small values makes one file, not a
    thousand.
    """
    offsets, offset = [], 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb", buffering=0) as f:
        for parts in values:
            offsets.append(offset)
            for part in parts:
                view = part
                offset += view.nbytes
                while view.nbytes:
                    written = f.write(view)
                    view = view[written:]
    return offsets


def map_file(path: Path) -> memoryview:
    """Map a whole file as a writable copy-on-write view (shares the page cache)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return memoryview(bytearray())
        return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY))


def slice_parts(view: memoryview, offset: int, sizes: Sequence[int]) -> list[memoryview]:
    """The parts of the value at ``offset`` in a mapped file; raise if the file is short."""
    end = offset + sum(sizes)
    if end > view.nbytes:
        raise ValueError(f"the value file holds {view.nbytes} bytes, expected at least {end}")
    parts = []
    for size in sizes:
        parts.append(view[offset : offset + size])
        offset += size
    return parts


def read_file(path: Path, sizes: Sequence[int]) -> list[memoryview]:
    """Map a file holding exactly one value and return its parts (copy-on-write views).

    The views share the page cache with the file, so a large array costs no
    extra copy until it is written to.
    """
    if sum(sizes) == 0:
        return [memoryview(b"") for _ in sizes]
    view = map_file(path)
    if view.nbytes != sum(sizes):
        raise ValueError(f"{path.name} holds {view.nbytes} bytes, expected {sum(sizes)}")
    return slice_parts(view, 0, sizes)


# --------------------------------------------------------------------------- what returns

_MISSING = object()


def snapshot(namespace: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The objects bound to ``names`` now (identity, not copies), to compare after a cell."""
    return {name: namespace.get(name, _MISSING) for name in names}


def names_to_return(
    namespace: Mapping[str, Any], before: Mapping[str, Any], succeeded: bool
) -> list[str]:
    """Which snapshotted names go back after a cell.

    After success, every one that is bound. After an exception, only those the
    cell rebound, so an older value never overwrites the caller's.
    """
    return [
        name
        for name, old in before.items()
        if name in namespace and (succeeded or namespace[name] is not old)
    ]
