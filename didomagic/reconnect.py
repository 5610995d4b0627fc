"""Taking a session back after its connection dropped: backoff, the ticket, clear endings.

The runner keeps a session whose connection dropped for its grace period
(``--session-grace``, which it reports in its description). :func:`reattach`
dials again with a capped exponential backoff and presents the session's
ticket until the runner takes it, or until it is certain the session is gone:

- the runner answers that the session ended (grace over, runner restarted);
- the grace period has passed since the connection was lost;
- nothing has listened at the runner's address for :data:`ABSENT_LIMIT`
  seconds (the host refuses connections, or the mediator has no link to the
  runner): the runner process, which held the session, is not there.

Each way ends in a :class:`~didomagic.errors.SessionEnded` (a plain
:class:`~didomagic.errors.ConnectionLost` for the last, where the runner
itself is gone) that names the runner, when the session ended and that its
state is gone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from didomagic.client import OPEN_TIMEOUT, RunnerConnection, attach
from didomagic.errors import ConnectionLost, RunnerBusy, RunnerUnreachable, SessionEnded
from didomagic.tickets import Ticket
from didomagic.urls import ConnectionURL

BACKOFF_START = 0.2
"""Seconds before the second attempt; each further wait doubles, up to :data:`BACKOFF_MAX`."""

BACKOFF_MAX = 5.0

ABSENT_LIMIT = 10.0
"""Seconds of refused connections after which the runner counts as gone."""

DEFAULT_GRACE = 300.0
"""The grace period assumed for a runner that does not report one."""

GONE = "its kernel and all its remote state are gone. The next cell opens a new session."


def clock(when: float) -> str:
    """A wall-clock time for messages: ``2026-12-01 09:14:03 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


def reconnect_text(attempt: int) -> str:
    """What the progress row says during attempt ``attempt`` to reconnect."""
    return f"connection lost; reconnecting ({attempt})…"


async def reattach(
    url: ConnectionURL,
    ticket: Ticket,
    *,
    cell: str,
    received: int,
    lost_at: float,
    grace: float,
    headers: dict[str, str],
    on_attempt: Callable[[int], None] = lambda attempt: None,
) -> RunnerConnection:
    """Dial until the runner gives the session back; raise :class:`ConnectionLost` if it is gone.

    ``lost_at`` is when the connection dropped (``time.time()``); ``cell`` and
    ``received`` say which cell's outputs and result are still awaited.
    """
    attempt, delay = 0, BACKOFF_START
    absent_since: float | None = None
    deadline = lost_at + grace
    while True:
        attempt += 1
        on_attempt(attempt)
        left = deadline - time.time()
        try:
            return await attach(
                url,
                ticket.session,
                ticket.ticket,
                cell,
                received,
                headers,
                timeout=max(1.0, min(OPEN_TIMEOUT, left)),
            )
        except RunnerUnreachable as exc:
            now = time.monotonic()
            absent_since = None if not exc.absent else absent_since or now
            if absent_since is not None and now - absent_since >= ABSENT_LIMIT:
                raise ConnectionLost(
                    f"The connection to runner {ticket.runner} was lost at {clock(lost_at)}, and "
                    f"it has not been there for {ABSENT_LIMIT:g} s since ({exc}): it was stopped "
                    f"or restarted, and the session ended with it; {GONE}"
                ) from None
        except RunnerBusy:
            absent_since = None
        left = deadline - time.time()
        if left <= 0:
            raise SessionEnded(
                f"The connection to runner {ticket.runner} was lost at {clock(lost_at)} and "
                f"not restored within its grace period ({grace:g} s, --session-grace), so the "
                f"session ended at {clock(deadline)}; {GONE}"
            )
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, BACKOFF_MAX)
