"""``didomagic-runner``: start a runner, or generate a certificate.

::

    didomagic-runner [--host H] [--port P] [--tags a,b] ...   serve cells
    didomagic-runner gen-cert --out DIR [--host NAME]          write a certificate

On start the runner logs where it listens and its certificate fingerprint, and
prints its connection URL (address, token and fingerprint in one string) on
standard output and to ``--url-file``. The token never goes to the log.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import platformdirs

from didomagic.urls import ConnectionURL
from runner import certs
from runner.server import RunnerServer, RunnerSettings

logger = logging.getLogger("didomagic.runner")

DEFAULT_PORT = 4940


def _tags(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def serve_parser() -> argparse.ArgumentParser:
    """The parser of the serve command (the default)."""
    p = argparse.ArgumentParser(
        prog="didomagic-runner",
        description="Run notebook cells sent by %%remote in real Jupyter kernels. "
        "Other command: 'didomagic-runner gen-cert --out DIR' writes a certificate.",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument(
        "--port",
        type=_non_negative,
        default=DEFAULT_PORT,
        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    p.add_argument("--name", default=None, help="runner name (default: the host name)")
    p.add_argument("--tags", type=_tags, default=(), help="comma-separated tags, e.g. gpu,a100")
    p.add_argument(
        "--token",
        default=None,
        help="access token (default: $DIDOMAGIC_TOKEN, else one generated once and "
        "kept in the state directory)",
    )
    p.add_argument("--certfile", type=Path, default=None, help="TLS certificate (PEM)")
    p.add_argument("--keyfile", type=Path, default=None, help="TLS private key (PEM)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the generated certificate and token are kept "
        "(default: the user's data directory)",
    )
    p.add_argument(
        "--url-file",
        type=Path,
        default=None,
        help="write the connection URL here (mode 0600) once listening",
    )
    p.add_argument(
        "--max-sessions",
        type=_positive,
        default=os.cpu_count() or 1,
        help="sessions served at once (default: CPU count)",
    )
    p.add_argument(
        "--warm-kernels",
        type=_non_negative,
        default=1,
        help="kernels started ahead of sessions (default 1)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO",
    )
    p.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="stop when standard input closes (used by the embedded runner, so it "
        "dies with the notebook kernel that started it)",
    )
    return p


def gen_cert_parser() -> argparse.ArgumentParser:
    """The parser of ``gen-cert``."""
    p = argparse.ArgumentParser(
        prog="didomagic-runner gen-cert", description="Write a self-signed certificate and key."
    )
    p.add_argument("--out", type=Path, required=True, help="directory to write into")
    p.add_argument(
        "--host",
        default="localhost",
        help="host name or address the certificate names (default localhost)",
    )
    return p


def default_state_dir() -> Path:
    """Where a runner keeps its certificate and token unless told otherwise."""
    return Path(platformdirs.user_data_dir("didomagic")) / "runner"


def _load_token(explicit: str | None, state_dir: Path) -> str:
    token = explicit if explicit is not None else os.environ.get("DIDOMAGIC_TOKEN")
    if token is not None:
        token = token.strip()
        if not token or any(c.isspace() for c in token):
            raise SystemExit(
                "didomagic-runner: the token must be non-empty and contain no "
                "spaces; omit --token to have one generated."
            )
        return token
    path = state_dir / "token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write(token)
    return token


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if level != "DEBUG":
        for noisy in ("didomagic.runner.websockets", "traitlets", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


async def serve(args: argparse.Namespace) -> None:
    """Run the runner until SIGTERM, SIGINT or (optionally) standard input closes."""
    state_dir = args.state_dir or default_state_dir()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (args.certfile is None) != (args.keyfile is None):
        raise SystemExit("didomagic-runner: give both --certfile and --keyfile, or neither.")
    if args.certfile is None:
        certfile, keyfile = certs.ensure(state_dir, args.host)
    else:
        certfile, keyfile = args.certfile, args.keyfile
    settings = RunnerSettings(
        host=args.host,
        port=args.port,
        tags=args.tags,
        token=_load_token(args.token, state_dir),
        certfile=certfile,
        keyfile=keyfile,
        max_sessions=args.max_sessions,
        warm_kernels=args.warm_kernels,
    )
    if args.name:
        settings.name = args.name
    if not _is_loopback(args.host):
        logger.warning(
            "listening on %s, not loopback: anyone who can reach this address and holds the "
            "token can run code here as this user. Keep the token secret.",
            args.host,
        )
    work_root = Path(tempfile.mkdtemp(prefix="didomagic-runner-"))
    server = RunnerServer(settings, work_root)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.exit_on_stdin_eof:
        threading.Thread(target=_wait_stdin_eof, args=(loop, stop), daemon=True).start()
    try:
        port = await server.start()
        fingerprint = certs.fingerprint_file(certfile)
        url = ConnectionURL(
            host=args.host if args.host not in ("0.0.0.0", "::") else "127.0.0.1",
            port=port,
            token=settings.token,
            fingerprint=fingerprint,
        )
        logger.info(
            "runner %s listening on %s (tags: %s)",
            settings.name,
            url.address,
            ",".join(settings.tags) or "none",
        )
        logger.info("certificate SHA-256 fingerprint: %s", fingerprint)
        logger.info(
            "connection URL: %s (the full URL is on standard output%s)",
            url.redacted(),
            f" and in {args.url_file}" if args.url_file else "",
        )
        if args.url_file:
            _write_private(args.url_file, str(url) + "\n")
        print(url, flush=True)
        await stop.wait()
        logger.info("stopping: closing sessions and shutting kernels down")
    finally:
        await server.stop()
        shutil.rmtree(work_root, ignore_errors=True)
        if args.url_file:
            args.url_file.unlink(missing_ok=True)
    logger.info("stopped")


def _wait_stdin_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    while sys.stdin.buffer.read(4096):
        pass
    loop.call_soon_threadsafe(stop.set)


def gen_cert(args: argparse.Namespace) -> None:
    """Write a certificate and key, and print the fingerprint."""
    certfile, keyfile, fingerprint = certs.generate(args.out, [args.host])
    print(f"certificate: {certfile}\nkey:         {keyfile}\nSHA-256 fingerprint: {fingerprint}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``didomagic-runner`` and ``python -m runner``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["gen-cert"]:
        gen_cert(gen_cert_parser().parse_args(argv[1:]))
        return 0
    args = serve_parser().parse_args(argv)
    _configure_logging(args.log_level)
    asyncio.run(serve(args))
    return 0
