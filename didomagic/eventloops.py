"""Which event loop didomagic's I/O runs on: uvloop where installed, else asyncio's.

Both sides use it: the notebook side's background loop, and runners and
mediators (``didomagic-runner`` runs both roles through :func:`run`).
uvloop's TLS transport moves about twice the bytes per second of asyncio's
default one on the same machine, and TLS is on every byte didomagic sends.
It does not exist on Windows, and ``DIDOMAGIC_NO_UVLOOP=1`` turns it off
anywhere (to compare, or to rule it out); either way the standard loop is
used and nothing else changes. A runner's log says which one it got
(``(event loop: uvloop)``).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

DISABLE_ENV = "DIDOMAGIC_NO_UVLOOP"
"""Set to 1 to use asyncio's own loop even where uvloop is installed."""


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """A factory of new event loops: uvloop's where available and not disabled."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:  # not installed, or a platform it does not support (Windows)
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: what a log line says the process runs on."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the loop :func:`loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
