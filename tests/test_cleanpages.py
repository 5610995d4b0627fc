"""The clean-page check on its own: page flags, the probe, mapped regions, fingerprints.

Real files, real copy-on-write mappings and this process's own pagemap; the
runner-level behaviour is in ``test_unchanged_values.py``.
"""

from __future__ import annotations

import gc
import mmap
import os
from pathlib import Path

import pytest

from didomagic import serialize
from didomagic.versions import fingerprint
from runner import cleanpages

PAGE = mmap.PAGESIZE
SIZE = 4 * cleanpages.MIN_BYTES


@pytest.fixture
def flags():
    """This process's page flags (skipped where Linux gives none)."""
    if not os.path.exists(cleanpages.PAGEMAP):
        pytest.skip("no /proc/self/pagemap here (not Linux?)")
    reader = cleanpages.PageFlags()
    if not cleanpages.probe(reader):
        pytest.skip("this kernel's pagemap hides page flags")
    yield reader
    reader.close()


@pytest.fixture
def mapped(tmp_path: Path, flags):
    """A value file of ``SIZE`` bytes mapped copy-on-write and registered."""
    path = tmp_path / "value.bin"
    path.write_bytes(bytes(range(256)) * (SIZE // 256))
    files = cleanpages.MappedFiles(flags)
    view = serialize.map_file(path)
    files.register(view)
    return files, view


def test_a_clean_mapping_is_one_clean_run_read_or_not(mapped):
    files, view = mapped
    runs = files.clean_runs(view)
    assert [(start, end) for start, end, _ in runs] == [(0, SIZE)]
    assert sum(view[::PAGE]) >= 0  # every page read: still the file's
    assert files.clean_runs(view) == runs


def test_a_written_page_is_cut_out_of_the_clean_runs(mapped):
    files, view = mapped
    before = files.clean_runs(view)
    view[SIZE // 2 + 10] ^= 1
    runs = [(start, end) for start, end, _ in files.clean_runs(view)]
    page = (SIZE // 2) // PAGE * PAGE
    assert runs == [(0, page), (page + PAGE, SIZE)]
    inner = view[PAGE // 2 : SIZE - 3]  # a buffer inside the mapping, not page-aligned
    assert [(s, e) for s, e, _ in files.clean_runs(inner)] == [
        (0, page - PAGE // 2),
        (page + PAGE - PAGE // 2, SIZE - 3 - PAGE // 2),
    ]
    assert files.clean_runs(view)[0][2] != before[0][2]  # the run's token names its length


def test_runs_across_reads_are_one_run(mapped, flags):
    _, view = mapped
    for page in (2, 3, 4, 9):  # a run across the boundary of two reads of 3 pages, and one more
        view[page * PAGE] ^= 1
    small = cleanpages.PageFlags(pages_per_read=3)
    try:
        address = cleanpages.address_of(view)
        assert small.dirty_pages(address, SIZE) == flags.dirty_pages(address, SIZE)
        assert small.dirty_pages(address, SIZE) == [(2 * PAGE, 5 * PAGE), (9 * PAGE, 10 * PAGE)]
        assert small.dirty_pages(address, SIZE, limit=1) is None
    finally:
        small.close()


def test_unknown_small_or_scattered_buffers_are_left_to_the_hash(mapped):
    files, view = mapped
    assert files.clean_runs(memoryview(bytearray(SIZE))) is None  # not in any mapping
    assert files.clean_runs(view[: cleanpages.MIN_BYTES - 1]) is None
    for page in range(0, 2 * cleanpages.MAX_RUNS * PAGE, 2 * PAGE):
        view[page] ^= 1
    assert files.clean_runs(view) is None
    assert cleanpages.MappedFiles(None).clean_runs(view) is None


def test_a_freed_mapping_is_forgotten(tmp_path: Path, flags):
    path = tmp_path / "value.bin"
    path.write_bytes(b"\1" * SIZE)
    files = cleanpages.MappedFiles(flags)
    view = serialize.map_file(path)
    files.register(view)
    assert files.clean_runs(view) is not None
    inner = view[:SIZE]
    del view
    gc.collect()
    assert files.clean_runs(inner) is not None  # a slice keeps the mapping alive
    del inner
    gc.collect()
    (entry,) = files._index[1]
    assert not entry.alive  # freed: nothing is taken as clean there any more
    files.register(serialize.map_file(path))  # and the next registration prunes it
    assert entry not in files._index[1] and len(files._index[1]) == 1


def test_the_fingerprint_skips_clean_bytes_and_sees_every_write(mapped):
    files, view = mapped
    parts = [memoryview(b"pickle stream"), view]
    clean = fingerprint(parts, files)
    assert fingerprint(parts, files) == clean
    view[7] ^= 1  # a change...
    once = fingerprint(parts, files)
    assert once != clean
    view[7] ^= 1  # ...undone: the page stays a private copy, hashed, so this is not the token
    assert fingerprint(parts, files) not in (clean, once)
    view[8] ^= 1  # a second write to a page already written is seen in its bytes
    assert fingerprint(parts, files) != once
    plain = fingerprint(parts)
    view[SIZE - 1] ^= 1
    assert fingerprint(parts) != plain  # without the check, the bytes are hashed


def test_a_pagemap_that_hides_its_flags_turns_the_check_off(monkeypatch, tmp_path: Path):
    zeros = cleanpages.PageFlags("/dev/zero")  # says "not present" for every page
    assert not cleanpages.probe(zeros, tmp_path)
    zeros.close()
    for setting in ("/dev/zero", "off", str(tmp_path / "missing")):
        monkeypatch.setenv(cleanpages.PAGEMAP_ENV, setting)
        assert cleanpages.from_environment(tmp_path).flags is None


def test_the_check_is_on_where_the_pagemap_works(monkeypatch, flags, tmp_path: Path):
    monkeypatch.delenv(cleanpages.PAGEMAP_ENV, raising=False)
    assert cleanpages.from_environment(tmp_path).flags is not None


def test_address_of_reads_any_contiguous_buffer():
    data = b"immutable"
    assert cleanpages.address_of(memoryview(data)) is not None
    assert cleanpages.address_of(memoryview(bytearray(8))[2:]) is not None
    assert cleanpages.address_of(memoryview(bytearray(8))[::2]) is None  # not contiguous
