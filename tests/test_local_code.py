"""The notebook's own modules travel with its cells: real runners, real kernels, a real folder.

Each test makes a notebook folder in tmp, makes it the IPython shell's working
directory and puts it on ``sys.path`` (as Jupyter does for a notebook), and
runs cells under ``%%remote`` on runners that have none of its files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from IPython.utils.capture import capture_output

from didomagic import firstparty, localcode

from .conftest import TIMEOUT, start_mediator, wait_until


def write(path: Path, text: str) -> Path:
    """Write a source file, moving its mtime on so an edit within a tick is still seen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(textwrap.dedent(text))
    if path.stat().st_mtime_ns <= old:
        os.utime(path, ns=(old + 1_000_000, old + 1_000_000))
    return path


@pytest.fixture
def notebook(tmp_path, shell, ns, monkeypatch):
    """A notebook folder: the shell's cwd and first on sys.path; its modules forgotten after."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "pyproject.toml").write_text("[project]\nname = 'demo'\n")
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)
    yield folder
    for name in set(sys.modules) - before:
        module = sys.modules.get(name)
        if str(tmp_path) in str(getattr(module, "__file__", "") or ""):
            del sys.modules[name]


def remote(shell, url: str, cell: str, options: str = ""):
    """Run ``cell`` under ``%%remote``; return the result and what it printed."""
    with capture_output() as cap:
        result = shell.run_cell(f"%%remote --runner {url} {options}\n{cell}")
    return result, cap


def local(shell, cell: str) -> None:
    result = shell.run_cell(cell)
    assert result.success, result.error_in_exec


def ok(result, cap) -> None:
    assert result.success, cap.stdout + cap.stderr


HELPERS = """
    import other

    def double(x):
        return 2 * x

    def triple(x):
        return other.times(3, x)
"""


def test_import_helpers_and_from_pkg_sub(shell, ns, notebook, runner_factory):
    write(notebook / "helpers.py", HELPERS)
    write(notebook / "other.py", "def times(k, x):\n    return k * x\n")
    write(notebook / "pkg" / "__init__.py", "from .sub import f\nfrom . import deep\n")
    write(
        notebook / "pkg" / "sub.py", "from .deep.leaf import g\n\ndef f(x):\n    return g(x) + 1\n"
    )
    write(notebook / "pkg" / "deep" / "__init__.py", "")
    write(notebook / "pkg" / "deep" / "leaf.py", "def g(x):\n    return x * 10\n")
    runner = runner_factory()
    local(shell, "import helpers\nx = 21")
    ok(*remote(shell, runner.url, "y = helpers.double(x)\nz = helpers.triple(x)"))
    assert ns["y"] == 42 and ns["z"] == 63
    # Not imported in the notebook: asked for by the runner's import hook.
    ok(*remote(shell, runner.url, "from pkg.sub import f\nfrom pkg import deep\nw = f(2)"))
    assert ns["w"] == 21
    # One ask per module the notebook never imported, whatever it imports in turn.
    write(notebook / "uses.py", "import tool\nfrom tool import k\n")
    write(notebook / "tool.py", "k = 7\n")
    ok(
        *remote(
            shell,
            runner.url,
            "from runner.codeimport import store\nbefore = store().asked\n"
            "import uses\nasks = (store().asked - before, before, uses.k)",
        )
    )
    assert ns["asks"] == (1, 1, 7)  # pkg took one ask (all of it), uses and tool one
    ok(
        *remote(
            shell,
            runner.url,
            "import pkg.deep.leaf, inspect\n"
            "where = (pkg.deep.leaf.__file__, helpers.__file__)\n"
            "src = inspect.getsource(pkg.deep.leaf.g)",
        )
    )
    leaf, helpers_file = ns["where"]
    assert leaf.endswith(os.path.join("pkg", "deep", "leaf.py")) and str(notebook) not in leaf
    assert helpers_file.endswith("helpers.py")
    assert "return x * 10" in ns["src"]


def code_state(url: str) -> localcode.CodeState:
    from didomagic.api import default_pool

    return localcode.state_of(default_pool().session(url).responder.state)


def test_edits_are_picked_up_and_unchanged_modules_are_not_resent(
    shell, ns, notebook, runner_factory
):
    write(notebook / "helpers.py", HELPERS)
    write(notebook / "other.py", "def times(k, x):\n    return k * x\n")
    runner = runner_factory()
    local(shell, "import helpers\nfrom helpers import double\nx = 5")
    ok(*remote(shell, runner.url, "from helpers import double as d\ny = helpers.double(x)"))
    assert ns["y"] == 10
    state = code_state(runner.url)
    sent = state.sent
    assert sent >= 2  # helpers and other
    ok(*remote(shell, runner.url, "y = helpers.double(x) + d(x)"))
    assert ns["y"] == 20 and state.sent == sent  # nothing sent again
    write(notebook / "helpers.py", HELPERS.replace("2 * x", "100 * x"))
    ok(*remote(shell, runner.url, "y = (helpers.double(x), d(x), d is helpers.double)"))
    # Reloaded before the cell: the module's attribute and the name bound earlier both,
    # still one function (so it pickles by reference).
    assert ns["y"] == (500, 500, True)
    assert state.sent == sent + 1  # only the changed module went
    # A module first imported on the runner (asked for) is watched for edits as well.
    write(notebook / "late.py", "K = 1\n")
    ok(*remote(shell, runner.url, "import late\nk = late.K"))
    assert ns["k"] == 1
    write(notebook / "late.py", "K = 2\n")
    ok(*remote(shell, runner.url, "k = late.K"))
    assert ns["k"] == 2


def test_a_function_from_helpers_travels_by_reference(shell, ns, notebook, runner_factory):
    write(notebook / "helpers.py", HELPERS)
    write(notebook / "other.py", "def times(k, x):\n    return k * x\n")
    write(
        notebook / "shapes.py",
        "class Square:\n    def __init__(self, s):\n        self.s = s\n"
        "    def area(self):\n        return self.s ** 2\n",
    )
    runner = runner_factory()
    local(
        shell,
        "from helpers import triple\nfrom shapes import Square\nsq = Square(3)\nfs = [triple]",
    )
    ok(
        *remote(
            shell,
            runner.url,
            "r = (triple(2), fs[0](3), sq.area(), type(sq).__module__)\nmade = Square(4)",
        )
    )
    assert ns["r"] == (6, 9, 9, "shapes")
    assert type(ns["made"]) is sys.modules["shapes"].Square and ns["made"].area() == 16


def test_a_syntax_error_points_at_the_file_and_line(shell, ns, notebook, runner_factory):
    write(notebook / "broken.py", "def f(:\n    pass\n")
    runner = runner_factory()
    result, cap = remote(shell, runner.url, "import broken")
    assert not result.success
    text = cap.stdout + cap.stderr + str(result.error_in_exec)
    assert "SyntaxError" in text and "broken.py" in text and "line 1" in text, text
    assert "pickl" not in text.lower()
    # A module that imported fine and then breaks: its reload fails with the real cause.
    write(notebook / "helpers.py", HELPERS)
    write(notebook / "other.py", "def times(k, x):\n    return k * x\n")
    local(shell, "import helpers")
    ok(*remote(shell, runner.url, "y = helpers.double(1)"))
    write(notebook / "helpers.py", "def double(x):\n    return 2 *\n")
    # As autoreload does: the previous version stays, and the note says why.
    result, cap = remote(shell, runner.url, "y = helpers.double(2)")
    ok(result, cap)
    assert ns["y"] == 4
    assert "'helpers' was not synced: kept its previous version" in cap.stderr
    assert "SyntaxError" in cap.stderr and "helpers.py, line 2" in cap.stderr, cap.stderr
    write(notebook / "helpers.py", "def double(x):\n    return 3 * x\n")
    ok(*remote(shell, runner.url, "y = helpers.double(2)"))
    assert ns["y"] == 6
    # A value whose module first loads on the runner, broken since: the cause, not a pickle.
    write(notebook / "fine.py", "def g(x):\n    return x\n")
    local(shell, "from fine import g")
    write(notebook / "fine.py", "def g(x):\n    return x +\n")
    result, cap = remote(shell, runner.url, "r = g(1)")
    assert not result.success
    assert (
        "'g' was not synced: needs the notebook's module fine, which failed on the runner: "
        "SyntaxError: invalid syntax (fine.py, line 2)" in cap.stderr
    ), cap.stderr
    assert "unpickl" not in cap.stderr


def test_sys_path_built_from_the_cwd(shell, ns, notebook, runner_factory):
    write(notebook / "src" / "mylib" / "__init__.py", "")
    write(notebook / "src" / "mylib" / "calc.py", "def total(xs):\n    return sum(xs)\n")
    write(notebook / "lib" / "solo.py", "NAME = 'solo'\n")
    runner = runner_factory()
    local(
        shell,
        "import sys\nfrom pathlib import Path\n"
        "sys.path.insert(0, str(Path.cwd() / 'src'))\n"
        "sys.path.append(str(Path.cwd() / 'lib'))",
    )
    ok(
        *remote(
            shell,
            runner.url,
            "from mylib.calc import total\nimport solo\nt = (total([1, 2]), solo.NAME)",
        )
    )
    assert ns["t"] == (3, "solo")


def test_runner_environment_modules_are_never_shipped(shell, ns, notebook, runner_factory):
    write(notebook / "helpers.py", HELPERS)
    write(notebook / "other.py", "def times(k, x):\n    return k * x\n")
    local(shell, "import helpers, json, numpy, didomagic")
    imported = firstparty.index().imported()
    assert {"helpers", "other"} <= set(imported)
    assert not {"json", "numpy", "didomagic", "runner.agent"} & set(imported)
    state = localcode.CodeState()
    bundle = localcode.bundle_for(state)
    assert bundle is not None
    names = {m["name"] for m in json.loads(bytes(bundle.parts[0]))["modules"]}
    assert {"helpers", "other"} <= names and "numpy" not in names
    bundle.commit(state)
    assert localcode.bundle_for(state) is None  # unchanged: nothing at all goes
    # A name the runner asks for that is not first-party here is not found; a path is refused.
    from didomagic.protocol import AnswerStatus
    from didomagic.resources import Request

    def ask(name: str):
        return localcode.serve_module(Request("module", name, {}, {}))

    assert ask("numpy").status is AnswerStatus.NOT_FOUND
    assert ask("json").status is AnswerStatus.NOT_FOUND
    assert ask("didomagic.api").status is AnswerStatus.NOT_FOUND
    assert ask("../../etc/passwd").status is AnswerStatus.REFUSED
    assert ask("helpers").status is AnswerStatus.FOUND


def test_an_editable_install_of_the_project(
    shell, ns, notebook, runner_factory, tmp_path, monkeypatch
):
    project = tmp_path / "edproj"
    write(
        project / "pyproject.toml",
        """
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "edpkg"
        version = "0.1"
        """,
    )
    write(project / "edpkg" / "__init__.py", "from .core import hello\n")
    write(project / "edpkg" / "core.py", "def hello():\n    return 'hi from edpkg'\n")
    prefix = tmp_path / "prefix"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "-e",
            str(project),
            "--prefix",
            str(prefix),
        ],
        capture_output=True,
        text=True,
        timeout=10 * TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    site_dir = next(prefix.rglob("site-packages"))
    assert "editable" in (next(site_dir.glob("edpkg-*.dist-info")) / "direct_url.json").read_text()
    # Visible to the notebook only: its own sys.path and import hooks (restored afterwards).
    for attr in ("path", "meta_path", "path_hooks"):
        monkeypatch.setattr(sys, attr, list(getattr(sys, attr)))
    import site

    site.addsitedir(str(site_dir))
    runner = runner_factory()
    # Not imported here first: the runner asks for it by name.
    ok(*remote(shell, runner.url, "import edpkg\nh = edpkg.hello()\nwhere = edpkg.__file__"))
    assert ns["h"] == "hi from edpkg"
    local(shell, "import edpkg.core")
    assert "edpkg.core" in firstparty.index().imported()
    write(project / "edpkg" / "core.py", "def hello():\n    return 'edited'\n")
    ok(*remote(shell, runner.url, "h = edpkg.hello()"))
    assert ns["h"] == "edited"


def test_map_over_a_local_function_across_two_runners(
    shell, ns, notebook, runner_factory, private_config
):
    import didomagic
    from didomagic.config import Config
    from didomagic.pool import SessionPool
    from didomagic.urls import ConnectionURL

    started = notebook.parent / "started"
    started.mkdir()
    write(  # each runner's first item waits (bounded) until both have one: a loaded machine
        notebook / "work.py",  # may open the second session late, but map must use it
        "import os, time\n\ndef square(i):\n"
        "    name = os.environ.get('DIDOMAGIC_RUNNER_NAME', 'here')\n"
        f"    open(os.path.join({str(started)!r}, name), 'w').close()\n"
        "    deadline = time.monotonic() + 30\n"
        f"    while len(os.listdir({str(started)!r})) < 2 and time.monotonic() < deadline:\n"
        "        time.sleep(0.05)\n"
        "    return i * i, name\n",
    )
    a = runner_factory("--max-sessions", "1", name="a")
    b = runner_factory("--max-sessions", "1", name="b")
    private_config.unlink(missing_ok=True)
    config = Config()
    config.add("a", ConnectionURL.parse(a.url))
    config.add("b", ConnectionURL.parse(b.url))
    try:
        import work

        results = didomagic.map(work.square, range(8), pool=SessionPool(), progress="none")
        assert [r[0] for r in results] == [i * i for i in range(8)]
        assert {r[1] for r in results} == {"a", "b"}
        assert didomagic.run(work.square, 5, runner=a.url) == (25, "a")
        # A detached job has no notebook to ask: the module went with the submission.
        job = didomagic.submit(work.square, 3, runner=b.url)
        assert job.wait(timeout=TIMEOUT)["state"] == "done"
        assert job.result() == (9, "b")
    finally:
        private_config.unlink(missing_ok=True)


def test_modules_through_a_mediator(shell, ns, notebook, runner_factory, tmp_path):
    write(notebook / "helpers.py", HELPERS)
    write(notebook / "other.py", "def times(k, x):\n    return k * x\n")
    write(notebook / "pkg" / "__init__.py", "from .sub import f\n")
    write(notebook / "pkg" / "sub.py", "def f(x):\n    return x + 1\n")
    mediator = start_mediator(tmp_path / "mediator")
    try:
        runner_factory("--mediator", mediator.runner_url, name="relayed")
        wait_until(lambda: "registered" in mediator.log, "the runner registered")
        local(shell, "import helpers\nx = 2")
        ok(*remote(shell, mediator.url, "import pkg\ny = (helpers.triple(x), pkg.f(x))"))
        assert ns["y"] == (6, 3)
        write(notebook / "pkg" / "sub.py", "def f(x):\n    return x + 100\n")
        ok(*remote(shell, mediator.url, "y = pkg.f(x)"))
        assert ns["y"] == 102
    finally:
        mediator.stop()


def _notebook(*cells: str):
    import nbformat

    return nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])


def _outputs(nb) -> list[str]:
    texts = []
    for cell in nb.cells:
        parts = []
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
            parts.append(" ".join(out.get("traceback", [])))
        texts.append("\n".join(parts))
    return texts


def test_a_real_notebook_and_a_detached_job_that_runs_after_its_kernel_died(
    shell, ns, notebook, runner_factory, private_config, tmp_path
):
    import re

    from nbclient import NotebookClient

    from didomagic import detached
    from didomagic.config import Config
    from didomagic.urls import ConnectionURL

    write(notebook / "helpers.py", HELPERS)
    write(notebook / "other.py", "def times(k, x):\n    return k * x\n")
    write(notebook / "pkg" / "__init__.py", "from .sub import f\n")
    write(notebook / "pkg" / "sub.py", "def f(x):\n    return x + 1\n")
    marker = tmp_path / "the-notebook-kernel-is-gone"
    runner = runner_factory(name="nbcode")
    private_config.unlink(missing_ok=True)
    Config().add("nbcode", ConnectionURL.parse(runner.url))  # the kernel inherits the config
    try:
        nb = _notebook(
            "%load_ext didomagic",
            "import helpers\nx = 7",
            "%%remote\nfrom pkg import f\ny = (helpers.triple(x), f(x))\nprint('remote', y)",
            "print('local', y)",
            "%%remote --detach --name withcode\nimport os, time\n"
            f"while not os.path.exists({str(marker)!r}):\n    time.sleep(0.05)\n"
            "import pkg.sub\n"
            "out = (helpers.double(x), pkg.sub.f(x), type(pkg.__loader__).__name__)",
        )
        NotebookClient(
            nb,
            timeout=4 * TIMEOUT,
            kernel_name="python3",
            shutdown_kernel="immediate",  # kills the kernel process after the last cell
            resources={"metadata": {"path": str(notebook)}},
        ).execute()
        texts = _outputs(nb)
        assert "remote (21, 8)" in texts[2] and "local (21, 8)" in texts[3], texts
        job_id = re.search(r"submitted job (\S+)", texts[4]).group(1)
        assert detached.job(job_id).status()["state"] == "running"
        # The notebook kernel is gone and nothing serves its files: the job runs now.
        for name in ("helpers", "other", "pkg", "pkg.sub"):
            sys.modules.pop(name, None)
        marker.touch()
        wait_until(lambda: detached.job(job_id).status()["state"] in ("done", "failed"), "the job")
        with capture_output() as cap:
            shell.run_line_magic("jobs", f"pull {job_id}")
        assert ns["out"] == (14, 8, "NotebookLoader"), cap.stdout + cap.stderr
    finally:
        private_config.unlink(missing_ok=True)


def test_an_untrusted_runner_gets_no_modules(shell, ns, notebook, runner_factory):
    write(notebook / "helpers.py", HELPERS)
    write(notebook / "other.py", "def times(k, x):\n    return k * x\n")
    runner = runner_factory()
    with capture_output():
        shell.run_line_magic("runners", f"add {runner.url} --name careful --safe-results")
    try:
        local(shell, "import other")  # imported here: still not sent
        result, cap = remote(shell, "careful", "import helpers")
        assert not result.success
        text = cap.stdout + cap.stderr + str(result.error_in_exec)
        assert "ModuleNotFoundError" in text and "safe_results" in text, text
        result, cap = remote(shell, "careful", "import other")
        assert not result.success
        from didomagic.api import default_pool

        session = default_pool().session("careful")
        assert localcode.state_of(session.responder.state).sent == 0
    finally:
        with capture_output():
            shell.run_line_magic("runners", "remove careful")


def test_a_namespace_package_and_a_kernel_that_died(shell, ns, notebook, runner_factory):
    write(notebook / "nspkg" / "mod.py", "VALUE = 'namespace'\n")  # no __init__.py
    write(notebook / "helpers.py", HELPERS)
    write(notebook / "other.py", "def times(k, x):\n    return k * x\n")
    runner = runner_factory()
    local(shell, "import nspkg.mod, helpers")
    ok(*remote(shell, runner.url, "import nspkg.mod\nv = (nspkg.mod.VALUE, helpers.double(2))"))
    assert ns["v"] == ("namespace", 4)
    result, cap = remote(shell, runner.url, "import os\nos._exit(1)")
    assert not result.success and "died" in cap.stdout + cap.stderr + str(result.error_in_exec)
    # The fresh kernel gets every module again, though none of them changed.
    ok(*remote(shell, runner.url, "import nspkg.mod\nv = (nspkg.mod.VALUE, helpers.double(3))"))
    assert ns["v"] == ("namespace", 6)


def test_modules_under_bwrap_without_network(shell, ns, notebook, runner_factory):
    from runner.sandbox import probe_bwrap, probe_network

    from .conftest import skip_missing

    why = probe_bwrap() or probe_network()
    if why is not None:
        skip_missing(f"bwrap and network namespaces: {why}")
    write(notebook / "helpers.py", HELPERS)
    write(notebook / "other.py", "def times(k, x):\n    return k * x\n")
    write(notebook / "pkg" / "__init__.py", "from .sub import f\n")
    write(notebook / "pkg" / "sub.py", "def f(x):\n    return x + 1\n")
    runner = runner_factory("--sandbox", "bwrap", "--no-network", name="boxed")
    local(shell, "import helpers\nx = 4")
    ok(*remote(shell, runner.url, "import pkg\ny = (helpers.triple(x), pkg.f(x))"))
    assert ns["y"] == (12, 5)


def test_sources_beyond_the_budget_are_asked_for(shell, ns, notebook, runner_factory, monkeypatch):
    write(notebook / "helpers.py", HELPERS)
    write(notebook / "other.py", "def times(k, x):\n    return k * x\n")
    local(shell, "import helpers")
    bundle = localcode.bundle_for(localcode.CodeState(), budget=1)
    assert bundle is not None and sum(p.nbytes for p in bundle.parts[1:]) <= 1
    listed = {m["name"] for m in json.loads(bytes(bundle.parts[0]))["modules"]}
    assert {"helpers", "other"} <= listed  # listed, not sent
    monkeypatch.setattr(localcode, "PUSH_BUDGET", 1)
    runner = runner_factory()
    ok(
        *remote(
            shell,
            runner.url,
            "from runner.codeimport import store\ny = helpers.triple(2)\nasked = store().asked",
        )
    )
    assert ns["y"] == 6 and ns["asked"] >= 1
    write(notebook / "other.py", "def times(k, x):\n    return k * x + 1\n")
    ok(*remote(shell, runner.url, "y = helpers.triple(2)"))
    assert ns["y"] == 7
