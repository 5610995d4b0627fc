"""A tiny local package for the project demo: reached through sys.path, never installed."""

from .stats import summarize

__all__ = ["summarize"]
