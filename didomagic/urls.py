"""Connection URLs: everything a client needs to reach one runner, in one string.

The form is ``wss://HOST:PORT/#fp=SHA256&token=TOKEN``. The secrets sit in the
URL *fragment*, which a client never puts on the wire: the token travels only
in the ``Authorization`` header after the pinned TLS handshake, and the
fingerprint never travels at all. Without ``fp`` the system's trusted CAs and
the host name are checked instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlsplit

from didomagic.errors import ConfigurationError

_HEX64 = re.compile(r"[0-9a-f]{64}")


def normalize_fingerprint(text: str) -> str:
    """Lower-case hex SHA-256 without separators; raise if it is not one."""
    fp = text.strip().lower().replace(":", "")
    if fp.startswith("sha256:"):
        fp = fp[len("sha256:") :]
    if not _HEX64.fullmatch(fp):
        raise ConfigurationError(
            f"{text!r} is not a SHA-256 certificate fingerprint (64 hex digits); "
            "copy it from the runner's start-up log or its connection URL."
        )
    return fp


@dataclass(frozen=True)
class ConnectionURL:
    """A parsed connection URL. ``repr`` hides the token."""

    host: str
    port: int
    token: str
    fingerprint: str | None = None
    client_cert: str | None = None
    """A client certificate (PEM) to present, for runners started with --client-ca."""
    client_key: str | None = None
    """Its private key (PEM); None when the certificate file holds it."""
    safe_results: bool = False
    """Accept only plain data (no code-running pickles) in values from this runner."""

    @property
    def address(self) -> str:
        """``host:port``, with brackets around an IPv6 host."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def websocket_uri(self) -> str:
        """The URI the websocket client dials: no token, no fingerprint."""
        return f"wss://{self.address}/"

    def __str__(self) -> str:
        fields = {
            "fp": self.fingerprint,
            "cert": self.client_cert,
            "key": self.client_key,
            "safe": "1" if self.safe_results else None,
        }
        fragment = "".join(f"{k}={quote(v, safe='/')}&" for k, v in fields.items() if v)
        return f"wss://{self.address}/#{fragment}token={quote(self.token, safe='')}"

    def __repr__(self) -> str:
        return f"ConnectionURL({self.address!r}, fingerprint={self.fingerprint!r}, token=***)"

    def redacted(self) -> str:
        """The URL with the token replaced by ``***``, safe for logs."""
        return str(self).rsplit("token=", 1)[0] + "token=***"

    @classmethod
    def parse(cls, text: str) -> ConnectionURL:
        """Parse ``wss://HOST:PORT/#fp=…&token=…``; raise :class:`ConfigurationError`."""
        hint = "A runner prints its connection URL when it starts (and writes it to --url-file)."
        try:
            parts = urlsplit(text.strip())
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(f"Not a connection URL ({exc}). {hint}") from None
        if parts.scheme != "wss":
            raise ConfigurationError(
                f"Connection URLs start with wss:// (didomagic always uses TLS), "
                f"got {parts.scheme or 'no scheme'}://. {hint}"
            )
        if not parts.hostname or port is None:
            raise ConfigurationError(f"The connection URL needs a host and a port. {hint}")
        fields = parse_qs(parts.fragment, keep_blank_values=True)
        token = fields.get("token", [""])[0]
        if not token:
            raise ConfigurationError(f"The connection URL has no token (#token=…). {hint}")
        fp = fields.get("fp", [None])[0]
        safe = fields.get("safe", ["0"])[0]
        if safe not in ("0", "1"):
            raise ConfigurationError(f"safe= in a connection URL is 0 or 1, not {safe!r}.")
        return cls(
            host=parts.hostname,
            port=port,
            token=token,
            fingerprint=normalize_fingerprint(fp) if fp else None,
            client_cert=fields.get("cert", [None])[0] or None,
            client_key=fields.get("key", [None])[0] or None,
            safe_results=safe == "1",
        )
