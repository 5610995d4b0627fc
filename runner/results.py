"""What a cell sends back, as its kernel's agent reported it.

The agent puts the values' headers, failures and deleted names in the
metadata of the cell's ``execute_reply``, and the values' bytes, end to end,
in ``out.bin`` in the exchange directory. The kernel runs the user's code, so
both are untrusted: the report is checked field by field, and ``out.bin`` is
read without following links or waiting on FIFOs (:mod:`runner.safefiles`).
What does not pass is logged and comes back as no values.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from didomagic import serialize
from didomagic.protocol import ValueHeader
from runner import safefiles

logger = logging.getLogger("didomagic.runner")

RELEASE_ON_THREAD = 16 << 20
"""Bytes of a finished result above which :func:`release` lets it go on a thread."""

Collected = tuple[list[ValueHeader], list[int], dict[str, str], list[str]]
"""Value headers, their offsets in ``out.bin``, failures by name, deleted names."""


def collect(body: Any, log_id: str) -> Collected:
    """Check the agent's report of a cell (None: it made none, say the kernel died)."""
    if body is None:
        return [], [], {}, []
    try:
        return _checked(body)
    except (ValueError, TypeError, KeyError) as exc:
        logger.warning("session %s: the kernel's result was refused: %s", log_id, exc)
        return [], [], {}, []


def _checked(body: Any) -> Collected:
    values, offsets = [], []
    for v in body["values"]:
        sizes, offset = v["sizes"], v["offset"]
        if not (
            isinstance(v["name"], str)
            and isinstance(sizes, list)
            and all(type(n) is int and n >= 0 for n in sizes)
            and type(offset) is int
            and offset >= 0
        ):
            raise ValueError(f"malformed value entry {v!r:.80}")
        values.append(ValueHeader(v["name"], tuple(sizes)))
        offsets.append(offset)
    failures, deleted = body["failures"], body["deleted"]
    if not (
        isinstance(failures, dict)
        and all(isinstance(x, str) for x in failures.values())
        and isinstance(deleted, list)
        and all(isinstance(x, str) for x in deleted)
    ):
        raise ValueError("malformed failures or deleted names")
    return values, offsets, dict(failures), list(deleted)


def output_parts(
    path: Path,
    values: list[ValueHeader],
    offsets: list[int],
    failures: dict[str, str],
    log_id: str,
) -> tuple[list[list[memoryview]], list[ValueHeader]]:
    """The parts of each value in ``out.bin``, and the values sent.

    If the file is not a regular file or is shorter than declared, no value
    is sent and each is named in ``failures``.
    """
    if not values:
        return [], []
    try:
        view = safefiles.map_regular(path)
        parts = [
            serialize.slice_parts(view, offset, v.sizes)
            for offset, v in zip(offsets, values, strict=True)
        ]
    except (OSError, safefiles.UnsafeFile, ValueError) as exc:
        logger.warning("session %s: the kernel's returned values were refused: %s", log_id, exc)
        for v in values:
            failures[v.name] = f"could not be sent back: {exc}"
        return [], []
    return parts, values


def release(box: list[list[list[memoryview]]]) -> None:
    """Let go of the finished result's parts that ``box`` holds (its only reference to them).

    The parts map the kernel's ``out.bin``, already unlinked, so dropping the
    last view unmaps it and frees its pages: 0.2 to 0.4 s per GB, which the
    next cell would wait for on the event loop. A large result's box is
    therefore emptied on a thread of its own (unmapping releases the GIL).
    Build the box in the same statement that drops your own reference::

        box, finished.parts = [finished.parts], []
    """
    if sum(part.nbytes for parts in box for value in parts for part in value) < RELEASE_ON_THREAD:
        box.clear()
        return
    threading.Thread(target=box.clear, name="didomagic-release", daemon=True).start()
