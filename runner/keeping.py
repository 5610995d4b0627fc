"""Sessions that outlive their connection: the registry, tickets, and the replay of outputs.

A runner keeps every open session here by id, attached to a connection or
not. A session whose connection dropped waits for its grace period
(``--session-grace``) on one timer; a connection that presents the session's
id, its ticket and the client identity that opened it takes it back. The
ticket is compared in constant time, and a wrong ticket, another client's
identity and an unknown id all get the same answer, so nobody learns which
sessions exist.

Session ids start with the runner's instance id (new at every start), so a
runner can tell a session of an earlier run of itself ("the runner restarted")
from one that ended here, and a mediator can route an attach to the runner
that holds the session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol

from didomagic.reconnect import GONE, clock

ENDED_KEPT = 1000
"""How many ended sessions a runner remembers, to say when and why they ended."""


class Kept(Protocol):
    """What the registry needs of a session."""

    id: str
    owner: str
    ticket: str


class SessionGone(Exception):
    """An attach names no session this client may take back; the message says why."""


class OutputLog:
    """The outputs of the current cell, as sent (JSON text), for a client that reattaches.

    Holds at most ``limit`` bytes: beyond it the oldest outputs are dropped and
    :attr:`first` (the number of the oldest one kept) moves on.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: deque[str] = deque()
        self.first = 0
        self.size = 0

    def reset(self) -> None:
        """A new cell starts: forget the last one's outputs."""
        self.entries.clear()
        self.first = self.size = 0

    def add(self, text: str) -> None:
        """Keep one output; drop the oldest ones while over the limit (never the newest)."""
        self.entries.append(text)
        self.size += len(text)
        while self.size > self.limit and len(self.entries) > 1:
            self.size -= len(self.entries.popleft())
            self.first += 1

    def since(self, number: int) -> tuple[int, list[str]]:
        """The outputs from number ``number`` on (from the oldest kept, if that was dropped)."""
        start = max(number, self.first)
        return start, list(self.entries)[start - self.first :]


@dataclass(frozen=True)
class Ended:
    """Why and when a session ended, for a client that comes back for it."""

    when: float
    why: str
    owner: str
    ticket_digest: str


class SessionRegistry:
    """Every open session of this runner by id, and the last :data:`ENDED_KEPT` that ended."""

    def __init__(self, runner_name: str) -> None:
        self.runner_name = runner_name
        self.instance = secrets.token_hex(6)
        """This run of the runner (session ids start with it; a mediator routes by it)."""
        self.started = time.time()
        self.open: dict[str, Kept] = {}
        self._ended: OrderedDict[str, Ended] = OrderedDict()

    def new_id(self) -> str:
        """A fresh session id: ``<instance>.<random>``."""
        return f"{self.instance}.{secrets.token_urlsafe(6)}"

    def add(self, session: Kept) -> None:
        """Register an open session."""
        self.open[session.id] = session

    def remove(self, session: Kept, why: str) -> None:
        """The session ended (``why`` completes "it ended at T (...)")."""
        if self.open.pop(session.id, None) is None:
            return
        self._ended[session.id] = Ended(time.time(), why, session.owner, _digest(session.ticket))
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    def of(self, owner: str) -> list[Kept]:
        """The open sessions of one client identity (none for an anonymous client)."""
        if not owner:
            return []
        return [s for s in self.open.values() if hmac.compare_digest(s.owner, owner)]

    def claim(self, session_id: str, ticket: str, owner: str) -> Kept:
        """The session an attach names, if ``ticket`` and ``owner`` are its own.

        Raise :class:`SessionGone` with a message for the user otherwise.
        """
        session = self.open.get(session_id)
        if (
            session is not None
            and hmac.compare_digest(session.ticket.encode(), ticket.encode())
            and hmac.compare_digest(session.owner, owner)
        ):
            return session
        raise SessionGone(self._gone(session_id, ticket, owner))

    def gone(self, session_id: str) -> str:
        """Why a session that just ended is gone (for its own client, who just proved it)."""
        ended = self._ended.get(session_id)
        return self._gone(session_id, "", ended.owner if ended else "", trusted=True)

    def _gone(self, session_id: str, ticket: str, owner: str, trusted: bool = False) -> str:
        name = self.runner_name
        after = GONE[0].upper() + GONE[1:]
        ended = self._ended.get(session_id)
        if ended is not None and (
            trusted
            or (
                hmac.compare_digest(ended.ticket_digest, _digest(ticket))
                and hmac.compare_digest(ended.owner, owner)
            )
        ):
            when = clock(ended.when)
            return f"Runner {name}: session {session_id} ended at {when} ({ended.why}). {after}"
        if not session_id.startswith(f"{self.instance}."):
            return (
                f"Runner {name} was restarted at {clock(self.started)}, so session {session_id} "
                f"ended by then. {after}"
            )
        return (
            f"Runner {name} holds no session {session_id} for this client (it ended, or it "
            f"belongs to another client). {after}"
        )


def _digest(ticket: str) -> str:
    return hashlib.sha256(ticket.encode()).hexdigest()
