"""The user's runner list: a small JSON file in the platform's config directory.

Connection URLs carry tokens, so the file is written with mode 0600 (atomically,
through a private temporary file) and its directory with 0700.
``DIDOMAGIC_CONFIG`` points at another file, for example per project or in tests.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from didomagic.errors import ConfigurationError
from didomagic.urls import ConnectionURL

CONFIG_ENV = "DIDOMAGIC_CONFIG"
"""Environment variable naming the config file to use instead of the default."""

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def config_path() -> Path:
    """Where the runner list is kept: ``$DIDOMAGIC_CONFIG`` or the user config directory."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return Path(platformdirs.user_config_dir("didomagic")) / "config.json"


def client_secret() -> str:
    """This user's client identity: a secret made once, kept beside the config (mode 0600).

    Detached jobs belong to it, so every notebook of this user sees its jobs
    and no other client does.
    """
    path = config_path().with_name("client-secret")
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_urlsafe(32)
    tmp = path.with_name(f".client-secret.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write(secret)
    try:
        os.link(tmp, path)  # never replaces one another process made meanwhile
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


@dataclass(frozen=True)
class Entry:
    """A configured runner or mediator: a name and its connection URL."""

    name: str
    url: ConnectionURL


class Config:
    """The configured runners and mediators, in the order they were added."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_path()
        self.entries: list[Entry] = []
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            body = json.loads(self.path.read_text())
            items = body.get("runners", [])
            self.entries = [Entry(str(i["name"]), ConnectionURL.parse(i["url"])) for i in items]
        except (ValueError, KeyError, TypeError, AttributeError, ConfigurationError) as exc:
            raise ConfigurationError(
                f"The didomagic config file {self.path} is not valid ({exc}). Fix or delete it; "
                "'%runners add URL' writes a new one."
            ) from None

    def save(self) -> None:
        """Write the file (mode 0600) atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = {"runners": [{"name": e.name, "url": str(e.url)} for e in self.entries]}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w") as f:
            json.dump(body, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def get(self, name: str) -> Entry | None:
        """The entry called ``name``, if any."""
        return next((e for e in self.entries if e.name == name), None)

    def add(self, name: str, url: ConnectionURL) -> Entry:
        """Add (or, for an existing name, replace) an entry and save."""
        if not _NAME.fullmatch(name):
            raise ConfigurationError(
                f"Runner name {name!r} may only use letters, digits, '.', '_' and '-'."
            )
        entry = Entry(name, url)
        existing = self.get(name)
        if existing is not None:
            self.entries[self.entries.index(existing)] = entry
        else:
            self.entries.append(entry)
        self.save()
        return entry

    def remove(self, name: str) -> Entry:
        """Remove the entry called ``name`` and save; raise if there is none."""
        entry = self.get(name)
        if entry is None:
            known = ", ".join(e.name for e in self.entries) or "none"
            raise ConfigurationError(
                f"No runner called {name!r} in {self.path} (configured: {known})."
            )
        self.entries.remove(entry)
        self.save()
        return entry
