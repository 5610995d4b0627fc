"""The wire protocol on its own: no sockets."""

from __future__ import annotations

import json

import pytest

from didomagic.errors import ProtocolError, VersionMismatch
from didomagic.protocol import (
    CHUNK_SIZE,
    MAX_OPEN_ASKS,
    PROTOCOL_VERSION,
    SMALL_PART,
    Answer,
    AnswerStatus,
    Ask,
    Attach,
    Attached,
    Comm,
    CommMsg,
    Dial,
    Error,
    ErrorCode,
    Execute,
    Hello,
    Interrupt,
    ListSessions,
    Output,
    Result,
    Role,
    Session,
    SessionList,
    State,
    Status,
    ValueHeader,
    Welcome,
    check_compatible,
    cloudpickle_version,
    decode,
    encode,
    python_version,
)

EVERY_MESSAGE = [
    Hello(PROTOCOL_VERSION, "3.11", "3.1.2", "0.1.0"),
    Welcome(PROTOCOL_VERSION, "3.11", "3.1.2", "sid", {"name": "r", "tags": ["gpu"]}),
    Execute("c1", "x = 1", (ValueHeader("a", (10, 0, 5)),), ("x",), ("y",), 2.5),
    Execute("c2", "pass"),
    Interrupt("c1"),
    Output("c1", "stream", {"name": "stdout", "text": "hi\n"}),
    Result("c1", Status.OK, (ValueHeader("x", (3,)),), ("y",), {"z": "why"}, None),
    Result("c1", Status.ERROR, error={"ename": "E", "evalue": "v", "traceback": ["t"]}),
    Ask("c1", "1", "module", "helpers", {"digest": "ab"}),
    Ask("c1", "2", "file", "data/train.csv"),
    Answer("c1", "1", AnswerStatus.FOUND, "", {"modules": [{"name": "helpers"}]}, (10, 0, 3)),
    Answer("c1", "2", AnswerStatus.REFUSED, "outside the project"),
    Error(ErrorCode.BUSY, "busy"),
    Welcome(PROTOCOL_VERSION, "3.11", "3.1.2", "sid", {}, "ticket"),
    Attach(PROTOCOL_VERSION, "3.11", "3.1.2", "abc.sid", "ticket", "c1", 7),
    Attached("abc.sid", "c1", 5, {"name": "r"}),
    ListSessions(),
    SessionList(({"id": "abc.sid", "state": "idle"},)),
    Dial("t", "owner"),
]


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    assert decode(encode(message)) == message


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"type": "launch"}', "unknown message type"),
        ('{"protocol": 1}', "unknown message type"),
        ('{"type": "interrupt"}', "missing the field 'cell'"),
        ('{"type": "interrupt", "cell": 5}', "interrupt.cell must be a string"),
        ('{"type": "interrupt", "cell": "c", "extra": 1}', "unknown fields ['extra']"),
        (
            '{"type": "hello", "protocol": true, "python": "3", "cloudpickle": "3"}',
            "must be an integer",
        ),
        ('{"type": "execute", "cell": "c", "code": "", "timeout": -1}', "positive number"),
        ('{"type": "execute", "cell": "c", "code": "", "values": [{"name": "a"}]}', '"sizes"'),
        (
            '{"type": "execute", "cell": "c", "code": "", "values": [{"name": "a", '
            '"sizes": [-1]}]}',
            '"sizes"',
        ),
        ('{"type": "execute", "cell": "c", "code": "", "fetch": "x"}', "list of strings"),
        ('{"type": "result", "cell": "c", "status": "great"}', "status must be one of"),
        ('{"type": "error", "code": "nope", "message": ""}', "code must be one of"),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(text, complaint):
    with pytest.raises(ProtocolError) as info:
        decode(text)
    assert complaint in str(info.value)


def test_versions_must_match_and_the_error_names_both_sides():
    check_compatible(
        protocol=PROTOCOL_VERSION, python=python_version(), cloudpickle=cloudpickle_version()
    )
    with pytest.raises(VersionMismatch) as info:
        check_compatible(protocol=PROTOCOL_VERSION, python="2.7", cloudpickle="0.1")
    text = str(info.value)
    assert "Python 2.7" in text and f"Python {python_version()}" in text
    assert "cloudpickle 0.1" in text and cloudpickle_version() in text
    with pytest.raises(VersionMismatch, match="protocol 99"):
        check_compatible(protocol=99, python=python_version(), cloudpickle=cloudpickle_version())


def _open_pair() -> tuple[Session, Session]:
    client, runner = Session(Role.CLIENT), Session(Role.RUNNER)
    runner.receive(client.send(EVERY_MESSAGE[0]))
    client.receive(runner.send(EVERY_MESSAGE[1]))
    assert client.state is State.IDLE and runner.state is State.IDLE
    return client, runner


def test_a_whole_cell_moves_values_both_ways_in_chunks():
    client, runner = _open_pair()
    big = bytes(range(256)) * (CHUNK_SIZE // 128 + 3)  # a bit over two chunks
    parts = [[memoryview(b"pickle"), memoryview(b""), memoryview(big)]]
    request = Execute("c", "y = x", (ValueHeader("x", (6, 0, len(big))),), ("y",))
    runner.receive(client.send(request))
    received = {0: bytearray(6), 2: bytearray(len(big))}
    frames = list(client.frames(parts))
    assert max(len(f) for f in frames) <= CHUNK_SIZE
    assert len(frames) == 1 + 3  # the empty part has no frame
    for frame in frames:
        for chunk in runner.receive_binary(bytes(frame)):
            received[chunk.part][chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
    assert received == {0: bytearray(b"pickle"), 2: bytearray(big)}
    assert client.state is State.RUNNING and runner.state is State.RUNNING

    client.receive(runner.send(Output("c", "stream", {"name": "stdout", "text": "x"})))
    client.receive(runner.send(Result("c", Status.OK, (ValueHeader("y", (3,)),))))
    assert client.state is State.DOWNLOAD
    for frame in runner.frames([[memoryview(b"abc")]]):
        assert client.receive_binary(frame)[0].data.tobytes() == b"abc"
    assert client.state is State.IDLE and runner.state is State.IDLE


def test_an_interrupt_that_crosses_the_result_is_harmless():
    client, runner = _open_pair()
    runner.receive(client.send(Execute("c", "pass")))
    client.receive(runner.send(Result("c", Status.OK)))
    runner.receive(client.send(Interrupt("c")))
    assert runner.state is State.IDLE


@pytest.mark.parametrize(
    "move",
    [
        "execute before hello",
        "result from the client",
        "second execute while running",
        "binary frame when none expected",
        "frame overruns its part",
        "output while values are expected",
        "hello twice",
    ],
)
def test_out_of_order_input_is_rejected(move):
    client, runner = _open_pair()
    with pytest.raises(ProtocolError):
        if move == "execute before hello":
            Session(Role.RUNNER).receive(encode(Execute("c", "x")))
        elif move == "result from the client":
            runner.receive(encode(Result("c", Status.OK)))
        elif move == "second execute while running":
            runner.receive(encode(Execute("c", "x")))
            runner.receive(encode(Execute("d", "x")))
        elif move == "binary frame when none expected":
            runner.receive_binary(b"data")
        elif move == "frame overruns its part":
            runner.receive(encode(Execute("c", "x", (ValueHeader("a", (4,)),))))
            runner.receive_binary(b"12345")
        elif move == "output while values are expected":
            runner.receive(encode(Execute("c", "x")))
            client.receive(runner.send(Result("c", Status.OK, (ValueHeader("a", (4,)),))))
            client.receive(encode(Output("c", "stream", {})))
        elif move == "hello twice":
            runner.receive(encode(EVERY_MESSAGE[0]))


def test_a_side_cannot_send_the_other_sides_messages():
    client, runner = _open_pair()
    with pytest.raises(ProtocolError, match="does not send"):
        client.send(Result("c", Status.OK))
    with pytest.raises(ProtocolError, match="does not send"):
        runner.send(Execute("c", "x"))


def test_declared_sizes_must_match_what_is_sent():
    client, _ = _open_pair()
    client.send(Execute("c", "x", (ValueHeader("a", (4,)),)))
    with pytest.raises(ProtocolError, match="declared 4"):
        list(client.frames([[memoryview(b"12")]]))


def test_an_error_closes_the_session_from_any_state():
    client, runner = _open_pair()
    client.receive(runner.send(Error(ErrorCode.PROTOCOL, "bye")))
    assert client.state is State.CLOSED


def test_encoded_messages_are_plain_json_objects():
    body = json.loads(encode(EVERY_MESSAGE[6]))
    assert body["type"] == "result" and body["status"] == "ok"


def test_small_parts_share_frames_and_land_in_place():
    client, runner = _open_pair()
    small = [[memoryview(f"value {i}".encode())] for i in range(1000)]
    big = memoryview(bytes(SMALL_PART + 5))
    values = [*small[:500], [big], *small[500:]]
    headers = tuple(ValueHeader(f"v{i}", (v[0].nbytes,)) for i, v in enumerate(values))
    runner.receive(client.send(Execute("c", "pass", headers)))
    frames = list(client.frames(values))
    assert len(frames) == 3  # 500 small ones, the big one alone, 500 small ones
    assert frames[1].obj is big.obj  # a large part is never copied
    received = [bytearray(h.sizes[0]) for h in headers]
    for frame in frames:
        for chunk in runner.receive_binary(bytes(frame)):
            received[chunk.value][chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
    assert [bytes(r) for r in received] == [v[0].tobytes() for v in values]
    assert runner.state is State.RUNNING


def _attach(cell: str = "") -> tuple[Session, Session]:
    """A client and a runner end that have just taken a kept session back."""
    client, runner = Session(Role.CLIENT), Session(Role.RUNNER)
    runner.receive(client.send(Attach(PROTOCOL_VERSION, "3.11", "3", "s", "t", "c1", 2)))
    assert runner.state is client.state is State.ATTACH
    client.receive(runner.send(Attached("s", cell, 2)))
    return client, runner


def test_an_attach_naming_no_cell_leaves_the_session_idle_for_the_next_cell():
    client, runner = _attach("")
    assert client.state is runner.state is State.IDLE
    runner.receive(client.send(Execute("c2", "x = 1")))
    assert runner.state is State.RUNNING


def test_an_attach_naming_a_cell_replays_its_outputs_then_its_result():
    client, runner = _attach("c1")
    assert client.state is runner.state is State.RUNNING
    client.receive(runner.send(Output("c1", "stream", {"name": "stdout", "text": "missed"})))
    client.receive(runner.send(Result("c1", Status.OK)))
    assert client.state is runner.state is State.IDLE


@pytest.mark.parametrize(
    "move",
    [
        lambda c, r: r.receive(c.send(Execute("c", "x"))),  # no cell before the attached
        lambda c, r: r.send(Welcome(PROTOCOL_VERSION, "3.11", "3", "s")),
        lambda c, r: r.send(Attached("s")) and r.send(Attached("s")),
    ],
)
def test_an_attach_must_be_answered_before_anything_else(move):
    client, runner = Session(Role.CLIENT), Session(Role.RUNNER)
    runner.receive(client.send(Attach(PROTOCOL_VERSION, "3.11", "3", "s", "t")))
    with pytest.raises(ProtocolError):
        move(client, runner)


def test_an_attach_comes_first_or_not_at_all():
    client, runner = Session(Role.CLIENT), Session(Role.RUNNER)
    runner.receive(client.send(Hello(PROTOCOL_VERSION, "3.11", "3", "0")))
    with pytest.raises(ProtocolError, match="not allowed in state 'welcome'"):
        runner.receive(encode(Attach(PROTOCOL_VERSION, "3.11", "3", "s", "t")))
    with pytest.raises(ProtocolError, match="does not send attached"):
        Session(Role.CLIENT).send(Attached("s"))


def test_a_session_listing_is_one_question_and_one_answer():
    client, runner = Session(Role.CLIENT), Session(Role.RUNNER)
    runner.receive(client.send(ListSessions()))
    client.receive(runner.send(SessionList(({"id": "s"},))))
    assert client.state is runner.state is State.CLOSED
    with pytest.raises(ProtocolError):
        runner.send(SessionList())


def test_an_error_answers_an_attach_and_closes():
    client, runner = Session(Role.CLIENT), Session(Role.RUNNER)
    runner.receive(client.send(Attach(PROTOCOL_VERSION, "3.11", "3", "s", "t")))
    client.receive(runner.send(Error(ErrorCode.NOT_FOUND, "gone")))
    assert client.state is State.CLOSED


# -- the request channel: asks and answers while a cell runs


def _running_pair() -> tuple[Session, Session]:
    client, runner = _open_pair()
    runner.receive(client.send(Execute("c", "pass")))
    assert client.state is State.RUNNING and runner.state is State.RUNNING
    return client, runner


def test_an_answer_and_its_parts_arrive_while_outputs_go_on():
    client, runner = _running_pair()
    client.receive(runner.send(Ask("c", "1", "module", "helpers")))
    client.receive(runner.send(Ask("c", "2", "file", "a.csv")))
    big = bytes(range(256)) * (CHUNK_SIZE // 256 + 1)
    runner.receive(client.send(Answer("c", "2", AnswerStatus.FOUND, sizes=(3, len(big)))))
    assert client.state is State.ANSWER and runner.state is State.ANSWER
    # The cell goes on meanwhile: outputs, more asks and interrupts are legal.
    client.receive(runner.send(Output("c", "stream", {"name": "stdout", "text": "x"})))
    client.receive(runner.send(Ask("c", "3", "file", "b.csv")))
    runner.receive(client.send(Interrupt("c")))
    # ... and so is widget traffic (a tqdm bar while a file arrives), both ways
    client.receive(runner.send(Comm("comm_msg", {"comm_id": "w1", "data": {}})))
    runner.receive(client.send(CommMsg("m", "comm_msg", {"comm_id": "w1", "data": {}})))
    assert client.state is State.ANSWER and runner.state is State.ANSWER
    got: dict[int, bytearray] = {0: bytearray(3), 1: bytearray(len(big))}
    for frame in client.frames([[memoryview(b"abc"), memoryview(big)]]):
        for chunk in runner.receive_binary(bytes(frame)):
            got[chunk.part][chunk.offset : chunk.offset + chunk.data.nbytes] = chunk.data
    assert got == {0: bytearray(b"abc"), 1: bytearray(big)}
    assert client.state is State.RUNNING and runner.state is State.RUNNING
    assert runner.asks == client.asks == {"1", "3"}
    for ask_id in ("1", "3"):
        runner.receive(client.send(Answer("c", ask_id, AnswerStatus.NOT_FOUND, "no")))
    client.receive(runner.send(Result("c", Status.OK)))
    assert client.state is State.IDLE and runner.state is State.IDLE


def test_a_result_waits_for_every_answer():
    client, runner = _running_pair()
    client.receive(runner.send(Ask("c", "1", "module", "m")))
    with pytest.raises(ProtocolError, match="1 asks are unanswered"):
        runner.send(Result("c", Status.OK))
    with pytest.raises(ProtocolError, match="1 asks are unanswered"):
        client.receive(encode(Result("c", Status.OK)))


@pytest.mark.parametrize(
    ("move", "complaint"),
    [
        ("unknown id", "not open"),
        ("twice", "not open"),
        ("same id", "already open"),
        ("text mid-answer", "bytes of values were still expected"),
        ("second answer mid-answer", "not allowed in state 'answer'"),
        ("result mid-answer", "not allowed in state 'answer'"),
        ("client asks", "does not send ask"),
        ("overrun", "overruns"),
        ("ask when idle", "not allowed in state 'idle'"),
    ],
)
def test_illegal_asks_and_answers(move, complaint):
    client, runner = _running_pair()
    client.receive(runner.send(Ask("c", "1", "module", "m")))
    with pytest.raises(ProtocolError, match=complaint):
        if move == "unknown id":
            runner.receive(encode(Answer("c", "9", AnswerStatus.FOUND)))
        elif move == "twice":
            runner.receive(client.send(Answer("c", "1", AnswerStatus.FOUND)))
            runner.receive(encode(Answer("c", "1", AnswerStatus.FOUND)))
        elif move == "same id":
            client.receive(encode(Ask("c", "1", "module", "m")))
        elif move in ("text mid-answer", "second answer mid-answer", "result mid-answer"):
            client.receive(runner.send(Ask("c", "2", "module", "n")))
            runner.receive(client.send(Answer("c", "1", AnswerStatus.FOUND, sizes=(4,))))
            if move == "text mid-answer":
                runner.receive(encode(Answer("c", "2", AnswerStatus.FOUND)))
            elif move == "second answer mid-answer":
                client.send(Answer("c", "2", AnswerStatus.FOUND))
            else:
                runner.send(Result("c", Status.OK))
        elif move == "client asks":
            client.send(Ask("c", "5", "module", "m"))
        elif move == "overrun":
            runner.receive(client.send(Answer("c", "1", AnswerStatus.FOUND, sizes=(4,))))
            runner.receive_binary(b"12345")
        else:
            runner.receive(client.send(Answer("c", "1", AnswerStatus.FOUND)))
            client.receive(runner.send(Result("c", Status.OK)))
            runner.send(Ask("c", "2", "module", "m"))


def test_open_asks_are_capped():
    client, runner = _running_pair()
    for i in range(MAX_OPEN_ASKS):
        client.receive(runner.send(Ask("c", str(i), "file", "f")))
    with pytest.raises(ProtocolError, match="asks open at once"):
        runner.send(Ask("c", "x", "file", "f"))


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({"cell": "c", "id": "1", "status": "maybe"}, "answer.status must be one of"),
        ({"cell": "c", "id": "1", "status": "found", "sizes": [-1]}, "list of sizes"),
        ({"cell": "c", "id": "1", "status": "found", "sizes": [True]}, "list of sizes"),
        ({"cell": "c", "id": "1", "status": "found", "meta": []}, "JSON object"),
    ],
)
def test_bad_answers_are_refused(body, complaint):
    with pytest.raises(ProtocolError, match=complaint):
        decode(json.dumps({"type": "answer", **body}))
