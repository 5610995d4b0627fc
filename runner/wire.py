"""Small helpers every server endpoint shares: refusing a connection, naming its peer."""

from __future__ import annotations

import contextlib
from typing import Any

from websockets.exceptions import ConnectionClosed

from didomagic.protocol import Error, ErrorCode, encode


def peer_of(ws: Any) -> str:
    """``host:port`` of the other end, for log lines."""
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"


async def refuse(ws: Any, code: ErrorCode, message: str) -> None:
    """Send an error message and close the connection (policy violation)."""
    with contextlib.suppress(ConnectionClosed):
        await ws.send(encode(Error(code, message)))
        await ws.close(1008, code.value)
