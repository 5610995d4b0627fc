"""What one cell or job submission may declare, checked before anything is allocated.

A cell (on a session) and a submission (on the jobs channel) carry the same
value headers, so both pass the same checks: the bytes declared against
``--max-message-size``, the count against ``--max-values``, and the wait for
their bytes against ``--upload-timeout``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from didomagic.protocol import ValueHeader
from runner.limits import format_size

MAX_VALUES = 10_000
"""Default of ``--max-values``: values one cell or submission may declare."""

UPLOAD_TIMEOUT = 60.0
"""Default of ``--upload-timeout``: seconds a declared upload may go without a frame."""


@dataclass(frozen=True)
class RequestLimits:
    """The limits every cell and submission is held to."""

    max_message_size: int = 8 << 30
    """Bytes of values one request may declare (those already cached do not count)."""
    max_values: int = MAX_VALUES
    """Values one request may declare."""
    upload_timeout: float = UPLOAD_TIMEOUT
    """Seconds an upload may go without receiving a frame before it is dropped."""


def refusal(values: Sequence[ValueHeader], limits: RequestLimits, what: str) -> str | None:
    """Why a request (``what``: "cell" or "submission") with ``values`` is refused, if it is."""
    if len(values) > limits.max_values:
        return (
            f"The {what} declares {len(values)} values; this server accepts at most "
            f"{limits.max_values} per {what} (--max-values). Nothing was allocated; send "
            "fewer, larger values (a dict or a list of them travels as one)."
        )
    size = sum(v.nbytes for v in values if not v.cached)
    if size > limits.max_message_size:
        return (
            f"The {what} declares {format_size(size)} of values; this server accepts at most "
            f"{format_size(limits.max_message_size)} per {what} (--max-message-size). "
            "Nothing was allocated."
        )
    return None


def stalled(limits: RequestLimits, what: str) -> str:
    """The error text for an upload dropped by ``--upload-timeout``."""
    return (
        f"No bytes of the {what}'s declared values arrived for {limits.upload_timeout:g} s "
        f"(--upload-timeout); the {what} was dropped and nothing of it was kept. Check the "
        "connection, or ask the server's owner to raise --upload-timeout."
    )
