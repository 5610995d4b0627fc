"""``%runners discover``: find runners and mediators that advertise on the local network.

Servers started with ``--advertise`` announce themselves with DNS-SD over mDNS
(``_didomagic._tcp``): name, role, tags, address, port and certificate
fingerprint, never a token. :func:`discover` listens for a short while and
returns what answered; :func:`connection_url` pins a discovered server to its
advertised fingerprint, with the token its owner gave the user.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from zeroconf import ServiceBrowser, ServiceStateChange, Zeroconf

from didomagic.errors import ConfigurationError
from didomagic.urls import ConnectionURL

SERVICE_TYPE = "_didomagic._tcp.local."
"""The DNS-SD service type runners and mediators advertise (runner/advertise.py)."""

DISCOVER_TIMEOUT = 2.0
"""Seconds :func:`discover` listens by default."""


@dataclass(frozen=True)
class Discovered:
    """A runner or mediator that answered on the local network."""

    name: str
    role: str
    host: str
    port: int
    tags: tuple[str, ...]
    fingerprint: str

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"


def _text(properties: dict[bytes, bytes | None], key: str) -> str:
    value = properties.get(key.encode())
    return value.decode(errors="replace") if value else ""


def discover(timeout: float = DISCOVER_TIMEOUT) -> list[Discovered]:
    """Everything that advertises ``_didomagic._tcp`` and answers within ``timeout`` s."""
    names: set[str] = set()
    seen = threading.Event()

    def changed(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Added:
            names.add(name)
            seen.set()

    zeroconf = Zeroconf()
    try:
        browser = ServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[changed])
        deadline = time.monotonic() + timeout
        seen.wait(timeout)  # the first answer, then the rest of the window for others
        time.sleep(max(0.0, deadline - time.monotonic()))
        browser.cancel()
        found = []
        for name in sorted(names):
            info = zeroconf.get_service_info(SERVICE_TYPE, name, timeout=int(timeout * 1000))
            if info is None or not info.parsed_addresses():
                continue
            props = info.properties
            fingerprint = _text(props, "fp").lower()
            if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
                continue  # not a didomagic server: no valid fingerprint to pin
            found.append(
                Discovered(
                    name=_text(props, "name") or name.removesuffix("." + SERVICE_TYPE),
                    role=_text(props, "role") or "runner",
                    host=info.parsed_addresses()[0],
                    port=int(info.port or 0),
                    tags=tuple(t for t in _text(props, "tags").split(",") if t),
                    fingerprint=fingerprint,
                )
            )
        return found
    finally:
        zeroconf.close()


def connection_url(found: Discovered, token: str) -> ConnectionURL:
    """The connection URL of a discovered server, pinned to its advertised fingerprint."""
    if not token:
        raise ConfigurationError(
            f"{found.name} advertises no token (none ever travels on the network): give the "
            "one its owner gave you with --token T."
        )
    return ConnectionURL(found.host, found.port, token, found.fingerprint)


_last: list[Discovered] = []
"""What the last :func:`discover` found (``%runners add NAME`` looks there first)."""


def discover_and_remember(timeout: float = DISCOVER_TIMEOUT) -> list[Discovered]:
    """:func:`discover`, remembering the result for :func:`find`."""
    global _last
    _last = discover(timeout)
    return _last


def find(name: str, timeout: float = DISCOVER_TIMEOUT) -> Discovered:
    """The discovered server called ``name``: from the last discovery, else a new one."""
    for source in (lambda: _last, lambda: discover_and_remember(timeout)):
        for found in source():
            if found.name == name:
                return found
    raise ConfigurationError(
        f"No runner or mediator called {name!r} answered on the local network. "
        "%runners discover lists the ones that do (they need --advertise); otherwise "
        "give its connection URL."
    )


def text_table(found: list[Discovered], configured: list[ConnectionURL]) -> str:
    """The discovery as a plain-text table, with whether each is already configured."""
    if not found:
        return (
            "didomagic: nothing answered on the local network (runners and mediators "
            "announce themselves only with --advertise)."
        )
    pinned = {u.fingerprint for u in configured} | {u.address for u in configured}
    rows = [
        (
            d.name,
            d.role,
            d.address,
            ",".join(d.tags) or "-",
            d.fingerprint[:16] + "…",
            "yes" if d.fingerprint in pinned or d.address in pinned else "no",
        )
        for d in found
    ]
    header = ("NAME", "ROLE", "ADDRESS", "TAGS", "FINGERPRINT", "CONFIGURED")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    lines.append("add one with: %runners add NAME --token T (the token comes from its owner)")
    return "\n".join(line.rstrip() for line in lines)
