"""Stopping never hangs: a cancellation that races the event a loop waits on still stops it."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from runner.wire import wait_set


async def _cancel_as_the_event_is_set(wait) -> bool:  # type: ignore[no-untyped-def]
    """True when the waiting task ended cancelled (False: the cancellation was lost)."""
    event = asyncio.Event()

    async def loop() -> None:
        while True:  # what the job scheduler and the load reporter do
            await wait(event)
            event.clear()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)  # the task is now waiting
    event.set()
    await asyncio.sleep(0)  # the inner wait completes ...
    task.cancel()  # ... and the stop arrives in the same turn of the loop
    try:
        await asyncio.wait_for(asyncio.shield(task), 2)
    except asyncio.CancelledError:
        return True
    except TimeoutError:
        task.cancel()
        return False
    return task.cancelled()


def test_wait_set_keeps_a_cancellation_that_races_the_event():
    assert asyncio.run(_cancel_as_the_event_is_set(lambda e: wait_set(e, 60)))


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps it from Python 3.12")
def test_wait_for_is_what_lost_it_on_python_3_11():
    """The control: the pattern wait_set replaced does lose the cancellation here."""

    async def old(event: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), 60)

    assert not asyncio.run(_cancel_as_the_event_is_set(old))
