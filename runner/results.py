"""What a cell sends back, as its kernel's agent left it in the exchange directory.

The agent writes ``result.json`` (the values' headers, failures, deleted
names) and ``out.bin`` (the values' bytes, end to end). The kernel runs the
user's code, so both are untrusted: they are read without following links or
waiting on FIFOs (:mod:`runner.safefiles`), and ``result.json`` is checked
field by field. What does not pass is logged and comes back as no values.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from didomagic import serialize
from didomagic.protocol import MAX_TEXT_SIZE, ValueHeader
from runner import agent, safefiles

logger = logging.getLogger("didomagic.runner")

Collected = tuple[list[ValueHeader], list[int], dict[str, str], list[str]]
"""Value headers, their offsets in ``out.bin``, failures by name, deleted names."""


def collect(exchange: Path, log_id: str) -> Collected:
    """Read and check ``result.json`` (then remove it); nothing if it is missing or bad."""
    path = exchange / agent.RESULT_FILE
    try:
        body = json.loads(safefiles.read_regular(path, MAX_TEXT_SIZE))
        return _checked(body)
    except FileNotFoundError:
        return [], [], {}, []
    except (safefiles.UnsafeFile, ValueError, TypeError, KeyError) as exc:
        logger.warning("session %s: the kernel's result was refused: %s", log_id, exc)
        return [], [], {}, []
    finally:
        with contextlib.suppress(OSError):
            path.unlink()


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
