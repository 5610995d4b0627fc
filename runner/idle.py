"""``--exit-when-idle``: a runner that has served nobody for a while stops by itself.

Runners launched on demand (a Slurm job started by the mediator) use it so
their jobs end, and their GPUs return to the cluster, once no notebook needs
them. Idle means no session holds a slot and none is queued (a detached job
of the runner's own runs in a session too).
"""

from __future__ import annotations

import asyncio
import logging

from runner.server import RunnerServer
from runner.wire import wait_set

logger = logging.getLogger("didomagic.runner")


def _busy(server: RunnerServer) -> bool:
    return bool(server.active or server.waiting)


async def stop_when_idle(server: RunnerServer, seconds: float, stop: asyncio.Event) -> None:
    """Set ``stop`` once ``server`` has been idle for ``seconds`` without a break."""
    changed = asyncio.Event()
    server.load_listeners.append(changed.set)
    try:
        while True:
            changed.clear()
            if _busy(server):
                await changed.wait()
                continue
            if not await wait_set(changed, seconds) and not _busy(server):
                logger.info("idle for %g s (--exit-when-idle): stopping", seconds)
                stop.set()
                return
    finally:
        server.load_listeners.remove(changed.set)
