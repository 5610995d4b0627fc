"""The process's descriptor limit: raised to the hard limit at start, and logged.

Every connection, kernel channel and value file is a descriptor; the soft
``RLIMIT_NOFILE`` of many systems (1024) is far below what a busy runner
needs, while the hard limit is usually much higher and any process may raise
its soft limit up to it.
"""

from __future__ import annotations

import logging

try:
    import resource
except ImportError:  # Windows has no rlimits
    resource = None  # type: ignore[assignment]

DESCRIPTORS_PER_KERNEL = 32
"""About how many descriptors the runner holds for each kernel (ZMQ channels, pipes)."""


def raise_nofile(logger: logging.Logger, connections: int, handshakes: int) -> int | None:
    """Raise the soft descriptor limit to the hard one; log both; return the new soft limit.

    Warn when ``connections`` websockets plus ``handshakes`` unfinished
    connections would not leave room for a few kernels.
    """
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, wanted, exc)
            wanted = soft
    logger.info(
        "RLIMIT_NOFILE: soft %d (was %d), hard %s",
        wanted,
        soft,
        "unlimited" if hard == resource.RLIM_INFINITY else hard,
    )
    needed = connections + handshakes + 4 * DESCRIPTORS_PER_KERNEL
    if wanted < needed:
        logger.warning(
            "RLIMIT_NOFILE %d leaves little room: --max-connections %d and --max-handshakes %d "
            "may take %d descriptors; lower them or raise the hard limit (ulimit -Hn)",
            wanted,
            connections,
            handshakes,
            connections + handshakes,
        )
    return wanted
