"""Hostile input, round 2: paths, descriptors, half-open work, the jobs channel, fuzzing.

Each case follows ``tests/test_hostile.py``: a real runner (or mediator), a
real connection per case, and through the ``case`` fixture a legitimate cell
afterwards with the runner's kernels, descriptors and directories counted
before and after.
"""

# ruff: noqa: F811 - the `case` and `target` fixtures come from test_hostile, by import

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from didomagic import detached, eventloops, serialize
from didomagic.client import open_connection, query
from didomagic.errors import ConnectionLost, ProtocolError, RunnerBusy
from didomagic.loop import background_loop
from didomagic.protocol import (
    DIGEST_LENGTH,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Channel,
    Execute,
    Hello,
    Link,
    ListJobs,
    Load,
    Message,
    Register,
    Result,
    Role,
    Session,
    Status,
    Submit,
    ValueHeader,
    Welcome,
    cloudpickle_version,
    decode,
    encode,
    python_version,
)
from didomagic.urls import ConnectionURL

from .conftest import TIMEOUT, RunnerProcess, rss, start_mediator, wait_until
from .test_hostile import (  # noqa: F401 - fixtures shared with the first round
    _drain,
    _exchange,
    case,
    error_of,
    footprint,
    hello,
    legit_cell,
    run,
    target,
)

# --------------------------------------------------------------------------- helpers


def work_dirs(runner: RunnerProcess) -> list[Path]:
    """The runner's work roots (scratch under /tmp, private under /dev/shm)."""
    pid = runner.process.pid
    return [
        work
        for parent in (Path("/tmp"), Path("/dev/shm"))
        for work in parent.glob(f"didomagic-runner-{pid}-*")
    ]


def fd_count(runner: RunnerProcess) -> int:
    """Open descriptors of the runner process."""
    return len(os.listdir(f"/proc/{runner.process.pid}/fd"))


def digest_of(payload: bytes) -> str:
    """The digest a client declares for a one-part value."""
    digester = serialize.Digester((len(payload),))
    digester.update(payload)
    return digester.hexdigest()


def raw_execute(cell: str, code: str, values: list[dict[str, object]]) -> str:
    """An execute message as JSON, with value headers exactly as given (no validation)."""
    return json.dumps({"type": "execute", "cell": cell, "code": code, "values": values})


# --------------------------------------------------------------------------- 1. paths


@pytest.mark.parametrize(
    "digest",
    ["../x", "/abs/path", "A" * 32, "0" * 31, "0" * 33, "g" * 32, "0" * 30 + "/x"],
    ids=["dotdot", "absolute", "upper-case", "short", "long", "not-hex", "slash"],
)
def test_a_digest_that_is_not_the_hash_form_is_a_protocol_error(digest):
    body = raw_execute("c", "pass", [{"name": "x", "sizes": [3], "digest": digest}])
    with pytest.raises(ProtocolError, match="digest"):
        decode(body)
    made = digest_of(b"abc")  # the form is exactly what the client's digester writes
    assert len(made) == DIGEST_LENGTH and made == made.lower()
    good = raw_execute("c", "pass", [{"name": "x", "sizes": [3], "digest": made}])
    assert decode(good).values[0].digest == made  # type: ignore[attr-defined]


@pytest.mark.parametrize("escape", ["../escaped", "absolute"])
def test_a_path_as_digest_is_refused_and_creates_nothing_outside_the_cache(
    case, target, tmp_path, escape
):
    digest = str(tmp_path / "planted") if escape == "absolute" else escape
    payload = os.urandom(2 << 20)
    created: list[Path] = []

    def outside() -> list[Path]:
        found = list(tmp_path.glob("planted*"))
        for work in work_dirs(target):
            found += work.glob("escaped*")
        return found

    async def go() -> list[str]:
        connection = await open_connection(case)
        ws = connection.ws
        with contextlib.suppress(ConnectionClosed):
            header = {"name": "x", "sizes": [len(payload)], "digest": digest}
            await ws.send(raw_execute("c1", "pass", [header]))
            await ws.send(payload[: 1 << 20])  # half of it: the runner now waits for the rest
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.wait_closed(), 1.0)
            created.extend(outside())  # while the upload is still open (before the fix)
        if created:
            await ws.close()
        return await _drain(ws)

    replies = run(go())
    assert not created, f"the upload created {created}"
    error = error_of(replies)
    assert error["code"] == "protocol" and "digest" in str(error["message"]), error
    assert not outside()


PLANT = """
import glob, os
planted = []
for cache in glob.glob('/dev/shm/didomagic-runner-{pid}-*/*-cache') + glob.glob(
    '/tmp/didomagic-runner-{pid}-*/*/cache'
):
    path = os.path.join(cache, '{digest}.bin.part-0')
    if {fifo}:
        os.mkfifo(path)
    else:
        os.symlink({victim!r}, path)
    planted.append(path)
"""


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_planted_symlink_or_fifo_in_the_cache_is_not_written_through(
    case, target, tmp_path, kind
):
    victim = tmp_path / "victim.txt"
    victim.write_text("the runner user's file")
    payload = os.urandom(2 << 20)
    digest = digest_of(payload)
    plant = PLANT.format(
        pid=target.process.pid, digest=digest, fifo=kind == "fifo", victim=str(victim)
    )
    planted: list[str] = []
    served = threading.Event()

    async def go() -> list[str]:
        connection = await open_connection(case)  # raw messages: no reader task, so the
        session, ws = connection.session, connection.ws  # test reads the websocket itself
        await ws.send(session.send(Execute("c1", plant + "print('PLANTED', *planted)\n")))
        for text in await _until_answer(ws):
            session.receive(text)  # the session's state follows what the runner sent
            body = json.loads(text)
            if body["type"] == "result":
                assert body["status"] == "ok", body
            elif body["type"] == "output" and body["content"].get("name") == "stdout":
                planted.extend(body["content"]["text"].split()[1:])
        assert planted, "the cell found no cache directory to plant in"
        header = ValueHeader("x", (len(payload),), digest=digest)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(session.send(Execute("c2", "y = len(x)", (header,), ("y",))))
            for frame in session.frames([[memoryview(payload)]]):
                await ws.send(frame)
        replies = await _until_answer(ws)
        await ws.close()
        return replies

    def other_client() -> None:
        assert legit_cell(case) == 42  # the runner serves others while this happens
        served.set()

    future = background_loop().submit(go())
    try:
        replies = future.result(TIMEOUT)
        helper = threading.Thread(target=other_client, daemon=True)
        helper.start()
        helper.join(TIMEOUT)
        assert served.is_set(), "another client could not run a cell meanwhile"
    finally:
        for path in planted:  # a writer blocked on the FIFO gets its reader (before the fix)
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    assert victim.read_bytes() == b"the runner user's file", "the upload wrote through the link"
    error = error_of(replies)
    assert "already exists" in str(error["message"]), error


async def _until_answer(ws: object) -> list[str]:
    """The text frames a peer sends until its result or error (or until it closes)."""
    replies: list[str] = []
    with contextlib.suppress(ConnectionClosed):
        async for reply in ws:  # type: ignore[attr-defined]
            if isinstance(reply, str):
                replies.append(reply)
                if json.loads(reply)["type"] in ("result", "error"):
                    break
    return replies


FIFO_RESULT = """
import os
def _plant(result=None, path=os.path.join({exchange!r}, 'out.bin')):
    if 'z' not in get_ipython().user_ns:  # the next cell: after the agent wrote its values
        return
    if os.path.exists(path):
        os.unlink(path)
    os.mkfifo(path)
get_ipython().events.register('post_run_cell', _plant)
"""


def test_a_fifo_planted_as_the_values_file_does_not_freeze_the_runner(case, target):
    exchange = ""

    async def go() -> Result:
        nonlocal exchange
        connection = await open_connection(case)
        # Where this session's exchange directory is: the agent knows.
        _, buffers = await connection.execute(
            Execute(
                "c1",
                "import runner.agent as _a, gc\n"
                "where = [str(o.exchange) for o in gc.get_objects() if isinstance(o, _a.Agent)][0]",
                fetch=("where",),
            ),
            [],
            lambda output: None,
        )
        exchange = serialize.unpack([bytes(p) for p in buffers[0]])
        await connection.execute(
            Execute("c2", FIFO_RESULT.format(exchange=exchange)), [], lambda output: None
        )
        second, _ = await connection.execute(
            Execute("c3", "z = 1", fetch=("z",)), [], lambda o: None
        )
        await connection.close()
        return second

    future = background_loop().submit(go())
    try:
        second = future.result(TIMEOUT / 2)
    finally:  # a runner blocked reading the FIFO gets its writer (before the fix)
        with contextlib.suppress(OSError):
            os.close(os.open(Path(exchange) / "out.bin", os.O_WRONLY | os.O_NONBLOCK))
    assert second.status is Status.OK
    assert legit_cell(case) == 42
    assert "not a regular file" in target.log


# --------------------------------------------------------------------------- 3. allocations


class FakeRunner:
    """A TLS websocket server that welcomes, then answers a cell with a huge declared result."""

    def __init__(self, tmp: Path, declared: int) -> None:
        from runner import certs

        certfile, keyfile, self.fingerprint = certs.generate(tmp, ["127.0.0.1"])
        self.context = certs.server_context(certfile, keyfile)
        self.declared = declared
        self.result_sent = threading.Event()
        self.release = asyncio.Event()
        self.server = run(self._start())
        self.port = next(iter(self.server.sockets)).getsockname()[1]

    async def _start(self):  # type: ignore[no-untyped-def]
        return await serve(
            self._handle, "127.0.0.1", 0, ssl=self.context, compression=None, max_size=1 << 24
        )

    async def _handle(self, ws) -> None:  # type: ignore[no-untyped-def]
        session = Session(Role.RUNNER)
        session.receive(await ws.recv())
        await ws.send(
            session.send(Welcome(PROTOCOL_VERSION, python_version(), cloudpickle_version(), "s"))
        )
        request = session.receive(await ws.recv())
        values = (ValueHeader("x", (self.declared,)),)
        await ws.send(session.send(Result(request.cell, Status.OK, values)))  # type: ignore[attr-defined]
        self.result_sent.set()
        await self.release.wait()  # ... and never sends a byte of it

    @property
    def url(self) -> ConnectionURL:
        return ConnectionURL("127.0.0.1", self.port, "any-token", self.fingerprint)

    def close(self) -> None:
        background_loop().loop.call_soon_threadsafe(self.release.set)
        self.server.close()


def test_a_huge_declared_result_that_never_arrives_costs_the_client_no_memory(tmp_path):
    fake = FakeRunner(tmp_path, declared=900 << 20)
    before = rss(os.getpid())

    async def go() -> None:
        connection = await open_connection(fake.url)
        await connection.execute(Execute("c", "pass"), [], lambda output: None)

    future = background_loop().submit(go())
    try:
        assert fake.result_sent.wait(TIMEOUT)
        time.sleep(0.2)  # let the client take in the result it was sent
        grown = rss(os.getpid()) - before
        assert grown < 50 << 20, f"the client's memory grew by {grown >> 20} MiB"
    finally:
        fake.close()
    with pytest.raises((ConnectionLost, ProtocolError)):
        future.result(TIMEOUT)


# --------------------------------------------------------------------------- 4. the jobs channel


async def _jobs(url: ConnectionURL, message: object, *frames: bytes) -> dict[str, object]:
    """Send one jobs request (and frames) on a fresh jobs connection; return the answer."""
    connection = await detached._open(url)
    ws = connection.ws
    with contextlib.suppress(ConnectionClosed):
        await ws.send(connection.session.send(message))  # type: ignore[arg-type]
        for frame in frames:
            await ws.send(frame)
    replies = await asyncio.wait_for(_drain_first(ws), TIMEOUT)
    await connection.close()
    return json.loads(replies)


async def _drain_first(ws: object) -> str:
    async for reply in ws:  # type: ignore[attr-defined]
        if isinstance(reply, str):
            return reply
    raise AssertionError("closed without an answer")


@pytest.mark.parametrize("declared", [1 << 40, 12 << 20], ids=["1TiB", "12MiB"])
def test_a_submit_over_the_message_size_limit_is_refused_at_once(runner_factory, declared):
    runner = runner_factory("--max-message-size", "8M")
    url = ConnectionURL.parse(runner.url)
    submit = Submit("req-1", "pass", values=(ValueHeader("x", (declared,)),))
    started = time.monotonic()
    answer = run(_jobs(url, submit))
    assert answer["type"] == "error" and answer["code"] == "bad-request", answer
    assert "--max-message-size" in str(answer["message"])
    assert time.monotonic() - started < TIMEOUT / 3
    assert rss(runner.process.pid) < 1 << 30
    assert legit_cell(url) == 42


def test_list_jobs_with_a_million_ids_is_refused_with_the_cap(runner_factory):
    runner = runner_factory()
    url = ConnectionURL.parse(runner.url)
    started = time.monotonic()
    answer = run(_jobs(url, ListJobs(tuple(str(i) for i in range(1_000_000)))))
    assert answer["type"] == "error" and answer["code"] == "bad-request", answer
    assert "ids" in str(answer["message"]) and "1000" in str(answer["message"])
    assert time.monotonic() - started < 5
    # Up to the cap, one request lists what exists, in one statement.
    assert run(detached.list_async(url, [f"missing-{i}" for i in range(1000)])) == []
    assert legit_cell(url) == 42


def test_the_job_store_works_off_the_event_loop(runner_factory):
    """While SQLite waits for a lock, the runner goes on answering others."""
    runner = runner_factory()
    url = ConnectionURL.parse(runner.url)
    database = runner.state_dir / "jobs" / "jobs.sqlite3"
    wait_until(database.exists, "the job store")
    locker = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN IMMEDIATE")  # the runner's next write waits (5 s busy timeout)
    submitted = background_loop().submit(
        detached.submit_async(url, Submit("req-lock", "x = 1"), [])
    )
    try:
        time.sleep(0.5)  # the submission reaches the runner and waits for the lock
        started = time.monotonic()
        run(query(url))
        assert time.monotonic() - started < 2, "the runner froze while SQLite waited"
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert submitted.result(TIMEOUT)["state"] in ("queued", "running", "done")


# --------------------------------------------------------------------------- 5. descriptors


def test_a_cell_that_declares_values_and_sends_nothing_is_dropped_at_the_upload_timeout(
    runner_factory,
):
    runner = runner_factory("--upload-timeout", "1")
    url = ConnectionURL.parse(runner.url)
    payload = os.urandom(4 << 20)
    header = ValueHeader("x", (len(payload),), digest=digest_of(payload))

    async def go() -> list[str]:
        connection = await open_connection(url)
        ws, session = connection.ws, connection.session
        await ws.send(session.send(Execute("c1", "pass", (header,))))
        await ws.send(payload[: 1 << 20])  # a first frame, then silence
        return await asyncio.wait_for(_drain(ws), TIMEOUT)

    started = time.monotonic()
    error = error_of(run(go()))
    assert "--upload-timeout" in str(error["message"]), error
    assert time.monotonic() - started < TIMEOUT / 3
    for work in work_dirs(runner):
        assert not list(work.glob("cache-*/*.part-*")), "the half-written file was kept"
    assert legit_cell(url) == 42


def test_a_submit_that_sends_nothing_is_dropped_at_the_upload_timeout(runner_factory):
    runner = runner_factory("--upload-timeout", "1")
    url = ConnectionURL.parse(runner.url)
    submit = Submit("req-2", "pass", values=(ValueHeader("x", (1 << 20,)),))
    answer = run(_jobs(url, submit))
    assert answer["type"] == "error" and "--upload-timeout" in str(answer["message"]), answer
    assert not list((runner.state_dir / "jobs" / "incoming").iterdir())


def test_too_many_values_in_one_message_are_refused(case):
    values = [{"name": f"v{i}", "sizes": [1]} for i in range(10_001)]
    replies, _ = run(_exchange(case, json.dumps(hello()), raw_execute("c", "pass", values)))
    error = error_of(replies)
    assert error["code"] == "bad-request" and "--max-values" in str(error["message"]), error


def test_a_thousand_declared_values_hold_no_descriptors(case, target):
    sizes = 32 << 10
    headers = tuple(
        ValueHeader(f"v{i}", (sizes,), digest=f"{i:032x}") for i in range(1000)
    )  # 32 MiB declared, under the target's --max-message-size 64M
    opened = threading.Event()
    release = asyncio.Event()

    async def go() -> None:
        connection = await open_connection(case)
        await connection.ws.send(connection.session.send(Execute("c1", "pass", headers)))
        opened.set()
        await release.wait()
        await connection.close()

    before = fd_count(target)
    future = background_loop().submit(go())
    try:
        assert opened.wait(TIMEOUT)
        time.sleep(0.5)  # the runner has read the declaration
        assert fd_count(target) < before + 50, "declared values hold descriptors"
        assert legit_cell(case) == 42  # others still run cells
    finally:
        background_loop().loop.call_soon_threadsafe(release.set)
        future.result(TIMEOUT)


def test_a_submission_of_a_thousand_values_that_sends_nothing_holds_no_descriptors(
    runner_factory,
):
    runner = runner_factory()
    url = ConnectionURL.parse(runner.url)
    submit = Submit(
        "req-5", "pass", values=tuple(ValueHeader(f"v{i}", (1024,)) for i in range(1000))
    )
    opened = threading.Event()
    release = asyncio.Event()

    async def go() -> None:
        connection = await detached._open(url)
        await connection.ws.send(connection.session.send(submit))
        opened.set()
        await release.wait()
        await connection.close()

    incoming = runner.state_dir / "jobs" / "incoming"
    wait_until(  # its warm kernel's sockets are open before the count starts
        lambda: run(query(url))[0].runners[0]["warm_kernels"] >= 1, "a warm kernel"
    )
    before = fd_count(runner)
    future = background_loop().submit(go())
    try:
        assert opened.wait(TIMEOUT)
        wait_until(  # the runner has read the declaration: its upload directory exists
            lambda: incoming.is_dir() and any(incoming.iterdir()), "the submission's upload"
        )
        assert fd_count(runner) < before + 20, "declared values hold descriptors"
        assert legit_cell(url) == 42
    finally:
        background_loop().loop.call_soon_threadsafe(release.set)
        future.result(TIMEOUT)
    wait_until(lambda: not list(incoming.iterdir()), "the unfinished submission to be removed")


def _lower_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (200, 400))


EVENT_LOOPS = pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
"""Both event loops a runner or mediator may run on (uvloop where installed)."""


def on_loop(loop: str) -> dict[str, str]:
    """The environment that puts a runner or mediator on ``loop``."""
    return {eventloops.DISABLE_ENV: "" if loop == "uvloop" else "1"}


@EVENT_LOOPS
def test_idle_tcp_connections_that_never_finish_tls_do_not_stop_a_client(runner_factory, loop):
    runner = runner_factory(
        "--handshake-timeout", str(TIMEOUT * 2), preexec_fn=_lower_nofile, env=on_loop(loop)
    )
    assert f"(event loop: {loop})" in runner.log
    url = ConnectionURL.parse(runner.url)
    flood: list[socket.socket] = []
    try:
        for _ in range(1100):
            flood.append(socket.create_connection((url.host, url.port)))
        assert legit_cell(url) == 42
    finally:
        for raw in flood:
            raw.close()
    assert legit_cell(url) == 42
    assert "RLIMIT_NOFILE: soft 400 (was 200), hard 400" in runner.log
    assert "connections still in their handshake (--max-handshakes 128)" in runner.log


@EVENT_LOOPS
def test_the_mediator_bounds_connections_and_ends_idle_jobs_connections(tmp_path, loop):
    mediator = start_mediator(
        tmp_path / "m", "--max-connections", "2", "--idle-timeout", "1", env=on_loop(loop)
    )
    try:
        assert f"(event loop: {loop})" in mediator.log
        url = ConnectionURL.parse(mediator.url)

        async def go() -> tuple[list[object], object]:
            first = await detached._open(url)
            second = await detached._open(url)
            try:
                third: object = await detached._open(url)
            except RunnerBusy as exc:
                third = exc
            await asyncio.wait_for(first.ws.wait_closed(), TIMEOUT / 3)  # idle: ended
            await asyncio.wait_for(second.ws.wait_closed(), TIMEOUT / 3)
            reasons = [first.ws.close_reason, second.ws.close_reason]
            return reasons, third

        reasons, third = run(go())
        assert isinstance(third, RunnerBusy) and "--max-connections 2" in str(third)
        assert reasons == ["idle-timeout", "idle-timeout"]
        assert run(detached.list_async(url)) == []  # served again once they are gone
    finally:
        assert mediator.stop() == 0, mediator.log


def test_the_mediator_drops_a_submit_that_sends_nothing(tmp_path):
    mediator = start_mediator(tmp_path / "m", "--upload-timeout", "1", "--max-values", "10")
    try:
        url = ConnectionURL.parse(mediator.url)
        quiet = Submit("req-3", "pass", values=(ValueHeader("x", (1 << 20,)),))
        answer = run(_jobs(url, quiet))
        assert "--upload-timeout" in str(answer["message"]), answer
        many = Submit("req-4", "pass", values=tuple(ValueHeader(f"v{i}", (1,)) for i in range(11)))
        answer = run(_jobs(url, many))
        assert "--max-values" in str(answer["message"]), answer
    finally:
        assert mediator.stop() == 0, mediator.log


# --------------------------------------------------------------------------- 7. malformed input


NESTED = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_is_a_protocol_error_on_every_side():
    shallow = json.dumps({"type": "load", "load": {"x": [[[[]]]]}})
    for role in (Role.CLIENT, Role.RUNNER):
        with pytest.raises(ProtocolError, match="nested"):
            Session(role).receive(NESTED)
    with pytest.raises(ProtocolError, match="nested"):
        Link(Role.MEDIATOR).receive(
            '{"type": "register", "id": "r", "heartbeat": 1, "runner": '
            + '{"a":' * 100
            + "1"
            + "}" * 100
            + "}"
        )
    decode(shallow)  # a few levels are fine


def test_deep_nesting_gets_a_protocol_error_from_the_runner(case):
    nested_hello = json.dumps(hello())[:-1] + ', "tags": ' + NESTED + "}"
    replies, _ = run(_exchange(case, nested_hello))
    error = error_of(replies)
    assert error["code"] == "protocol" and "nested" in str(error["message"]), error


def test_deep_nesting_gets_a_protocol_error_from_the_mediator(tmp_path):
    mediator = start_mediator(tmp_path / "m")
    try:
        url = ConnectionURL.parse(mediator.url)
        for path in ("", "jobs"):

            async def go(path: str = path) -> list[str]:
                from didomagic.client import dial

                ws = await dial(url, path)
                await ws.send(NESTED)
                return await _drain(ws)

            error = error_of(run(go()))
            assert error["code"] == "protocol" and "nested" in str(error["message"]), error
        assert "Traceback" not in mediator.log
    finally:
        assert mediator.stop() == 0, mediator.log


def test_a_binary_frame_while_idle_is_a_protocol_error(case, target):
    async def go() -> list[str]:
        connection = await open_connection(case)
        await connection.ws.send(b"\x00" * 16)
        return await _drain(connection.ws)

    error = error_of(run(go()))
    assert error["code"] == "protocol" and "unexpected binary frame" in str(error["message"])


def test_a_binary_frame_on_an_idle_jobs_connection_is_a_protocol_error(runner_factory):
    url = ConnectionURL.parse(runner_factory().url)

    async def go() -> list[str]:
        connection = await detached._open(url)
        await connection.ws.send(b"\x00" * 16)
        return await _drain(connection.ws)

    error = error_of(run(go()))
    assert error["code"] == "protocol" and "unexpected binary frame" in str(error["message"])


# -- fuzzing: random and mutated messages and frame sequences into the state machines


def _samples() -> list[str]:
    """One valid encoding of (nearly) every message type, to mutate."""
    header = ValueHeader("x", (3, 0), digest="0" * 32)
    messages = [
        Hello(PROTOCOL_VERSION, python_version(), cloudpickle_version(), tags=("gpu",)),
        Welcome(PROTOCOL_VERSION, python_version(), cloudpickle_version(), "s", {"name": "r"}),
        Execute("c", "x = 1", (header,), ("x",), ("y",), 2.0),
        Result("c", Status.OK, (header,), ("y",), {"z": "why"}),
        Submit("r", "pass", (header,)),
        ListJobs(("a", "b")),
        Register("id", {"name": "r"}, 1.0),
        Load({"sessions": 1}),
    ]
    texts = [encode(m) for m in messages]
    for kind in MESSAGE_TYPES:
        texts.append(json.dumps({"type": kind}))
    return texts


SAMPLES = _samples()

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    body = json.loads(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from([*body.keys(), "extra"]))
        if draw(st.booleans()) and key != "type":
            body.pop(key, None)
        else:
            body[key] = draw(_json)
    return json.dumps(body)


@st.composite
def _spliced(draw: st.DrawFn) -> str | bytes:
    text = draw(st.sampled_from(SAMPLES))
    cut = draw(st.integers(0, len(text)))
    junk = draw(st.text(max_size=6))
    return text[:cut] + junk + text[cut + draw(st.integers(0, 4)) :]


_frame = st.one_of(
    st.sampled_from(SAMPLES),
    _mutated(),
    _spliced(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.binary(min_size=1, max_size=8).map(bytes),
    st.builds(lambda depth: "[" * depth + "]" * depth, st.integers(0, 3000)),
)


def _feed(machine: Session | Link, frames: list[str | bytes]) -> None:
    for frame in frames:
        try:
            if isinstance(frame, bytes) and isinstance(machine, Session):
                machine.receive_binary(frame)
            else:
                machine.receive(frame)
        except ProtocolError:
            pass  # the only error a peer's bytes may cause


def _advanced(role: Role, channel: Channel, depth: int) -> Session:
    """A session moved ``depth`` legal steps on, so fuzzed frames reach later states."""
    session = Session(role, channel)
    hello_ = Hello(PROTOCOL_VERSION, python_version(), cloudpickle_version())
    welcome = Welcome(PROTOCOL_VERSION, python_version(), cloudpickle_version(), "s")
    client = role is Role.CLIENT
    steps: list[tuple[bool, Message]] = [(client, hello_), (not client, welcome)]  # (we send, it)
    if client and channel is Channel.CELLS:  # then the cell runs: a result may come
        steps.append((True, Execute("c", "pass")))
    for we_send, message in steps[:depth]:
        if we_send:
            session.send(message)
        else:
            session.receive(encode(message))
    return session


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    role=st.sampled_from([Role.CLIENT, Role.RUNNER]),
    channel=st.sampled_from([Channel.CELLS, Channel.JOBS]),
    depth=st.integers(0, 3),
    frames=st.lists(_frame, max_size=8),
)
def test_fuzzed_frames_into_a_session_raise_only_protocol_errors(role, channel, depth, frames):
    _feed(_advanced(role, channel, depth), frames)


@settings(max_examples=150, deadline=None)
@given(role=st.sampled_from([Role.RUNNER, Role.MEDIATOR]), frames=st.lists(_frame, max_size=8))
def test_fuzzed_frames_into_a_link_raise_only_protocol_errors(role, frames):
    link = Link(role)
    if role is Role.RUNNER:
        link.send(Register("id", {}, 1.0))
    _feed(link, [f for f in frames if isinstance(f, str)])


@pytest.fixture(autouse=True)
def _enough_descriptors() -> Iterator[None]:
    """The flood test opens 1,100 sockets in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    yield
