"""Packages a cell asks for: real runners install test wheels offline into cached environments.

Every wheel is written by the test itself (:mod:`tests.wheels`) into a folder
the runners get as ``--find-links DIR --no-index``: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import threading
import zipfile
from pathlib import Path

import cloudpickle
import pytest
from IPython.utils.capture import capture_output

from didomagic import api, packages, serialize
from didomagic.client import query
from didomagic.errors import (
    ConfigurationError,
    KernelDied,
    PackageError,
    ProtocolError,
    RemoteError,
)
from didomagic.loop import background_loop
from didomagic.progress import NoProgress
from didomagic.protocol import (
    Execute,
    Installing,
    Role,
    Session,
    State,
    Status,
    Submit,
    decode,
    encode,
)
from didomagic.runners_view import text_table
from didomagic.urls import ConnectionURL
from runner import sandbox
from runner.envs import PackageRequestError, normalise, satisfied_by

from .conftest import TIMEOUT, skip_missing, start_mediator, start_runner, wait_until
from .wheels import write_wheel

FRAME = '''
class Frame:
    """A tiny DataFrame-like table: named columns of equal length."""

    def __init__(self, columns):
        self.columns = {name: list(values) for name, values in columns.items()}

    def with_column(self, name, values):
        return Frame({**self.columns, name: values})

    def __eq__(self, other):
        return isinstance(other, Frame) and self.columns == other.columns

    def __repr__(self):
        return f"Frame({self.columns})"
'''


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two versions of one package, a package with one dependency, a DataFrame-like one."""
    folder = tmp_path_factory.mktemp("wheels")
    write_wheel(folder, "dmtbase", "1.0")
    write_wheel(folder, "dmtbase", "2.0")
    write_wheel(
        folder,
        "dmtapp",
        "1.0",
        {"dmtapp/__init__.py": "import dmtbase\nVERSION = 'app on ' + dmtbase.__version__\n"},
        requires=["dmtbase>=2.0"],
    )
    write_wheel(folder, "dmtframe", "1.0", {"dmtframe/__init__.py": FRAME})
    write_wheel(folder, "dmtextra", "1.0")
    write_wheel(folder, "cycler", "0.0.1")  # an old version of one the runner has itself
    return folder


@pytest.fixture(scope="module")
def pk_runner(tmp_path_factory, wheelhouse):  # type: ignore[no-untyped-def]
    """A runner that installs from the wheelhouse only."""
    runner = start_runner(
        tmp_path_factory.mktemp("pk"),
        "--name",
        "pk",
        "--warm-kernels",
        "2",
        "--max-sessions",
        "8",
        "--find-links",
        str(wheelhouse),
        "--no-index",
    )
    yield runner
    assert runner.stop() == 0, runner.log


@pytest.fixture
def notebook_has(tmp_path, monkeypatch, wheelhouse):  # type: ignore[no-untyped-def]
    """Install a wheel on the notebook side only: unpacked into a folder on sys.path."""

    def install(filename: str) -> None:
        target = tmp_path / f"site-{filename}"
        with zipfile.ZipFile(wheelhouse / filename) as wheel:
            wheel.extractall(target)
        monkeypatch.syspath_prepend(str(target))

    yield install
    for name in [m for m in sys.modules if m.startswith("dmt")]:
        del sys.modules[name]


def describe(url: str) -> dict:  # type: ignore[type-arg]
    """The runner's self-description, as a client's query gets it."""
    info, _ = background_loop().run(query(ConnectionURL.parse(url)))
    return dict(info.runners[0])


def describe_all(url: str) -> list[dict]:  # type: ignore[type-arg]
    """Every runner a mediator (or a runner) describes."""
    info, _ = background_loop().run(query(ConnectionURL.parse(url)))
    return [dict(r) for r in info.runners]


def builds(url: str) -> int:
    """Environments the runner has built so far."""
    return int(describe(url)["packages"]["builds"])


def remote(shell, url: str, cell: str, options: str = ""):  # type: ignore[no-untyped-def]
    """Run ``cell`` under ``%%remote --runner url`` and capture what it shows."""
    with capture_output() as cap:
        result = shell.run_cell(f"%%remote --runner {url} {options}\n{cell}")
    return result, cap


def execute(session: api.RemoteSession, code: str, pip=(), fetch=()):  # type: ignore[no-untyped-def]
    """Run code in ``session`` asking for ``pip``; return the result and the fetched values."""
    request = Execute(cell=secrets.token_hex(8), code=code, fetch=tuple(fetch), packages=tuple(pip))
    result, buffers = session.execute(request, [], lambda output: None)
    values: dict[str, object] = {}
    serialize.unpack_into(
        values, [(v.name, parts) for v, parts in zip(result.values, buffers, strict=True)]
    )
    return result, values


# --------------------------------------------------------------------------- pure logic


def test_requirements_are_normalised_and_urls_refused():
    assert normalise(["DMT_Base==1.0", "dmtapp", "dmt-base==2.0"]) == ("dmt-base==2.0", "dmtapp")
    with pytest.raises(PackageRequestError, match="URL or path"):
        normalise(["evil @ file:///etc/passwd"])
    with pytest.raises(PackageRequestError, match="not a valid requirement"):
        normalise(["not a requirement!"])
    assert satisfied_by(["a==1", "b>=2", "c"], {"a": "1", "b": "1.5"}) == ["b>=2", "c"]


def test_the_cache_size_is_a_count_or_a_size_and_progress_names_the_installs():
    from didomagic.progress import Progress
    from runner.cli import install_settings_of, serve_parser

    size = serve_parser().parse_args(["--env-cache-size", "3"]).env_cache_size
    assert (size.count, size.nbytes, str(size)) == (3, None, "3")
    size = serve_parser().parse_args(["--env-cache-size", "5G"]).env_cache_size
    assert (size.count, size.nbytes) == (None, 5 << 30)
    assert install_settings_of(serve_parser().parse_args([])).allow is True
    assert install_settings_of(serve_parser().parse_args(["--no-install"])).allow is False
    assert install_settings_of(serve_parser().parse_args(["--allow-install"])).allow is True
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--allow-install", "--no-install"])
    progress = Progress()
    progress.installing(0, "Resolved 3 packages")
    assert progress.install_text().startswith("resolving packages, ")
    progress.installing(3, "Installed 3 packages in 4ms")
    progress.installing(3, "+ dmtbase==1.0")  # the list after it says less
    assert progress.install_text().startswith("installing 3 packages, 0.")
    assert progress.install_text().endswith(": Installed 3 packages in 4ms")
    assert "installing 3 packages" in progress.summary()
    progress.installing(3, "installed in 0.1 s", done=True)
    assert progress.state == "running" and progress.install_seconds > 0


def test_without_uv_the_runner_falls_back_to_pip_with_a_note(monkeypatch, tmp_path):
    from runner import installer

    found = installer.pick_installer("auto", tmp_path)
    assert isinstance(found[0], installer.UvInstaller) and found[1] == ""
    monkeypatch.setattr(installer, "find_uv", lambda: None)
    chosen, note = installer.pick_installer("auto", tmp_path)
    assert isinstance(chosen, installer.PipInstaller) and "pip install uv" in note
    with pytest.raises(SystemExit, match="--installer uv"):
        installer.pick_installer("uv", tmp_path)


def test_requirements_file_keeps_requirements_and_skips_index_options(tmp_path):
    (tmp_path / "more.txt").write_text("dmtextra\n")
    (tmp_path / "req.txt").write_text(
        "# comment\n--index-url https://user:secret@example.invalid/simple\n"
        "dmtbase==1.0  # pinned\n\n-r more.txt\n-f /somewhere\n"
    )
    skipped: list[str] = []
    found = packages.read_requirements(tmp_path / "req.txt", skipped.append)
    assert found == ["dmtbase==1.0", "dmtextra"]
    assert skipped == ["--index-url", "-f"]
    with pytest.raises(ConfigurationError, match="URL or a path"):
        packages.check_requirement("x @ https://example.invalid/x.whl")


def test_pickles_name_the_modules_they_import(notebook_has):
    notebook_has("dmtframe-1.0-py3-none-any.whl")
    import dmtframe

    frame = dmtframe.Frame({"a": [1]})
    assert "dmtframe" in packages.pickled_modules(cloudpickle.dumps(frame, protocol=5))
    holder = {"m": dmtframe}  # a module travels by reference (cloudpickle's subimport)
    assert "dmtframe" in packages.pickled_modules(cloudpickle.dumps(holder, protocol=5))
    assert packages.imported_modules("import os.path\nfrom dmtframe import Frame\n") == {
        "os",
        "dmtframe",
    }
    assert packages.imported_modules("%matplotlib inline\nx = 1\n") == {"matplotlib"}
    assert packages.pins_for(packages.distributions_of({"dmtframe", "os", "IPython"})) == [
        "dmtframe==1.0"
    ]  # the stdlib and didomagic's own stack are never pinned


def test_installing_messages_and_package_fields_round_trip():
    runner, client = Session(Role.RUNNER), Session(Role.CLIENT)
    for side in (runner, client):
        side.state = State.IDLE
    execute_text = client.send(Execute("c1", "x = 1", packages=("dmtbase==1.0",)))
    assert runner.receive(execute_text) == Execute("c1", "x = 1", packages=("dmtbase==1.0",))
    message = Installing("c1", 2, " + dmtbase==1.0", done=True)
    assert client.receive(runner.send(message)) == message
    with pytest.raises(ProtocolError, match="count must be an integer"):
        decode('{"type": "installing", "cell": "c1", "count": "2"}')
    with pytest.raises(ProtocolError, match="does not send installing"):
        client.send(message)
    submit = Submit("r1", "x = 1", packages=("dmtapp",))
    assert decode(encode(submit)) == submit


def test_an_editable_project_is_not_pinned_only_its_dependencies(
    notebook_has, tmp_path, monkeypatch
):
    notebook_has("dmtbase-1.0-py3-none-any.whl")
    project = tmp_path / "project"
    (project / "dmtproj").mkdir(parents=True)
    (project / "dmtproj" / "__init__.py").write_text("import dmtbase\n")
    site = tmp_path / "editable-site"
    info = site / "dmtproj-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: dmtproj\nVersion: 0.1\nRequires-Dist: dmtbase>=1\n"
    )
    (info / "RECORD").write_text("__editable__.dmtproj-0.1.pth,,\n")  # no module listed
    (info / "direct_url.json").write_text(
        json.dumps({"url": project.as_uri(), "dir_info": {"editable": True}})
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(project))  # what the editable .pth does
    import dmtproj  # noqa: F401

    pins = packages.match("import dmtproj\n", [], packages.transform_cell)
    assert pins == ["dmtbase==1.0"]  # the project's code travels; its dependency installs
    assert packages.notebook_version("dmtproj") is None  # and no hint to --pip it


# --------------------------------------------------------------------------- one runner


def test_install_and_import_then_reuse_without_installing(shell, ns, pk_runner, monkeypatch):
    monkeypatch.setenv("DIDOMAGIC_PROGRESS", "text")
    before = builds(pk_runner.url)
    result, cap = remote(
        shell,
        pk_runner.url,
        "import dmtapp\nv = dmtapp.VERSION",
        "--new-session --pip dmtapp",
    )
    assert result.success, cap.stdout + cap.stderr
    assert ns["v"] == "app on 2.0"  # its dependency came too, in the version it needs
    assert "installing 2 packages on pk" in cap.stderr
    assert "installed 2 packages in" in cap.stderr
    assert builds(pk_runner.url) == before + 1
    # A second session with the same set: no install at all.
    result, cap = remote(
        shell, pk_runner.url, "import dmtapp\nw = dmtapp.VERSION", "--new-session --pip dmtapp"
    )
    assert result.success, cap.stdout + cap.stderr
    assert ns["w"] == "app on 2.0"
    assert "installing" not in cap.stderr
    assert builds(pk_runner.url) == before + 1
    # Asking for what the session's environment already holds builds nothing either.
    result, cap = remote(shell, pk_runner.url, "import dmtbase", "--pip dmtbase==2.0")
    assert result.success, cap.stdout + cap.stderr
    assert builds(pk_runner.url) == before + 1
    assert describe(pk_runner.url)["packages"]["install"] is True


def test_sessions_racing_for_one_set_build_it_once(pk_runner):
    url = ConnectionURL.parse(pk_runner.url)
    sessions = [api.RemoteSession(url) for _ in range(3)]
    try:
        for s in sessions:
            execute(s, "x = 1")  # all open before the race
        before = builds(pk_runner.url)
        start = threading.Barrier(len(sessions))
        results: list[object] = [None] * len(sessions)

        def race(i: int) -> None:
            start.wait()
            results[i] = execute(sessions[i], "import dmtextra", ["dmtextra"])

        threads = [threading.Thread(target=race, args=(i,)) for i in range(len(sessions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        for result, _values in results:  # type: ignore[misc]
            assert result.status is Status.OK, result.error
        assert builds(pk_runner.url) == before + 1
        assert "waiting for the build" in pk_runner.log  # the race did happen
    finally:
        for s in sessions:
            s.close()


def test_a_version_conflict_shows_the_installers_message_and_the_session_goes_on(
    shell, ns, pk_runner
):
    result, _ = remote(shell, pk_runner.url, "kept = 41", "--new-session")
    assert result.success
    result, _ = remote(shell, pk_runner.url, "import dmtapp", "--pip dmtapp --pip dmtbase==1.0")
    error = result.error_in_exec
    assert isinstance(error, PackageError) and error.ename == "PackageInstallError"
    assert "dmtbase" in str(error) and "unsatisfiable" in str(error)  # uv's own words
    result, _cap = remote(shell, pk_runner.url, "kept2 = kept + 1")
    assert result.success and ns["kept2"] == 42  # same session, state intact


def test_a_failed_resolution_names_the_missing_package(shell, ns, pk_runner):
    result, cap = remote(shell, pk_runner.url, "kept = 1", "--new-session")
    result, cap = remote(shell, pk_runner.url, "print('never')", "--pip dmtnowhere==3")
    error = result.error_in_exec
    assert isinstance(error, PackageError)
    assert "dmtnowhere" in str(error) and "was not found" in str(error)
    assert "never" not in cap.stdout
    result, cap = remote(shell, pk_runner.url, "kept += 1")
    assert result.success and ns["kept"] == 2


def test_adding_a_package_mid_session_keeps_state_and_a_version_change_is_refused(
    shell, ns, pk_runner
):
    result, cap = remote(
        shell,
        pk_runner.url,
        "import dmtbase\nstate = [dmtbase.__version__]",
        "--new-session --pip dmtbase==1.0",
    )
    assert result.success, cap.stdout + cap.stderr
    result, cap = remote(
        shell,
        pk_runner.url,
        "import dmtframe\nstate = [*state, type(dmtframe.Frame({})).__name__]\n"
        "v = dmtbase.__version__",
        "--pip dmtframe",
    )
    assert result.success, cap.stdout + cap.stderr
    assert ns["state"] == ["1.0", "Frame"] and ns["v"] == "1.0"
    # dmtbase 1.0 is imported in this kernel: 2.0 cannot replace it.
    result, cap = remote(shell, pk_runner.url, "state = [*state, 'no']", "--pip dmtbase==2.0")
    error = result.error_in_exec
    assert isinstance(error, PackageError) and error.ename == "PackageVersionConflict"
    assert "dmtbase 1.0" in str(error) and "--new-session" in str(error)
    result, cap = remote(shell, pk_runner.url, "n = len(state)")
    assert result.success and ns["n"] == 2  # the session went on, unchanged
    result, cap = remote(
        shell,
        pk_runner.url,
        "import dmtbase\nv = dmtbase.__version__",
        "--new-session --pip dmtbase==2.0",
    )
    assert result.success and ns["v"] == "2.0"


def test_a_replaced_kernel_gets_the_sessions_environment_again(shell, ns, pk_runner):
    result, _ = remote(shell, pk_runner.url, "import dmtbase", "--new-session --pip dmtbase==1.0")
    assert result.success
    result, _ = remote(shell, pk_runner.url, "import os\nos._exit(1)")
    assert isinstance(result.error_in_exec, KernelDied)
    result, cap = remote(shell, pk_runner.url, "import dmtbase\nv = dmtbase.__version__")
    assert result.success, cap.stdout + cap.stderr
    assert ns["v"] == "1.0"


def test_going_back_to_the_runners_own_version_takes_the_layer_away(shell, ns, pk_runner):
    import cycler

    own = cycler.__version__
    result, cap = remote(
        shell,
        pk_runner.url,
        "import importlib.metadata\nv = importlib.metadata.version('cycler')",
        "--new-session --pip cycler==0.0.1",
    )
    assert result.success, cap.stdout + cap.stderr
    assert ns["v"] == "0.0.1"
    result, cap = remote(
        shell,
        pk_runner.url,
        "import cycler\nv = cycler.__version__",
        f"--pip cycler=={own}",
    )
    assert result.success, cap.stdout + cap.stderr
    assert ns["v"] == own  # not imported before: the runner's own version, in place
    result, cap = remote(shell, pk_runner.url, "import cycler", "--new-session --pip cycler==0.0.1")
    result, cap = remote(shell, pk_runner.url, "x = 1", f"--pip cycler=={own}")
    error = result.error_in_exec  # imported in 0.0.1: it cannot become the runner's own
    assert isinstance(error, PackageError) and error.ename == "PackageVersionConflict"
    assert f"cycler 0.0.1 (imported as cycler) → {own}" in str(error)


def test_packages_match_mirrors_the_notebooks_version(shell, ns, pk_runner, notebook_has):
    notebook_has("dmtbase-1.0-py3-none-any.whl")  # the runner could get 2.0, the newest
    result, cap = remote(
        shell,
        pk_runner.url,
        "import dmtbase\nv = dmtbase.__version__",
        "--new-session --packages match",
    )
    assert result.success, cap.stdout + cap.stderr
    assert ns["v"] == "1.0"


def test_the_notebook_wide_default_is_a_trait_or_an_environment_variable(
    shell, ns, pk_runner, notebook_has, monkeypatch
):
    notebook_has("dmtbase-1.0-py3-none-any.whl")
    monkeypatch.setenv(packages.PACKAGES_ENV, "match")
    result, cap = remote(
        shell, pk_runner.url, "import dmtbase\nv = dmtbase.__version__", "--new-session"
    )
    assert result.success, cap.stdout + cap.stderr
    assert ns["v"] == "1.0"
    result, cap = remote(  # --packages none overrides the default
        shell, pk_runner.url, "import dmtbase", "--new-session --packages none"
    )
    assert isinstance(result.error_in_exec, RemoteError)
    monkeypatch.delenv(packages.PACKAGES_ENV)
    shell.run_line_magic("config", "RemoteMagics.packages = 'match'")  # the magics' trait
    try:
        result, cap = remote(
            shell, pk_runner.url, "import dmtbase\nw = dmtbase.__version__", "--new-session"
        )
    finally:
        shell.run_line_magic("config", "RemoteMagics.packages = None")
    assert result.success, cap.stdout + cap.stderr
    assert ns["w"] == "1.0"


def test_a_missing_module_the_notebook_has_says_what_to_do(shell, ns, pk_runner, notebook_has):
    notebook_has("dmtbase-1.0-py3-none-any.whl")
    result, _cap = remote(shell, pk_runner.url, "import dmtbase.sub", "--new-session")
    error = result.error_in_exec
    assert isinstance(error, RemoteError) and error.ename == "ModuleNotFoundError"
    hint = (
        "No module named 'dmtbase' on runner pk; the notebook has dmtbase 1.0: "
        "add --pip dmtbase==1.0 or --packages match"
    )
    assert hint in str(error)
    assert hint in error._render_traceback_()[-2]


def test_a_dataframe_like_value_from_an_installed_package_travels(
    shell, ns, pk_runner, notebook_has
):
    notebook_has("dmtframe-1.0-py3-none-any.whl")
    shell.run_cell("import dmtframe\ndf = dmtframe.Frame({'a': [1, 2]})")
    # Without the package the value cannot load there, and the user is told what to do.
    result, cap = remote(shell, pk_runner.url, "n = len(df.columns)", "--new-session")
    assert not result.success
    assert "add --pip dmtframe==1.0 or --packages match" in cap.stderr
    result, cap = remote(
        shell, pk_runner.url, "df2 = df.with_column('b', [3, 4])", "--packages match"
    )
    assert result.success, cap.stdout + cap.stderr
    import dmtframe

    assert ns["df2"] == dmtframe.Frame({"a": [1, 2], "b": [3, 4]})
    # The Python API: the argument's pickle names its package, which the call then gets.
    import didomagic

    def widen(frame):  # type: ignore[no-untyped-def]
        return frame.with_column("c", [5, 6])

    shell.run_cell(f"%%remote --runner {pk_runner.url} --new-session\nx = 1")
    wide = didomagic.run(widen, ns["df"], runner=pk_runner.url, packages="match")
    assert wide == dmtframe.Frame({"a": [1, 2], "c": [5, 6]})


def test_a_detached_job_and_a_call_ask_for_packages(shell, ns, pk_runner):
    import didomagic
    from didomagic import detached

    spec = api.CellSpec(code="import dmtapp\nv = dmtapp.VERSION", pip=("dmtapp",), packages="none")
    job = detached.submit_cell(spec, ns, runner=pk_runner.url)
    assert job.wait(TIMEOUT)["state"] == "done", job.status()
    assert job.fetch().values["v"] == "app on 2.0"

    def base_version() -> str:
        import dmtbase

        return str(dmtbase.__version__)

    assert didomagic.run(base_version, runner=pk_runner.url, pip=["dmtbase==1.0"]) == "1.0"


def test_requirements_file_option(shell, ns, pk_runner, tmp_path):
    (tmp_path / "requirements.txt").write_text("--index-url https://example.invalid\ndmtapp\n")
    result, cap = remote(
        shell,
        pk_runner.url,
        "import dmtapp\nv = dmtapp.VERSION",
        f"--new-session --requirements {tmp_path / 'requirements.txt'}",
    )
    assert result.success, cap.stdout + cap.stderr
    assert ns["v"] == "app on 2.0"
    assert "--index-url skipped" in cap.stderr


# --------------------------------------------------------------------------- other runners


def test_least_recently_used_environments_go_but_never_one_in_use(runner_factory, wheelhouse):
    runner = runner_factory(
        "--env-cache-size", "1", "--find-links", str(wheelhouse), "--no-index", name="lru"
    )
    url = ConnectionURL.parse(runner.url)
    envs = runner.state_dir / "envs"

    def on_disk() -> int:
        return sum(1 for e in envs.iterdir() if not e.name.startswith("."))

    holder = api.RemoteSession(url)
    try:
        result, _ = execute(holder, "import dmtbase", ["dmtbase==1.0"])
        assert result.status is Status.OK, result.error
        other = api.RemoteSession(url)
        result, _ = execute(other, "import dmtbase", ["dmtbase==2.0"])
        assert result.status is Status.OK, result.error
        assert on_disk() == 2  # over the cap, but the first is in use
        other.close()
        wait_until(lambda: describe(runner.url)["sessions"] == 1, "the second session to end")
        third = api.RemoteSession(url)
        result, _ = execute(third, "import dmtframe", ["dmtframe"])
        assert result.status is Status.OK, result.error
        third.close()
        assert describe(runner.url)["packages"]["environments"] == 2
        wait_until(lambda: on_disk() == 2, "the evicted environment to leave the disk")
        # The one in use is still whole: its kernel can still read its files.
        result, values = execute(
            holder, "import os\nok = os.path.exists(dmtbase.__file__)", fetch=["ok"]
        )
        assert values["ok"] is True
        before = builds(runner.url)
        again = api.RemoteSession(url)
        result, _ = execute(again, "import dmtbase", ["dmtbase==2.0"])  # evicted: built again
        again.close()
        assert result.status is Status.OK and builds(runner.url) == before + 1
    finally:
        holder.close()


def test_no_network_kernels_get_packages_installed_by_the_runner(runner_factory, wheelhouse):
    reason = sandbox.probe_network()
    if reason is not None:
        skip_missing(reason)
    runner = runner_factory(
        "--no-network", "--find-links", str(wheelhouse), "--no-index", name="nonet"
    )
    session = api.RemoteSession(ConnectionURL.parse(runner.url))
    try:
        port = ConnectionURL.parse(runner.url).port
        result, values = execute(
            session,
            "import dmtapp, socket\nv = dmtapp.VERSION\n"
            f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    net = True\nexcept OSError:\n    net = False\n",
            ["dmtapp"],
            fetch=["v", "net"],
        )
        assert result.status is Status.OK, result.error
        assert values == {"v": "app on 2.0", "net": False}
    finally:
        session.close()


def test_a_sandboxed_kernel_sees_its_environment_read_only(runner_factory, wheelhouse):
    reason = sandbox.probe_bwrap()
    if reason is not None:
        skip_missing(reason)
    runner = runner_factory(
        "--sandbox", "bwrap", "--find-links", str(wheelhouse), "--no-index", name="box"
    )
    session = api.RemoteSession(ConnectionURL.parse(runner.url))
    try:
        result, values = execute(
            session,
            "import dmtbase, os\nv = dmtbase.__version__\n"
            "try:\n    open(os.path.join(os.path.dirname(dmtbase.__file__), 'x'), 'w')\n"
            "    writable = True\nexcept OSError:\n    writable = False\n",
            ["dmtbase==1.0"],
            fetch=["v", "writable"],
        )
        assert result.status is Status.OK, result.error
        assert values == {"v": "1.0", "writable": False}
    finally:
        session.close()


def test_a_runner_that_refuses_installs_says_so_and_the_listing_shows_both(
    runner_factory, wheelhouse, pk_runner
):
    runner = runner_factory("--no-install", "--find-links", str(wheelhouse), name="noinst")
    session = api.RemoteSession(ConnectionURL.parse(runner.url))
    try:
        result, _ = execute(session, "import dmtapp", ["dmtapp"])
        assert result.status is Status.ERROR
        assert result.error["ename"] == "InstallsDisabled"
        assert "--no-install" in result.error["evalue"]
        # What the runner already has costs nothing and is allowed.
        import numpy

        result, _ = execute(session, "import numpy", [f"numpy=={numpy.__version__}"])
        assert result.status is Status.OK, result.error
    finally:
        session.close()
    assert describe(runner.url)["packages"] == {
        "install": False,
        "installer": "",
        "environments": 0,
        "builds": 0,
    }
    installs = api.RemoteSession(ConnectionURL.parse(pk_runner.url))
    try:
        execute(installs, "import dmtbase", ["dmtbase==1.0"])
    finally:
        installs.close()
    envs = describe(pk_runner.url)["packages"]["environments"]
    assert envs >= 1
    api.add_runner(pk_runner.url, "pk")
    api.add_runner(runner.url, "noinst")
    try:
        table = text_table(api.runners())
    finally:
        api.remove_runner("pk")
        api.remove_runner("noinst")
    lines = {line.split()[0]: line for line in table.splitlines()[1:] if line.strip()}
    assert "PACKAGES" in table.splitlines()[0]
    assert re.search(rf"installs \(uv [^)]+\), {envs} envs", lines["pk"])
    assert "no installs" in lines["noinst"]


def test_packages_through_a_mediator_with_progress(runner_factory, wheelhouse, tmp_path):
    mediator = start_mediator(tmp_path / "mediator")
    try:
        runner_factory(
            "--mediator",
            mediator.runner_url,
            "--find-links",
            str(wheelhouse),
            "--no-index",
            name="relayed",
        )
        wait_until(
            lambda: any(r.get("status") == "up" for r in describe_all(mediator.url)),
            "the runner to join the mediator",
        )
        session = api.RemoteSession(ConnectionURL.parse(mediator.url))
        seen: list[tuple[int, str, bool]] = []

        class Watch(NoProgress):
            def installing(self, count: int, line: str, done: bool = False) -> None:
                seen.append((count, line, done))

        try:
            request = Execute(
                cell="c",
                code="import dmtapp\nv = dmtapp.VERSION",
                fetch=("v",),
                packages=("dmtapp",),
            )
            result, _ = session.execute(request, [], lambda output: None, Watch())
        finally:
            session.close()
        assert result.status is Status.OK, result.error
        assert session.runner_name == "relayed"
        assert seen and seen[-1][0] == 2 and seen[-1][2] is True  # the last says: done
        assert any(not done for _, _, done in seen)
    finally:
        assert mediator.stop() == 0, mediator.log


def test_pip_is_the_fallback_installer(runner_factory, wheelhouse):
    runner = runner_factory(
        "--installer", "pip", "--find-links", str(wheelhouse), "--no-index", name="pip"
    )
    assert describe(runner.url)["packages"]["installer"] == "pip"
    session = api.RemoteSession(ConnectionURL.parse(runner.url))
    try:
        result, values = execute(session, "import dmtapp\nv = dmtapp.VERSION", ["dmtapp"], ["v"])
        assert result.status is Status.OK, result.error
        assert values["v"] == "app on 2.0"
    finally:
        session.close()


def test_environments_outlive_the_runner(tmp_path, wheelhouse):
    args = ("--name", "again", "--find-links", str(wheelhouse), "--no-index")
    first = start_runner(tmp_path, *args)
    try:
        session = api.RemoteSession(ConnectionURL.parse(first.url))
        execute(session, "import dmtbase", ["dmtbase==1.0"])
        session.close()
    finally:
        assert first.stop() == 0
    second = start_runner(tmp_path, *args)
    try:
        assert describe(second.url)["packages"]["environments"] == 1
        session = api.RemoteSession(ConnectionURL.parse(second.url))
        result, _ = execute(session, "import dmtbase", ["dmtbase==1.0"])
        session.close()
        assert result.status is Status.OK and builds(second.url) == 0
    finally:
        assert second.stop() == 0
    assert os.path.isdir(tmp_path / "state" / "uv-cache")
