"""A cell whose files bundle would say nothing new sends none; the files still work.

The kernel's agent sets its mirror up from the last bundle it got, so what a
cell writes still comes back, its working directory is still the notebook's,
and a kernel that died is sent the project again (through a real runner).
"""

from __future__ import annotations

import re
from pathlib import Path

from IPython.utils.capture import capture_output

from didomagic import api, files
from didomagic.errors import KernelDied
from didomagic.filebundle import FileOptions


def remote(shell, url: str, cell: str, options: str = ""):  # type: ignore[no-untyped-def]
    with capture_output() as cap:
        result = shell.run_cell(f"%%remote --runner {url} {options}\n{cell}")
    return result, cap


def ok(shell, url: str, cell: str, options: str = "") -> None:  # type: ignore[no-untyped-def]
    result, cap = remote(shell, url, cell, options)
    assert result.success, cap.stdout + cap.stderr


def ledger(url: str) -> files.Ledger:
    state = api.default_pool().session(url).responder.state
    (found,) = state[files.RESOURCE].values()
    return found


def test_after_the_first_cell_none_is_sent_and_written_files_still_come_back(
    shell, ns, module_runner, notebook_folder: Path
):
    url = module_runner.url
    ok(shell, url, "import os\nfirst_cwd = os.getcwd()")
    ok(shell, url, "os.chdir('/')")  # the next cell still starts in the notebook's folder
    assert ledger(url).kept is not None  # the kernel holds what the last bundle said
    state = api.default_pool().session(url).responder.state
    assert files.bundle_value(state, FileOptions(), skip_unchanged=True) is None
    ok(shell, url, "second_cwd = os.getcwd()\nopen('written.txt', 'w').write('back')")
    assert ns["second_cwd"] == ns["first_cwd"]
    assert (notebook_folder / "written.txt").read_text() == "back"
    ok(shell, url, "open('more/deep.txt', 'w') if os.makedirs('more') is None else None")
    assert (notebook_folder / "more" / "deep.txt").exists()


def test_a_file_changed_here_and_get_patterns_still_travel(
    shell, ns, module_runner, notebook_folder: Path
):
    url = module_runner.url
    (notebook_folder / "data.txt").write_text("one")
    ok(shell, url, "first = open('data.txt').read()")
    ok(shell, url, "x = 1")
    (notebook_folder / "data.txt").write_text("two, longer")  # stale there: a bundle goes
    ok(shell, url, "second = open('data.txt').read()")
    assert (ns["first"], ns["second"]) == ("one", "two, longer")
    ok(shell, url, "open('big.bin', 'wb').write(b'x' * 100)", "--return-limit 10")
    assert not (notebook_folder / "big.bin").exists()  # over the limit: stays there
    ok(shell, url, "y = 2", "--get big.bin")  # another bundle: --get brings it
    assert (notebook_folder / "big.bin").stat().st_size == 100
    ok(shell, url, "open('small.txt', 'w').write('s')")  # the limit is the default again
    assert (notebook_folder / "small.txt").read_text() == "s"


def test_after_its_kernel_died_the_new_kernel_gets_the_project_again(
    shell, ns, module_runner, notebook_folder: Path
):
    url = module_runner.url
    (notebook_folder / "input.txt").write_text("still here")
    ok(shell, url, "x = 1")
    ok(shell, url, "y = 2")
    result, _ = remote(shell, url, "import os\nos._exit(1)")
    assert isinstance(result.error_in_exec, KernelDied)
    ok(shell, url, "text = open('input.txt').read()\nopen('after.txt', 'w').write('new')")
    assert ns["text"] == "still here"
    assert (notebook_folder / "after.txt").read_text() == "new"


def test_the_first_cell_of_a_new_session_is_remembered_so_the_second_sends_nothing(
    shell, ns, runner_factory, notebook_folder: Path
):
    """The first cell's bundle (with the project's tree) was recorded in a responder the
    session then replaced on opening, so the second cell walked and sent the tree again."""
    runner = runner_factory()
    (notebook_folder / "notes.txt").write_text("in the tree")
    ok(shell, runner.url, "x = 1")  # opens the session: the tree goes
    assert ledger(runner.url).tree_sent
    ok(shell, runner.url, "y = 2")
    counts = re.findall(r"\((\d+) values in, \d+ held, \d+ out\)", runner.log)
    assert counts[-1] == "0", runner.log[-2000:]  # no bundle: the kernel holds the tree
    ok(shell, runner.url, "z = open('notes.txt').read()")
    assert ns["z"] == "in the tree"
