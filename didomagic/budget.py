"""How much a ``--safe-results`` value may decode to, relative to the bytes that carried it.

A pickle can ask for large objects in a few bytes: ``bytearray(2**30)``,
``set(range(2**30))``, an empty numpy array or a numpy bytes scalar with a
huge shape or item size, ``Fraction('1e999999999')``. Under safe-results the
unpickler charges every such constructor call against a :class:`DecodeBudget`
of ``max(DECODE_FLOOR, DECODE_FACTOR x the bytes received)`` and refuses the
value once it is spent, before the allocation. Opcodes that carry their bytes
(strings, bytes, lists, in-band arrays) cost what was received, so plain data
of any size still travels.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

DECODE_FLOOR = 64 << 20
"""Bytes any value may decode to, however small its pickle."""

DECODE_FACTOR = 4
"""Beyond the floor, a value may decode to this many times the bytes received for it."""

_SET_ENTRY = 64
"""Bytes one element of a set built from a range costs (entry and int object)."""


class DecodeTooLarge(pickle.UnpicklingError):
    """A safe-results value would decode to more than its budget allows."""


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


class DecodeBudget:
    """The bytes one value may still build while it is unpickled."""

    def __init__(self, received: int) -> None:
        self.received = received
        self.limit = max(DECODE_FLOOR, DECODE_FACTOR * received)
        self.used = 0

    def charge(self, nbytes: int, what: str) -> None:
        """Count ``nbytes`` about to be built by ``what``; raise past the limit."""
        self.used += max(0, nbytes)
        if self.used > self.limit:
            raise DecodeTooLarge(
                f"refused by safe-results: decoding it would build {what} of at least "
                f"{_mib(self.used)} from {self.received:,} bytes received (a value may decode "
                f"to at most {_mib(self.limit)}: {DECODE_FACTOR}x its bytes, or "
                f"{_mib(DECODE_FLOOR)}); nothing was bound"
            )

    def guard(self, module: str, name: str, target: Any) -> Any:
        """``target``, or a stand-in that charges each call first when it can build big."""
        cost = _COSTS.get(("numpy" if module.startswith("numpy") else module, name))
        return target if cost is None else _Guarded(target, cost, self, f"{module}.{name}")


class _Guarded:
    """Calls ``target`` after charging its cost; unwraps guarded arguments (numpy subtypes)."""

    def __init__(
        self, target: Any, cost: Callable[..., int], budget: DecodeBudget, what: str
    ) -> None:
        self.target, self.cost, self.budget, self.what = target, cost, budget, what

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(a.target if isinstance(a, _Guarded) else a for a in args)
        self.budget.charge(self.cost(*args, **kwargs), self.what)
        return self.target(*args, **kwargs)


def _bytearray(source: Any = 0, *_: Any, **__: Any) -> int:
    if isinstance(source, int):
        return source
    return len(source) if isinstance(source, range) else 0


def _set(iterable: Any = (), *_: Any) -> int:
    return _SET_ENTRY * len(iterable) if isinstance(iterable, range) else 0


def _nbytes(shape: Any, dtype: Any) -> int:
    import numpy

    dims = (shape,) if isinstance(shape, int) else shape
    if not isinstance(dims, tuple) or not all(isinstance(d, int) for d in dims):
        return 0  # numpy refuses it itself
    count = 1
    for d in dims:
        count *= max(d, 0)
    return count * numpy.dtype(dtype).itemsize


def _ndarray(shape: Any, dtype: Any = float, buffer: Any = None, *_: Any, **__: Any) -> int:
    return _nbytes(shape, dtype) if buffer is None else 0


def _reconstruct(subtype: Any, shape: Any, dtype: Any, *_: Any) -> int:
    return _nbytes(shape, dtype)


def _scalar(dtype: Any, *_: Any) -> int:
    import numpy

    return int(numpy.dtype(dtype).itemsize)


def _fraction(numerator: Any = 0, *_: Any, **__: Any) -> int:
    """About the bytes of the integers a Fraction of a decimal exponent computes."""
    if isinstance(numerator, str):
        found = re.search(r"[eE]\s*[-+]?([\d_]+)", numerator)
        return int(found.group(1).replace("_", "") or 0) // 2 if found else 0
    if isinstance(numerator, Decimal) and isinstance(numerator.as_tuple().exponent, int):
        return abs(int(numerator.as_tuple().exponent)) // 2
    return 0


_COSTS: dict[tuple[str, str], Callable[..., int]] = {
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _set,
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "_reconstruct"): _reconstruct,
    ("numpy", "scalar"): _scalar,
    ("fractions", "Fraction"): _fraction,
}
"""What each constructor that can build more than it was given costs, by its arguments."""
