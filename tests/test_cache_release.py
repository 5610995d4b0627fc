"""A cached value replaced by a newer one: its name goes at once, its pages once released.

The runner keeps a replaced cache file open until the cell that replaced it
ran (:meth:`runner.uploads.ValueCache.release`), so the kernel's unmapping
of the old value never pays for freeing its pages.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from runner.uploads import ValueCache


def _written(cache: ValueCache, name: str, data: bytes) -> Path:
    part = cache.directory / f"{name}.part"
    part.write_bytes(data)
    return part


def _open_deleted(directory: Path) -> list[str]:
    """This process's descriptors on files of ``directory`` that lost their name."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)) and target.endswith("(deleted)"):
            found.append(target)
    return found


def test_a_replaced_file_loses_its_name_at_once_and_is_let_go_on_release(tmp_path):
    cache = ValueCache(tmp_path / "cache")
    old = cache.store("a", "d1", _written(cache, "one", b"old bytes"))
    with open(old, "rb") as f:  # as the kernel maps the value it loaded
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    new = cache.store("a", "d2", _written(cache, "two", b"new bytes"))

    assert not old.exists() and new.read_bytes() == b"new bytes"
    assert cache.lookup("a", "d1") is None and cache.lookup("a", "d2") == new
    assert mapping[:] == b"old bytes"  # the kernel's copy is untouched
    mapping.close()
    assert _open_deleted(cache.directory) == [f"{old} (deleted)"]  # held: freed later

    thread = cache.release()
    assert thread is not None
    thread.join()
    assert _open_deleted(cache.directory) == []
    assert cache.release() is None  # nothing retired twice


def test_the_same_bytes_stored_again_retire_the_file_they_replace(tmp_path):
    cache = ValueCache(tmp_path / "cache")
    first = cache.store("a", "d1", _written(cache, "one", b"bytes"))
    again = cache.store("b", "d1", _written(cache, "two", b"bytes"))

    assert first == again and again.read_bytes() == b"bytes"
    assert cache.lookup("a", "d1") == again and cache.lookup("b", "d1") == again
    assert _open_deleted(cache.directory) == [f"{first} (deleted)"]
    thread = cache.release()
    assert thread is not None
    thread.join()
    assert _open_deleted(cache.directory) == []
