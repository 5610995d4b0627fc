"""%%remote end to end: an IPython shell with didomagic, a real runner process, TLS websockets."""

from __future__ import annotations

import io
import os
import re
import signal
import socket

import numpy as np
from IPython.utils.capture import capture_output

from didomagic import api
from didomagic.errors import (
    AuthenticationFailed,
    CellTimeout,
    ConnectionLost,
    FingerprintMismatch,
    KernelDied,
    RemoteError,
    RunnerUnreachable,
    VersionMismatch,
)
from didomagic.protocol import PROTOCOL_VERSION
from didomagic.urls import ConnectionURL

from .conftest import TIMEOUT


def remote(shell, url: str, cell: str, options: str = ""):
    """Run ``cell`` under ``%%remote --runner url`` and capture what it shows."""
    with capture_output() as cap:
        result = shell.run_cell(f"%%remote --runner {url} {options}\n{cell}")
    return result, cap


def assert_one_paragraph(cap, error_name: str) -> None:
    assert error_name in cap.stdout
    assert "Traceback" not in cap.stdout and 'File "' not in cap.stdout


def test_values_sync_both_ways(shell, ns, module_runner):
    shell.run_cell(
        "import numpy as np\n"
        "a = np.arange(5.0)\n"
        "scale = 3\n"
        "def helper(v):\n    return v * scale\n"
        "class Point:\n    def __init__(self, x):\n        self.x = x\n"
        "square = lambda v: v * v\n"
    )
    result, cap = remote(
        shell,
        module_runner.url,
        "b = helper(a)\np = Point(square(4))\nimport os\nwhere = os.getcwd()",
    )
    assert result.success, cap.stdout + cap.stderr
    assert np.array_equal(ns["b"], np.arange(5.0) * 3)
    assert ns["p"].x == 16 and type(ns["p"]).__name__ == "Point"
    assert "scratch" in ns["where"] and ns["where"] != os.getcwd()


def test_output_streams_while_the_cell_runs(shell, ns, module_runner, tmp_path, monkeypatch):
    marker = tmp_path / "first-line-arrived"
    ns["marker"] = str(marker)

    class Tap(io.StringIO):
        def write(self, text: str) -> int:
            if "first" in text:
                marker.touch()  # the remote cell only goes on once this line got here
            return super().write(text)

    tap = Tap()
    monkeypatch.setattr("sys.stdout", tap)
    result = shell.run_cell(
        f"%%remote --runner {module_runner.url}\n"
        "import os, time\n"
        "print('first', flush=True)\n"
        f"deadline = time.monotonic() + {TIMEOUT}\n"
        "while not os.path.exists(marker):\n"
        "    assert time.monotonic() < deadline, 'first line never arrived'\n"
        "    time.sleep(0.01)\n"
        "print('second')\n"
    )
    assert result.success
    text = tap.getvalue()
    assert text.index("first") < text.index("second")


def test_rich_output_and_last_expression(shell, ns, module_runner):
    result, cap = remote(
        shell,
        module_runner.url,
        "from IPython.display import HTML, display\n"
        "import matplotlib.pyplot as plt\n"
        "display(HTML('<b>bold</b>'))\n"
        "plt.plot([1, 2, 3]); plt.show()\n"
        "6 * 7",
    )
    assert result.success, cap.stdout
    kinds = [set(o.data) for o in cap.outputs]
    assert any("text/html" in k for k in kinds)
    assert any("image/png" in k for k in kinds)
    assert repr(result.result) == "42"
    quiet, _ = remote(shell, module_runner.url, "6 * 7;")
    assert quiet.result is None


def test_remote_state_persists_across_cells(shell, ns, module_runner):
    remote(shell, module_runner.url, "kept_there = 'remote only'", "--no-sync")
    assert "kept_there" not in ns
    result, _ = remote(shell, module_runner.url, "echo = kept_there")
    assert result.success and ns["echo"] == "remote only"


def test_push_pull_and_no_sync(shell, ns, module_runner):
    ns["pushed"] = 5
    result, _ = remote(
        shell,
        module_runner.url,
        "exec('hidden_result = pushed + 1')",
        "--no-sync --push pushed --pull hidden_result",
    )
    assert result.success and ns["hidden_result"] == 6


def test_del_deletes_locally(shell, ns, module_runner):
    ns["doomed"] = 1
    result, _ = remote(shell, module_runner.url, "del doomed")
    assert result.success and "doomed" not in ns


def test_ipython_syntax_runs_on_the_runner(shell, ns, module_runner):
    ns["word"] = "hello-from-shell"
    result, cap = remote(
        shell, module_runner.url, "!echo {word}\n%time timed = len(word)\nlines = !echo listed"
    )
    assert result.success, cap.stdout
    assert "hello-from-shell" in cap.stdout
    assert ns["timed"] == len("hello-from-shell") and list(ns["lines"]) == ["listed"]


def test_remote_exception_fails_the_cell_with_the_remote_traceback(shell, ns, module_runner):
    result, cap = remote(
        shell, module_runner.url, "before = 1\ndef inner():\n    return 1 / 0\ninner()"
    )
    assert not result.success
    error = result.error_in_exec
    assert isinstance(error, RemoteError) and error.ename == "ZeroDivisionError"
    assert "ZeroDivisionError: division by zero" in str(error)
    shown = re.sub(r"\x1b\[[0-9;]*m", "", cap.stdout)
    assert "inner()" in shown and "1 / 0" in shown  # the remote frames
    assert ns["before"] == 1  # bound before the exception: synced, as locally


def test_unpicklable_values_are_reported_and_the_rest_syncs(shell, ns, module_runner):
    shell.run_cell("import threading\nmine = threading.Lock()\nplain = 1")
    result, cap = remote(
        shell,
        module_runner.url,
        "uses = (mine, plain)\ntheirs = threading.Lock()\nfine = plain + 1",
    )
    assert result.success or isinstance(result.error_in_exec, RemoteError)
    assert "'mine' was not sent" in cap.stderr and "pickle" in cap.stderr
    result, cap = remote(
        shell, module_runner.url, "import threading\ntheirs = threading.Lock()\nfine = 2"
    )
    assert result.success
    assert "'theirs' was not synced" in cap.stderr and ns["fine"] == 2


def test_timeout_interrupts_and_the_session_goes_on(shell, ns, module_runner):
    remote(shell, module_runner.url, "survivor = 'still here'", "--no-sync")
    result, cap = remote(shell, module_runner.url, "import time\ntime.sleep(60)", "--timeout 1")
    assert isinstance(result.error_in_exec, CellTimeout)
    assert_one_paragraph(cap, "CellTimeout")
    result, _ = remote(shell, module_runner.url, "after = survivor")
    assert result.success and ns["after"] == "still here"


def test_keyboard_interrupt_interrupts_the_remote_cell(shell, ns, module_runner, monkeypatch):
    class Tap(io.StringIO):
        def write(self, text: str) -> int:
            if "started" in text:
                os.kill(os.getpid(), signal.SIGINT)  # the notebook's stop button
            return super().write(text)

    monkeypatch.setattr("sys.stdout", Tap())
    result = shell.run_cell(
        f"%%remote --runner {module_runner.url}\n"
        "import time\nprint('started', flush=True)\ntime.sleep(60)"
    )
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    monkeypatch.undo()
    result, _ = remote(shell, module_runner.url, "ok_after_interrupt = 1")
    assert result.success and ns["ok_after_interrupt"] == 1


def test_kernel_death_is_reported_and_other_sessions_are_untouched(shell, ns, module_runner):
    other = api.SessionPool()
    try:
        api.run_cell(
            api.CellSpec("mine = 'other session'", sync=False),
            {},
            runner=module_runner.url,
            pool=other,
        )
        result, cap = remote(shell, module_runner.url, "import os\nos._exit(1)")
        assert isinstance(result.error_in_exec, KernelDied)
        assert_one_paragraph(cap, "KernelDied")
        result, _ = remote(shell, module_runner.url, "fresh = 'new kernel'")
        assert result.success and ns["fresh"] == "new kernel"
        there: dict[str, object] = {}
        api.run_cell(api.CellSpec("back = mine"), there, runner=module_runner.url, pool=other)
        assert there["back"] == "other session"
    finally:
        other.close()


def test_large_array_round_trip(shell, ns, module_runner):
    ns["big"] = np.random.default_rng(0).random(100_000_000 // 8)  # 100 MB
    result, _ = remote(shell, module_runner.url, "doubled = big * 2")
    assert result.success
    assert np.array_equal(ns["doubled"], ns["big"] * 2)


def test_local_mode_uses_the_same_path(shell, ns):
    shell.run_cell("base = 20")
    with capture_output() as cap:
        result = shell.run_cell(
            "%%remote --local\nimport threading\nlk = threading.Lock()\ntotal = base + 1\ntotal"
        )
    assert result.success and ns["total"] == 21 and result.result == 21
    assert "'lk' was not synced" in cap.stderr
    result = shell.run_cell("%%remote --local\nraise ValueError('local boom')")
    assert isinstance(result.error_in_exec, ValueError)


# --------------------------------------------------------------------------- connect errors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_runner(shell, ns):
    url = ConnectionURL("127.0.0.1", _free_port(), "t", "00" * 32)
    result, cap = remote(shell, str(url), "x = 1")
    assert isinstance(result.error_in_exec, RunnerUnreachable)
    assert_one_paragraph(cap, "RunnerUnreachable")


def test_fingerprint_mismatch_sends_nothing(shell, ns, module_runner):
    real = ConnectionURL.parse(module_runner.url)
    fake = ConnectionURL(real.host, real.port, real.token, "00" * 32)
    result, cap = remote(shell, str(fake), "x = 1")
    error = result.error_in_exec
    assert isinstance(error, FingerprintMismatch)
    assert error.expected == "00" * 32 and error.got == real.fingerprint
    assert_one_paragraph(cap, "FingerprintMismatch")


def test_without_a_pin_the_system_cas_decide(shell, ns, module_runner):
    real = ConnectionURL.parse(module_runner.url)
    unpinned = ConnectionURL(real.host, real.port, real.token, None)
    result, cap = remote(shell, str(unpinned), "x = 1")
    assert isinstance(result.error_in_exec, RunnerUnreachable)
    assert "not trusted by this system's CAs" in str(result.error_in_exec)
    assert_one_paragraph(cap, "RunnerUnreachable")


def test_wrong_token(shell, ns, module_runner):
    real = ConnectionURL.parse(module_runner.url)
    wrong = ConnectionURL(real.host, real.port, "not-the-token", real.fingerprint)
    result, cap = remote(shell, str(wrong), "x = 1")
    assert isinstance(result.error_in_exec, AuthenticationFailed)
    assert_one_paragraph(cap, "AuthenticationFailed")


def test_protocol_version_mismatch_names_both_sides(shell, ns, runner_factory, monkeypatch):
    runner = runner_factory()
    monkeypatch.setattr("didomagic.client.PROTOCOL_VERSION", 99)
    result, cap = remote(shell, runner.url, "x = 1")
    assert isinstance(result.error_in_exec, VersionMismatch)
    ours = f"protocol {PROTOCOL_VERSION}"
    assert "protocol 99" in str(result.error_in_exec) and ours in str(result.error_in_exec)
    assert_one_paragraph(cap, "VersionMismatch")


def test_connection_lost_mid_cell(shell, ns, runner_factory, monkeypatch):
    runner = runner_factory()

    class Tap(io.StringIO):
        def write(self, text: str) -> int:
            if "started" in text:
                runner.process.kill()
            return super().write(text)

    tap = Tap()
    monkeypatch.setattr("sys.stdout", tap)
    result = shell.run_cell(
        f"%%remote --runner {runner.url}\nimport time\nprint('started', flush=True)\ntime.sleep(60)"
    )
    monkeypatch.undo()
    assert isinstance(result.error_in_exec, ConnectionLost)
    assert "ConnectionLost" in tap.getvalue() and "Traceback" not in tap.getvalue()


def test_a_bad_option_is_a_usage_error(shell, ns):
    with capture_output() as cap:
        result = shell.run_cell("%%remote --timeout -1\nx = 1")
    assert not result.success and "--timeout must be a positive" in cap.stderr + cap.stdout
    with capture_output():
        result = shell.run_cell("%%remote --runner not-a-url\nx = 1")
    assert "No runner called 'not-a-url'" in str(result.error_in_exec)


def test_an_interrupt_while_values_arrive_cancels_the_cell_before_it_starts(module_runner):
    from didomagic.client import open_connection
    from didomagic.loop import background_loop
    from didomagic.protocol import Execute, Interrupt, Result, State, Status
    from didomagic.serialize import pack_names, unpack

    packed, _ = pack_names({"a": np.ones(2_000_000)}, ["a"])
    request = Execute("c1", "ran = True", (packed[0].header,), ("ran",))

    async def cancelled_then_fine() -> tuple[Result, object]:
        connection = await open_connection(ConnectionURL.parse(module_runner.url))
        session = connection.session
        await connection.ws.send(session.send(request))
        await connection.ws.send(session.send(Interrupt("c1")))  # before any value byte
        for frame in session.frames([packed[0].parts]):
            await connection.ws.send(frame)
        first = None
        while first is None or session.state is not State.IDLE:
            message = session.receive(await connection.ws.recv())
            if isinstance(message, Result):
                first = message
        second, buffers = await connection.execute(
            Execute("c2", "ok = 'ran' not in globals()", fetch=("ok",)), [], lambda o: None
        )
        await connection.close()
        assert second.status is Status.OK
        return first, unpack(buffers[0])

    first, never_ran = background_loop().run(cancelled_then_fine())
    assert first.status is Status.INTERRUPTED and not first.values
    assert never_ran is True  # the cancelled cell's code did not run; the session goes on


def test_output_printed_last_always_arrives_before_the_result(shell, ns, module_runner):
    """Kernels run without ipykernel's 0.5 ms post-cell sleep: the idle status orders it."""
    for attempt in range(20):
        result, cap = remote(
            shell,
            module_runner.url,
            "import sys\nfor i in range(200):\n    print(i)\n"
            f"_ = sys.stderr.write('end {attempt}')",
        )
        assert result.success
        assert cap.stdout.split()[-1] == "199" and f"end {attempt}" in cap.stderr
