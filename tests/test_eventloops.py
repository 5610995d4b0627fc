"""uvloop where it is installed, asyncio's loop where it is not or is turned off."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from didomagic import api, eventloops

from .conftest import start_mediator


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


def _cell(url: str) -> object:
    session = api.SessionPool()
    try:
        api.run_cell(api.CellSpec("y = 6 * 7"), ns := {}, runner=url, pool=session)
    finally:
        session.close()
    return ns["y"]


def test_the_notebook_side_runners_and_mediators_run_on_uvloop(runner_factory, tmp_path):
    pytest.importorskip("uvloop")
    from didomagic.loop import background_loop

    async def kind() -> str:
        return eventloops.loop_name(asyncio.get_running_loop())

    assert background_loop().run(kind()) == "uvloop"
    env = {eventloops.DISABLE_ENV: ""}
    runner = runner_factory(env=env)
    assert "(event loop: uvloop)" in runner.log
    assert _cell(runner.url) == 42
    mediator = start_mediator(tmp_path / "m", env=env)
    try:
        assert "(event loop: uvloop)" in mediator.log
    finally:
        assert mediator.stop() == 0, mediator.log


@pytest.mark.parametrize(
    "how", ["DIDOMAGIC_NO_UVLOOP=1", "import uvloop fails"], ids=["turned-off", "missing"]
)
def test_without_uvloop_runners_and_mediators_serve_on_asyncio(
    how: str, runner_factory, tmp_path: Path
):
    """The fallback where uvloop is turned off, or where it does not exist (Windows)."""
    if how == "import uvloop fails":
        (tmp_path / "hide").mkdir()
        (tmp_path / "hide" / "uvloop.py").write_text(
            "raise ImportError('no uvloop on this platform (a test hides it)')\n"
        )
        path = os.pathsep.join([str(tmp_path / "hide"), os.environ.get("PYTHONPATH", "")])
        env = {"PYTHONPATH": path.rstrip(os.pathsep), eventloops.DISABLE_ENV: ""}
    else:
        env = {eventloops.DISABLE_ENV: "1"}
    runner = runner_factory(env=env)
    assert "(event loop: asyncio)" in runner.log
    assert _cell(runner.url) == 42
    mediator = start_mediator(tmp_path / "m", env=env)
    try:
        assert "(event loop: asyncio)" in mediator.log
    finally:
        assert mediator.stop() == 0, mediator.log
