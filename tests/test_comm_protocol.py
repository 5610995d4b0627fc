"""The widget messages of the wire protocol, and the runner's relay of them: no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from didomagic.errors import ProtocolError
from didomagic.protocol import (
    PROTOCOL_VERSION,
    Comm,
    CommDone,
    CommMsg,
    Execute,
    Hello,
    Result,
    Role,
    Session,
    SideOutput,
    State,
    Status,
    ValueHeader,
    Welcome,
    cloudpickle_version,
    decode,
    decode_buffers,
    encode,
    encode_buffers,
    python_version,
)
from runner.comms import CommRelay

OPEN = {"comm_id": "w1", "target_name": "jupyter.widget", "data": {"state": {}}}

WIDGET_MESSAGES = [
    Comm("comm_open", OPEN, {"version": "2.1.0"}, encode_buffers([b"\x00\xff"]), ""),
    Comm("comm_msg", {"comm_id": "w1", "data": {"method": "update"}}, request="m-1"),
    CommMsg("m-1", "comm_msg", {"comm_id": "w1", "data": {}}, {}, encode_buffers([b"ab"])),
    SideOutput("stream", {"name": "stdout", "text": "moved\n"}, "m-1"),
    CommDone("m-1"),
    Execute("c", "x = 1", parent="3f2a-1_b", count=12),
]


@pytest.mark.parametrize("message", WIDGET_MESSAGES, ids=lambda m: type(m).__name__)
def test_widget_messages_round_trip(message: Any) -> None:
    assert decode(encode(message)) == message


def test_buffers_travel_as_base64_both_ways() -> None:
    data = [b"", b"\x00\x01\x02", bytes(range(256))]
    assert decode_buffers(encode_buffers(data)) == data
    with pytest.raises(ProtocolError, match="not valid base64"):
        decode_buffers(["%%%"])


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ('{"type": "comm", "msg_type": "execute", "content": {"comm_id": "a"}}', "msg_type"),
        ('{"type": "comm", "msg_type": "comm_msg", "content": {}}', "comm_id"),
        (
            '{"type": "comm-msg", "request": "", "msg_type": "comm_msg", '
            '"content": {"comm_id": "a"}}',
            "message id",
        ),
        (
            '{"type": "comm-msg", "request": "a b", "msg_type": "comm_msg", '
            '"content": {"comm_id": "a"}}',
            "message id",
        ),
        ('{"type": "comm-done", "request": "' + "x" * 200 + '"}', "message id"),
        ('{"type": "side-output", "msg_type": "error", "content": {}}', "msg_type"),
        ('{"type": "execute", "cell": "c", "code": "", "parent": "\\n"}', "message id"),
        (
            '{"type": "comm", "msg_type": "comm_msg", "content": {"comm_id": "a"}, "buffers": [1]}',
            "buffers",
        ),
    ],
)
def test_bad_widget_messages_are_refused_with_the_reason(text: str, complaint: str) -> None:
    with pytest.raises(ProtocolError, match=complaint):
        decode(text)


def _open_pair() -> tuple[Session, Session]:
    client, runner = Session(Role.CLIENT), Session(Role.RUNNER)
    runner.receive(client.send(Hello(PROTOCOL_VERSION, python_version(), cloudpickle_version())))
    client.receive(
        runner.send(Welcome(PROTOCOL_VERSION, python_version(), cloudpickle_version(), "s"))
    )
    return client, runner


def test_widget_traffic_crosses_in_every_state_of_an_open_session() -> None:
    client, runner = _open_pair()
    comm = Comm("comm_msg", {"comm_id": "w1", "data": {}})
    answer = CommMsg("m", "comm_msg", {"comm_id": "w1", "data": {}})
    client.receive(runner.send(comm))  # idle, between cells
    runner.receive(client.send(answer))
    runner.receive(client.send(Execute("c", "x", (ValueHeader("a", (4,)),))))
    assert runner.state is State.UPLOAD
    runner.receive(client.send(answer))  # between the values' frames
    client.receive(runner.send(SideOutput("stream", {"name": "stdout", "text": "t"})))
    list(client.frames([[memoryview(b"abcd")]]))
    runner.receive_binary(b"abcd")
    assert runner.state is State.RUNNING
    client.receive(runner.send(comm))
    client.receive(runner.send(Result("c", Status.OK, (ValueHeader("x", (2,)),))))
    assert client.state is State.DOWNLOAD
    client.receive(runner.send(CommDone("m")))  # while the result's values arrive
    client.receive_binary(b"xy")
    assert client.state is State.IDLE and runner.state is State.DOWNLOAD


def test_only_the_right_side_sends_each_widget_message() -> None:
    client, runner = _open_pair()
    with pytest.raises(ProtocolError, match="does not send"):
        client.send(Comm("comm_msg", {"comm_id": "w"}))
    with pytest.raises(ProtocolError, match="does not send"):
        runner.send(CommMsg("m", "comm_msg", {"comm_id": "w"}))


class FakeKernel:
    """What the relay needs of a kernel: a side callback and a shell channel to write to."""

    def __init__(self) -> None:
        self.side = None
        self.shell: list[tuple[str, dict[str, Any], list[bytes], str]] = []

    def send_shell(self, msg_type, content, metadata, buffers, msg_id):  # type: ignore[no-untyped-def]
        self.shell.append((msg_type, content, buffers, msg_id))


def _iopub(msg_type: str, content: dict[str, Any], parent: str = "", buffers=()) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {
        "header": {"msg_type": msg_type},
        "parent_header": {"msg_id": parent} if parent else {},
        "content": content,
        "metadata": {},
        "buffers": list(buffers),
    }


def test_the_relay_runs_a_frontend_message_under_its_id_and_says_when_it_is_done() -> None:
    sent: list[Any] = []
    relay, kernel = CommRelay(sent.append), FakeKernel()
    relay.attach(kernel)
    assert kernel.side is not None
    relay.forward(CommMsg("m-7", "comm_msg", {"comm_id": "w"}, buffers=encode_buffers([b"z"])))
    assert kernel.shell == [("comm_msg", {"comm_id": "w"}, [b"z"], "m-7")]
    kernel.side(_iopub("comm_msg", {"comm_id": "w", "data": {}}, "m-7", [b"\x01"]))
    kernel.side(_iopub("stream", {"name": "stdout", "text": "moved"}, "m-7"))
    kernel.side(_iopub("status", {"execution_state": "idle"}, "m-7"))
    kernel.side(_iopub("stream", {"name": "stdout", "text": "thread"}))  # no request: still sent
    kernel.side(_iopub("status", {"execution_state": "idle"}, "other"))  # not ours: dropped
    assert [type(m).__name__ for m in sent] == ["Comm", "SideOutput", "CommDone", "SideOutput"]
    assert sent[0].request == "m-7" and decode_buffers(sent[0].buffers) == [b"\x01"]
    assert sent[2] == CommDone("m-7") and sent[3].request == ""


def test_a_replaced_kernel_answers_what_the_old_one_never_will() -> None:
    sent: list[Any] = []
    relay = CommRelay(sent.append)
    old, new = FakeKernel(), FakeKernel()
    relay.attach(old)
    relay.forward(CommMsg("m-1", "comm_msg", {"comm_id": "w"}))
    relay.attach(new)  # the old kernel died with m-1 in its queue
    assert sent == [CommDone("m-1")] and old.side is None and new.side is not None
