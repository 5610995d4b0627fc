"""A runner kernel's output channel keeps every message, however fast a cell sends them."""

from __future__ import annotations

from didomagic.api import RemoteSession
from didomagic.protocol import Execute, Status
from didomagic.urls import ConnectionURL

FLUSHES = 10_000
"""Far beyond ZeroMQ's default high-water mark of 1,000 waiting messages."""


def test_a_cell_that_floods_its_output_loses_no_message_and_ends(runner_factory):
    """Each flush is one IOPub message; at the default mark, some were dropped (a widget's
    updates, a tqdm bar's last one) and a dropped ``idle`` left the cell waiting forever."""
    runner = runner_factory()
    session = RemoteSession(ConnectionURL.parse(runner.url))
    outputs = []
    try:
        result, _ = session.execute(
            Execute(
                "flood",
                "import sys\n"
                f"for i in range({FLUSHES}):\n"
                "    sys.stdout.write('.')\n"
                "    sys.stdout.flush()\n",
            ),
            [],
            outputs.append,
        )
    finally:
        session.close()
    assert result.status is Status.OK
    text = "".join(o.content.get("text", "") for o in outputs if o.msg_type == "stream")
    assert text == "." * FLUSHES, f"{text.count('.')} of {FLUSHES} flushes arrived"
