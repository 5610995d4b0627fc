"""didomagic: run a notebook cell on a remote Jupyter kernel with ``%%remote``.

Load it in IPython or Jupyter with ``%load_ext didomagic``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_ipython_extension", "unload_ipython_extension"]


def load_ipython_extension(ipython: Any) -> None:
    """Register the ``%%remote`` magic (``%load_ext didomagic``)."""
    from didomagic.magics import RemoteMagics

    ipython.register_magics(RemoteMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """Close open runner sessions (``%unload_ext didomagic``)."""
    from didomagic.api import default_pool

    default_pool().close()
