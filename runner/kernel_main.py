"""How a runner kernel starts: ipykernel's own application, with an IOPub channel that never drops.

ZeroMQ publish sockets drop messages once 1,000 of them wait for a reader
(their high-water mark). A remote cell that updates a widget or a display
thousands of times in a tight loop (a fast tqdm bar) lost updates that way;
and when the lost message was the kernel's ``idle`` status, the runner waited
for the cell forever. The runner is this channel's only reader and reads it
as fast as it forwards, so both ends are unbounded here and in
:meth:`runner.kernels.Kernel.start` (``--max-output`` still caps what a cell
may send on).

Run as ``python -m runner.kernel_main -f CONNECTION_FILE``, in place of
``python -m ipykernel_launcher``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import zmq
from ipykernel.kernelapp import IPKernelApp


class RunnerKernelApp(IPKernelApp):
    """ipykernel's kernel application, whose IOPub socket keeps every message."""

    def init_iopub(self, context: Any) -> None:
        """Make the IOPub socket (and the sockets made after it) with no high-water mark."""
        context.setsockopt(zmq.SNDHWM, 0)
        super().init_iopub(context)


def main() -> None:
    """Start the kernel (as ``ipykernel_launcher`` does: without the start directory on the path,
    which the kernel's shell adds back)."""
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    RunnerKernelApp.launch_instance()


if __name__ == "__main__":
    main()
