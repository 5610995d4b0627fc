"""The notebook's files on the runner: a real project folder, a real runner, the magic.

Each test makes a project (a ``.git`` marker, the notebook in ``nb/``, data,
a package under ``src/``, a ``.gitignore``, a symlink leaving the project) and
works in its ``nb/`` folder, as a notebook there would.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from IPython.utils.capture import capture_output

from didomagic import files
from didomagic.errors import FilesTooLarge, RemoteError
from didomagic.project import Project
from didomagic.resources import Request
from didomagic.urls import ConnectionURL

from .test_jobs import config, submitted_id, wait_state
from .test_remote import remote

__all__ = ["config"]  # a fixture, used by name


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "proj"
    (root / ".git").mkdir(parents=True)
    (root / "nb").mkdir()
    (root / "data" / "images").mkdir(parents=True)
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "secret").mkdir()
    (root / "nb" / "data.csv").write_text("a,b\n1,2\n")
    (root / "data" / "train.csv").write_text("x\n3\n")
    for i in range(3):
        (root / "data" / "images" / f"img{i}.png").write_bytes(b"\x89PNG" + bytes([i]))
    np.save(root / "data" / "arr.npy", np.arange(6.0))
    (root / "data" / "unused.bin").write_bytes(os.urandom(1 << 16))
    (root / "src" / "pkg" / "__init__.py").write_text("from .core import f\n")
    (root / "src" / "pkg" / "core.py").write_text("def f():\n    return 42\n")
    (root / ".gitignore").write_text("secret/\n*.log\n")
    (root / "secret" / "key").write_text("do not send")
    (root / "nb" / "run.log").write_text("ignored")
    outside = tmp_path / "outside.txt"
    outside.write_text("outside the project")
    (root / "nb" / "escape").symlink_to(outside)
    monkeypatch.chdir(root / "nb")
    return root


def run(shell, url: str, cell: str, options: str = ""):
    result, cap = remote(shell, url, cell, options)
    assert result.success, cap.stdout + cap.stderr
    return cap


def test_a_relative_file_is_fetched_lazily_when_first_read(shell, ns, module_runner, project):
    run(
        shell,
        module_runner.url,
        "import numpy as np, os\n"
        "text = open('data.csv').read()\n"
        "arr = np.load('../data/arr.npy')\n"
        "blocks = os.stat('../data/unused.bin').st_blocks\n"
        "size = os.path.getsize('../data/unused.bin')\n"
        "where = os.getcwd()\n",
    )
    assert ns["text"] == "a,b\n1,2\n"
    assert np.array_equal(ns["arr"], np.arange(6.0))
    assert ns["size"] == 1 << 16 and ns["blocks"] == 0  # listed with its size, never fetched
    assert ns["where"].endswith("/scratch/nb") and ns["where"] != str(project / "nb")


def test_listings_come_from_the_notebook_side(shell, ns, module_runner, project):
    run(
        shell,
        module_runner.url,
        "import os, glob\n"
        "from pathlib import Path\n"
        "top = sorted(os.listdir('..'))\n"
        "images = sorted(glob.glob('../data/images/*.png'))\n"
        "here = sorted(p.name for p in Path('.').iterdir())\n"
        "walked = sorted(f for _, _, fs in os.walk('../data') for f in fs)\n",
    )
    assert ns["top"] == [".gitignore", "data", "nb", "src"]  # no .git, no ignored secret/
    assert ns["images"] == [f"../data/images/img{i}.png" for i in range(3)]
    assert ns["here"] == ["data.csv"]  # run.log is ignored, the escaping symlink is hidden
    assert ns["walked"] == [
        "arr.npy",
        "img0.png",
        "img1.png",
        "img2.png",
        "train.csv",
        "unused.bin",
    ]


def test_sys_path_built_from_the_working_directory_imports(shell, ns, module_runner, project):
    run(
        shell,
        module_runner.url,
        "import sys\n"
        "from pathlib import Path\n"
        "sys.path.insert(0, str(Path.cwd().parent / 'src'))\n"
        "answer = __import__('pkg').f()\n",
    )
    assert ns["answer"] == 42


def test_paths_outside_the_root_are_refused_and_logged(shell, ns, module_runner, project, caplog):
    caplog.set_level(logging.WARNING, logger="didomagic.client")
    cap = run(
        shell,
        module_runner.url,
        "outcomes = {}\n"
        "for path in ['escape', '../../outside.txt']:\n"
        "    try:\n"
        "        open(path).read()\n"
        "        outcomes[path] = 'read'\n"
        "    except OSError as exc:\n"
        "        outcomes[path] = type(exc).__name__\n",
    )
    assert ns["outcomes"] == {"escape": "PermissionError", "../../outside.txt": "FileNotFoundError"}
    assert "leads outside the project root" in caplog.text, cap.stdout
    # the notebook side refuses such names whoever asks, whatever the mirror does
    files.bundle_value({}, files.FileOptions())
    for name in ("../outside.txt", "/etc/passwd", "nb/escape", "nb/../../outside.txt"):
        reply = files.serve(Request("file", name, {"op": "read"}, {}))
        assert reply.status.value == "refused", name


def test_gitignored_and_git_files_are_not_served(shell, ns, module_runner, project):
    run(
        shell,
        module_runner.url,
        "outcomes = {}\n"
        "for path in ['run.log', '../secret/key', '../.git/HEAD']:\n"
        "    try:\n"
        "        open(path).read()\n"
        "        outcomes[path] = 'read'\n"
        "    except OSError as exc:\n"
        "        outcomes[path] = type(exc).__name__\n",
    )
    assert set(ns["outcomes"].values()) == {"PermissionError"}


def test_a_missing_file_is_a_plain_file_not_found_error(shell, ns, module_runner, project):
    result, _ = remote(shell, module_runner.url, "open('nothing-here.csv')")
    assert isinstance(result.error_in_exec, RemoteError)
    assert result.error_in_exec.ename == "FileNotFoundError"


def test_a_written_file_comes_back_and_a_local_cell_shows_it(shell, ns, module_runner, project):
    cap = run(
        shell,
        module_runner.url,
        "import matplotlib\n"
        "matplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots()\n"
        "ax.plot([1, 2, 3])\n"
        "fig.savefig('out.png')\n"
        "plt.close(fig)\n"
        "del fig, ax\n"
        "import os\n"
        "os.makedirs('results', exist_ok=True)\n"
        "n = open('results/summary.txt', 'w').write('done')\n",
    )
    assert "files from the runner: out.png" in cap.stderr and "results/summary.txt" in cap.stderr
    assert (project / "nb" / "results" / "summary.txt").read_text() == "done"
    local = shell.run_cell("from IPython.display import Image\nimage = Image('out.png')")
    assert local.success and ns["image"].data[:4] == b"\x89PNG"


def test_a_file_changed_here_since_it_was_sent_is_not_overwritten(
    shell, ns, module_runner, project
):
    run(shell, module_runner.url, "before = open('data.csv').read()")
    (project / "nb" / "data.csv").write_text("edited in the notebook\n")
    cap = run(shell, module_runner.url, "n = open('data.csv', 'w').write('from the runner\\n')")
    assert "not written, changed here since the runner read it: data.csv" in cap.stderr
    assert (project / "nb" / "data.csv").read_text() == "edited in the notebook\n"
    cap = run(shell, module_runner.url, "pass", "--get data.csv")  # explicit: it overwrites
    assert (project / "nb" / "data.csv").read_text() == "from the runner\n"


def test_an_append_on_the_runner_starts_from_the_notebooks_latest(
    shell, ns, module_runner, project
):
    run(shell, module_runner.url, "before = open('data.csv').read()")
    (project / "nb" / "data.csv").write_text("edited\n")
    run(shell, module_runner.url, "n = open('data.csv', 'a').write('appended\\n')")
    assert (project / "nb" / "data.csv").read_text() == "edited\nappended\n"


def test_an_edit_in_the_notebook_reaches_the_runner_next_cell(shell, ns, module_runner, project):
    run(shell, module_runner.url, "first = open('../data/train.csv').read()")
    (project / "data" / "train.csv").write_text("x\n4\n")
    run(shell, module_runner.url, "second = open('../data/train.csv').read()")
    assert (ns["first"], ns["second"]) == ("x\n3\n", "x\n4\n")


def test_files_sent_up_front_reach_a_subprocess(shell, ns, module_runner, project):
    run(
        shell,
        module_runner.url,
        "import subprocess\n"
        "done = subprocess.run(['cat', '../data/train.csv'], capture_output=True, text=True)\n"
        "seen = done.stdout\n",
        "--files ../data/train.csv",
    )
    assert ns["seen"] == "x\n3\n"


def test_big_written_files_wait_for_get(shell, ns, module_runner, project):
    cap = run(
        shell,
        module_runner.url,
        "n = open('big.bin', 'wb').write(b'x' * 4096)\n",
        "--return-limit 1K",
    )
    assert "left on the runner (over --return-limit 1 KiB): big.bin (4 KiB)" in cap.stderr
    assert "--get big.bin" in cap.stderr and not (project / "nb" / "big.bin").exists()
    run(shell, module_runner.url, "pass", "--get big.bin")
    assert (project / "nb" / "big.bin").read_bytes() == b"x" * 4096


def test_size_caps_name_the_biggest_files_and_the_flag(shell, ns, module_runner, project):
    (project / "nb" / "large.bin").write_bytes(b"y" * 8192)
    with capture_output():
        options = "--files large.bin,data.csv --files-limit 4K"
        result = shell.run_cell(f"%%remote --runner {module_runner.url} {options}\npass")
    error = result.error_in_exec
    assert isinstance(error, FilesTooLarge)
    assert "large.bin (8 KiB)" in str(error) and "--files-limit" in str(error)
    result, _ = remote(
        shell, module_runner.url, "open('large.bin', 'rb').read()", "--files-limit 4K"
    )
    assert isinstance(result.error_in_exec, RemoteError)
    assert result.error_in_exec.ename == "PermissionError"
    assert "over --files-limit 4 KiB: nb/large.bin (8 KiB)" in result.error_in_exec.evalue


def test_safe_results_serves_only_the_files_listed(shell, ns, module_runner, project):
    safe = str(dataclasses.replace(ConnectionURL.parse(module_runner.url), safe_results=True))
    run(
        shell,
        safe,
        "listed = open('data.csv').read()\n"
        "try:\n"
        "    open('../data/train.csv')\n"
        "    other = 'read'\n"
        "except PermissionError as exc:\n"
        "    other = str(exc)\n",
        "--files data.csv",
    )
    assert ns["listed"] == "a,b\n1,2\n"
    assert "not listed with --files" in ns["other"] and "--safe-results" in ns["other"]


def test_project_root_is_the_nearest_marked_parent(project):
    here = Project.here()
    assert here.root == project.resolve() and here.cwd == "nb"
    assert here.excluded("secret/key", False) and here.excluded("nb/run.log", False)
    assert not here.excluded("nb/data.csv", False)
    assert here.excluded(".git/HEAD", False)


def test_a_detached_job_carries_its_files_and_brings_written_ones_back(
    shell, ns, runner_factory, config, project
):
    runner = runner_factory(name="jobs")
    config.add("jobs", ConnectionURL.parse(runner.url))
    with capture_output() as cap:
        result = shell.run_cell(
            "%%remote --detach --files data.csv\n"
            "rows = open('data.csv').read().splitlines()\n"
            "n = open('rows.txt', 'w').write(str(len(rows)))\n"
        )
    assert result.success, result.error_in_exec
    job_id = submitted_id(cap.stdout)
    (project / "nb" / "data.csv").unlink()  # the notebook's copy is gone: the job has its own
    wait_state(job_id, "done")
    with capture_output() as cap:
        shell.run_line_magic("jobs", f"pull {job_id}")
    assert ns["rows"] == ["a,b", "1,2"]
    assert (project / "nb" / "rows.txt").read_text() == "2", cap.stderr


def test_files_sent_back_are_written_only_inside_the_project(project, capsys):
    from didomagic import serialize
    from didomagic.filebundle import FILES_VALUE

    back = {
        "files": {
            "nb/ok.txt": b"fine",
            "../evil.txt": b"x",
            "/tmp/evil.txt": b"x",
            ".git/config": b"x",
            "nb/escape": b"x",  # a symlink leaving the project: never written through
            "src/pkg/__pycache__/core.pyc": b"x",
        },
        "mtimes": {},
        "left": {},
    }
    returned = [(FILES_VALUE, serialize.pack(FILES_VALUE, back).parts), ("y", ())]
    others = files.take_back(returned, {}, files.FileOptions())
    assert others == [("y", ())]
    assert (project / "nb" / "ok.txt").read_bytes() == b"fine"
    assert not (project.parent / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()
    assert (project.parent / "outside.txt").read_text() == "outside the project"
    assert not (project / ".git" / "config").exists()
    assert not (project / "src" / "pkg" / "__pycache__").exists()
    assert "not written back (excluded paths)" in capsys.readouterr().err
    bad = [(FILES_VALUE, serialize.pack(FILES_VALUE, {"files": {"a": "not bytes"}}).parts)]
    assert files.take_back(bad, {}, files.FileOptions()) == []
    assert "could not be read" in capsys.readouterr().err


def test_files_travel_the_same_through_a_mediator(shell, ns, runner_factory, project, tmp_path):
    from .conftest import start_mediator
    from .test_mediator import join, wait_for_up

    mediator = start_mediator(tmp_path / "mediator")
    try:
        join(runner_factory, mediator, "relayed")
        wait_for_up(mediator.url, "relayed")
        cap = run(
            shell,
            mediator.url,
            "import os\n"
            "rows = open('../data/train.csv').read().splitlines()\n"
            "listed = sorted(os.listdir('.'))\n"
            "n = open('relayed.txt', 'w').write('via the mediator')\n",
        )
    finally:
        assert mediator.stop() == 0, mediator.log
    assert ns["rows"] == ["x", "3"] and ns["listed"] == ["data.csv"]
    assert (project / "nb" / "relayed.txt").read_text() == "via the mediator", cap.stderr


def test_an_untrusted_session_is_served_only_listed_files_whatever_the_cell_says(project):
    from didomagic.localcode import SAFE_RESULTS

    files.bundle_value({}, files.FileOptions(send=("data.csv",)))  # a trusting cell's policy
    untrusted = {SAFE_RESULTS: True}
    listed = files.serve(Request("file", "nb/data.csv", {"op": "read"}, untrusted))
    other = files.serve(Request("file", "data/train.csv", {"op": "read"}, untrusted))
    assert listed.status.value == "found" and bytes(listed.parts[0]) == b"a,b\n1,2\n"
    assert other.status.value == "refused" and "--safe-results" in other.message
    trusted = files.serve(Request("file", "data/train.csv", {"op": "read"}, {}))
    assert trusted.status.value == "found"


def test_temporary_files_left_in_the_scratch_do_not_come_back(shell, ns, module_runner, project):
    cap = run(
        shell,
        module_runner.url,
        "import os, tempfile\n"
        "handle = tempfile.NamedTemporaryFile(dir=os.getcwd() + '/..', delete=False)\n"
        "handle.write(b'scratch')\n"
        "handle.close()\n"
        "leftover = os.path.basename(handle.name)\n"
        "del handle\n"
        "n = open('kept.txt', 'w').write('output')\n",
    )
    assert (project / "nb" / "kept.txt").read_text() == "output"
    assert not (project / ns["leftover"]).exists() and ns["leftover"] not in cap.stderr
