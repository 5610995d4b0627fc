"""Sessions that outlive their connection: real runners, kernels, and a forwarder the test cuts.

The :class:`Forwarder` sits on loopback between the client and a runner (or a
mediator). ``cut()`` closes both sides of every connection through it, and
until ``restore()`` every new connection is closed as soon as it arrives (and
counted), like a network that is down. Every wait is for an event: an output
arriving, a line in the runner's log, a file a remote cell writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from didomagic import tickets
from didomagic.client import attach, list_sessions
from didomagic.config import client_secret
from didomagic.errors import ConnectionLost, RunnerBusy, SessionEnded
from didomagic.loop import background_loop
from didomagic.progress import TextProgress
from didomagic.protocol import CLIENT_HEADER, Execute, Output, Result
from didomagic.resources import Reply, register_handler, unregister_handler
from didomagic.serialize import unpack
from didomagic.session import RemoteSession
from didomagic.urls import ConnectionURL

from .conftest import TIMEOUT, RunnerProcess, rss, start_mediator, wait_until


class Forwarder:
    """A TCP forwarder on loopback that a test can cut and restore."""

    def __init__(self, target: ConnectionURL) -> None:
        self.target = (target.host, target.port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = ConnectionURL("127.0.0.1", self.port, target.token, target.fingerprint)
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._cut = False
        self.knocked = threading.Event()
        """Set when a connection arrives while the forwarder is cut."""
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self._cut:
                    client.close()
                    self.knocked.set()
                    continue
                upstream = socket.create_connection(self.target)
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        """Close both sides of every connection; refuse new ones until :meth:`restore`."""
        with self._lock:
            self._cut = True
            self.knocked.clear()
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def restore(self) -> None:
        """Let connections through again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        """Stop listening and close everything."""
        self.cut()
        self.listener.close()


@pytest.fixture
def forwarders() -> Iterator[list[Forwarder]]:
    made: list[Forwarder] = []
    yield made
    for forwarder in made:
        forwarder.close()


def forward(forwarders: list[Forwarder], url: str) -> Forwarder:
    forwarder = Forwarder(ConnectionURL.parse(url))
    forwarders.append(forwarder)
    return forwarder


class Cell:
    """One cell run on a thread through a RemoteSession: its outputs, progress and outcome."""

    def __init__(self, session: RemoteSession, code: str, fetch: tuple[str, ...] = ()) -> None:
        self.outputs: list[str] = []
        self.arrived = threading.Condition()
        self.progress = io.StringIO()
        self.result: Result | None = None
        self.values: dict[str, object] = {}
        self.error: BaseException | None = None
        request = Execute(os.urandom(4).hex(), code, fetch=fetch)
        self.thread = threading.Thread(target=self._run, args=(session, request), daemon=True)
        self.thread.start()

    def _run(self, session: RemoteSession, request: Execute) -> None:
        try:
            self.result, buffers = session.execute(
                request, [], self._output, TextProgress(self.progress)
            )
            self.values = {
                v.name: unpack(parts) for v, parts in zip(self.result.values, buffers, strict=True)
            }
        except BaseException as exc:
            self.error = exc

    def _output(self, output: Output) -> None:
        with self.arrived:
            self.outputs.append(str(output.content.get("text", "")))
            self.arrived.notify_all()

    @property
    def text(self) -> str:
        """Every output so far, joined."""
        return "".join(self.outputs)

    def wait_for(self, text: str) -> None:
        """Block until ``text`` has arrived among the outputs."""
        with self.arrived:
            arrived = self.arrived.wait_for(lambda: text in self.text, TIMEOUT)
            assert arrived, (self.text[-300:], self.error, self.progress.getvalue())

    def finish(self) -> None:
        """Block until the cell's thread is done."""
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the cell did not end"


def waiting_cell(tmp_path: Path, name: str) -> tuple[str, Path]:
    """Code that waits for a file the test creates (its cue), and that file."""
    cue = tmp_path / name
    return (
        f"import pathlib, time\nwhile not pathlib.Path({str(cue)!r}).exists():\n"
        "    time.sleep(0.02)\n",
        cue,
    )


def kept(runner: RunnerProcess) -> Callable[[], bool]:
    """A condition: the runner has kept one more session since now."""
    count = runner.log.count("connection lost; kept")
    return lambda: runner.log.count("connection lost; kept") > count


def test_output_and_values_of_a_running_cell_arrive_after_a_cut(
    runner_factory, forwarders, tmp_path
):
    runner = runner_factory("--session-grace", "60")
    forwarder = forward(forwarders, runner.url)
    session = RemoteSession(forwarder.url)
    first, cue1 = waiting_cell(tmp_path, "cue1")
    second, cue2 = waiting_cell(tmp_path, "cue2")
    wrote = tmp_path / "wrote"
    code = (
        "print('before', flush=True)\nstate = 'kept'\n"
        + first
        + f"print('during', flush=True)\npathlib.Path({str(wrote)!r}).touch()\n"
        + second
        + "print('after', flush=True)\nvalue = 42\n"
    )
    cell = Cell(session, code, fetch=("value",))
    cell.wait_for("before")
    was_kept = kept(runner)
    forwarder.cut()
    wait_until(was_kept, "the runner to keep the session")
    cue1.touch()  # the cell prints while no connection is there
    wait_until(wrote.exists, "the cell to print while disconnected")
    assert forwarder.knocked.wait(TIMEOUT)  # the client is trying to reconnect
    forwarder.restore()
    cell.wait_for("during")  # replayed on reattach
    cue2.touch()
    cell.finish()
    assert cell.error is None, cell.error
    assert cell.values == {"value": 42}
    assert cell.text.split() == ["before", "during", "after"]  # each once, in order
    assert "connection lost; reconnecting (1)…" in cell.progress.getvalue()
    # The next cell runs in the same remote namespace.
    again = Cell(session, "same = state", fetch=("same",))
    again.finish()
    assert again.values == {"same": "kept"}
    session.close()


def test_a_cell_that_finishes_during_a_cut_delivers_on_reattach(
    runner_factory, forwarders, tmp_path
):
    runner = runner_factory("--session-grace", "60")
    forwarder = forward(forwarders, runner.url)
    session = RemoteSession(forwarder.url)
    wait, cue = waiting_cell(tmp_path, "cue")
    cell = Cell(session, "print('one', flush=True)\n" + wait + "print('two')\nx = [1, 2]", ("x",))
    cell.wait_for("one")
    was_kept = kept(runner)
    forwarder.cut()
    wait_until(was_kept, "the runner to keep the session")
    cue.touch()
    wait_until(lambda: " ok in " in runner.log, "the cell to finish on the runner")
    forwarder.restore()
    cell.finish()
    assert cell.error is None, cell.error
    assert cell.values == {"x": [1, 2]} and cell.text.split() == ["one", "two"]
    session.close()


def test_a_cut_longer_than_the_grace_ends_the_session_and_says_so(
    runner_factory, forwarders, tmp_path
):
    runner = runner_factory("--session-grace", "1")
    forwarder = forward(forwarders, runner.url)
    session = RemoteSession(forwarder.url)
    wait, _ = waiting_cell(tmp_path, "never")
    cell = Cell(session, "gone = 1\nprint('started', flush=True)\n" + wait)
    cell.wait_for("started")
    session_id = session.session_id
    forwarder.cut()
    wait_until(lambda: "no client came back within 1 s" in runner.log, "the grace to expire")
    forwarder.restore()
    cell.finish()
    assert isinstance(cell.error, SessionEnded), cell.error
    message = str(cell.error)
    assert "runner r" in message.lower() and "grace period" in message
    assert " UTC" in message and "state are gone" in message
    assert "next cell opens a new session" in message
    assert session_id not in {t.session for t in tickets.load()}  # the ticket is forgotten
    fresh = Cell(session, "fresh = 'gone' not in globals()", ("fresh",))
    fresh.finish()
    assert fresh.values == {"fresh": True}  # a new session: the old state is gone
    session.close()


def test_a_runner_restart_is_named_when_a_client_comes_back(runner_factory, tmp_path):
    runner = runner_factory("--session-grace", "60")
    session = RemoteSession(ConnectionURL.parse(runner.url))
    Cell(session, "x = 1").finish()
    ticket = session.ticket
    assert ticket is not None
    port = ConnectionURL.parse(runner.url).port
    runner.stop()
    again = runner_factory("--port", str(port), "--state-dir", str(runner.state_dir))
    url = ConnectionURL.parse(again.url)
    with pytest.raises(SessionEnded, match=r"Runner r was restarted at .* UTC.*state are gone"):
        background_loop().run(
            attach(url, ticket.session, ticket.ticket, headers={CLIENT_HEADER: client_secret()})
        )


def test_another_client_with_the_token_cannot_attach_list_or_interrupt(
    runner_factory, forwarders, tmp_path
):
    runner = runner_factory("--session-grace", "60")
    forwarder = forward(forwarders, runner.url)
    session = RemoteSession(forwarder.url)
    wait, cue = waiting_cell(tmp_path, "cue")
    cell = Cell(session, "secret = 's3cret'\nprint('up', flush=True)\n" + wait + "done = 1")
    cell.wait_for("up")
    ticket = session.ticket
    assert ticket is not None
    was_kept = kept(runner)
    forwarder.cut()
    wait_until(was_kept, "the runner to keep the session")
    direct = ConnectionURL.parse(runner.url)  # the same token, not through the forwarder
    mine = {CLIENT_HEADER: client_secret()}
    stranger = {CLIENT_HEADER: "another client's secret"}
    loop = background_loop()
    for headers, presented in ((stranger, ticket.ticket), (stranger, ""), (mine, "wrong")):
        with pytest.raises(SessionEnded, match="holds no session") as info:
            loop.run(attach(direct, ticket.session, presented, "c", 0, headers))
        assert "s3cret" not in str(info.value)
    assert loop.run(list_sessions(direct, stranger)) == ()
    assert loop.run(list_sessions(direct, {})) == ()
    listed = loop.run(list_sessions(direct, mine))
    assert [s["id"] for s in listed] == [ticket.session] and not listed[0]["attached"]
    forwarder.restore()  # the owner still gets it back, untouched
    cue.touch()
    cell.finish()
    assert cell.error is None and cell.result is not None
    assert cell.result.status.value == "ok"
    session.close()


def test_the_ticket_file_is_private_and_a_close_on_purpose_ends_the_session_at_once(
    runner_factory,
):
    runner = runner_factory("--max-sessions", "1", "--session-grace", "600")
    url = ConnectionURL.parse(runner.url)
    session = RemoteSession(url)
    Cell(session, "x = 1").finish()
    path = tickets.tickets_path()
    assert path.parent == Path(os.environ["DIDOMAGIC_CONFIG"]).parent
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    body = json.loads(path.read_text())
    session_id = session.session_id
    assert session_id in {t["session"] for t in body["sessions"]}
    session.close()
    assert session.session_id == "" and session_id not in path.read_text()
    other = RemoteSession(url)
    done = Cell(other, "y = 2", ("y",))  # the one slot is free again at once
    done.finish()
    assert done.values == {"y": 2}
    other.close()


def test_a_kept_session_counts_against_max_sessions(runner_factory, forwarders, tmp_path):
    runner = runner_factory("--max-sessions", "1", "--session-grace", "60")
    forwarder = forward(forwarders, runner.url)
    session = RemoteSession(forwarder.url)
    Cell(session, "held = 1").finish()
    was_kept = kept(runner)
    forwarder.cut()
    wait_until(was_kept, "the runner to keep the session")
    other = RemoteSession(ConnectionURL.parse(runner.url))
    busy = Cell(other, "x = 1")
    busy.finish()
    assert isinstance(busy.error, RunnerBusy), busy.error
    forwarder.restore()
    back = Cell(session, "still = held", ("still",))
    back.finish()
    assert back.values == {"still": 1}
    session.close()
    free = Cell(other, "x = 1")
    free.finish()
    assert free.error is None, free.error
    other.close()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_memory_and_descriptors_stay_flat_while_sessions_wait(runner_factory, forwarders):
    runner = runner_factory("--session-grace", "600", "--max-sessions", "4")
    forwarder = forward(forwarders, runner.url)
    sessions = [RemoteSession(forwarder.url) for _ in range(3)]
    for session in sessions:
        Cell(session, "import numpy\nblob = numpy.ones(10)").finish()
    count = runner.log.count("connection lost; kept")
    forwarder.cut()
    wait_until(
        lambda: runner.log.count("connection lost; kept") >= count + 3, "all three to be kept"
    )
    pid = runner.process.pid
    fds, memory = _fds(pid), rss(pid)
    # An observation window, not a synchronisation: nothing may grow meanwhile.
    deadline = time.monotonic() + 3.0
    most_fds, most_memory = fds, memory
    while time.monotonic() < deadline:
        most_fds, most_memory = max(most_fds, _fds(pid)), max(most_memory, rss(pid))
        time.sleep(0.1)
    assert most_fds <= fds, (fds, most_fds)
    assert most_memory - memory < 2 << 20, (memory, most_memory)
    forwarder.restore()
    for session in sessions:
        back = Cell(session, "n = int(blob.sum())", ("n",))
        back.finish()
        assert back.values == {"n": 10}
        session.close()


def test_through_a_mediator_the_relay_reattaches_to_the_same_runner(
    runner_factory, forwarders, tmp_path
):
    from didomagic.client import Requirements, query

    mediator = start_mediator(tmp_path / "mediator")
    try:
        runner_factory(
            "--mediator", mediator.runner_url, "--heartbeat", "0.3", "--session-grace", "60"
        )
        runner_factory("--mediator", mediator.runner_url, "--heartbeat", "0.3", name="s")

        def both_up() -> bool:
            info, _ = background_loop().run(query(ConnectionURL.parse(mediator.url)))
            return sum(d.get("status") == "up" for d in info.runners) == 2

        wait_until(both_up, "both runners up at the mediator")
        forwarder = forward(forwarders, mediator.url)
        session = RemoteSession(forwarder.url, Requirements(runner="r"))
        wait, cue = waiting_cell(tmp_path, "cue")
        code = "import os\nprint('on', os.environ['DIDOMAGIC_RUNNER_NAME'], flush=True)\n"
        cell = Cell(
            session,
            code + wait + "print('back')\nwhere = os.environ['DIDOMAGIC_RUNNER_NAME']",
            ("where",),
        )
        cell.wait_for("on r")
        forwarder.cut()
        assert forwarder.knocked.wait(TIMEOUT)
        forwarder.restore()
        listed = background_loop().run(
            list_sessions(ConnectionURL.parse(mediator.url), {CLIENT_HEADER: client_secret()})
        )
        assert session.session_id in [s["id"] for s in listed]
        cue.touch()
        cell.finish()
        assert cell.error is None, cell.error
        assert cell.values == {"where": "r"} and "back" in cell.text
        session.close()
    finally:
        assert mediator.stop() == 0, mediator.log


def test_a_runner_that_is_gone_ends_the_cell_with_connection_lost(runner_factory, tmp_path):
    runner = runner_factory("--session-grace", "60")
    session = RemoteSession(ConnectionURL.parse(runner.url))
    wait, _ = waiting_cell(tmp_path, "never")
    cell = Cell(session, "print('started', flush=True)\n" + wait)
    cell.wait_for("started")
    runner.process.send_signal(signal.SIGKILL)
    cell.finish()
    assert isinstance(cell.error, ConnectionLost)
    assert "it was stopped or restarted" in str(cell.error)


class NotebookKernel:
    """A real notebook kernel (ipykernel through jupyter_client) with its own didomagic config."""

    def __init__(self, config: Path) -> None:
        from jupyter_client import KernelManager

        self.manager = KernelManager(kernel_name="python3")
        env = {**os.environ, "DIDOMAGIC_CONFIG": str(config), "DIDOMAGIC_PROGRESS": "text"}
        self.manager.start_kernel(env=env)
        self.client = self._connect()

    def _connect(self):  # type: ignore[no-untyped-def]
        client = self.manager.client()
        client.start_channels()
        client.wait_for_ready(timeout=TIMEOUT)
        return client

    def run(self, code: str) -> str:
        """Execute ``code``; return everything it showed (streams, results, errors)."""
        shown: list[str] = []

        def hook(message: dict) -> None:  # type: ignore[type-arg]
            content = message["content"]
            if message["msg_type"] == "stream":
                shown.append(content["text"])
            elif message["msg_type"] in ("execute_result", "display_data"):
                shown.append(content["data"].get("text/plain", ""))
            elif message["msg_type"] == "error":
                shown.append(f"{content['ename']}: {content['evalue']}")

        self.client.execute_interactive(code, output_hook=hook, timeout=2 * TIMEOUT)
        return "".join(shown)

    def kill_and_restart(self) -> None:
        """Kill the kernel process (no goodbye to anyone) and start a fresh one.

        (A restart from Jupyter interrupts the kernel first, which interrupts a
        running remote cell, as the stop button does; a dying kernel does not.)
        """
        self.client.stop_channels()
        provisioner = self.manager.provisioner
        assert provisioner is not None and provisioner.pid is not None
        os.kill(provisioner.pid, signal.SIGKILL)
        wait_until(lambda: not self.manager.is_alive(), "the kernel to die")
        self.manager.restart_kernel(now=True)
        self.client = self._connect()

    def shutdown(self) -> None:
        """Shut the kernel down on purpose."""
        self.client.stop_channels()
        self.manager.shutdown_kernel()


def test_a_restarted_notebook_kernel_reattaches_with_remote_attach(runner_factory, tmp_path):
    runner = runner_factory("--session-grace", "120")
    config = tmp_path / "notebook-config" / "config.json"
    kernel = NotebookKernel(config)
    try:
        kernel.run("%load_ext didomagic")
        shown = kernel.run(f"%%remote --runner {runner.url}\nx = 41\nprint('remote x is set')")
        assert "remote x is set" in shown, shown
        held = json.loads(config.with_name("sessions.json").read_text())["sessions"]
        assert (
            len(held) == 1
            and stat.S_IMODE(config.with_name("sessions.json").stat().st_mode) == 0o600
        )
        session_id = held[0]["session"]
        # A long cell is running when the notebook's kernel is killed.
        started, cue = tmp_path / "started", tmp_path / "cue"
        wait, _ = waiting_cell(tmp_path, "cue")
        kernel.client.execute(
            f"%%remote --runner {runner.url}\n"
            f"pathlib_started = __import__('pathlib').Path({str(started)!r})\n"
            "pathlib_started.touch()\n" + wait + "z = x * 2\nprint('finished remotely')"
        )
        wait_until(started.exists, "the long cell to start")
        was_kept = kept(runner)
        kernel.kill_and_restart()
        wait_until(was_kept, "the runner to keep the session of the killed kernel")
        kernel.run("%load_ext didomagic")
        listing = kernel.run("%runners sessions")
        row = next(line for line in listing.splitlines() if session_id in line)
        assert "running, detached" in row and "pathlib_started" in row and " r " in row, listing
        cue.touch()  # it finishes while no notebook is there
        wait_until(lambda: runner.log.count(" ok in ") >= 2, "the cell to finish on the runner")
        shown = kernel.run(f"%remote attach {session_id}")
        assert f"attached session {session_id}" in shown, shown
        assert "finished remotely" in shown  # its output, and its values, arrive here
        assert "82" in kernel.run("print(z)")
        assert "42" in kernel.run("%%remote\ny = x + 1\nprint(y)")  # the same remote namespace
        assert "43" in kernel.run("print(y + 1)")  # and y came back to the notebook
        assert "detached session" in kernel.run("%remote detach")
        assert "41" in kernel.run(f"%%remote --session {session_id}\nprint(x)")
        shown = kernel.run(f"%remote close {session_id}")
        assert f"closed session {session_id}" in shown, shown
        wait_until(lambda: session_id.split(".")[1][:6] + " closed" in runner.log, "the end")
        assert session_id not in kernel.run("%runners sessions")
        assert "unknown command 'bogus'" in kernel.run("%remote bogus")
    finally:
        kernel.shutdown()


def test_a_kernel_shut_down_on_purpose_ends_its_sessions_at_once(runner_factory, tmp_path):
    runner = runner_factory("--session-grace", "600", "--max-sessions", "1")
    kernel = NotebookKernel(tmp_path / "config" / "config.json")
    kernel.run("%load_ext didomagic")
    assert "ok" in kernel.run(f"%%remote --runner {runner.url}\nprint('ok')")
    kernel.shutdown()
    wait_until(lambda: " closed" in runner.log, "the runner to end the session")
    assert "connection lost; kept" not in runner.log


def test_output_beyond_max_output_while_disconnected_drops_the_oldest_with_a_note(
    runner_factory, forwarders, tmp_path
):
    runner = runner_factory("--session-grace", "60", "--max-output", "4000")
    forwarder = forward(forwarders, runner.url)
    session = RemoteSession(forwarder.url)
    first, cue1 = waiting_cell(tmp_path, "cue1")
    second, cue2 = waiting_cell(tmp_path, "cue2")
    wrote = tmp_path / "wrote"
    code = (
        "print('start', flush=True)\n"
        + first
        + "for i in range(300):\n    print(f'line {i}', flush=True)\n"
        + f"pathlib.Path({str(wrote)!r}).touch()\n"
        + second
        + "print('end', flush=True)\n"
    )
    cell = Cell(session, code)
    cell.wait_for("start")
    was_kept = kept(runner)
    forwarder.cut()
    wait_until(was_kept, "the runner to keep the session")
    cue1.touch()
    wait_until(wrote.exists, "the cell to print while disconnected")
    forwarder.restore()
    cell.wait_for("were dropped")
    cue2.touch()
    cell.finish()
    assert cell.error is None, cell.error
    text = cell.text
    assert "line 0\n" not in text  # the oldest went, the newest stayed
    # Lines still on their way from the kernel at the reattach arrive live, and live output
    # is cut at --max-output as always: either way nothing beyond the limit arrives.
    assert "line 299" in text or "(--max-output) was cut here" in text
    assert len(text) < 3 * 4000
    session.close()


def test_a_reattached_cell_can_still_be_interrupted(runner_factory, forwarders, tmp_path):
    runner = runner_factory("--session-grace", "60")
    forwarder = forward(forwarders, runner.url)
    session = RemoteSession(forwarder.url)
    first, cue = waiting_cell(tmp_path, "cue")
    forever, _ = waiting_cell(tmp_path, "never")
    cell = Cell(
        session, "print('up', flush=True)\n" + first + "print('away', flush=True)\n" + forever
    )
    cell.wait_for("up")
    was_kept = kept(runner)
    forwarder.cut()
    wait_until(was_kept, "the runner to keep the session")
    cue.touch()
    assert forwarder.knocked.wait(TIMEOUT)
    forwarder.restore()
    cell.wait_for("away")  # replayed: the client is back in the cell
    session.cancel()  # the stop button
    cell.finish()
    assert cell.error is None and cell.result is not None
    assert cell.result.status.value == "interrupted"
    after = Cell(session, "ok = 1", ("ok",))
    after.finish()
    assert after.values == {"ok": 1}
    session.close()


@pytest.fixture
def greeting() -> Iterator[tuple[list[str], threading.Event]]:
    """A ``greeting`` handler on the notebook side; its first call waits for the event."""
    calls: list[str] = []
    release = threading.Event()

    def serve(request: Any) -> Reply:
        calls.append(request.name)
        if len(calls) == 1:
            release.wait(TIMEOUT)
        return Reply.found(b"hi")

    register_handler("greeting", serve)
    yield calls, release
    unregister_handler("greeting")


ASK = "from runner.asking import ask\n"


def test_an_ask_unanswered_when_the_connection_drops_is_asked_again_on_reattach(
    runner_factory, forwarders, greeting
):
    calls, release = greeting
    runner = runner_factory("--session-grace", "60")
    forwarder = forward(forwarders, runner.url)
    session = RemoteSession(forwarder.url)
    cell = Cell(session, ASK + "got = bytes(ask('greeting', 'hello').parts[0])", ("got",))
    wait_until(lambda: calls, "the kernel's ask to reach the notebook side")
    was_kept = kept(runner)
    forwarder.cut()
    wait_until(was_kept, "the runner to keep the session")
    release.set()  # its answer goes nowhere: that connection is gone
    assert forwarder.knocked.wait(TIMEOUT)
    forwarder.restore()
    cell.finish()
    assert cell.error is None, cell.error
    assert cell.values == {"got": b"hi"}
    assert calls == ["hello", "hello"]  # asked again on the connection that took it back
    session.close()


def test_an_ask_made_while_disconnected_is_sent_on_reattach(
    runner_factory, forwarders, greeting, tmp_path
):
    calls, release = greeting
    release.set()
    runner = runner_factory("--session-grace", "60")
    forwarder = forward(forwarders, runner.url)
    session = RemoteSession(forwarder.url)
    wait, cue = waiting_cell(tmp_path, "cue")
    asking = tmp_path / "asking"
    code = (
        ASK
        + "print('before', flush=True)\n"
        + wait
        + f"pathlib.Path({str(asking)!r}).touch()\n"
        + "got = bytes(ask('greeting', 'hello').parts[0])\n"
    )
    cell = Cell(session, code, ("got",))
    cell.wait_for("before")
    was_kept = kept(runner)
    forwarder.cut()
    wait_until(was_kept, "the runner to keep the session")
    cue.touch()
    wait_until(asking.exists, "the kernel to ask while disconnected")
    forwarder.restore()
    cell.finish()
    assert cell.error is None, cell.error
    assert cell.values == {"got": b"hi"} and calls == ["hello"]
    session.close()
