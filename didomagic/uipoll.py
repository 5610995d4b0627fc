"""Widget events while a cell blocks the notebook kernel: the technique of ``jupyter-ui-poll``.

A ``%%remote`` cell waits on the kernel's main thread, so the kernel reads no
shell message until it ends: a click on the progress row's Cancel button, or a
remote slider moved meanwhile, would wait for the cell. :class:`ShellPump`
reads the kernel's pending shell messages itself while the cell waits, handles
the comm messages among them at once (as ipykernel ≥ 7.4 does for an async
cell), and hands every other message (the next cells of a "Run All") back to
the kernel to handle, in order, after this cell.

ipykernel 7 hands shell messages from its shell-channel thread to the main
thread over an in-process socket; ipykernel 6 reads them on the main thread
from the shell socket itself. Either way the pump reads that socket without
blocking.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

import zmq

from didomagic.protocol import COMM_TYPES

logger = logging.getLogger("didomagic.uipoll")

POLL = 0.02
"""Seconds between two looks at the shell socket while a cell waits."""


class ShellPump:
    """Handles the notebook kernel's comm messages while a cell blocks its main thread."""

    def __init__(self, kernel: Any, socket: Any, defer: Any) -> None:
        self.kernel = kernel
        self._socket = socket
        self._defer = defer
        self._deferred: list[Any] = []
        self._last = 0.0

    @classmethod
    def current(cls) -> ShellPump | None:
        """A pump for this process's ipykernel, or None (no kernel, or one it cannot read)."""
        from didomagic.comms import notebook_kernel

        if threading.current_thread() is not threading.main_thread():
            return None  # only the thread the kernel runs cells on may read its shell
        kernel = notebook_kernel()
        if kernel is None or getattr(kernel, "session", None) is None:
            return None
        thread = getattr(kernel, "shell_channel_thread", None)
        try:
            if thread is not None:  # ipykernel 7: the shell channel thread forwards to us
                pair = thread.manager.get_shell_channel_to_subshell_pair(None)
                return cls(kernel, pair.to_socket, _later(kernel))
            stream = kernel.shell_stream  # ipykernel 6: the shell socket is ours
            if hasattr(kernel, "schedule_dispatch"):
                return cls(kernel, stream.socket, _queued(kernel))
            return cls(kernel, stream.socket, _later(kernel))
        except Exception:
            logger.debug("cannot read this kernel's shell messages", exc_info=True)
            return None

    def poll(self) -> int:
        """Handle the comm messages waiting now (at most every :data:`POLL` s); return how many."""
        now = time.monotonic()
        if now - self._last < POLL:
            return 0
        self._last = now
        handled = 0
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return handled
            except zmq.ZMQError:
                logger.debug("the shell socket cannot be read", exc_info=True)
                return handled
            if self._is_comm(frames):
                self._handle(frames)
                handled += 1
            else:
                self._deferred.append(frames)

    def release(self) -> None:
        """Give the messages that were not comm messages back to the kernel, in order."""
        deferred, self._deferred = self._deferred, []
        for frames in deferred:
            self._defer(frames)

    def _is_comm(self, frames: list[Any]) -> bool:
        session = self.kernel.session
        try:
            _, rest = session.feed_identities(frames, copy=False)
            header = session.deserialize(rest, content=False, copy=False)["header"]
        except Exception:
            return False
        return header.get("msg_type") in COMM_TYPES

    def _handle(self, frames: list[Any]) -> None:
        """Handle one comm message now, as its parent, then restore the cell's parent."""
        kernel = self.kernel
        idents, rest = kernel.session.feed_identities(frames, copy=False)
        msg = kernel.session.deserialize(rest, content=True, copy=False)
        saved_ident, saved_parent = _parent_ident(kernel), kernel.get_parent("shell")
        kernel.set_parent(idents, msg, channel="shell")
        try:
            handler = kernel.shell_handlers.get(msg["header"]["msg_type"])
            if handler is not None:
                handler(kernel.shell_stream, idents, msg)
        except Exception:
            logger.exception("a widget message failed while a remote cell ran")
        finally:
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    stream.flush()
            kernel.set_parent(saved_ident, saved_parent, channel="shell")


def _parent_ident(kernel: Any) -> Any:
    """The identity the kernel's current shell parent came from (ipykernel 6 and 7)."""
    var = getattr(kernel, "_shell_parent_ident", None)
    if var is not None and hasattr(var, "get"):
        try:
            return kernel._get_shell_context_var(var)
        except (LookupError, AttributeError):
            return []
    return getattr(kernel, "_parent_ident", {}).get("shell", [])


def _later(kernel: Any) -> Any:
    """Handle a message on the kernel's loop, after the running cell (ipykernel 7)."""

    def defer(frames: list[Any]) -> None:
        kernel.io_loop.add_callback(kernel.shell_main, None, frames)

    return defer


def _queued(kernel: Any) -> Any:
    """Queue a message behind the running cell (ipykernel 6)."""

    def defer(frames: list[Any]) -> None:
        kernel.schedule_dispatch(kernel.dispatch_shell, frames)

    return defer
