"""``didomagic-runner mediator add-runner NAME`` and ``remove-runner NAME``.

``add-runner`` issues runner ``NAME`` a credential of its own at a mediator
(see :mod:`runner.credentials`) and prints the runner URL that carries it,
for ``didomagic-runner --name NAME --mediator URL``. Run it with the
mediator's state directory (and its address, which the URL names); a running
mediator picks the change up at the runner's next connection.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import platformdirs

from didomagic.urls import ConnectionURL
from runner import certs
from runner.credentials import RunnerCredentials
from runner.descriptions import DescriptionError, check_description

MEDIATOR_PORT = 4941


def _parser(command: str) -> argparse.ArgumentParser:
    issuing = command == "add-runner"
    p = argparse.ArgumentParser(
        prog=f"didomagic-runner mediator {command}",
        description=(
            "Issue a runner its own credential at this mediator (replacing any earlier one) "
            "and print the runner URL that carries it; only this runner can then register "
            "under this name."
            if issuing
            else "Revoke a runner's own credential at this mediator."
        ),
    )
    p.add_argument("name", help="the runner's name (its --name)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the mediator's state directory (default: the user's data directory, mediator/)",
    )
    if issuing:
        p.add_argument(
            "--host",
            default="127.0.0.1",
            help="the mediator's address, as runners reach it (default 127.0.0.1)",
        )
        p.add_argument(
            "--port",
            type=int,
            default=MEDIATOR_PORT,
            help=f"the mediator's port (default {MEDIATOR_PORT})",
        )
        p.add_argument(
            "--certfile",
            type=Path,
            default=None,
            help="the mediator's certificate, when it was started with --certfile "
            "(default: the one in its state directory)",
        )
    return p


def main(command: str, argv: Sequence[str]) -> int:
    """Run ``add-runner`` or ``remove-runner`` with ``argv``; return the exit status."""
    args = _parser(command).parse_args(argv)
    state_dir = args.state_dir or Path(platformdirs.user_data_dir("didomagic")) / "mediator"
    try:
        check_description({"name": args.name, "sessions": 0, "max_sessions": 0})
    except DescriptionError as exc:
        raise SystemExit(f"didomagic-runner mediator {command}: {exc}") from None
    credentials = RunnerCredentials(state_dir)
    if command == "remove-runner":
        if not credentials.remove(args.name):
            raise SystemExit(f"didomagic-runner: runner {args.name!r} has no credential here.")
        print(f"revoked the credential of runner {args.name!r}")
        return 0
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    certfile = args.certfile or certs.ensure(state_dir, args.host)[0]
    token = credentials.issue(args.name)
    print(ConnectionURL(args.host, args.port, token, certs.fingerprint_file(certfile)), flush=True)
    return 0
