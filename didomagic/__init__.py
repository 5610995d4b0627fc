"""didomagic: run a notebook cell on a remote Jupyter kernel with ``%%remote``.

Load it in IPython or Jupyter with ``%load_ext didomagic``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "add_runner",
    "cancel",
    "delete",
    "job",
    "jobs",
    "load_ipython_extension",
    "map",
    "remove_runner",
    "run",
    "run_async",
    "runners",
    "submit",
    "unload_ipython_extension",
    "use",
]

_API = {
    "run": "didomagic.calls",
    "run_async": "didomagic.calls",
    "map": "didomagic.calls",
    "submit": "didomagic.calls",
    "job": "didomagic.detached",
    "jobs": "didomagic.detached",
    "cancel": "didomagic.detached",
    "delete": "didomagic.detached",
    "runners": "didomagic.api",
    "add_runner": "didomagic.api",
    "remove_runner": "didomagic.api",
    "use": "didomagic.api",
}


def __getattr__(name: str) -> Any:
    """The Python API (``didomagic.run``, ``didomagic.map``, ...), imported on first use."""
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'didomagic' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%%remote``, ``%runners`` and ``%jobs`` (``%load_ext didomagic``)."""
    from didomagic.magics import RemoteMagics

    ipython.register_magics(RemoteMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """Close open runner sessions (``%unload_ext didomagic``)."""
    from didomagic.api import default_pool

    default_pool().close()
