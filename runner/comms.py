"""The runner's end of a session's widgets: comm traffic between its kernel and the client.

The kernel's comm messages (``comm_open``, ``comm_msg``, ``comm_close`` on
iopub, from a cell, a callback or a thread) go to the client as
:class:`~didomagic.protocol.Comm`. A client's :class:`~didomagic.protocol.CommMsg`
(the notebook frontend moved a slider) goes to the kernel's shell channel
under the frontend's own message id; what the kernel prints while handling it
goes back as :class:`~didomagic.protocol.SideOutput` and, once it is idle
again, a :class:`~didomagic.protocol.CommDone`. Outputs no cell claims (a
thread printing after its cell ended) go back as side outputs too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from didomagic.protocol import (
    COMM_TYPES,
    OUTPUT_TYPES,
    Comm,
    CommDone,
    CommMsg,
    Message,
    SideOutput,
    decode_buffers,
    encode_buffers,
)

logger = logging.getLogger("didomagic.runner")

MAX_PENDING = 1024
"""Most comm messages a session may have in its kernel's queue at once; more are dropped."""


class CommKernel(Protocol):
    """What the relay needs of a kernel (see ``runner.kernels.Kernel``)."""

    side: Callable[[dict[str, Any]], None] | None

    def send_shell(
        self,
        msg_type: str,
        content: dict[str, Any],
        metadata: dict[str, Any],
        buffers: list[bytes],
        msg_id: str,
    ) -> None:
        """Send one message on the kernel's shell channel under ``msg_id``."""


class CommRelay:
    """Moves one session's comm traffic between its kernel and the client.

    ``send`` queues a message for the client (in order with the cell's outputs).
    """

    def __init__(self, send: Callable[[Message], None]) -> None:
        self._send = send
        self._kernel: CommKernel | None = None
        self._pending: set[str] = set()

    def attach(self, kernel: CommKernel) -> None:
        """Relay this kernel's traffic (a session's first kernel, or its replacement)."""
        if self._kernel is not None:
            self._kernel.side = None
        self._kernel = kernel
        kernel.side = self.iopub
        for request in self._pending:  # the old kernel will never answer these
            self._send(CommDone(request))
        self._pending.clear()

    def iopub(self, msg: dict[str, Any]) -> None:
        """One iopub message of the kernel that no cell listener took, or a comm message."""
        msg_type = msg["header"]["msg_type"]
        parent = (msg.get("parent_header") or {}).get("msg_id", "")
        request = parent if parent in self._pending else ""
        content = msg.get("content") or {}
        if msg_type in COMM_TYPES:
            self._send(
                Comm(
                    msg_type,
                    content,
                    msg.get("metadata") or {},
                    encode_buffers(msg.get("buffers") or []),
                    request,
                )
            )
        elif msg_type in OUTPUT_TYPES:
            self._send(SideOutput(msg_type, content, request))
        elif msg_type == "status" and request and content.get("execution_state") == "idle":
            self._pending.discard(request)
            self._send(CommDone(request))

    def forward(self, message: CommMsg) -> None:
        """Hand a client's comm message to the kernel."""
        if self._kernel is None or len(self._pending) >= MAX_PENDING:
            logger.warning("dropped a comm message: %d are waiting in the kernel", MAX_PENDING)
            self._send(CommDone(message.request))
            return
        self._pending.add(message.request)
        self._kernel.send_shell(
            message.msg_type,
            message.content,
            message.metadata,
            decode_buffers(message.buffers),
            message.request,
        )
