"""Small helpers the server side shares: refusing a connection, naming its peer, waiting."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from websockets.exceptions import ConnectionClosed

from didomagic.protocol import Error, ErrorCode, encode

IDLE_CLOSE_REASON = "idle-timeout"
"""The close reason of a connection ended by --idle-timeout (the client tells the user)."""


def peer_of(ws: Any) -> str:
    """``host:port`` of the other end, for log lines."""
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"


async def refuse(ws: Any, code: ErrorCode, message: str) -> None:
    """Send an error message and close the connection (policy violation)."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(encode(Error(code, message)))
        await ws.close(1008, code.value)


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; True if it was set.

    Loops that wake on an event or a period use this rather than
    ``asyncio.wait_for``: on Python 3.11 ``wait_for`` drops a cancellation that
    arrives as the event is set, and the loop then never stops (a runner once
    hung on SIGTERM that way). ``asyncio.timeout`` keeps it.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
