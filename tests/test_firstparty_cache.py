"""The code index keeps its answer of which modules are first-party only while it holds."""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import pytest

from didomagic.firstparty import CodeIndex


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'cachetest'\n")
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def ours(found: dict[str, str]) -> set[str]:
    """The test's own modules among those found (the checkout's tests are first-party too)."""
    return {name for name in found if name.startswith("fp_")}


def test_a_module_imported_replaced_or_removed_since_is_seen(folder: Path):
    index = CodeIndex()
    (folder / "fp_first.py").write_text("X = 1\n")
    (folder / "fp_second.py").write_text("Y = 2\n")
    importlib.import_module("fp_first")
    assert ours(index.imported()) == {"fp_first"}
    assert ours(index.imported()) == {"fp_first"}  # kept: nothing changed
    importlib.import_module("fp_second")
    assert ours(index.imported()) == {"fp_first", "fp_second"}
    sys.modules["fp_second"] = json  # the same name, another object: classified again
    assert ours(index.imported()) == {"fp_first"}
    del sys.modules["fp_first"]
    assert ours(index.imported()) == set()
    sys.modules["fp_first"] = types.ModuleType("fp_first")  # no file: not first-party
    assert ours(index.imported()) == set()


def test_the_answer_is_a_copy(folder: Path):
    index = CodeIndex()
    (folder / "fp_third.py").write_text("Z = 3\n")
    importlib.import_module("fp_third")
    first = index.imported()
    first.clear()
    assert ours(index.imported()) == {"fp_third"}
