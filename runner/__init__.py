"""The didomagic runner: a websocket server that runs notebook cells in Jupyter kernels.

Start one with ``didomagic-runner`` (see :mod:`runner.cli`).
"""
