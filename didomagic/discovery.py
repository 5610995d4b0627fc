"""Finding out what runners there are: ask every configured runner and mediator at once.

Each configured URL is queried concurrently. A runner answers with its own
description; a mediator with the description of each runner in its pool. A
URL that cannot be reached becomes one row with status ``unreachable`` and the
reason, so a listing always shows every configured entry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from didomagic.client import query
from didomagic.config import Entry
from didomagic.errors import DidomagicError
from didomagic.urls import ConnectionURL

QUERY_TIMEOUT = 5.0
"""Seconds one runner or mediator has to answer a query."""


@dataclass(frozen=True)
class RunnerView:
    """One runner as the notebook sees it, and how to reach it."""

    entry: str
    """The configured name this runner was found through."""
    url: ConnectionURL
    """Where to connect: the runner itself, or its mediator."""
    mediator: bool
    """True when the runner is reached through a mediator (``url`` is the mediator's)."""
    description: dict[str, Any]
    """What the runner reported, plus ``status``, ``reason``, ``latency`` (seconds) and
    ``identity``: how it was verified (by its mediator's credential check, or by the
    certificate this client pinned)."""

    @property
    def name(self) -> str:
        """The runner's name."""
        return str(self.description.get("name") or self.entry)

    @property
    def address(self) -> str:
        """``host:port`` of the runner, or ``via NAME`` for a runner behind a mediator."""
        return f"via {self.entry}" if self.mediator else self.url.address

    @property
    def status(self) -> str:
        """``up``, ``down`` (the mediator lost it) or ``unreachable``."""
        return str(self.description.get("status", "up"))


async def _survey_one(entry: Entry, timeout: float) -> list[RunnerView]:
    try:
        info, latency = await asyncio.wait_for(query(entry.url, timeout), timeout)
    except (DidomagicError, TimeoutError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        return [
            RunnerView(
                entry.name,
                entry.url,
                False,
                {"name": entry.name, "status": "unreachable", "reason": reason.split(". ")[0]},
            )
        ]
    mediator = info.role == "mediator"
    if mediator and not info.runners:
        empty = {"name": entry.name, "status": "down", "reason": "no runners at this mediator yet"}
        return [RunnerView(entry.name, entry.url, False, empty)]
    views = []
    for description in info.runners:
        description = {**description, "latency": latency}
        description.setdefault("status", "up")
        if not mediator:
            description.setdefault("name", entry.name)
            description["identity"] = _pinned(entry.url)  # what this client verified itself
        views.append(RunnerView(entry.name, entry.url, mediator, description))
    return views


def _pinned(url: ConnectionURL) -> str:
    """How a runner reached directly proved who it is: the certificate this client pinned."""
    if url.fingerprint is None:
        return "certificate checked against the system CAs"
    return f"pinned certificate {url.fingerprint[:16]}"


async def survey_async(
    entries: Sequence[Entry], timeout: float = QUERY_TIMEOUT
) -> list[RunnerView]:
    """Query every entry at once; runners in configuration order."""
    groups = await asyncio.gather(*(_survey_one(e, timeout) for e in entries))
    return [view for group in groups for view in group]
