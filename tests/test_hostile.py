"""Hostile and broken input against a real runner (and mediator), one real connection per case.

Each case asserts three things: the sender gets a clear error, a legitimate
client still runs a cell afterwards, and nothing leaked: the runner has as
many kernels, open file descriptors and scratch directories as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from didomagic import api
from didomagic.client import dial, open_connection
from didomagic.errors import AuthenticationFailed, FingerprintMismatch
from didomagic.loop import background_loop
from didomagic.protocol import (
    PROTOCOL_VERSION,
    Execute,
    Hello,
    Session,
    ValueHeader,
    cloudpickle_version,
    encode,
    python_version,
)
from didomagic.urls import ConnectionURL

from .conftest import (
    TIMEOUT,
    RunnerProcess,
    kernel_count,
    rss,
    start_mediator,
    start_runner,
    wait_until,
)

# --------------------------------------------------------------------------- what leaks


def footprint(runner: RunnerProcess) -> tuple[int, int, int]:
    """(kernel processes, open descriptors, kernel directories) of a runner now."""
    pid = runner.process.pid
    kernels = kernel_count(pid)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    dirs = 0
    for parent in (Path("/tmp"), Path("/dev/shm")):
        for work in parent.glob(f"didomagic-runner-{pid}-*"):
            dirs += sum(1 for p in work.iterdir() if p.is_dir())
    return kernels, fds, dirs


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunnerProcess]:
    runner = start_runner(
        tmp_path_factory.mktemp("hostile"),
        "--name",
        "target",
        "--handshake-timeout",
        "1",
        "--max-message-size",
        "64M",
        "--max-output",
        "200000",
    )
    url = ConnectionURL.parse(runner.url)
    legit_cell(url)  # first use opens what a runner keeps open for good
    start = settled(runner)
    yield runner
    end = settled(runner)
    assert end[1] <= start[1] + FD_SLACK, f"descriptors grew over the module: {start} -> {end}"
    assert runner.stop() == 0, runner.log


FD_SLACK = 8
"""Descriptors a runner's libraries may open or close lazily between two counts (ZMQ, TLS)."""


def settled(runner: RunnerProcess) -> tuple[int, int, int]:
    """The footprint once every session has closed and only the warm kernel is left."""

    def quiet() -> tuple[int, int, int] | None:
        log = runner.log
        now = footprint(runner)
        if log.count(" opened from ") != log.count(" closed\n") or now[0] != 1:
            return None
        return now if now[2] == 3 and footprint(runner) == now else None  # home, private, cache

    return wait_until(quiet, "the runner to settle: one warm kernel, no session")  # type: ignore[return-value]


@pytest.fixture
def case(target: RunnerProcess) -> Iterator[ConnectionURL]:
    """Count before; after the case, a legitimate cell runs and the counts come back."""
    url = ConnectionURL.parse(target.url)
    before = settled(target)
    yield url
    assert legit_cell(url) == 42, "a legitimate client could not run a cell afterwards"
    after = settled(target)
    assert after[0] == before[0] and after[2] == before[2], f"leaked: {before} -> {after}"
    assert after[1] <= before[1] + FD_SLACK, f"descriptors leaked: {before} -> {after}"
    assert target.process.poll() is None


def legit_cell(url: ConnectionURL) -> object:
    pool = api.SessionPool()
    try:
        ns: dict[str, object] = {"a": 40}
        api.run_cell(api.CellSpec("b = a + 2"), ns, runner=str(url), pool=pool)
        return ns["b"]
    finally:
        pool.close()


def run(coro):  # type: ignore[no-untyped-def]
    return background_loop().run(coro)


def hello(**changes: object) -> dict[str, object]:
    body = json.loads(encode(Hello(PROTOCOL_VERSION, python_version(), cloudpickle_version())))
    body.update(changes)
    return body


async def _exchange(url: ConnectionURL, *frames: str | bytes) -> tuple[list[str], int | None]:
    """Send raw frames on an authenticated connection; return what came back and the close."""
    ws = await dial(url)
    with contextlib.suppress(ConnectionClosed):
        for frame in frames:
            await ws.send(frame)
    replies = await _drain(ws)
    await ws.wait_closed()
    return replies, ws.close_code


async def _drain(ws: object) -> list[str]:
    """The text frames a peer sends until it closes the connection."""
    replies: list[str] = []
    with contextlib.suppress(ConnectionClosed):
        async for reply in ws:  # type: ignore[attr-defined]
            if isinstance(reply, str):
                replies.append(reply)
    return replies


def error_of(replies: list[str]) -> dict[str, object]:
    assert replies, "the runner closed without saying why"
    body = json.loads(replies[-1])
    assert body["type"] == "error", body
    return body


# --------------------------------------------------------------------------- malformed messages


@pytest.mark.parametrize(
    ("frame", "complaint"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2, 3]", "must be a JSON object"),
        (json.dumps({"type": "launch-missiles"}), "unknown message type"),
        (json.dumps({"type": "hello"}), "missing"),
        (json.dumps(hello(protocol="two")), "protocol"),
        (json.dumps(hello(tags="gpu")), "tags"),
        (json.dumps({"type": "execute", "cell": "c", "code": "x"}), "not allowed in state 'hello'"),
        (b"\x00binary first", "expected a hello text message first"),
    ],
    ids=[
        "not-json",
        "not-object",
        "unknown-type",
        "missing-fields",
        "wrong-type",
        "wrong-container",
        "out-of-order",
        "binary-first",
    ],
)
def test_malformed_first_messages_get_a_clear_protocol_error(case, frame, complaint):
    replies, code = run(_exchange(case, frame))
    error = error_of(replies)
    assert error["code"] == "protocol" and complaint in str(error["message"]), error
    assert code == 1008


def test_a_wrong_protocol_version_names_both_sides(case):
    replies, _ = run(_exchange(case, json.dumps(hello(protocol=PROTOCOL_VERSION + 7))))
    error = error_of(replies)
    assert error["code"] == "version"
    assert f"protocol {PROTOCOL_VERSION}" in str(error["message"])
    assert f"protocol {PROTOCOL_VERSION + 7}" in str(error["message"])


def test_a_message_over_the_size_limit_closes_with_1009(case):
    huge = json.dumps(hello(client="x" * (17 << 20)))
    _, code = run(_exchange(case, huge))
    assert code == 1009  # "message too big", before it is parsed


def test_a_compressed_frame_is_refused(case):
    """A deflate bomb: 1 KiB on the wire, 100 MiB inflated, sent without negotiation."""

    async def bomb() -> int | None:
        ws = await dial(case)
        payload = zlib.compress(b"\x00" * (100 << 20))[2:-4]
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        header = bytes([0xC1, 0x80 | 127]) + struct.pack("!Q", len(payload)) + mask
        ws.transport.write(header + masked)  # FIN + RSV1 (compressed) + text, masked
        await ws.wait_closed()
        return ws.close_code

    assert run(bomb()) == 1002  # protocol error: no extension was negotiated


# --------------------------------------------------------------------------- values


async def _session(url: ConnectionURL) -> tuple[object, Session]:
    connection = await open_connection(url)
    return connection.ws, connection.session


def _send_cell(url: ConnectionURL, request: Execute, payloads: list[bytes]) -> list[str]:
    async def go() -> list[str]:
        ws, session = await _session(url)
        replies: list[str] = []
        await ws.send(session.send(request))
        for frame in session.frames([[memoryview(p)] for p in payloads]):
            await ws.send(frame)
        try:
            async for reply in ws:
                if isinstance(reply, str):
                    replies.append(reply)
                    if json.loads(reply)["type"] == "result":
                        break
        except Exception:
            pass
        await ws.close()
        return replies

    return run(go())


def test_a_blob_that_does_not_match_its_digest_is_refused(case):
    data = os.urandom(2 << 20)
    header = ValueHeader("x", (len(data),), digest="0" * 32)
    replies = _send_cell(case, Execute("c1", "y = len(x)", values=(header,), fetch=("y",)), [data])
    error = error_of(replies)
    assert "do not match the digest it was declared with" in str(error["message"])


def test_a_declared_size_over_the_limit_is_refused_before_allocating(case, target):
    header = ValueHeader("x", (1 << 40,))  # a terabyte, declared

    async def go() -> list[str]:
        ws, session = await _session(case)
        await ws.send(session.send(Execute("c2", "pass", values=(header,))))
        return await _drain(ws)

    rss_before = rss(target.process.pid)
    error = error_of(run(go()))
    assert "1 TiB of values" in str(error["message"]) and "--max-message-size" in str(
        error["message"]
    )
    assert rss(target.process.pid) < rss_before + (50 << 20)


def _cell_result(url: ConnectionURL, payload: bytes) -> dict[str, object]:
    header = ValueHeader("x", (len(payload),))
    replies = _send_cell(url, Execute("c3", "z = 1", values=(header,), fetch=("z",)), [payload])
    result = json.loads(replies[-1])
    assert result["type"] == "result", result
    return result


def test_a_truncated_pickle_is_reported_and_the_cell_still_runs(case):
    import pickle

    result = _cell_result(case, pickle.dumps(list(range(1000)), protocol=5)[:-40])
    reason = result["failures"]["x"]
    assert "could not be unpickled" in reason and "on the runner: Python" in reason
    assert result["status"] == "ok"


def test_a_pickle_from_another_python_names_both_versions(case):
    # What Python 3.13 writes for a pathlib.PosixPath: a module 3.11 does not have.
    payload = b"\x80\x05\x8c\x0epathlib._local\x94\x8c\tPosixPath\x94\x93\x94."
    reason = _cell_result(case, payload)["failures"]["x"]
    assert "pathlib._local" in reason
    assert f"on the runner: Python {python_version()}" in reason
    assert f"the client pickled it with Python {python_version()}" in reason


def test_an_output_flood_is_cut_and_the_client_keeps_its_memory(case):
    pool = api.SessionPool()
    try:
        ns: dict[str, object] = {}
        api.run_cell(
            api.CellSpec("for i in range(50000):\n    print('y' * 200)\nflooded = i"),
            ns,
            runner=str(case),
            pool=pool,
        )
        assert ns["flooded"] == 49999
    finally:
        pool.close()


# --------------------------------------------------------------------------- before the handshake


def test_a_slow_handshake_is_closed_at_the_timeout(case):
    started = time.monotonic()
    with socket.create_connection((case.host, case.port)) as raw:  # TCP, then silence
        raw.settimeout(TIMEOUT)
        assert raw.recv(1) == b""
    plain = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    plain.check_hostname, plain.verify_mode = False, ssl.CERT_NONE
    raw = socket.create_connection((case.host, case.port))
    with plain.wrap_socket(raw) as tls:  # TLS, then a request that never ends
        tls.settimeout(TIMEOUT)
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert tls.recv(1) in (b"", b"H")  # closed (or a 4xx/5xx and closed)
    assert time.monotonic() - started < 10  # --handshake-timeout 1, twice, plus slack


def test_a_connection_flood_is_shed_and_memory_stays_bounded(case, target):
    rss_before = rss(target.process.pid)
    flood = [socket.create_connection((case.host, case.port)) for _ in range(200)]
    try:
        assert legit_cell(case) == 42  # served while 200 silent connections are open
        assert rss(target.process.pid) < rss_before + (100 << 20)
        for raw in flood:
            raw.settimeout(TIMEOUT)
            assert raw.recv(1) == b""  # each closed by the handshake timeout
    finally:
        for raw in flood:
            raw.close()


def test_a_wrong_or_empty_token_never_touches_a_kernel(case, target):
    kernels = footprint(target)[0]
    for token in ("wrong-token-zqx", ""):
        bad = ConnectionURL(case.host, case.port, token or " ", case.fingerprint)
        with pytest.raises(AuthenticationFailed):
            run(dial(bad))
    assert footprint(target)[0] == kernels
    assert "wrong-token-zqx" not in target.log


# --------------------------------------------------------------------------- an impostor


class Impostor:
    """A TLS server with its own certificate on a free port that records every byte it gets."""

    def __init__(self, tmp: Path) -> None:
        from runner import certs

        certfile, keyfile, _ = certs.generate(tmp, ["127.0.0.1"])
        self.context = certs.server_context(certfile, keyfile)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    tls.settimeout(2)
                    while chunk := tls.recv(65536):
                        self.received += chunk
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.listener.close()


def test_an_impostor_gets_neither_the_token_nor_any_value(case, tmp_path):
    impostor = Impostor(tmp_path)
    try:
        lured = ConnectionURL("127.0.0.1", impostor.port, case.token, case.fingerprint)
        pool = api.SessionPool()
        secret_value = "the notebook's secret value"
        with pytest.raises(FingerprintMismatch):
            api.run_cell(api.CellSpec("y = x"), {"x": secret_value}, runner=str(lured), pool=pool)
        pool.close()
        assert impostor.connections >= 1  # it was reached, and heard nothing
        assert case.token.encode() not in impostor.received
        assert secret_value.encode() not in impostor.received
        assert bytes(impostor.received) == b""
    finally:
        impostor.close()


# --------------------------------------------------------------------------- the mediator


def test_the_mediator_answers_hostile_input_clearly_and_keeps_serving(tmp_path):
    mediator = start_mediator(tmp_path / "m")
    runner = start_runner(tmp_path / "r", "--name", "behind", "--mediator", mediator.runner_url)
    try:
        client = ConnectionURL.parse(mediator.url)
        runner_side = ConnectionURL.parse(mediator.runner_url)
        wait_until(lambda: "registered" in runner.log, "the runner to join")
        for url, path in ((client, ""), (client, "jobs"), (runner_side, "register")):

            async def hostile(url: ConnectionURL = url, path: str = "") -> list[str]:
                ws = await dial(url, path)
                await ws.send("{not json")
                return await _drain(ws)

            error = error_of(run(hostile(url, path)))
            assert "not valid JSON" in str(error["message"]), (path, error)
        assert legit_cell(client) == 42
        assert mediator.process.poll() is None and runner.process.poll() is None
    finally:
        assert runner.stop() == 0, runner.log
        assert mediator.stop() == 0, mediator.log
