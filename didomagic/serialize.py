"""Packing values for the wire and unpacking them, one name at a time.

A value becomes *parts*: a cloudpickle stream (protocol 5) and the out-of-band
buffers it refers to, so array memory is never copied into the pickle. Parts
are flat byte ``memoryview`` objects; the wire protocol moves them as binary
frames and the runner keeps them in one file per value, laid end to end.

A name that cannot be pickled or unpickled does not stop the others: the
functions here return the failures by name with the reason.

Functions and classes defined in the notebook travel by value, and cloudpickle
would give each one a fresh globals dict of its own. Here they are bound to
the *live* ``__main__`` namespace where they are unpacked instead (the runner
kernel's on the runner, the notebook's when they come back), so a method that
calls ``eval('df1')`` or reads a global defined later finds it, as it would
locally. The globals the function names travel with it and are written into
that namespace, as cloudpickle writes them into its fresh dict.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import mmap
import os
import pickle
import sys
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cloudpickle
import xxhash

from didomagic.budget import DecodeBudget, DecodeTooLarge
from didomagic.protocol import ValueHeader

PICKLE_PROTOCOL = 5


@dataclass(frozen=True)
class Packed:
    """One value ready to travel: its name and its parts (pickle stream first)."""

    name: str
    parts: tuple[memoryview, ...]

    @property
    def header(self) -> ValueHeader:
        """The header that declares this value on the wire."""
        return ValueHeader(self.name, tuple([p.nbytes for p in self.parts]))

    @property
    def nbytes(self) -> int:
        """Total size of the parts."""
        return sum([p.nbytes for p in self.parts])

    def digest(self) -> str:
        """XXH3-128 of the parts (sizes included), to tell whether a value changed."""
        digester = Digester(tuple(p.nbytes for p in self.parts))
        for part in self.parts:
            digester.update(part)
        return digester.hexdigest()


class Digester:
    """A value's digest computed from its bytes as they stream in, in any slicing."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self._hash = xxhash.xxh3_128()
        self._sizes = list(reversed(sizes))
        self._left = 0

    def update(self, data: memoryview | bytes) -> None:
        """Add the next bytes of the value."""
        view = memoryview(data).cast("B")
        while len(view):
            while self._left == 0 and self._sizes:
                self._left = self._sizes.pop()
                self._hash.update(self._left.to_bytes(8, "little"))
            if self._left == 0:
                raise ValueError("more bytes than the value's declared sizes")
            take = min(self._left, len(view))
            self._hash.update(view[:take])
            self._left -= take
            view = view[take:]

    def hexdigest(self) -> str:
        """The digest, once every byte has been added (empty parts included)."""
        while self._sizes:
            size = self._sizes.pop()
            self._hash.update(size.to_bytes(8, "little"))
        return self._hash.hexdigest()


def _flat(buffer: pickle.PickleBuffer | bytes | bytearray | memoryview) -> memoryview:
    view = buffer.raw() if isinstance(buffer, pickle.PickleBuffer) else memoryview(buffer)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def describe(exc: BaseException) -> str:
    """A one-line reason for a failure, as shown to the user."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_SCALARS = frozenset({int, float, complex, bool, str, bytes, type(None)})
"""Types the standard pickler writes exactly as cloudpickle would, without its setup cost."""


_MAIN: contextvars.ContextVar[MutableMapping[str, Any] | None] = contextvars.ContextVar(
    "didomagic_main_namespace", default=None
)
"""The namespace by-value ``__main__`` functions are bound to while a value is unpacked."""


def live_main() -> MutableMapping[str, Any]:
    """The live ``__main__`` namespace of this process (what unpacking binds functions to).

    Named in pickles by reference, so it must stay importable under this name.
    """
    namespace = _MAIN.get()
    if namespace is not None:
        return namespace
    return vars(sys.modules["__main__"])


class _LiveMain:
    """Stands, in a pickle, for the ``__main__`` globals of by-value functions."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return live_main, ()


_LIVE_MAIN = _LiveMain()


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, except that by-value ``__main__`` functions keep the live namespace."""

    def _function_getnewargs(self, func: Any) -> tuple[Any, ...]:
        code, base_globals, *rest = super()._function_getnewargs(func)
        if func.__globals__ is _MAIN.get() or base_globals.get("__name__") == "__main__":
            base_globals = _LIVE_MAIN  # one object: pickled once, shared by every function
        return (code, base_globals, *rest)


@contextlib.contextmanager
def binding_to(namespace: MutableMapping[str, Any] | None) -> Iterator[None]:
    """Make ``namespace`` the live ``__main__`` one while values are packed or unpacked.

    Packing, functions whose globals it is travel as ``__main__``'s;
    unpacking, by-value ``__main__`` functions get it as their globals.
    cloudpickle also sets ``__builtins__`` in a function's globals; the
    namespace's own entry is put back afterwards.
    """
    if namespace is None:
        yield
        return
    token = _MAIN.set(namespace)
    builtins_before = namespace.get("__builtins__", _MISSING)
    try:
        yield
    finally:
        _MAIN.reset(token)
        if builtins_before is not _MISSING:
            namespace["__builtins__"] = builtins_before


def pack(name: str, value: Any) -> Packed:
    """Pickle one value with out-of-band buffers; raise if it cannot be pickled."""
    if type(value) in _SCALARS:  # about 20x faster for the many small values of a cell
        return Packed(name, (memoryview(pickle.dumps(value, protocol=PICKLE_PROTOCOL)),))
    buffers: list[pickle.PickleBuffer] = []
    with io.BytesIO() as file:
        _Pickler(file, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append).dump(value)
        stream = file.getvalue()
    return Packed(name, (memoryview(stream), *(_flat(b) for b in buffers)))


def pack_names(
    namespace: Mapping[str, Any], names: Iterable[str]
) -> tuple[list[Packed], dict[str, str]]:
    """Pack every name bound in ``namespace``; return the packed values and the failures."""
    packed: list[Packed] = []
    failures: dict[str, str] = {}
    with binding_to(namespace if isinstance(namespace, MutableMapping) else None):
        for name in names:
            if name not in namespace:
                continue
            try:
                packed.append(pack(name, namespace[name]))
            except Exception as exc:
                failures[name] = f"could not be pickled: {describe(exc)}"
    return packed, failures


def unpack(parts: Sequence[bytes | bytearray | memoryview], safe: bool = False) -> Any:
    """Rebuild a value from its parts (pickle stream first, then its buffers).

    With ``safe``, only plain data is accepted (see :class:`PlainDataUnpickler`),
    of a size bounded by the bytes received (see :mod:`didomagic.budget`).
    """
    if safe:
        budget = DecodeBudget(sum(memoryview(p).nbytes for p in parts))
        return PlainDataUnpickler(io.BytesIO(parts[0]), budget, buffers=parts[1:]).load()
    return pickle.loads(parts[0], buffers=parts[1:])


def unpack_into(
    namespace: MutableMapping[str, Any],
    values: Iterable[tuple[str, Sequence[Any]]],
    safe: bool = False,
    main: MutableMapping[str, Any] | None = None,
) -> dict[str, str]:
    """Unpickle ``(name, parts)`` pairs into ``namespace``; return the failures by name.

    ``main``: the live namespace by-value functions are bound to (see
    :func:`binding_to`); by default ``namespace`` itself.
    """
    failures: dict[str, str] = {}
    with binding_to(namespace if main is None else main):
        for name, parts in values:
            try:
                namespace[name] = unpack(parts, safe)
            except (NotPlainData, DecodeTooLarge) as exc:
                failures[name] = str(exc)
            except Exception as exc:
                failures[name] = f"could not be unpickled: {describe(exc)}"
    return failures


class NotPlainData(pickle.UnpicklingError):
    """A value refused by safe-results mode: unpickling it would need arbitrary code."""


PLAIN_DATA = frozenset(
    {
        *(
            ("builtins", name)
            for name in ("bytearray", "complex", "frozenset", "set", "slice", "range")
        ),
        ("collections", "OrderedDict"),
        *(("datetime", name) for name in ("date", "datetime", "time", "timedelta", "timezone")),
        ("decimal", "Decimal"),
        ("fractions", "Fraction"),
        *(
            (module, name)
            for module in ("numpy.core.multiarray", "numpy._core.multiarray")
            for name in ("_reconstruct", "scalar")
        ),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)
"""The globals a safe-results pickle may name: constructors of plain data, nothing else."""


class PlainDataUnpickler(pickle.Unpickler):
    """Accepts numbers, strings, bytes, containers of them, dates and numpy arrays.

    Any other global (a class, a function: anything whose call could run code)
    is refused before it is looked up, so a hostile runner cannot make the
    notebook run code by returning a crafted pickle; and the constructors that
    can build more than they were given are charged to ``budget`` first.
    """

    def __init__(self, file: IO[bytes], budget: DecodeBudget, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.budget = budget

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in PLAIN_DATA or (
            module.startswith("numpy") and name.endswith("DType") and "dtypes" in module
        ):
            return self.budget.guard(module, name, super().find_class(module, name))
        raise NotPlainData(
            f"refused by safe-results: unpickling it needs {module}.{name}, which is not plain "
            "data (numbers, strings, bytes, containers of them, numpy arrays); return plain "
            "data from this runner, or add it without --safe-results if you trust it"
        )


# --------------------------------------------------------------------------- files


def write_values(path: Path, values: Sequence[Sequence[memoryview]]) -> list[int]:
    """Write several values' parts end to end into one file; return each value's offset.

    One file for many values: creating a file costs far more than writing a
    small value, so a cell with a thousand small values makes one file, not a
    thousand.
    """
    offsets, offset = [], 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as f:  # buffered: small parts coalesce, large ones go straight out
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
