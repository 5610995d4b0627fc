"""``--advertise``: announce a runner or mediator on the local network with DNS-SD over mDNS.

The announcement (service type :data:`SERVICE_TYPE`) carries the role, name,
tags, port and certificate fingerprint, so that a notebook can find the server
and pin it; it never carries a token, which the user still gets from the
server's owner. ``zeroconf`` does the multicast (a maintained implementation
of RFC 6762/6763, asyncio-native, so nothing here blocks the event loop).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Sequence

from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

import didomagic

logger = logging.getLogger("didomagic.runner.advertise")

SERVICE_TYPE = "_didomagic._tcp.local."
"""The DNS-SD service type of didomagic runners and mediators."""

MAX_TXT_VALUE = 200
"""Characters of one TXT value (a DNS TXT string holds at most 255 bytes)."""


def _addresses(host: str) -> list[str]:
    """The addresses to announce for a server listening on ``host``."""
    if host in ("0.0.0.0", "::", ""):
        name = socket.gethostname()
        found = {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)}
        return sorted(a for a in found if not ipaddress.ip_address(a).is_loopback)
    return [host]


class Advertiser:
    """One server's announcement, from :meth:`start` until :meth:`stop`."""

    def __init__(
        self,
        role: str,
        name: str,
        host: str,
        port: int,
        fingerprint: str,
        tags: Sequence[str] = (),
    ) -> None:
        self.addresses = _addresses(host)
        if not self.addresses or all(ipaddress.ip_address(a).is_loopback for a in self.addresses):
            raise ValueError(
                f"--advertise needs an address others can reach; this server listens on "
                f"{host} only. Give --host with this machine's LAN address (or 0.0.0.0)."
            )
        label = f"{name}-{role}" if role == "mediator" and name == "mediator" else name
        self.info = ServiceInfo(
            SERVICE_TYPE,
            f"{label[:60]}.{SERVICE_TYPE}",
            addresses=[socket.inet_pton(_family(a), a) for a in self.addresses],
            port=port,
            properties={
                "role": role,
                "name": name[:MAX_TXT_VALUE],
                "tags": ",".join(tags)[:MAX_TXT_VALUE],
                "fp": fingerprint,
                "version": didomagic.__version__,
            },
            server=f"{socket.gethostname()}.local.",
        )
        self._zeroconf: AsyncZeroconf | None = None

    async def start(self) -> None:
        """Announce (and answer queries) on the interfaces of the announced addresses."""
        v4 = all(_family(a) is socket.AF_INET for a in self.addresses)
        self._zeroconf = AsyncZeroconf(
            interfaces=self.addresses, ip_version=IPVersion.V4Only if v4 else IPVersion.All
        )
        await self._zeroconf.async_register_service(self.info, allow_name_change=True)
        logger.info(
            "advertising %s on the local network (DNS-SD %s) at %s",
            self.info.name,
            SERVICE_TYPE,
            ", ".join(self.addresses),
        )

    async def stop(self) -> None:
        """Withdraw the announcement."""
        if self._zeroconf is not None:
            await self._zeroconf.async_unregister_service(self.info)
            await self._zeroconf.async_close()
            self._zeroconf = None


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET
