"""A private asyncio event loop on a daemon thread, for code that must block.

A magic runs inside a kernel whose own event loop is already running, so it
cannot call ``asyncio.run``. All network I/O of the notebook side runs on this
one loop instead; the calling thread submits coroutines and waits for them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from didomagic.eventloops import loop_factory

T = TypeVar("T")


class BackgroundLoop:
    """An event loop running forever on a daemon thread."""

    def __init__(self) -> None:
        self.loop = loop_factory()()
        self.thread = threading.Thread(
            target=self.loop.run_forever, daemon=True, name="didomagic-io"
        )
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; return a future the caller can wait on."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return self.submit(coro).result()


_loop: BackgroundLoop | None = None
_lock = threading.Lock()


def background_loop() -> BackgroundLoop:
    """The process-wide background loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None:
            _loop = BackgroundLoop()
        return _loop
