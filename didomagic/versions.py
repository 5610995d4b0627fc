"""Which version of each value each side holds, so changes in place travel and stale ones don't.

A remote cell that changes an object it read without rebinding its name
(``model.fit(X, y)``, ``items.append(x)``) must leave the notebook's name
holding the changed object, as a local run would; and the next cell must not
send the notebook's older copy over the runner's newer one.

A value's *version* is the digest of its pickled parts. Both sides keep one
per name:

- :class:`HeldVersions`, on the notebook side (one per runner session): the
  version of each name the runner's namespace holds. A cell reading a name
  whose notebook value packs to that version sends no bytes for it: the name
  is *held*, and the runner keeps its own object (which may be newer, or
  identical). A value changed in the notebook since packs to another version
  and is sent.
- :class:`InPlaceTracker`, where the cell runs (the runner kernel's agent, or
  ``--local``): the version of each value the cell reads as it starts; after
  the cell, a value still bound to the same object whose pickle now has
  another version changed in place and goes back with the cell's results.
  In a runner kernel the bytes of a loaded value that still lie on clean
  pages of the file they were loaded from need no hash (see
  :mod:`runner.cleanpages`); in the notebook, its own value is always hashed.

Values of immutable scalar types (numbers, strings, bytes, None) cannot change
in place and are cheap to send: they carry no version and are always sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import xxhash

from didomagic import serialize
from didomagic.protocol import ValueHeader

_IMMUTABLE = frozenset({int, float, complex, bool, str, bytes, type(None)})


def versioned(value: Any) -> bool:
    """True if ``value`` can change in place, so its version is worth tracking."""
    return type(value) not in _IMMUTABLE


def _repacked(namespace: Mapping[str, Any], name: str) -> serialize.Packed:
    """``name``'s value pickled here now, as :func:`serialize.pack_names` pickles it."""
    packed, failures = serialize.pack_names(namespace, [name])
    if not packed:
        raise ValueError(failures.get(name, f"{name!r} is not bound"))
    return packed[0]


class CleanBytes(Protocol):
    """Knows which bytes of a buffer cannot have changed since they were loaded.

    Where a cell runs, :mod:`runner.cleanpages` answers it from the page
    flags of the mappings the values were loaded from.
    """

    def clean_runs(self, view: memoryview) -> Sequence[tuple[int, int, bytes]] | None:
        """Runs ``(start, end, token)`` of ``view`` known unchanged; None if nothing is known.

        Equal tokens must mean equal bytes.
        """


def fingerprint(
    parts: Sequence[memoryview | bytes | bytearray], clean: CleanBytes | None = None
) -> str:
    """A quicker version (XXH3-64, about 1.6x faster), for a side comparing its own pickles.

    The side where the cell runs fingerprints every value the cell read once
    more after the cell; 64 bits are plenty to notice a change there. With
    ``clean``, a run of a buffer known unchanged adds its token instead of its
    bytes (so a clean 1 GB buffer costs a page-flag read, not a hash): equal
    fingerprints still mean equal bytes.
    """
    digest = xxhash.xxh3_64()
    for part in parts:
        view = memoryview(part).cast("B")
        runs = clean.clean_runs(view) if clean is not None else None
        if not runs:
            digest.update(b"\0" + view.nbytes.to_bytes(8, "little"))
            digest.update(view)
            continue
        digest.update(b"\1" + view.nbytes.to_bytes(8, "little"))
        done = 0
        for start, end, token in (*runs, (view.nbytes, view.nbytes, b"")):
            if start > done:  # bytes that may have changed: hashed
                digest.update(b"B" + (start - done).to_bytes(8, "little"))
                digest.update(view[done:start])
            if end > start:
                digest.update(b"C" + len(token).to_bytes(8, "little") + token)
            done = end
    return digest.hexdigest()


def version(parts: Sequence[memoryview | bytes | bytearray]) -> str:
    """The version of a value: the digest of its parts (sizes included)."""
    digester = serialize.Digester(tuple(memoryview(p).nbytes for p in parts))
    for part in parts:
        digester.update(memoryview(part))
    return digester.hexdigest()


class HeldVersions:
    """The notebook's record of which version of each name a runner session holds."""

    def __init__(self) -> None:
        self._versions: dict[str, str] = {}
        self._pending: dict[str, str] = {}

    def clear(self) -> None:
        """Forget everything: a new remote session, or a kernel that was replaced."""
        self._versions.clear()
        self._pending.clear()

    def of(
        self, namespace: Mapping[str, Any], packed: Iterable[serialize.Packed]
    ) -> dict[str, str]:
        """The version of each packed value worth comparing (on the caller's thread: it hashes).

        A scalar the runner holds no version of is left out: it is just sent.
        """
        return {
            item.name: version(item.parts)
            for item in packed
            if item.name in self._versions or versioned(namespace.get(item.name))
        }

    def hold(
        self,
        values: Sequence[ValueHeader],
        parts: Sequence[Sequence[memoryview]],
        versions: Mapping[str, str],
    ) -> tuple[tuple[ValueHeader, ...], list[Sequence[memoryview]], tuple[str, ...]]:
        """Drop the values the runner holds at the version the notebook has.

        Returns the values (and their parts) still to send, and the names
        held. Call it once the session is open (a new session holds nothing).
        """
        send: list[ValueHeader] = []
        send_parts: list[Sequence[memoryview]] = []
        held: list[str] = []
        self._pending = {}
        for header, item_parts in zip(values, parts, strict=True):
            current = versions.get(header.name)
            if current is not None and self._versions.get(header.name) == current:
                held.append(header.name)
                continue
            send.append(header)
            send_parts.append(item_parts)
            if current is not None:
                self._pending[header.name] = current
        return tuple(send), send_parts, tuple(held)

    def after_cell(
        self,
        namespace: Mapping[str, Any],
        returned: Iterable[tuple[str, Sequence[Any]]],
        runner_failures: Iterable[str],
        unapplied: Iterable[str],
        deleted: Iterable[str],
    ) -> None:
        """Record what the runner holds once a cell is done.

        The versions sent are those :meth:`hold` kept; ``returned``: the ``(name,
        parts)`` the runner sent back (now the notebook's values too);
        ``runner_failures``: names the runner reported failures for (a name
        this cell gave it failed to load there, so it holds no known version;
        any other it rebound to what could not travel, so it holds a newer
        value than the notebook's); ``unapplied``: returned names the notebook
        could not unpack (the runner's is newer too); ``deleted``: gone there.

        Versions are taken from this process's own pickles (see
        :meth:`InPlaceTracker.loaded`). Where the runner's value is newer, the
        notebook's current value is recorded as held, so it is not sent over
        the runner's until it changes.
        """
        sent, self._pending = self._pending, {}
        given = set(sent)
        newer = set(unapplied)
        for name in runner_failures:
            if name in given or name in self._versions:
                given.discard(name)
                self._versions.pop(name, None)
            else:
                newer.add(name)
        self._versions.update({name: sent[name] for name in given})
        for name, _ in returned:
            if name not in newer:  # a scalar is cheaper to send again than to hash
                self._versions.pop(name, None)
                if versioned(namespace.get(name)):
                    newer.add(name)
        for name in newer:
            try:
                self._versions[name] = version(_repacked(namespace, name).parts)
            except Exception:  # unbound or unpicklable here: nothing could be sent anyway
                self._versions.pop(name, None)
        for name in deleted:
            self._versions.pop(name, None)


@dataclass
class _Seen:
    identity: int
    version: str


class InPlaceTracker:
    """Where a cell runs: notices the values it read that it changed without rebinding.

    Holds only object identities and versions, never the objects, so a value
    the cell deletes is freed. ``clean``: what knows which loaded bytes are
    unchanged, so they need no hash (see :func:`fingerprint`).
    """

    def __init__(self, clean: CleanBytes | None = None) -> None:
        self._clean = clean
        self._seen: dict[str, _Seen] = {}
        self._reads: list[str] = []

    def loaded(self, namespace: Mapping[str, Any], name: str) -> None:
        """Record a value just unpacked here: its version is that of its pickle in this process.

        (Pickles of one object differ between processes, in which strings the
        memo shares, so a version is only ever compared on the side that made it.)
        """
        value = namespace.get(name, _MISSING)
        self._seen.pop(name, None)
        if value is _MISSING or not versioned(value):
            return
        try:
            parts = _repacked(namespace, name).parts
        except Exception:  # not picklable here: it cannot come back anyway
            return
        self._seen[name] = _Seen(id(value), self._fingerprint(parts))

    def returned(self, namespace: Mapping[str, Any], packed: Iterable[serialize.Packed]) -> None:
        """Record values going back, at the version of the pickle that carries them."""
        for item in packed:
            value = namespace.get(item.name)
            if versioned(value):
                self._seen[item.name] = _Seen(id(value), self._fingerprint(item.parts))
            else:
                self._seen.pop(item.name, None)

    def _fingerprint(self, parts: Sequence[memoryview]) -> str:
        return fingerprint(parts, self._clean)

    def start(self, namespace: Mapping[str, Any], reads: Iterable[str]) -> list[str]:
        """A cell starts reading ``reads``; return those this side should hold but doesn't."""
        self._reads = list(reads)
        missing = []
        for name in self._reads:
            seen = self._seen.get(name)
            value = namespace.get(name, _MISSING)
            if value is _MISSING:
                missing.append(name)
            elif seen is None or seen.identity != id(value):
                self.loaded(namespace, name)  # rebound since it was recorded: take it now
        return missing

    def changed(
        self, namespace: Mapping[str, Any], skip: Iterable[str]
    ) -> tuple[list[serialize.Packed], dict[str, str]]:
        """The values read at :meth:`start` that changed in place, packed; and pack failures.

        ``skip``: names going back anyway (the cell bound them).
        """
        skipped = set(skip)
        packed: list[serialize.Packed] = []
        failures: dict[str, str] = {}
        for name in self._reads:
            seen = self._seen.get(name)
            value = namespace.get(name, _MISSING)
            if name in skipped or seen is None or value is _MISSING or id(value) != seen.identity:
                continue
            try:
                item = _repacked(namespace, name)
            except Exception as exc:
                failures[name] = f"changed in place, but {exc}"
                continue
            if self._fingerprint(item.parts) != seen.version:
                packed.append(item)
        self._reads = []
        return packed, failures

    def forget(self, names: Iterable[str]) -> None:
        """Drop names that are gone."""
        for name in names:
            self._seen.pop(name, None)


_MISSING = object()
