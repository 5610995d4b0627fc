"""``%remote on|off``, ``%%local`` and the RemoteMagics traits, against real runners."""

from __future__ import annotations

import subprocess
import sys

import pytest
from IPython.utils.capture import capture_output

from didomagic.errors import CellTimeout

from .conftest import TIMEOUT

WHERE = "import os\nwhere = os.environ.get('DIDOMAGIC_RUNNER_NAME', 'here')"


def magics(shell):
    return shell.magics_manager.registry["RemoteMagics"]


@pytest.fixture
def mode_off(shell):
    """Every test leaves the mode off and the traits at their defaults."""
    yield
    with capture_output():
        shell.run_line_magic("remote", "off")
    for trait in ("default_runner", "default_tags", "default_os", "timeout", "progress"):
        magics(shell).traits()[trait].set(magics(shell), magics(shell).traits()[trait].default())


def run(shell, cell: str):
    with capture_output() as cap:
        result = shell.run_cell(cell)
    return result, cap


def test_mode_runs_every_cell_remotely_until_off(shell, ns, module_runner, mode_off):
    result, cap = run(shell, f"%remote on --runner {module_runner.url}")
    assert result.success and "remote mode on" in cap.stdout
    assert run(shell, WHERE)[0].success and ns["where"] == "shared"
    assert not run(shell, "raise ValueError('boom')")[0].success  # fails the cell ...
    assert run(shell, "where = None\n" + WHERE)[0].success and ns["where"] == "shared"  # still on
    result, _ = run(shell, "%%local\n" + WHERE)
    assert result.success and ns["where"] == "here"
    result, cap = run(shell, "%runners --text")  # control magics stay local
    assert result.success and "NAME" in cap.stdout
    result, cap = run(shell, "%remote off")
    assert result.success and "remote mode off" in cap.stdout
    assert run(shell, WHERE)[0].success and ns["where"] == "here"


def test_cell_options_override_the_mode(shell, ns, module_runner, runner_factory, mode_off):
    other = runner_factory(name="other")
    run(shell, f"%remote on --runner {module_runner.url}")
    result, cap = run(shell, f"%%remote --runner {other.url}\n" + WHERE)
    assert result.success, cap.stdout + cap.stderr
    assert ns["where"] == "other"
    assert run(shell, WHERE)[0].success and ns["where"] == "shared"


def test_mode_options_are_checked_at_once(shell, mode_off):
    result, _ = run(shell, "%remote on --timeout nope")
    assert not result.success and "argument --timeout" in str(result.error_in_exec)
    result, _ = run(shell, "%remote sideways")
    assert not result.success and "%remote on [options]" in str(result.error_in_exec)
    assert not magics(shell).mode.on


def test_remote_help_lists_every_line_command_of_one_dispatcher(shell, mode_off):
    result, cap = run(shell, "%remote help")
    assert result.success
    for form in ("%remote on [options]", "%remote off", "%remote attach ID", "%remote detach"):
        assert form in cap.stdout
    assert "%remote close ID" in cap.stdout and "%%local" in cap.stdout
    result, _ = run(shell, "%remote off now")  # off takes nothing after it
    assert not result.success and "%remote attach ID" in str(result.error_in_exec)


def test_local_without_the_mode_runs_here_and_shows_its_value(shell, ns, mode_off):
    result, _ = run(shell, "%%local\nx = 20\nx + 1")
    assert result.success and ns["x"] == 20 and result.result == 21


def test_traits_set_with_config_are_the_defaults(shell, ns, module_runner, mode_off):
    with capture_output() as cap:
        shell.run_line_magic("config", "RemoteMagics")
    for trait in ("default_runner", "default_tags", "timeout", "progress", "sync"):
        assert f"RemoteMagics.{trait}" in cap.stdout
    shell.run_line_magic("config", f"RemoteMagics.default_runner = {module_runner.url!r}")
    assert run(shell, "%%remote\n" + WHERE)[0].success and ns["where"] == "shared"
    shell.run_line_magic("config", "RemoteMagics.timeout = 0.5")
    result, _ = run(shell, "%%remote\nimport time\ntime.sleep(20)")
    assert isinstance(result.error_in_exec, CellTimeout)
    result, _ = run(shell, "%%remote --timeout 10\nimport time\ntime.sleep(1)\ndone = 1")
    assert result.success and ns["done"] == 1  # the cell's own --timeout wins


def test_ipython_config_file_sets_the_traits(tmp_path, module_runner):
    profile = tmp_path / "profile"
    profile.mkdir()
    (profile / "ipython_config.py").write_text(
        "c.InteractiveShellApp.extensions = ['didomagic']\n"
        f"c.RemoteMagics.default_runner = {module_runner.url!r}\n"
        "c.RemoteMagics.progress = 'none'\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "IPython",
            f"--profile-dir={profile}",
            "--no-banner",
            "-c",
            "%%remote\nimport os\nprint('ran on', os.environ['DIDOMAGIC_RUNNER_NAME'])",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
        stdin=subprocess.DEVNULL,
    )
    assert "ran on shared" in done.stdout, done.stdout + done.stderr
