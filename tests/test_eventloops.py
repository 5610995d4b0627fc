"""uvloop where it is installed, asyncio's loop where it is not or is turned off."""

from __future__ import annotations

import asyncio
import sys

import pytest

from didomagic import api, eventloops


def test_without_uvloop_the_standard_loop_is_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as on Windows: the import fails
    loop = eventloops.loop_factory()()
    try:
        assert eventloops.loop_name(loop) == "asyncio"
    finally:
        loop.close()


def test_uvloop_is_used_where_installed(monkeypatch):
    pytest.importorskip("uvloop")
    monkeypatch.delenv(eventloops.DISABLE_ENV, raising=False)
    loop = eventloops.loop_factory()()
    try:
        assert eventloops.loop_name(loop) == "uvloop"
    finally:
        loop.close()
    assert eventloops.run(asyncio.sleep(0, result=7)) == 7


def test_the_notebook_side_runs_on_uvloop_and_runners_on_asyncio(runner_factory):
    pytest.importorskip("uvloop")
    from didomagic.loop import background_loop

    async def kind() -> str:
        return eventloops.loop_name(asyncio.get_running_loop())

    assert background_loop().run(kind()) == "uvloop"
    runner = runner_factory()
    assert "(event loop: asyncio)" in runner.log  # runner.accept counts accepts in Python
    session = api.SessionPool()
    try:
        api.run_cell(api.CellSpec("y = 6 * 7"), ns := {}, runner=runner.url, pool=session)
    finally:
        session.close()
    assert ns["y"] == 42
