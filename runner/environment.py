"""Configuration from environment variables and mounted secret files.

Containers (Kubernetes) and batch jobs (Slurm) configure a process through
its environment, not its command line. :func:`arguments` turns the variables
below into command-line flags placed *before* the real ones, so an explicit
flag still wins. The flags listed here may be given as ``DIDOMAGIC_X_Y`` for
``--x-y`` (``--mediator`` as ``DIDOMAGIC_MEDIATOR_URL``); a variable ending in
``_FILE`` names a file whose content (stripped) is the value — the form of a
mounted Kubernetes Secret.

Secrets (tokens, the mediator URL that carries the runner token) are removed
from the process environment once read, so the kernels a runner starts never
inherit them.
"""

from __future__ import annotations

import shlex
from collections.abc import MutableMapping
from pathlib import Path

from didomagic.errors import ConfigurationError

PREFIX = "DIDOMAGIC_"

COMMON = ("host", "port", "name", "certfile", "keyfile", "client_ca", "state_dir", "log_level")
"""Flags both roles read from the environment."""

RUNNER = ("mediator", "tags", "max_sessions", "max_queue", "heartbeat", "exit_when_idle")
"""Flags only a runner reads."""

MEDIATOR = ("job_ttl",)
"""Flags only a mediator reads."""

SECRETS = ("token", "runner_token", "mediator")
"""Flags whose values are secret: read from ``*_FILE`` or the variable, then removed."""

ARGS = PREFIX + "ARGS"
"""More flags, in shell syntax, appended after the ones above."""


def variable_of(flag: str) -> str:
    """The variable of a flag (``max_sessions``: ``DIDOMAGIC_MAX_SESSIONS``)."""
    return PREFIX + ("MEDIATOR_URL" if flag == "mediator" else flag.upper())


def flags(role: str) -> tuple[str, ...]:
    """The flags ``role`` ("runner" or "mediator") reads from the environment."""
    own = (*MEDIATOR, "runner_token") if role == "mediator" else RUNNER
    return (*COMMON, *own, "token")


def arguments(role: str, environ: MutableMapping[str, str]) -> list[str]:
    """Flags for ``role`` ("runner" or "mediator") from ``environ``; secrets are removed.

    Raise :class:`~didomagic.errors.ConfigurationError` when a ``*_FILE`` variable names a file
    that cannot be read.
    """
    argv: list[str] = []
    for flag in flags(role):
        variable = variable_of(flag)
        value = _value(variable, environ)
        if flag in SECRETS:
            environ.pop(variable, None)
            environ.pop(variable + "_FILE", None)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), value]
    argv += shlex.split(environ.get(ARGS, ""))
    return argv


def _value(variable: str, environ: MutableMapping[str, str]) -> str | None:
    path = environ.get(variable + "_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigurationError(
                f"{variable}_FILE={path}: cannot read it ({exc.strerror}); mount the secret "
                "there or unset the variable."
            ) from None
    value = environ.get(variable)
    return value.strip() if value is not None and value.strip() else None
