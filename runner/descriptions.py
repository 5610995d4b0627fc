"""Checking what a runner says about itself before a mediator lists it or matches on it.

A registration and every load report carry the runner's description (see
``RunnerServer.describe``). The mediator serves it to every client that lists
the pool and matches cells on it, so one runner's bad description must never
break the listing or the matching for others. :func:`check_description`
accepts exactly the fields it knows with their types and ranges, and other
fields only as small JSON values (a newer runner may report more); everything
else raises :class:`DescriptionError` with what was wrong.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from didomagic.errors import ProtocolError

MAX_NAME = 128
"""Characters of a runner name."""

MAX_TAGS = 64
MAX_TAG = 64
MAX_TEXT = 256
"""Characters of any other string field."""

MAX_COUNT = 1 << 20
"""The largest session, queue, CPU or kernel count a runner may report."""

MAX_BYTES = 1 << 60
"""The largest memory or message size (an exbibyte)."""

MAX_GPUS = 64
MAX_LIMITS = 32

MAX_EXTRA = 4096
"""Bytes of JSON an unknown field may take."""

MAX_DESCRIPTION = 64 << 10
"""Bytes of JSON a whole description may take."""

MAX_HEARTBEAT = 3600.0
"""The longest heartbeat a runner may announce, in seconds."""

SET_BY_MEDIATOR = frozenset({"status", "reason", "identity", "latency"})
"""Fields the mediator (or the client) sets itself: a runner's own values are dropped."""

_NAME = re.compile(r"[^\s,]([^\t\n\r\f\v,]*[^\s,])?")
"""A runner name: printable, no commas, no leading or trailing space."""
_TAG = re.compile(r"[^\s,]+")
_KEY = re.compile(r"[\w.-]{1,64}")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class DescriptionError(ProtocolError):
    """A runner's description or load report is malformed (the message says which field)."""


def _text(limit: int) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if not isinstance(value, str) or len(value) > limit or not value.isprintable():
            raise DescriptionError(
                f"{key!r} must be a printable string of at most {limit} characters, "
                f"got {_show(value)}"
            )
        return value

    return check


def _count(limit: int, optional: bool = False) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if type(value) is not int or not 0 <= value <= limit:
            raise DescriptionError(
                f"{key!r} must be an integer from 0 to {limit}"
                f"{' or null' if optional else ''}, got {_show(value)}"
            )
        return value

    return check


def _name(key: str, value: Any) -> Any:
    ok = isinstance(value, str) and len(value) <= MAX_NAME and value.isprintable()
    if not ok or not _NAME.fullmatch(value):
        raise DescriptionError(
            f"{key!r} must be 1 to {MAX_NAME} printable characters without commas or "
            f"surrounding spaces, got {_show(value)}"
        )
    return value


def _tags(key: str, value: Any) -> Any:
    if not isinstance(value, list) or len(value) > MAX_TAGS:
        raise DescriptionError(f"{key!r} must be a list of at most {MAX_TAGS} tags")
    for tag in value:
        ok = isinstance(tag, str) and len(tag) <= MAX_TAG and tag.isprintable()
        if not ok or not _TAG.fullmatch(tag):
            raise DescriptionError(
                f"each tag must be 1 to {MAX_TAG} printable characters without spaces or "
                f"commas, got {_show(tag)}"
            )
    return list(value)


def _limits(key: str, value: Any) -> Any:
    if not isinstance(value, list) or len(value) > MAX_LIMITS:
        raise DescriptionError(f"{key!r} must be a list of at most {MAX_LIMITS} phrases")
    return [_text(MAX_TEXT)(key, phrase) for phrase in value]


def _gpus(key: str, value: Any) -> Any:
    if not isinstance(value, list) or len(value) > MAX_GPUS:
        raise DescriptionError(f"{key!r} must be a list of at most {MAX_GPUS} GPUs")
    checked = []
    for gpu in value:
        if not isinstance(gpu, dict):
            raise DescriptionError(f"each of {key!r} must be an object, got {_show(gpu)}")
        checked.append(
            {
                field: check(f"gpus.{field}", gpu[field])
                for field, check in _GPU_FIELDS.items()
                if field in gpu
            }
        )
    return checked


_OPTIONAL_BYTES = _count(MAX_BYTES, optional=True)

_GPU_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "index": lambda key, v: _count(MAX_GPUS)(key, v) if isinstance(v, int) else _text(16)(key, v),
    "name": _text(MAX_TEXT),
    "memory_total": _OPTIONAL_BYTES,
    "memory_used": _OPTIONAL_BYTES,
}

FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "name": _name,
    "tags": _tags,
    "didomagic": _text(64),
    "os": _text(64),
    "arch": _text(64),
    "python": _text(64),
    "cpus": _count(MAX_COUNT, optional=True),
    "memory_total": _OPTIONAL_BYTES,
    "memory_free": _OPTIONAL_BYTES,
    "gpus": _gpus,
    "limits": _limits,
    "max_message_size": _count(MAX_BYTES),
    "warm_kernels": _count(MAX_COUNT),
    "sessions": _count(MAX_COUNT),
    "max_sessions": _count(MAX_COUNT),
    "queue": _count(MAX_COUNT),
    "max_queue": _count(MAX_COUNT),
}
"""Every field a runner reports that the mediator or a client reads, with its check."""

REQUIRED = ("name", "sessions", "max_sessions")


def check_description(description: Any) -> dict[str, Any]:
    """The description, checked field by field; raise :class:`DescriptionError` if malformed."""
    if not isinstance(description, dict):
        raise DescriptionError(f"a description must be a JSON object, got {_show(description)}")
    size = len(json.dumps(description))
    if size > MAX_DESCRIPTION:
        raise DescriptionError(f"the description takes {size} bytes, more than {MAX_DESCRIPTION}")
    for key in REQUIRED:
        if key not in description:
            raise DescriptionError(f"the description has no {key!r}")
    checked: dict[str, Any] = {}
    for key, value in description.items():
        if key in SET_BY_MEDIATOR:
            continue
        check = FIELDS.get(key)
        if check is not None:
            checked[key] = check(key, value)
        elif _KEY.fullmatch(key) and len(json.dumps(value)) <= MAX_EXTRA:
            checked[key] = value  # a field a newer runner reports: small, and read by no one
        else:
            raise DescriptionError(
                f"unknown field {key[:MAX_TAG]!r} is not a short name with at most "
                f"{MAX_EXTRA} bytes of JSON"
            )
    if checked["sessions"] > checked["max_sessions"] + checked.get("queue", 0):
        raise DescriptionError(
            f"'sessions' ({checked['sessions']}) is more than 'max_sessions' "
            f"({checked['max_sessions']})"
        )
    return checked


def check_runner_id(value: str) -> str:
    """A runner id as registered: 1 to 64 letters, digits, ``_`` or ``-``."""
    if not _ID.fullmatch(value):
        raise DescriptionError(
            f"a runner id is 1 to 64 letters, digits, _ or -, got {_show(value)}"
        )
    return value


def check_heartbeat(value: float) -> float:
    """A heartbeat period as registered: positive, finite, at most :data:`MAX_HEARTBEAT`."""
    if not math.isfinite(value) or not 0 < value <= MAX_HEARTBEAT:
        raise DescriptionError(
            f"the heartbeat must be more than 0 and at most {MAX_HEARTBEAT:g} s, got {value!r}"
        )
    return value


def _show(value: Any) -> str:
    """A value as an error message shows it: its type, and its start."""
    return f"{type(value).__name__} {repr(value)[:40]}"
