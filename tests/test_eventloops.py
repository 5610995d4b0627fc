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


@pytest.mark.parametrize(("disable", "expected"), [("1", "asyncio"), ("", "uvloop")])
def test_a_runner_serves_cells_on_either_loop(runner_factory, disable, expected):
    if expected == "uvloop":
        pytest.importorskip("uvloop")
    runner = runner_factory(env={eventloops.DISABLE_ENV: disable})
    assert f"(event loop: {expected})" in runner.log
    session = api.SessionPool()
    try:
        api.run_cell(api.CellSpec("y = 6 * 7"), ns := {}, runner=runner.url, pool=session)
    finally:
        session.close()
    assert ns["y"] == 42
