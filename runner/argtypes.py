"""Argument types of the command lines (``type=`` of argparse), shared by every parser.

Each turns a flag's text into its value or raises ``ArgumentTypeError`` with
what was wrong, which argparse prints beside the flag's name.
"""

from __future__ import annotations

import argparse


def tags(text: str) -> tuple[str, ...]:
    """``gpu, a100`` → ``("gpu", "a100")``."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def positive(text: str) -> int:
    """An integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative(text: str) -> int:
    """An integer of 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def seconds(text: str) -> float:
    """A positive number of seconds."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value
