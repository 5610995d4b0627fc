"""The request channel end to end: a runner kernel asks the notebook side and waits.

Real runner processes, real kernels: the cell calls ``runner.asking.ask``; the
handler registered here answers in this process.
"""

from __future__ import annotations

import threading

import pytest
from IPython.utils.capture import capture_output

from didomagic.resources import Reply, register_handler, unregister_handler

from .conftest import start_mediator, wait_until


@pytest.fixture
def greeting():
    """A ``greeting`` handler: ``big`` sends 3 MB in two parts; counts its calls."""
    calls: list[str] = []

    def serve(request):
        calls.append(request.name)
        request.state.setdefault("greeting", []).append(request.name)
        if request.name == "hello":
            return Reply.found(b"hi ", b"there", meta={"n": len(request.state["greeting"])})
        if request.name == "big":
            return Reply.found(bytes(range(256)) * 8192, b"\x00" * (1 << 20))
        if request.name == "boom":
            raise RuntimeError("handler broke")
        return Reply.not_found(f"no greeting {request.name!r}")

    register_handler("greeting", serve)
    yield calls
    unregister_handler("greeting")


def remote(shell, url: str, cell: str):
    with capture_output() as cap:
        result = shell.run_cell(f"%%remote --runner {url}\n{cell}")
    return result, cap


ASK = "from runner.asking import ask\n"


def test_a_kernel_asks_and_gets_bytes_and_meta(shell, ns, module_runner, greeting):
    result, cap = remote(
        shell,
        module_runner.url,
        ASK + "r = ask('greeting', 'hello')\n"
        "got = (r.status, bytes(r.parts[0] + r.parts[1]), r.meta)\n"
        "big = ask('greeting', 'big')\n"
        "sizes = [len(p) for p in big.parts]\n"
        "ok = big.parts[0] == bytes(range(256)) * 8192\n"
        "missing = ask('greeting', 'nope')\n"
        "nf = (missing.status, missing.message)\n"
        "broken = ask('greeting', 'boom')\n"
        "other = ask('widget', 'x')\n"
        "refusals = (broken.status, broken.message, other.status, other.message)",
    )
    assert result.success, cap.stdout + cap.stderr
    assert ns["got"] == ("found", b"hi there", {"n": 1})
    assert ns["sizes"] == [256 * 8192, 1 << 20] and ns["ok"]
    assert ns["nf"] == ("not-found", "no greeting 'nope'")
    status, message, other_status, other_message = ns["refusals"]
    assert status == "refused" and "RuntimeError: handler broke" in message
    assert other_status == "refused" and "no 'widget' resources" in other_message
    assert greeting == ["hello", "big", "nope", "boom"]


def test_many_asks_from_threads_and_a_chunked_sink(shell, ns, module_runner, greeting):
    result, cap = remote(
        shell,
        module_runner.url,
        ASK + "import threading\n"
        "out = []\n"
        "def work():\n"
        "    for _ in range(25):\n"
        "        out.append(bytes(ask('greeting', 'hello').parts[1]))\n"
        "threads = [threading.Thread(target=work) for _ in range(4)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "count = len(out); same = set(out)\n"
        "chunks = []\n"
        "ask('greeting', 'big', sink=lambda part, chunk: chunks.append((part, len(chunk))))\n"
        "streamed = [sum(n for p, n in chunks if p == i) for i in (0, 1)]",
    )
    assert result.success, cap.stdout + cap.stderr
    assert ns["count"] == 100 and ns["same"] == {b"there"}
    assert ns["streamed"] == [256 * 8192, 1 << 20]


def test_outside_a_cell_an_ask_is_refused(shell, ns, module_runner, greeting):
    # The thread's results live in a module of the runner kernel, which no value sync touches.
    result, cap = remote(
        shell,
        module_runner.url,
        ASK + "import sys, threading, types\n"
        "box = sys.modules.setdefault('box', types.ModuleType('box'))\n"
        "box.gate = threading.Event()\n"
        "def later():\n"
        "    box.gate.wait(); box.r = ask('greeting', 'hello')\n"
        "threading.Thread(target=later, daemon=True).start()",
    )
    assert result.success, cap.stdout + cap.stderr
    result, cap = remote(shell, module_runner.url, "import sys\nsys.modules['box'].gate.set()")
    assert result.success
    result, cap = remote(
        shell,
        module_runner.url,
        "import sys, time\nbox = sys.modules['box']\n"
        "while not hasattr(box, 'r'): time.sleep(0.01)\n"
        "r = (box.r.status, box.r.message)",
    )
    assert result.success, cap.stdout + cap.stderr
    # It ran between the cells (refused) or during one (answered): never lost, never stuck.
    assert ns["r"] in (
        ("refused", "no cell is running: the notebook side answers only while one runs"),
        ("found", ""),
    )


def test_an_interrupted_ask_leaves_the_session_working(shell, ns, module_runner):
    from didomagic.api import default_pool

    asked, release = threading.Event(), threading.Event()

    def slow(request):
        asked.set()
        release.wait(timeout=30)
        return Reply.found(b"late")

    def interrupt_once_asked() -> None:
        asked.wait(timeout=30)
        default_pool().session(module_runner.url).cancel()  # the stop button
        release.set()

    register_handler("slow", slow)
    helper = threading.Thread(target=interrupt_once_asked)
    try:
        helper.start()
        result, cap = remote(shell, module_runner.url, ASK + "ask('slow', 'x')")
        helper.join()
        assert not result.success
        assert "KeyboardInterrupt" in cap.stdout + cap.stderr + repr(result.error_in_exec)
        result, cap = remote(shell, module_runner.url, ASK + "y = bytes(ask('slow', 'x').parts[0])")
        assert result.success, cap.stdout + cap.stderr
        assert ns["y"] == b"late"
    finally:
        release.set()
        unregister_handler("slow")


def test_asks_through_a_mediator(shell, ns, runner_factory, tmp_path, greeting):
    mediator = start_mediator(tmp_path / "mediator")
    try:
        runner_factory("--mediator", mediator.runner_url, name="relayed")
        wait_until(lambda: "registered" in mediator.log, "the runner registered")
        result, cap = remote(
            shell,
            mediator.url,
            ASK + "r = ask('greeting', 'big')\nsizes = [len(p) for p in r.parts]",
        )
        assert result.success, cap.stdout + cap.stderr
        assert ns["sizes"] == [256 * 8192, 1 << 20]
    finally:
        mediator.stop()


def test_asks_under_bwrap_without_network(shell, ns, runner_factory, greeting):
    from runner.sandbox import probe_bwrap, probe_network

    from .conftest import skip_missing

    if probe_bwrap() is not None or probe_network() is not None:
        skip_missing(f"bwrap or network namespaces: {probe_bwrap() or probe_network()}")
    runner = runner_factory("--sandbox", "bwrap", "--no-network", name="boxed")
    result, cap = remote(
        shell, runner.url, ASK + "r = ask('greeting', 'hello')\ngot = bytes(r.parts[1])"
    )
    assert result.success, cap.stdout + cap.stderr
    assert ns["got"] == b"there"


def test_garbage_on_the_socket_drops_that_connection_only(shell, ns, module_runner, greeting):
    result, cap = remote(
        shell,
        module_runner.url,
        ASK + "import socket, struct\nfrom runner import asking\n"
        "bad = []\n"
        "for junk in (b'\\xff\\xff\\xff\\xff', struct.pack('>I', 4) + b'[1]]',"
        " struct.pack('>I', 2) + b'[]', asking.frame({'resource': 1})):\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(asking._socket_path)\n"
        "    s.sendall(junk); s.settimeout(10)\n"
        "    bad.append(s.recv(1 << 16)); s.close()\n"
        "r = bytes(ask('greeting', 'hello').parts[1])",
    )
    assert result.success, cap.stdout + cap.stderr
    first, second, third, fourth = ns["bad"]
    assert first == second == third == b""  # closed at once
    assert b"refused" in fourth and b"resource and a name" in fourth
    assert ns["r"] == b"there"
