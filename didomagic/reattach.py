"""Remote sessions that outlive a connection or the notebook's kernel, from the magics.

``%runners sessions`` lists the sessions this user holds on the configured
runners and mediators (and on any runner a ticket names); ``%remote attach
ID`` takes one back so that the next cells run in its namespace, ``%remote
detach`` lets go of one without ending it, and ``%remote close ID`` ends one.
``%%remote --session ID`` runs one cell in a held session.

The commands register with :func:`didomagic.linecommands.command`, the one
dispatcher of ``%remote``'s line form.
"""

from __future__ import annotations

import sys
from typing import Any

from IPython.core.error import UsageError

from didomagic import display, tickets
from didomagic.client import list_sessions
from didomagic.config import client_secret
from didomagic.errors import ConnectError
from didomagic.linecommands import LineCall, command
from didomagic.loop import background_loop
from didomagic.pool import SessionPool, default_pool
from didomagic.protocol import CLIENT_HEADER, Output
from didomagic.session import RemoteSession
from didomagic.urls import ConnectionURL


def _one_id(words: list[str], what: str) -> str:
    if len(words) != 1:
        raise UsageError(f"%remote {what} needs one session id (see %runners sessions).")
    return words[0]


@command("attach", "%remote attach ID       take a held session back: the next cells run in it")
def attach(call: LineCall) -> Any:
    """``%remote attach ID``: take the session back; a cell it ran meanwhile delivers here."""
    from didomagic.api import apply_values, raise_for_status, report_failures
    from didomagic.progress import make_progress

    ticket = tickets.find(_one_id(call.words, "attach"))
    session = default_pool().adopt(ticket)
    shown: list[display.RemoteResult] = []

    def on_output(output: Output) -> None:
        result = display.show(output)
        if result is not None:
            shown.append(result)

    outcome = session.resume(on_output, make_progress())
    print(
        f"didomagic: attached session {ticket.session} on runner {session.runner_name}; "
        "cells without --runner or --tags run there now."
    )
    if outcome is None:
        return None
    result, buffers = outcome
    returned = [(v.name, parts) for v, parts in zip(result.values, buffers, strict=True)]
    failures = dict(result.failures)
    namespace = call.magics.shell.user_ns
    failures.update(apply_values(namespace, returned, result.deleted, session.url.safe_results))
    report_failures(failures, "synced")
    raise_for_status(result, session.runner_name)
    return shown[-1] if shown else None


@command(
    "detach", "%remote detach [ID]     let go of a session (the current one) without ending it"
)
def detach(call: LineCall) -> None:
    """``%remote detach [ID]``: let go of a session; it waits on its runner for its grace."""
    pool, words = default_pool(), call.words
    if len(words) > 1:
        raise UsageError("%remote detach takes at most one session id.")
    session = pool.find(tickets.find(words[0]).session) if words else pool.attached or pool.last
    if session is None or not session.session_id:
        raise UsageError(
            "%remote detach: this notebook holds no such session (see %runners sessions)."
        )
    grace = session.description.get("session_grace")
    session_id, runner = session.session_id, session.runner_name
    session.detach()
    pool.forget(session)
    print(
        f"didomagic: detached session {session_id}; runner {runner} keeps it"
        + (f" for {float(grace):g} s (--session-grace)" if grace else "")
        + f". %remote attach {session_id} takes it back."
    )


@command("close", "%remote close ID        end a held session now; its remote state is gone")
def close(call: LineCall) -> None:
    """``%remote close ID``: end a held session now (its remote state is gone)."""
    ticket = tickets.find(_one_id(call.words, "close"))
    pool = default_pool()
    session = pool.find(ticket.session) or RemoteSession(
        ConnectionURL.parse(ticket.url), ticket=ticket
    )
    session_id, runner = session.session_id, session.runner_name
    session.close()
    pool.forget(session)
    print(f"didomagic: closed session {session_id} on runner {runner}; its remote state is gone.")


def session_for(session_id: str, pool: SessionPool | None = None) -> RemoteSession:
    """The session ``%%remote --session ID`` runs its cell in (taken back on first use)."""
    return (pool or default_pool()).hold(tickets.find(session_id))


def held_sessions(pool: SessionPool | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The sessions this user holds on every configured runner and mediator (and ticket's).

    Returns them (each with ``via``, the name it was found through, and
    ``ticket``, whether this user's ticket file has it) and the configured
    places that could not be asked.
    """
    pool = pool or default_pool()
    places: dict[str, tuple[str, ConnectionURL]] = {}
    for entry in pool.entries():
        places.setdefault(entry.url.address, (entry.name, entry.url))
    configured = set(places)
    held = tickets.load()
    for ticket in held:
        url = ConnectionURL.parse(ticket.url)
        places.setdefault(url.address, (ticket.runner, url))
    headers = {CLIENT_HEADER: client_secret()}

    async def ask_all() -> list[tuple[str, tuple[dict[str, Any], ...] | ConnectError]]:
        import asyncio

        async def ask(name: str, url: ConnectionURL) -> Any:
            try:
                return name, await list_sessions(url, headers)
            except ConnectError as exc:
                # A runner known only from a ticket may be long gone (an embedded one).
                return name, exc if url.address in configured else ()

        return list(await asyncio.gather(*(ask(n, u) for n, u in places.values())))

    answers = background_loop().run(ask_all())
    ours = {t.session for t in held}
    rows: dict[str, dict[str, Any]] = {}
    failed = []
    for name, answer in answers:
        if isinstance(answer, ConnectError):
            failed.append(f"{name} ({str(answer).split('. ')[0]})")
            continue
        for item in answer:
            rows.setdefault(
                str(item.get("id")), {**item, "via": name, "ticket": item.get("id") in ours}
            )
    return list(rows.values()), failed


def text_table(rows: list[dict[str, Any]]) -> str:
    """The sessions as a plain-text table."""
    if not rows:
        return "didomagic: this user holds no remote sessions on the configured runners."
    header = ("ID", "RUNNER", "AGE", "STATE", "LAST CELL")
    lines = [header]
    for row in sorted(rows, key=lambda r: float(r.get("opened") or 0)):
        state = str(row.get("state", "?")) + ("" if row.get("attached") else ", detached")
        if not row.get("ticket"):
            state += ", no ticket here"
        lines.append(
            (
                str(row.get("id")),
                str(row.get("runner", row.get("via"))),
                _age(float(row.get("age") or 0)),
                state,
                str(row.get("last_cell") or ""),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def show_sessions() -> None:
    """``%runners sessions``: print the table (and the places that did not answer)."""
    rows, failed = held_sessions()
    print(text_table(rows))
    if failed:
        print("didomagic: could not ask " + "; ".join(failed), file=sys.stderr)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
