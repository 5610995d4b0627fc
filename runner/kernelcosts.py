"""Work ipykernel does for every cell that a runner's cells do not need, taken out.

Installed by the agent in each runner kernel (see :func:`install`):

- Before every ``execute_reply`` ipykernel flushes ``sys.stdout`` and
  ``sys.stderr``; each flush hands a task to its I/O thread and waits for it,
  even when nothing was written. The runner ends a cell only once the kernel's
  ``idle`` status has come on iopub, and that status leaves the I/O thread after
  everything the cell printed, so a flush with nothing pending is skipped. A
  stream with something pending flushes as before.
- ipykernel and then IPython each ask whether a cell needs an event loop
  (``should_run_async``: a full compile of the cell); the answer for the same
  transformed cell is kept, so a large cell is compiled for it once.
- ipykernel publishes every request's code (``execute_input``) and a ``busy``
  status on iopub, each a message through its I/O thread that the runner, the
  kernel's only client, reads and drops. They are not published; the ``idle``
  status, which ends a cell and a comm message for the runner, still is.

Each looks for what it patches and leaves a kernel that lacks it as it is.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

_PENDING = ("_flush_pending", "_subprocess_flush_pending", "_buffers")
"""The attributes of ipykernel's ``OutStream`` that say whether a flush has work to do."""


def install(shell: Any) -> None:
    """Patch this kernel's output streams, ``shell`` and its kernel."""
    for stream in (sys.stdout, sys.stderr):
        skip_idle_flush(stream)
    remember_async_check(shell)
    kernel = getattr(shell, "kernel", None)
    if kernel is not None:
        publish_less(kernel)


def publish_less(kernel: Any) -> bool:
    """Stop ``kernel`` publishing ``execute_input`` and ``busy``; False if it cannot tell how."""
    status = getattr(kernel, "_publish_status", None)
    if status is None or not hasattr(kernel, "_publish_execute_input"):
        return False

    def publish_status(state: str, channel: str, parent: Any = None) -> None:
        if state != "busy":
            status(state, channel, parent)

    kernel._publish_status = publish_status
    kernel._publish_execute_input = lambda code, parent, execution_count: None
    return True


def skip_idle_flush(stream: Any) -> bool:
    """Make ``stream.flush()`` return at once when nothing waits; False if it cannot tell."""
    if not all(hasattr(stream, name) for name in _PENDING):
        return False
    flush: Callable[[], None] = stream.flush

    def flush_if_pending() -> None:
        if stream._flush_pending or stream._subprocess_flush_pending or stream._buffers:
            flush()

    stream.flush = flush_if_pending
    return True


def remember_async_check(shell: Any) -> None:
    """Answer ``shell.should_run_async`` for the same transformed cell from the last answer."""
    ask = getattr(shell, "should_run_async", None)
    if ask is None:
        return
    last: tuple[str | None, bool] = (None, False)

    def should_run_async(
        raw_cell: str, *, transformed_cell: str | None = None, preprocessing_exc_tuple: Any = None
    ) -> bool:
        nonlocal last
        if transformed_cell is None or preprocessing_exc_tuple is not None or not shell.autoawait:
            return bool(
                ask(
                    raw_cell,
                    transformed_cell=transformed_cell,
                    preprocessing_exc_tuple=preprocessing_exc_tuple,
                )
            )
        if last[0] == transformed_cell:
            return last[1]
        answer = bool(ask(raw_cell, transformed_cell=transformed_cell))
        last = (transformed_cell, answer)
        return answer

    shell.should_run_async = should_run_async
