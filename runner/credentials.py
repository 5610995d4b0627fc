"""Per-runner credentials at a mediator: one token per runner name, issued and kept by it.

``didomagic-runner mediator add-runner NAME`` issues a token bound to the
runner name ``NAME`` and prints the runner URL that carries it. The mediator
keeps only the SHA-256 of each token, by name, in ``runner-credentials.json``
in its state directory (mode 0600), and reads that file again when it
changes, so runners can be added or removed while it runs.

A runner that joins with its own token is known by that name and no other:
it can register only as ``NAME``, and no other credential (the shared runner
token included) can register ``NAME``. Issuing a name again replaces its
token; removing it revokes it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

FILENAME = "runner-credentials.json"


@dataclass(frozen=True)
class Identity:
    """Who a runner connection proved to be: a named credential, or the shared token."""

    name: str | None
    """The runner name its own credential is bound to; None for the shared token."""

    @property
    def verified(self) -> bool:
        """True when the runner holds a credential of its own."""
        return self.name is not None

    def describe(self) -> str:
        """How ``%runners`` shows it."""
        if self.name is None:
            return "unverified (shared runner token)"
        return f"verified: credential of {self.name}"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RunnerCredentials:
    """The per-runner tokens of one mediator (their digests, by runner name)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILENAME
        self._stamp: tuple[int, int] | None = None
        self._by_name: dict[str, str] = {}

    def _load(self) -> dict[str, str]:
        """The digests by name, read again if the file changed since the last read."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._by_name = None, {}
            return self._by_name
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp != self._stamp:
            body = json.loads(self.path.read_text())
            self._by_name = {str(k): str(v) for k, v in body.get("runners", {}).items()}
            self._stamp = stamp
        return self._by_name

    def names(self) -> set[str]:
        """Every runner name that has a credential of its own."""
        return set(self._load())

    def identify(self, token: str) -> str | None:
        """The runner name ``token`` is the credential of, or None."""
        digest = _digest(token)
        for name, known in self._load().items():
            if hmac.compare_digest(digest, known):
                return name
        return None

    def issue(self, name: str) -> str:
        """A new token for runner ``name`` (replacing any earlier one); only its digest is kept."""
        token = secrets.token_urlsafe(32)
        self._save({**self._load(), name: _digest(token)})
        return token

    def remove(self, name: str) -> bool:
        """Revoke ``name``'s credential; False if it had none."""
        current = dict(self._load())
        if current.pop(name, None) is None:
            return False
        self._save(current)
        return True

    def _save(self, by_name: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + f".{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "w") as f:
            json.dump({"runners": dict(sorted(by_name.items()))}, f, indent=1)
        os.replace(tmp, self.path)
