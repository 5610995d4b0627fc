"""Large values over the runner's bulk port: real runners, real TLS, real kernels.

The bulk port (``runner.bulk``, ``didomagic.bulk``) moves a cell's large values
outside the websocket, admitted by one-time tickets. These tests check that it
is used and moves the right bytes both ways, that a ticket works once, for its
own session only, that garbage and impostors are refused, that a connection
broken either way fails only its cell, and that without it (``--no-bulk``, an
unreachable port, another certificate) the websocket carries the same values.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from didomagic import api, bulk, serialize
from didomagic.api import RemoteSession
from didomagic.client import RunnerConnection, open_connection
from didomagic.errors import ProtocolError, TransferFailed
from didomagic.loop import background_loop
from didomagic.protocol import (
    BULK_MAGIC,
    BULK_MIN,
    BULK_OK,
    BULK_REFUSED,
    PROTOCOL_VERSION,
    BulkClaim,
    BulkTicket,
    Direction,
    Execute,
    Hello,
    Result,
    Role,
    Session,
    State,
    Status,
    ValueHeader,
    Welcome,
    bulk_claim,
    bulk_claim_length,
    parse_bulk_claim,
)
from didomagic.urls import ConnectionURL
from runner import certs
from runner.bulk import MAX_TRANSFERS

from .conftest import TIMEOUT, RunnerProcess, wait_until

SIZE = 64 << 20
"""Bytes of the large value (the benchmark moves 1 GB; this keeps the suite quick)."""


def big(seed: int = 0) -> np.ndarray:
    """SIZE random bytes (incompressible, and a wrong offset anywhere shows)."""
    return np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8)


def run(coroutine: Any) -> Any:
    return background_loop().run(coroutine)


def bulk_lines(runner: RunnerProcess, direction: str) -> int:
    """How many transfers the runner logged as done over its bulk port, ``in`` or ``out``."""
    return runner.log.count(f"bytes {direction} over the bulk port")


# --------------------------------------------------------------------------- the path


def test_a_large_value_goes_in_and_comes_back_over_the_bulk_port(runner_factory):
    runner = runner_factory()
    a = big()
    ns: dict[str, Any] = {"a": a}
    api.run_cell(api.CellSpec("b = a[::-1].copy()\nn = int(a[12345])"), ns, runner=runner.url)
    assert ns["n"] == int(a[12345])
    assert np.array_equal(ns["b"], a[::-1])
    assert bulk_lines(runner, "in") == 1 and bulk_lines(runner, "out") == 1, runner.log
    api.default_pool().close()


def test_a_value_changed_in_place_between_cells_is_sent_again_over_the_bulk_port(
    runner_factory,
):
    runner = runner_factory()
    ns: dict[str, Any] = {"a": big()}
    api.run_cell(api.CellSpec("s = int(a.sum())"), ns, runner=runner.url)
    api.run_cell(api.CellSpec("s = int(a.sum())"), ns, runner=runner.url)  # unchanged: held
    assert bulk_lines(runner, "in") == 1
    ns["a"][SIZE // 2] ^= 0xFF  # in place: same object, same size
    api.run_cell(api.CellSpec("s = int(a.sum())"), ns, runner=runner.url)
    assert ns["s"] == int(ns["a"].sum())
    assert bulk_lines(runner, "in") == 2, runner.log
    api.default_pool().close()


def _mapped_results(pid: int) -> int:
    """Bytes of returned values (``out.bin`` files) the runner process has mapped now."""
    total = 0
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "out.bin" in line:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            total += end - start
    return total


def test_a_large_result_is_unmapped_once_the_next_cell_starts(runner_factory):
    runner = runner_factory()
    ns: dict[str, Any] = {}
    api.run_cell(
        api.CellSpec(f"import numpy as np\nb = np.ones({SIZE // 8})"), ns, runner=runner.url
    )
    assert ns["b"].sum() == SIZE // 8
    assert _mapped_results(runner.process.pid) >= SIZE  # kept until the next cell, to resend
    api.run_cell(api.CellSpec("n = 1"), ns, runner=runner.url)
    assert ns["n"] == 1
    wait_until(lambda: _mapped_results(runner.process.pid) < SIZE, "the result to be unmapped")
    api.run_cell(api.CellSpec("c = b[:10].copy()"), ns, runner=runner.url)  # the session goes on
    assert ns["c"].sum() == 10
    api.default_pool().close()


def test_small_values_keep_to_the_websocket(runner_factory):
    runner = runner_factory()
    ns: dict[str, Any] = {"a": np.ones(1000)}
    api.run_cell(api.CellSpec("b = a * 2"), ns, runner=runner.url)
    assert ns["b"].sum() == 2000
    assert bulk_lines(runner, "in") == 0 and bulk_lines(runner, "out") == 0
    api.default_pool().close()


def test_with_no_bulk_port_the_websocket_carries_the_same_values(runner_factory):
    runner = runner_factory("--no-bulk")
    a = big(1)
    ns: dict[str, Any] = {"a": a}
    api.run_cell(api.CellSpec("b = a[::-1].copy()"), ns, runner=runner.url)
    assert np.array_equal(ns["b"], a[::-1])
    assert "bulk transfers on port" not in runner.log
    connection = run(open_connection(ConnectionURL.parse(runner.url)))
    assert connection.welcome.bulk == 0 and connection.bulk is None
    run(connection.close())
    api.default_pool().close()


# --------------------------------------------------------------------------- no bulk port after all


@pytest.fixture
def impostor(tmp_path: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 with a certificate of its own; its port."""
    certfile, keyfile, _ = certs.generate(tmp_path / "impostor", ["127.0.0.1"])
    context = certs.server_context(certfile, keyfile)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(raw, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass  # the client refused our certificate: what the test wants

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    thread.join(TIMEOUT)


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


@pytest.mark.parametrize("where", ["another certificate", "nothing listening"])
def test_a_bulk_port_that_cannot_be_had_leaves_the_websocket(runner_factory, impostor, where):
    runner = runner_factory()
    session = RemoteSession(ConnectionURL.parse(runner.url))
    session.execute(Execute("w", "x = 1"), [], lambda output: None)
    connection = session._connection
    assert connection is not None and connection.bulk is not None
    port = impostor if where == "another certificate" else _free_port()
    link = bulk.BulkLink("127.0.0.1", port, connection.bulk.context)
    connection.bulk = link  # what the client would meet behind a hijacked or firewalled port
    a = big(2)
    packed = [serialize.pack("a", a)]
    request = Execute("c", "b = a[::-1].copy()", tuple(api._header(p) for p in packed), ("b",))
    result, buffers = session.execute(request, [p.parts for p in packed], lambda output: None)
    assert result.status is Status.OK
    back: dict[str, Any] = {}
    serialize.unpack_into(back, [("b", buffers[0])])
    assert np.array_equal(back["b"], a[::-1])
    assert link.reachable is False
    assert bulk_lines(runner, "in") == 0 and bulk_lines(runner, "out") == 0
    session.close()


# --------------------------------------------------------------------------- tickets


async def _ticketed(
    url: ConnectionURL, cell: str, value: serialize.Packed
) -> tuple[RunnerConnection, BulkTicket, Execute]:
    """A session that declared ``value`` for ``cell`` over the bulk port, and its ticket."""
    connection = await open_connection(url)
    request = Execute(cell, "n = len(a)", (value.header,), bulk_in=True)
    await connection.ws.send(connection.session.send(request))
    ticket = connection.session.receive(await asyncio.wait_for(connection.ws.recv(), TIMEOUT))
    assert isinstance(ticket, BulkTicket) and ticket.cell == cell
    return connection, ticket, request


def _raw_claim(connection: RunnerConnection, data: bytes) -> bytes:
    """Open a bulk connection, send ``data``, return all the runner answers before closing."""
    assert connection.bulk is not None
    tls = connection.bulk.connect()
    assert tls is not None
    with tls:
        tls.sendall(data)
        answer = bytearray()
        while chunk := tls.recv(4096):
            answer += chunk
    return bytes(answer)


async def _result(connection: RunnerConnection) -> Result:
    while True:
        message = connection.session.receive(await asyncio.wait_for(connection.ws.recv(), TIMEOUT))
        if isinstance(message, Result):
            return message


def test_a_ticket_works_once_and_only_for_its_own_session(runner_factory):
    runner = runner_factory()
    url = ConnectionURL.parse(runner.url)
    value = serialize.pack("a", big(3))
    owner, ticket, request = run(_ticketed(url, "c1", value))
    other = run(open_connection(url))
    mine = BulkClaim(ticket.ticket, owner.welcome.session, "c1", Direction.IN)
    theirs = BulkClaim(ticket.ticket, other.welcome.session, "c1", Direction.IN)
    answer = _raw_claim(other, bulk_claim(theirs) + b"x" * 1000)
    assert answer.startswith(BULK_REFUSED) and b"not for this session" in answer
    wrong_way = BulkClaim(ticket.ticket, owner.welcome.session, "c1", Direction.OUT)
    assert _raw_claim(owner, bulk_claim(wrong_way)).startswith(BULK_REFUSED)

    assert owner.bulk is not None
    tls = owner.bulk.connect()
    assert tls is not None
    bulk.send_values(tls, mine, request.values, [value.parts], lambda done, total: None)
    result = run(_result(owner))
    assert result.status is Status.OK, result.error

    replay = _raw_claim(owner, bulk_claim(mine) + b"x" * 1000)  # the same ticket again
    assert replay.startswith(BULK_REFUSED) and b"unknown, used or expired" in replay
    run(owner.close())
    run(other.close())
    assert bulk_lines(runner, "in") == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        BULK_MAGIC + (40).to_bytes(2, "big") + b"{" * 40,
        BULK_MAGIC + b"\x00\x00",
        BULK_MAGIC
        + b"\x00\x50"
        + json.dumps({"ticket": "ab", "session": "s", "cell": "c", "direction": "in"})
        .encode()
        .ljust(80),
        b"\x00" * 6,
    ],
    ids=["http", "bad json", "empty", "short ticket", "zeros"],
)
def test_garbage_on_the_bulk_port_is_refused_and_the_runner_goes_on(runner_factory, garbage):
    runner = runner_factory()
    url = ConnectionURL.parse(runner.url)
    value = serialize.pack("a", big(4))
    owner, ticket, request = run(_ticketed(url, "c1", value))
    answer = _raw_claim(owner, garbage)
    assert answer.startswith(BULK_REFUSED), answer
    assert b"not a bulk claim" in answer
    # the live ticket still works
    assert owner.bulk is not None
    tls = owner.bulk.connect()
    assert tls is not None
    claim = BulkClaim(ticket.ticket, owner.welcome.session, "c1", Direction.IN)
    bulk.send_values(tls, claim, request.values, [value.parts], lambda d, t: None)
    assert run(_result(owner)).status is Status.OK
    run(owner.close())


# --------------------------------------------------------------------------- broken transfers


class _Cut:
    """A bulk connection that breaks after ``limit`` bytes have crossed it (either way)."""

    def __init__(self, tls: ssl.SSLSocket, limit: int) -> None:
        self.tls, self.limit, self.moved = tls, limit, 0

    def sendall(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if self.moved + view.nbytes > self.limit:
            self.tls.sendall(view[: max(0, self.limit - self.moved)])
            self.tls.close()
            raise BrokenPipeError("cut by the test")
        self.moved += view.nbytes
        self.tls.sendall(view)

    def recv_into(self, buffer: Any, nbytes: int = 0) -> int:
        if self.moved >= self.limit:
            self.tls.close()
            return 0
        n = self.tls.recv_into(buffer, min(nbytes or len(buffer), self.limit - self.moved))
        self.moved += n
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tls, name)

    def __enter__(self) -> _Cut:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tls.close()


@pytest.mark.parametrize("direction", ["in", "out"])
def test_a_bulk_connection_cut_mid_transfer_fails_the_cell_and_the_session_goes_on(
    runner_factory, monkeypatch, direction
):
    runner = runner_factory()
    real = bulk.BulkLink.connect

    def cut(self: bulk.BulkLink) -> Any:
        tls = real(self)
        return None if tls is None else _Cut(tls, SIZE // 3)

    a = big(5)
    ns: dict[str, Any] = {"a": a}
    session = RemoteSession(ConnectionURL.parse(runner.url))
    api.run_cell(api.CellSpec("x = 1"), ns, session=session)
    link = session._connection.bulk if session._connection else None
    assert link is not None
    wait_until(lambda: link.reachable, "the bulk port probed")
    if direction == "out":
        api.run_cell(api.CellSpec("n = len(a)"), ns, session=session)  # (sent whole)
    monkeypatch.setattr(bulk.BulkLink, "connect", cut)
    code = "n = len(a)" if direction == "in" else "b = a[::-1].copy()"
    with pytest.raises(TransferFailed, match="bulk connection"):
        api.run_cell(api.CellSpec(code), ns, session=session)
    wait_until(
        lambda: "bulk upload failed" in runner.log or "bulk download failed" in runner.log,
        "the runner saw the transfer break",
    )
    monkeypatch.setattr(bulk.BulkLink, "connect", real)
    api.run_cell(api.CellSpec("b = a[::-1].copy()\nn = len(a)"), ns, session=session)
    assert ns["n"] == SIZE and np.array_equal(ns["b"], a[::-1])
    assert session.connected
    session.close()


# --------------------------------------------------------------------------- the wire format


def test_bulk_claims_round_trip_and_bad_ones_are_refused():
    claim = BulkClaim("ab" * 32, "runner.session", "c1", Direction.OUT)
    data = bulk_claim(claim)
    length = bulk_claim_length(data[:6])
    assert parse_bulk_claim(data[6 : 6 + length]) == claim
    for head in (b"XXXX\x00\x10", BULK_MAGIC + b"\x00\x00", BULK_MAGIC + b"\xff\xff"):
        with pytest.raises(ProtocolError):
            bulk_claim_length(head)
    for body in (b"[]", b'{"ticket": 1}', b"\xff", json.dumps({"ticket": "ab" * 32}).encode()):
        with pytest.raises(ProtocolError):
            parse_bulk_claim(body)
    with pytest.raises(ProtocolError):
        BulkClaim("AB" * 32, "s", "c", Direction.IN)  # upper case: not a ticket
    assert BULK_OK != BULK_REFUSED


def test_values_declared_over_bulk_expect_no_frames():
    runner_side = Session(Role.RUNNER)
    client_side = Session(Role.CLIENT)
    runner_side.receive(client_side.send(Hello(PROTOCOL_VERSION, "3", "3")))
    client_side.receive(runner_side.send(Welcome(PROTOCOL_VERSION, "3", "3", "s", bulk=4242)))
    request = Execute("c", "x", (ValueHeader("a", (BULK_MIN, 5)),), bulk_in=True)
    runner_side.receive(client_side.send(request))
    assert runner_side.state is State.RUNNING and client_side.state is State.RUNNING
    with pytest.raises(ProtocolError):  # no frame may come now
        runner_side.receive_binary(b"x")
    client_side.receive(runner_side.send(BulkTicket("c", "cd" * 32)))
    result = Result("c", Status.OK, (ValueHeader("b", (BULK_MIN,)),), bulk="ef" * 32)
    client_side.receive(runner_side.send(result))
    assert client_side.state is State.IDLE and runner_side.state is State.IDLE
    with pytest.raises(ProtocolError):
        Result("c", Status.OK, bulk="not a ticket")


def test_a_fixed_bulk_port_is_the_one_the_welcome_names(runner_factory):
    port = _free_port()
    runner = runner_factory("--bulk-port", str(port))
    assert f"bulk transfers on port {port}" in runner.log
    connection = run(open_connection(ConnectionURL.parse(runner.url)))
    assert connection.welcome.bulk == port
    run(connection.close())


def test_connections_beyond_the_bound_are_closed_at_once_and_transfers_go_on(runner_factory):
    runner = runner_factory()
    connection = run(open_connection(ConnectionURL.parse(runner.url)))
    port = connection.welcome.bulk
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_TRANSFERS)]
    try:
        extra = socket.create_connection(("127.0.0.1", port))
        extra.settimeout(TIMEOUT)
        assert extra.recv(1) == b""  # closed at once, not left waiting for a handshake
        extra.close()
        assert "too many at once" in runner.log
    finally:
        for s in idle:
            s.close()
    assert connection.bulk is not None
    context = connection.bulk.context
    run(connection.close())

    def a_slot_is_free() -> bool:
        tls = bulk.BulkLink("127.0.0.1", port, context).connect()
        if tls is not None:
            tls.close()
        return tls is not None

    wait_until(a_slot_is_free, "the runner let the idle connections go")
    ns: dict[str, Any] = {"a": big(6)}
    api.run_cell(api.CellSpec("n = len(a)"), ns, runner=runner.url)
    assert ns["n"] == SIZE and bulk_lines(runner, "in") == 1, runner.log
    api.default_pool().close()
