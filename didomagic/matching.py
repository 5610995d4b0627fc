"""Choosing a runner: match tags, OS and name, then take the least loaded.

Pure functions over runner descriptions (the dicts runners report about
themselves), shared by the notebook side and the mediator so both choose the
same way. Least loaded means: most free session slots, then the shortest
queue, then the lowest round-trip latency.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

Description = dict[str, Any]


def matches(
    description: Description, tags: Iterable[str] = (), os: str = "", name: str = ""
) -> bool:
    """True when the runner has every tag in ``tags``, runs ``os`` and is called ``name``.

    Empty requirements match anything; OS names compare case-insensitively.
    """
    if name and description.get("name") != name:
        return False
    if os and str(description.get("os", "")).lower() != os.lower():
        return False
    return set(tags) <= set(description.get("tags") or ())


def free_slots(description: Description) -> int:
    """Session slots not in use (never negative)."""
    return max(0, int(description.get("max_sessions") or 0) - int(description.get("sessions") or 0))


def can_take(description: Description) -> bool:
    """True when the runner is up and has a free slot or a free place in its queue."""
    if description.get("status", "up") != "up":
        return False
    queue = int(description.get("queue") or 0)
    return free_slots(description) > 0 or queue < int(description.get("max_queue") or 0)


def load_key(description: Description) -> tuple[int, int, float]:
    """Sort key: free slots first (more is better), then queue length, then latency."""
    latency = description.get("latency")
    return (
        -free_slots(description),
        int(description.get("queue") or 0),
        float(latency) if latency is not None else float("inf"),
    )


def choose(
    descriptions: Sequence[Description],
    tags: Iterable[str] = (),
    os: str = "",
    name: str = "",
) -> Description | None:
    """The least loaded runner that matches and can take a session now, or ``None``."""
    tags = tuple(tags)
    candidates = [d for d in descriptions if matches(d, tags, os, name) and can_take(d)]
    return min(candidates, key=load_key) if candidates else None


def all_busy(
    descriptions: Sequence[Description], tags: Iterable[str] = (), os: str = "", name: str = ""
) -> bool:
    """True when some matching runner is up (so it is full, rather than absent or down)."""
    tags = tuple(tags)
    return any(matches(d, tags, os, name) and d.get("status", "up") == "up" for d in descriptions)


def requirement_text(tags: Iterable[str] = (), os: str = "", name: str = "") -> str:
    """The requirements in words, for error messages: ``tags gpu,a100 and OS linux``."""
    parts = []
    if name:
        parts.append(f"the name {name}")
    tags = tuple(tags)
    if tags:
        parts.append(f"the tag{'s' if len(tags) > 1 else ''} {','.join(tags)}")
    if os:
        parts.append(f"OS {os}")
    return " and ".join(parts) or "no requirements"


def no_match_message(
    descriptions: Sequence[Description], tags: Iterable[str] = (), os: str = "", name: str = ""
) -> str:
    """Why no runner was chosen, listing every runner with its tags, OS, status and load."""
    tags = tuple(tags)
    wanted = requirement_text(tags, os, name)
    matching = [d for d in descriptions if matches(d, tags, os, name)]
    if not descriptions:
        head = f"No runner with {wanted}: no runners are known."
        hint = "Add one with %runners add URL (a runner's or a mediator's connection URL)."
    elif matching:
        head = f"Every runner with {wanted} is down or busy (all slots and queue places taken)."
        hint = "Try again later, or start another runner with these tags."
    else:
        head = f"No runner has {wanted}."
        hint = "Use tags that one of these runners has, or start a runner with --tags."
    lines = [head, "Known runners:"]
    for d in descriptions:
        lines.append("  " + summary(d))
    lines.append(hint)
    return "\n".join(lines)


def summary(description: Description) -> str:
    """One line about a runner: name, tags, OS, status and load."""
    tags = ",".join(description.get("tags") or ()) or "no tags"
    status = str(description.get("status", "up"))
    if description.get("reason"):
        status += f" ({description['reason']})"
    load = ""
    if status.startswith("up"):
        load = (
            f", {description.get('sessions', 0)}/{description.get('max_sessions', '?')} sessions"
            f", queue {description.get('queue', 0)}/{description.get('max_queue', 0)}"
        )
    return f"{description.get('name', '?')} [{tags}] {description.get('os', '?')}: {status}{load}"
