"""The session tickets this user holds: a small JSON file beside the config, mode 0600.

A ticket is the secret a runner issued when it opened a session; with it (and
this user's client identity, :func:`didomagic.config.client_secret`) a
notebook takes the session back after a dropped connection or a restart of its
own kernel. Each entry names the session id, the runner (its name and the
connection URL the session was opened through), the ticket and when the
session was opened.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from didomagic.config import config_path
from didomagic.errors import ConfigurationError

TICKETS_FILE = "sessions.json"
"""The file's name, in the directory of the config file."""

_lock = threading.Lock()


@dataclass(frozen=True)
class Ticket:
    """What it takes to reattach one remote session."""

    session: str
    runner: str
    url: str
    ticket: str
    opened: float = field(default_factory=time.time)


def tickets_path() -> Path:
    """Where the tickets are kept: beside the config file (``$DIDOMAGIC_CONFIG``'s directory)."""
    return config_path().with_name(TICKETS_FILE)


def load() -> list[Ticket]:
    """Every ticket in the file (none if there is no file)."""
    path = tickets_path()
    try:
        body = json.loads(path.read_text())
        return [Ticket(**item) for item in body.get("sessions", [])]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigurationError(
            f"The session ticket file {path} is not valid ({exc}). Delete it; the sessions it "
            "named can then no longer be reattached (they end after their grace period)."
        ) from None


def save(ticket: Ticket) -> None:
    """Add (or replace) the ticket of one session."""
    with _lock:
        kept = [t for t in load() if t.session != ticket.session]
        _write([*kept, ticket])


def remove(session: str) -> None:
    """Forget the ticket of one session (it ended)."""
    with _lock:
        tickets = load()
        kept = [t for t in tickets if t.session != session]
        if len(kept) != len(tickets):
            _write(kept)


def find(session: str) -> Ticket:
    """The ticket of a session by its id (or a unique start of it, or of its part after '.')."""
    tickets = load()
    exact = [t for t in tickets if t.session == session]
    found = exact or [
        t for t in tickets if t.session.startswith(session) or t.session.split(".")[-1] == session
    ]
    if len(found) == 1:
        return found[0]
    held = ", ".join(t.session for t in tickets) or "none"
    what = "more than one session" if found else "no session"
    raise ConfigurationError(
        f"{what.capitalize()} with id {session!r} in {tickets_path()} (held: {held}). "
        "%runners sessions lists the sessions this user holds."
    )


def _write(tickets: list[Ticket]) -> None:
    path = tickets_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        json.dump({"sessions": [asdict(t) for t in tickets]}, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
