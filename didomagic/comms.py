"""The notebook's end of a remote session's widgets: proxy comms in the notebook kernel.

A widget created on the runner opens a comm there; the runner forwards it
(:class:`~didomagic.protocol.Comm`) and :class:`CommBridge` opens a *proxy*
comm with the same id and target in this kernel's ``CommManager``, so the
notebook frontend renders the widget as if this kernel owned it. Updates and
closes from the runner are re-published on this kernel's iopub; what the
frontend sends to a proxy (a slider moved, a button clicked) goes to the
runner as a :class:`~didomagic.protocol.CommMsg`.

Order is what makes ``Output`` widgets and ``interact`` work: everything the
runner sends is handled on this kernel's main thread, in arrival order —
by the waiting loop of a running ``%%remote`` cell, by a proxy's handler
while the runner handles the frontend's message (it waits for
:class:`~didomagic.protocol.CommDone`, so the callback's outputs carry the
frontend's message as their parent, as a local callback's would), or else
by a callback on the kernel's event loop. The notebook's own comms are never
touched.

When the frontend asks for every widget's state (``jupyter.widget.control``:
a reloaded page, a second view of the notebook), the notebook's own answer is
completed with the live remote widgets' states, kept from their open and
update messages, so they render there too.

When the session ends, its widgets that can be disabled are, with a tooltip
saying why, and the next cell prints a one-line notice.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any

from didomagic import display
from didomagic.loop import BackgroundLoop
from didomagic.protocol import (
    Comm,
    CommDone,
    CommMsg,
    Message,
    Output,
    SideOutput,
    decode_buffers,
    encode_buffers,
)

logger = logging.getLogger("didomagic.comms")

ENDED_TOOLTIP = "didomagic: the remote session that owned this widget has ended"

CONTROL_TARGET = "jupyter.widget.control"

WAIT_TICK = 0.25
"""Seconds between checks that the session still lives while a widget event is handled."""

_bridges: weakref.WeakSet[CommBridge] = weakref.WeakSet()
"""Every bridge of this process: the control comm's answer includes their widgets."""


def notebook_kernel() -> Any:
    """This process's ipykernel kernel with a comm manager, or None (a terminal, a test shell)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    if kernel is None or getattr(kernel, "comm_manager", None) is None:
        return None
    return kernel


def _counted_ahead() -> int:
    """1 where IPython counts a cell before running it (9 and later), else 0."""
    import IPython

    return 1 if IPython.version_info[0] >= 9 else 0


_COUNTED_AHEAD = _counted_ahead()


def cell_identity() -> dict[str, Any]:
    """The running notebook cell's request id and execution count (empty outside a kernel).

    The runner's kernel runs the remote cell under the same request id, so a
    remote ``Output`` widget's captures land in this cell, and with the same
    count, so a remote traceback says ``Cell In[n]`` as this cell does.
    """
    kernel = notebook_kernel()
    if kernel is None or threading.current_thread() is not threading.main_thread():
        return {}
    parent = kernel.get_parent("shell") or {}
    msg_id = (parent.get("header") or {}).get("msg_id", "")
    count = int(getattr(kernel.shell, "execution_count", 1)) - _COUNTED_AHEAD
    identity: dict[str, Any] = {"count": max(count, 0)}
    if isinstance(msg_id, str) and 0 < len(msg_id) <= 128 and all("!" <= c <= "~" for c in msg_id):
        identity["parent"] = msg_id
    return identity


class CommBridge:
    """The proxies of one remote session's comms in this kernel.

    Made on the I/O loop when a session opens; :meth:`arrive` runs there,
    everything else on the kernel's main thread. ``in_cell()`` says whether
    a ``%%remote`` cell is waiting on the main thread right now (its loop then
    handles arrivals, and a proxy's handler must not wait for the runner,
    whose kernel is busy with that cell).
    """

    def __init__(
        self,
        send: Callable[[CommMsg], None],
        runner: str,
        in_cell: Callable[[], bool] = lambda: False,
    ) -> None:
        self._send = send
        self.runner = runner
        self._in_cell = in_cell
        self._kernel = notebook_kernel()
        self.sink: Any = None
        """Where arrivals go while someone on the main thread waits (set on the I/O loop)."""
        self.proxies: dict[str, Any] = {}
        self._states: dict[str, dict[str, Any]] = {}
        self._buffers: dict[str, dict[tuple[Any, ...], bytes]] = {}
        self.ended = False
        self.told = False
        if self._kernel is not None:
            _bridges.add(self)
            _complete_control_answers(self._kernel)

    # -- the I/O loop's side

    def arrive(self, message: Message | None) -> None:
        """A widget message from the runner, or None once the session is over (I/O loop)."""
        if self._kernel is None:
            return  # no frontend here to show widgets
        if self.sink is not None:
            self.sink.put(("aside", self, message))
        else:
            self._kernel.io_loop.add_callback(self.handle, message)

    # -- the main thread's side

    def handle(self, message: Message | None) -> None:
        """Show one message from the runner in this kernel (main thread)."""
        try:
            if message is None:
                self._end()
            elif isinstance(message, Comm):
                self._comm(message)
            elif isinstance(message, SideOutput):
                display.show(Output("", message.msg_type, message.content))
        except Exception:
            logger.exception("could not show a widget message from runner %s", self.runner)

    def _comm(self, message: Comm) -> None:
        content = message.content
        comm_id = content["comm_id"]
        data = content.get("data") or {}
        buffers = decode_buffers(message.buffers)
        if message.msg_type == "comm_open":
            from comm import create_comm

            proxy = create_comm(
                comm_id=comm_id,
                target_name=str(content.get("target_name", "")),
                target_module=content.get("target_module"),
                data=data,
                metadata=message.metadata,
                buffers=buffers,
            )
            proxy.on_msg(self._from_frontend)
            proxy.on_close(self._closed_by_frontend)
            self.proxies[comm_id] = proxy
            self._states[comm_id], self._buffers[comm_id] = {}, {}
            self._remember(comm_id, data, buffers)
            return
        proxy = self.proxies.get(comm_id)
        if proxy is None:
            logger.debug("a message for comm %s, which is not open here", comm_id)
            return
        if message.msg_type == "comm_msg":
            if data.get("method") == "update":
                self._remember(comm_id, data, buffers)
            proxy.send(data=data, metadata=message.metadata, buffers=buffers)
        else:
            self._forget(comm_id)
            proxy.close(data=data, metadata=message.metadata, buffers=buffers)

    def _from_frontend(self, msg: dict[str, Any]) -> None:
        """The frontend's message to a proxy: to the runner; wait for it unless a cell runs."""
        request = _as_request(msg)
        if request is None or self.ended:
            return
        if self._in_cell() or request.msg_type == "comm_close":
            self._send(request)
            return
        self.wait_for(request)

    def wait_for(self, request: CommMsg) -> None:
        """Send ``request`` and show what the runner sends until its kernel is done with it."""
        waiter: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.sink = waiter  # a plain attribute: the I/O loop sees it before the send below
        try:
            self._send(request)
            while True:
                try:
                    _, _, message = waiter.get(timeout=WAIT_TICK)
                except queue.Empty:
                    if self.ended:
                        break
                    continue
                if isinstance(message, CommDone) and message.request == request.request:
                    break
                self.handle(message)
                if message is None:
                    break
        except KeyboardInterrupt:
            logger.info("stopped waiting for runner %s to handle a widget event", self.runner)
        finally:
            self.sink = None
            while not waiter.empty():  # arrived between the CommDone and the line above
                self.handle(waiter.get()[2])

    def _closed_by_frontend(self, msg: dict[str, Any]) -> None:
        self._forget((msg.get("content") or {}).get("comm_id", ""))
        request = _as_request(msg)
        if request is not None and not self.ended:
            self._send(request)

    def _remember(self, comm_id: str, data: dict[str, Any], buffers: list[bytes]) -> None:
        """Keep a widget's state (JSON and binary parts) for the control comm's answer."""
        state, paths = data.get("state"), data.get("buffer_paths") or []
        if not isinstance(state, dict) or not isinstance(paths, list):
            return
        kept = self._buffers.setdefault(comm_id, {})
        for path in [p for p in kept if p[0] in state]:
            del kept[path]
        self._states.setdefault(comm_id, {}).update(state)
        for path, buffer in zip(paths, buffers, strict=False):
            if isinstance(path, list) and path:
                kept[tuple(path)] = buffer

    def _forget(self, comm_id: str) -> None:
        self.proxies.pop(comm_id, None)
        self._states.pop(comm_id, None)
        self._buffers.pop(comm_id, None)

    def control_states(self) -> tuple[dict[str, Any], list[list[Any]], list[bytes]]:
        """The live widgets' states as the control comm sends them (states, paths, buffers)."""
        states: dict[str, Any] = {}
        paths: list[list[Any]] = []
        buffers: list[bytes] = []
        if self.ended:
            return states, paths, buffers
        for comm_id, state in self._states.items():
            if "_model_name" not in state:
                continue  # not a widget model
            states[comm_id] = {
                "model_name": state["_model_name"],
                "model_module": state.get("_model_module", ""),
                "model_module_version": state.get("_model_module_version", ""),
                "state": state,
            }
            for path, buffer in self._buffers.get(comm_id, {}).items():
                paths.append([comm_id, "state", *path])
                buffers.append(buffer)
        return states, paths, buffers

    def _end(self) -> None:
        """The session is over: its widgets say so (disabled, with a tooltip) and stop talking."""
        if self.ended:
            return
        self.ended = True
        for comm_id, proxy in list(self.proxies.items()):
            state = self._states.get(comm_id, {})
            change: dict[str, Any] = {}
            if "disabled" in state:
                change["disabled"] = True
            if "tooltip" in state:
                change["tooltip"] = ENDED_TOOLTIP
            if change:
                try:
                    proxy.send(data={"method": "update", "state": change, "buffer_paths": []})
                except Exception:
                    logger.debug("could not mark comm %s as ended", comm_id, exc_info=True)

    def notice(self) -> str | None:
        """Once, after the session ended with widgets: a line saying they no longer respond."""
        if not self.ended or self.told or not self.proxies:
            return None
        self.told = True
        return (
            f"the session with runner {self.runner} ended, so the {len(self.proxies)} "
            "widget(s) it showed no longer respond; run their cells again for live ones."
        )


def _as_request(msg: dict[str, Any]) -> CommMsg | None:
    """The frontend's comm message as a :class:`CommMsg` (None if it cannot travel)."""
    header = msg.get("header") or {}
    try:
        return CommMsg(
            str(header.get("msg_id", "")),
            str(header.get("msg_type", "")),
            dict(msg.get("content") or {}),
            dict(msg.get("metadata") or {}),
            encode_buffers(msg.get("buffers") or []),
        )
    except Exception as exc:
        logger.warning("a widget message could not be forwarded: %s", exc)
        return None


def sender(loop: BackgroundLoop, connection: Any) -> Callable[[CommMsg], None]:
    """A thread-safe function that sends a :class:`CommMsg` on ``connection`` (I/O loop)."""

    def send(request: CommMsg) -> None:
        loop.submit(connection.send_comm(request))

    return send


def _complete_control_answers(kernel: Any) -> None:
    """Make the notebook's ``jupyter.widget.control`` answer include the remote widgets."""
    targets = kernel.comm_manager.targets
    opened = targets.get(CONTROL_TARGET)
    if opened is None or getattr(opened, "didomagic", False):
        return

    def control_opened(comm: Any, msg: dict[str, Any]) -> None:
        opened(comm, msg)
        send = comm.send

        def send_all(data: Any = None, metadata: Any = None, buffers: Any = None) -> None:
            if isinstance(data, dict) and data.get("method") == "update_states":
                data = dict(data)
                states = dict(data.get("states") or {})
                paths = list(data.get("buffer_paths") or [])
                buffers = list(buffers or [])
                for bridge in list(_bridges):
                    more, more_paths, more_buffers = bridge.control_states()
                    states.update(more)
                    paths += more_paths
                    buffers += more_buffers
                data["states"], data["buffer_paths"] = states, paths
            send(data=data, metadata=metadata, buffers=buffers)

        comm.send = send_all

    control_opened.didomagic = True  # type: ignore[attr-defined]
    targets[CONTROL_TARGET] = control_opened
