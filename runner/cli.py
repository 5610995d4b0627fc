"""``didomagic-runner``: start a runner, or generate a certificate.

::

    didomagic-runner [--host H] [--port P] [--tags a,b] ...   serve cells
    didomagic-runner mediator [--host H] [--port P] ...        match cells to runners
    didomagic-runner mediator add-runner NAME [--state-dir D]  a runner's own credential
    didomagic-runner gen-cert --out DIR [--host NAME]          write a certificate
    didomagic-runner gen-client-cert --ca-dir D --name N --out DIR   a client certificate
    didomagic-runner --check-sandbox [limit flags]             what this host can enforce
    didomagic-runner [mediator] --config FILE [--print-config]  flags from a TOML file
    didomagic-runner slurm-script [--slurm-* flags]            print a runner batch script

Both roles also read their settings from ``DIDOMAGIC_*`` environment variables
and mounted secret files (:mod:`runner.environment`); flags win.

On start the runner logs where it listens and its certificate fingerprint, and
prints its connection URL (address, token and fingerprint in one string) on
standard output and to ``--url-file``. A mediator prints two URLs: the one for
clients, then the one runners join with (``--mediator``). Tokens never go to
the log.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import platformdirs

from didomagic import eventloops
from didomagic.client import RunnerConnection, open_connection
from didomagic.errors import ConfigurationError
from didomagic.urls import ConnectionURL
from runner import accept, admission, certs, enrol, environment, fdlimit, slurm, slurm_options
from runner.admission import RequestLimits
from runner.advertise import Advertiser
from runner.argtypes import non_negative as _non_negative
from runner.argtypes import positive as _positive
from runner.argtypes import seconds as _seconds
from runner.argtypes import tags as _tags
from runner.configfile import add_config_flags, parse_with_config, render
from runner.envs import EnvCache, InstallSettings
from runner.idle import stop_when_idle
from runner.jobs import JobService
from runner.jobstore import JobRecord, JobStore
from runner.launcher import Launcher, LauncherSettings
from runner.limits import Limits, parse_size
from runner.link import MediatorLink
from runner.mediator import Mediator, MediatorSettings
from runner.sandbox import Sandbox, SandboxUnavailable, probe, report
from runner.server import RunnerServer, RunnerSettings
from runner.status import log_buffer

logger = logging.getLogger("didomagic.runner")

DEFAULT_PORT = 4940
MEDIATOR_PORT = 4941


def _grace(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _readable(path: Path | None) -> Path | None:
    if path is not None and not path.is_file():
        raise SystemExit(f"didomagic-runner: --client-ca {path}: no such file.")
    return path


def _url(text: str) -> ConnectionURL:
    try:
        return ConnectionURL.parse(text)
    except ConfigurationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_common(p: argparse.ArgumentParser, port: int, what: str) -> None:
    """Flags a runner and a mediator share: where to listen, TLS, state, URL file, logging."""
    add_config_flags(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    p.add_argument(
        "--port",
        type=_non_negative,
        default=port,
        help=f"port (default {port}; 0 picks a free one)",
    )
    p.add_argument(
        "--token",
        default=None,
        help="access token for clients (default: $DIDOMAGIC_TOKEN, else one generated "
        "once and kept in the state directory)",
    )
    p.add_argument("--certfile", type=Path, default=None, help="TLS certificate (PEM)")
    p.add_argument("--keyfile", type=Path, default=None, help="TLS private key (PEM)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the generated certificate and tokens are kept "
        f"(default: the user's data directory, {what}/)",
    )
    p.add_argument(
        "--url-file",
        type=Path,
        default=None,
        help="write the clients' connection URL here (mode 0600) once listening",
    )
    p.add_argument(
        "--advertise",
        action="store_true",
        help="announce this server on the local network with DNS-SD/mDNS (name, tags, port "
        "and certificate fingerprint, never the token), for %%runners discover (default: off)",
    )
    p.add_argument(
        "--admin-token",
        default=None,
        help="token that opens the read-only status page at https://HOST:PORT/status "
        "(default: $DIDOMAGIC_ADMIN_TOKEN, else one generated once and kept in the state "
        "directory as admin-token); no other token opens it",
    )
    p.add_argument(
        "--client-ca",
        type=Path,
        default=None,
        help="mutual TLS: refuse clients without a certificate signed by this CA (PEM); "
        "'didomagic-runner gen-client-cert' makes the CA and client certificates",
    )
    p.add_argument(
        "--handshake-timeout",
        type=_seconds,
        default=10.0,
        help="close connections that have not finished the TLS and websocket handshakes "
        "within this many seconds (default 10)",
    )
    p.add_argument(
        "--max-handshakes",
        type=_positive,
        default=accept.MAX_HANDSHAKES,
        help="connections still in their TLS or HTTP handshake at once; beyond it the oldest "
        f"is dropped, so idle ones cannot use up descriptors (default {accept.MAX_HANDSHAKES})",
    )
    p.add_argument(
        "--max-values",
        type=_positive,
        default=admission.MAX_VALUES,
        help="values one cell or job submission may declare; more are refused before "
        f"anything is opened (default {admission.MAX_VALUES})",
    )
    p.add_argument(
        "--upload-timeout",
        type=_seconds,
        default=admission.UPLOAD_TIMEOUT,
        help="drop a cell or job submission whose declared values go this many seconds "
        f"without a frame, and remove its files (default {admission.UPLOAD_TIMEOUT:g})",
    )
    p.add_argument(
        "--job-ttl",
        type=_seconds,
        default=None,
        help="delete detached jobs and their results this many seconds after they finish "
        "(default: keep them until deleted)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO",
    )


def serve_parser() -> argparse.ArgumentParser:
    """The parser of the serve command (the default)."""
    p = argparse.ArgumentParser(
        prog="didomagic-runner",
        description="Run notebook cells sent by %%remote in real Jupyter kernels. "
        "Other commands: 'didomagic-runner mediator --help' (a mediator for several "
        "runners), 'didomagic-runner gen-cert --out DIR' (write a certificate) and "
        "'didomagic-runner gen-client-cert --help' (client certificates for --client-ca).",
    )
    _add_common(p, DEFAULT_PORT, "runner")
    p.add_argument("--name", default=None, help="runner name (default: the host name)")
    p.add_argument(
        "--bulk-port",
        type=_non_negative,
        default=0,
        help="second port on --host for large values over plain TLS, one-time tickets "
        "(default 0: a free one; see docs/bulk-transfers.md)",
    )
    p.add_argument(
        "--no-bulk",
        action="store_true",
        help="listen on no bulk port: every value travels over the websocket",
    )
    p.add_argument("--tags", type=_tags, default=(), help="comma-separated tags, e.g. gpu,a100")
    p.add_argument(
        "--max-sessions",
        type=_positive,
        default=os.cpu_count() or 1,
        help="sessions served at once (default: CPU count)",
    )
    p.add_argument(
        "--max-queue",
        type=_non_negative,
        default=0,
        help="sessions that wait for a slot when all are busy, in order "
        "(default 0: refuse at once)",
    )
    p.add_argument(
        "--max-output",
        type=_positive,
        default=64 << 20,
        help="bytes of output one cell may stream back; beyond it output is cut with a "
        "visible note and the cell goes on (default 64 MiB)",
    )
    p.add_argument(
        "--cell-timeout",
        type=_seconds,
        default=None,
        help="interrupt any cell running longer than this many seconds (default: none; "
        "a client's --timeout may only be shorter)",
    )
    p.add_argument(
        "--max-connections",
        type=_positive,
        default=64,
        help="open connections (sessions, queued ones, queries) beyond which new ones are "
        "refused at once with 503 (default 64)",
    )
    p.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=None,
        help="end a session that runs no cell for this many seconds and free its kernel "
        "(default: none); its next cell starts a new session. Jobs connections that send "
        "no request this long are closed too",
    )
    p.add_argument(
        "--session-grace",
        type=_grace,
        default=300.0,
        help="keep a session whose connection dropped this many seconds, with its kernel "
        "and running cell, for its client to reattach (default 300; 0 ends it at once)",
    )
    p.add_argument(
        "--mediator",
        type=_url,
        default=None,
        help="join this mediator: its runner URL (the second URL it prints); the runner "
        "dials out, so it may sit behind a firewall",
    )
    p.add_argument(
        "--heartbeat",
        type=_seconds,
        default=5.0,
        help="seconds between load reports to the mediator (default 5); the mediator "
        "marks the runner down after three missed",
    )
    p.add_argument(
        "--warm-kernels",
        type=_non_negative,
        default=1,
        help="kernels started ahead of sessions (default 1)",
    )
    _add_limits(p)
    _add_packages(p)
    p.add_argument(
        "--exit-when-idle",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="stop once no session has been open or queued for this many seconds "
        "(default: never; runners launched by a mediator use it so their jobs end)",
    )
    p.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="stop when standard input closes (used by the embedded runner, so it "
        "dies with the notebook kernel that started it)",
    )
    p.add_argument(
        "--remove-state-on-exit",
        action="store_true",
        help="remove the --state-dir (token, certificate and its private key) when the "
        "runner stops (used by the embedded runner, whose state is private to one kernel)",
    )
    return p


def _add_limits(p: argparse.ArgumentParser) -> None:
    """The per-session limits and the sandbox (see ``--check-sandbox`` for this host)."""
    g = p.add_argument_group(
        "limits per session",
        "Each session's kernel is boxed by these; exceeding one ends that cell (or that "
        "session's kernel) with a message naming the limit, and the runner and other "
        "sessions go on. Sizes take K, M, G suffixes (powers of 1024). 'didomagic-runner "
        "--check-sandbox' shows how each is enforced on this host.",
    )
    g.add_argument(
        "--memory-limit",
        type=_size,
        default=None,
        help="memory of one kernel and its children (cgroup; else RLIMIT_DATA) (default: none)",
    )
    g.add_argument(
        "--cpu-time-limit",
        type=_positive,
        default=None,
        help="CPU seconds one kernel may use over its life (default: none)",
    )
    g.add_argument(
        "--max-file-size",
        type=_size,
        default=None,
        help="largest file a kernel may write, values it returns included (default: none)",
    )
    g.add_argument(
        "--max-processes",
        type=_positive,
        default=None,
        help="processes and threads per kernel (cgroup pids; else RLIMIT_NPROC, which counts "
        "per user) (default: none)",
    )
    g.add_argument(
        "--disk-quota",
        type=_size,
        default=None,
        help="bytes in a session's scratch directory, measured while cells run; over it the "
        "kernel is stopped (default: none)",
    )
    g.add_argument(
        "--max-message-size",
        type=_size,
        default=8 << 30,
        help="the most bytes of values one cell may send; larger cells are refused before "
        "anything is allocated (default 8G)",
    )
    g.add_argument(
        "--no-network",
        action="store_true",
        help="cut kernels off from every network, this host's loopback included (a network "
        "namespace); the runner refuses to start where the host cannot",
    )
    g.add_argument(
        "--sandbox",
        choices=["none", "bwrap"],
        default="none",
        help="bwrap: run kernels under bubblewrap, seeing only the Python environment "
        "(read-only), their scratch directory and a private /tmp (default: none)",
    )
    g.add_argument(
        "--no-cgroups",
        action="store_true",
        help="enforce --memory-limit and --max-processes with rlimits only, even where a "
        "cgroup is writable (the runner then creates no cgroups)",
    )
    g.add_argument(
        "--check-sandbox",
        action="store_true",
        help="print which mechanisms this host offers and how the given limits would be "
        "enforced, then exit",
    )


@dataclasses.dataclass(frozen=True)
class CacheSize:
    """``--env-cache-size``: a number of environments (``20``) or bytes (``5G``)."""

    text: str
    count: int | None
    nbytes: int | None

    def __str__(self) -> str:
        return self.text


def _cache_size(text: str) -> CacheSize:
    text = text.strip()
    if text.isdigit():
        return CacheSize(text, _positive(text), None)
    return CacheSize(text, None, _size(text))


def _add_packages(p: argparse.ArgumentParser) -> None:
    """Installing the packages cells ask for (see docs/packages.md)."""
    g = p.add_argument_group(
        "packages",
        "Cells may ask for packages (%%remote --pip, --requirements, --packages match). The "
        "runner installs them (wheels only) into cached environments layered over its own, "
        "never inside a kernel.",
    )
    allow = g.add_mutually_exclusive_group()
    allow.add_argument(
        "--allow-install",
        action="store_true",
        help="install the packages cells ask for (the default, unless --no-install)",
    )
    allow.add_argument(
        "--no-install",
        action="store_true",
        help="refuse: a cell asking for a package this runner lacks fails, saying so",
    )
    g.add_argument(
        "--env-cache-size",
        type=_cache_size,
        default=CacheSize("20", 20, None),
        metavar="N|SIZE",
        help="keep at most N environments (20), or SIZE bytes of them (e.g. 5G); the least "
        "recently used go first, never one in use (default 20)",
    )
    g.add_argument(
        "--find-links",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="also look for wheels in this folder (repeatable)",
    )
    g.add_argument(
        "--no-index",
        action="store_true",
        help="use no package index, only --find-links folders (offline hosts)",
    )
    g.add_argument(
        "--installer",
        choices=["auto", "uv", "pip"],
        default="auto",
        help="auto: uv (the 'uv' package) where installed, else pip (default auto)",
    )


def install_settings_of(args: argparse.Namespace) -> InstallSettings:
    """The :class:`InstallSettings` the command line asks for."""
    for folder in args.find_links:
        if not folder.is_dir():
            raise SystemExit(f"didomagic-runner: --find-links {folder}: no such folder.")
    return InstallSettings(
        allow=not args.no_install,
        installer=args.installer,
        find_links=tuple(str(f.resolve()) for f in args.find_links),
        no_index=args.no_index,
        max_envs=args.env_cache_size.count,
        max_bytes=args.env_cache_size.nbytes,
    )


def limits_of(args: argparse.Namespace) -> Limits:
    """The :class:`Limits` the command line asks for."""
    return Limits(
        memory=args.memory_limit,
        cpu_time=args.cpu_time_limit,
        file_size=args.max_file_size,
        processes=args.max_processes,
        disk_quota=args.disk_quota,
        no_network=args.no_network,
        sandbox=args.sandbox,
    )


def mediator_parser() -> argparse.ArgumentParser:
    """The parser of ``mediator``."""
    p = argparse.ArgumentParser(
        prog="didomagic-runner mediator",
        description="Match notebook sessions to runners by tags and load, and relay them. "
        "Prints two connection URLs: the first for clients (%%runners add), the second "
        "for runners (didomagic-runner --mediator).",
    )
    _add_common(p, MEDIATOR_PORT, "mediator")
    p.add_argument("--name", default="mediator", help="mediator name (default: mediator)")
    p.add_argument(
        "--runner-token",
        default=None,
        help="token runners join with (default: $DIDOMAGIC_RUNNER_TOKEN, else one generated "
        "once and kept in the state directory); it cannot run cells",
    )
    p.add_argument(
        "--runner-url-file",
        type=Path,
        default=None,
        help="write the runners' URL here (mode 0600) once listening",
    )
    p.add_argument(
        "--no-shared-runner-token",
        action="store_true",
        help="accept only runners with a credential of their own ('didomagic-runner mediator "
        "add-runner NAME'); by default the shared runner token also works, for names "
        "without a credential, and such runners are listed as unverified",
    )
    p.add_argument(
        "--launcher",
        choices=["none", "slurm"],
        default="none",
        help="slurm: submit runner jobs (the --slurm-* template) when a session waits for "
        "tags no up runner serves but such a runner would (default: none)",
    )
    p.add_argument(
        "--max-runners",
        type=_positive,
        default=4,
        help="runner jobs alive at once, pending ones included (default 4)",
    )
    p.add_argument(
        "--launcher-poll",
        type=_seconds,
        default=2.0,
        help="seconds between two looks at the runner jobs' states (default 2)",
    )
    slurm_options.add_template_options(p)
    p.add_argument(
        "--max-connections",
        type=_positive,
        default=256,
        help="open connections (clients, runner links, relays, jobs; a relayed session "
        "takes two) beyond which new ones are refused at once with 503 (default 256)",
    )
    p.add_argument(
        "--idle-timeout",
        type=_seconds,
        default=None,
        help="close a jobs connection that sends no request for this many seconds (default: none)",
    )
    p.add_argument(
        "--max-message-size",
        type=_size,
        default=8 << 30,
        help="the most bytes of values one job submission may send; larger ones are refused "
        "before anything is allocated (default 8G)",
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


def gen_client_cert_parser() -> argparse.ArgumentParser:
    """The parser of ``gen-client-cert``."""
    p = argparse.ArgumentParser(
        prog="didomagic-runner gen-client-cert",
        description="Issue a client certificate for mutual TLS, signed by a CA kept in "
        "--ca-dir (made on first use). Start runners with --client-ca "
        "CA_DIR/client-ca-cert.pem; give the client the certificate and key.",
    )
    p.add_argument("--ca-dir", type=Path, required=True, help="where the CA is kept")
    p.add_argument("--name", required=True, help="who the certificate is for, e.g. alice")
    p.add_argument("--out", type=Path, required=True, help="directory to write into")
    return p


def gen_client_cert(args: argparse.Namespace) -> None:
    """Issue a client certificate and print how to use it."""
    certfile, keyfile = certs.issue_client_cert(args.ca_dir, args.name, args.out)
    print(
        f"client certificate: {certfile}\nkey:                {keyfile}\n"
        f"runner flag:        --client-ca {args.ca_dir / certs.CA_CERT_NAME}\n"
        f"in the notebook:    %runners add URL --client-cert {certfile} --client-key {keyfile}"
    )


def default_state_dir(what: str = "runner") -> Path:
    """Where a runner (or mediator) keeps its certificate and tokens unless told otherwise."""
    return Path(platformdirs.user_data_dir("didomagic")) / what


def _load_token(
    explicit: str | None,
    state_dir: Path,
    env: str = "DIDOMAGIC_TOKEN",
    filename: str = "token",
) -> str:
    token = explicit if explicit is not None else os.environ.get(env)
    if token is not None:
        token = token.strip()
        if not token or any(c.isspace() for c in token):
            raise SystemExit(
                "didomagic-runner: the token must be non-empty and contain no "
                "spaces; omit --token to have one generated."
            )
        return token
    path = state_dir / filename
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write(token)
    return token


def _admin_token(args: argparse.Namespace, state_dir: Path, *others: str) -> str:
    """The status page's token (``--admin-token``); it must differ from every other token."""
    admin = _load_token(args.admin_token, state_dir, "DIDOMAGIC_ADMIN_TOKEN", "admin-token")
    if admin in others:
        raise SystemExit(
            "didomagic-runner: the admin token must differ from the client and runner "
            "tokens, so that none of those opens the status page."
        )
    return admin


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
    log_buffer()  # the status page shows the last lines
    if level != "DEBUG":
        for noisy in (
            "didomagic.runner.websockets",
            "didomagic.mediator.websockets",
            "didomagic.client.websockets",
            "traitlets",
            "asyncio",
        ):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _prepare(args: argparse.Namespace, what: str) -> tuple[Path, Path, Path]:
    """The state directory and the certificate and key to use (generated if needed)."""
    state_dir = args.state_dir or default_state_dir(what)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (args.certfile is None) != (args.keyfile is None):
        raise SystemExit("didomagic-runner: give both --certfile and --keyfile, or neither.")
    if args.certfile is None:
        certfile, keyfile = certs.ensure(state_dir, args.host)
    else:
        certfile, keyfile = args.certfile, args.keyfile
    if not _is_loopback(args.host):
        logger.warning(
            "listening on %s, not loopback: anyone who can reach this address and holds the "
            "token can %s. Keep the token secret.",
            args.host,
            "run code here as this user" if what == "runner" else "send cells to its runners",
        )
    return state_dir, certfile, keyfile


def _stop_event(exit_on_stdin_eof: bool = False) -> asyncio.Event:
    """An event set by SIGTERM, SIGINT or (optionally) standard input closing."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if exit_on_stdin_eof:
        threading.Thread(target=_wait_stdin_eof, args=(loop, stop), daemon=True).start()
    return stop


def _announce(
    what: str, args: argparse.Namespace, port: int, token: str, certfile: Path
) -> ConnectionURL:
    """Log where we listen and the fingerprint; return the connection URL for ``token``."""
    fingerprint = certs.fingerprint_file(certfile)
    url = ConnectionURL(
        host=args.host if args.host not in ("0.0.0.0", "::") else "127.0.0.1",
        port=port,
        token=token,
        fingerprint=fingerprint,
    )
    logger.info(
        "%s listening on %s (event loop: %s)",
        what,
        url.address,
        eventloops.loop_name(asyncio.get_running_loop()),
    )
    logger.info("certificate SHA-256 fingerprint: %s", fingerprint)
    return url


def _publish(url: ConnectionURL, label: str, url_file: Path | None) -> None:
    """Print the URL on standard output and write it to ``url_file``; log it redacted."""
    logger.info(
        "%s: %s (the full URL is on standard output%s)",
        label,
        url.redacted(),
        f" and in {url_file}" if url_file else "",
    )
    if url_file:
        _write_private(url_file, str(url) + "\n")
    print(url, flush=True)


async def _advertise(
    role: str,
    name: str,
    args: argparse.Namespace,
    url: ConnectionURL,
    tags: Sequence[str] = (),
) -> Advertiser:
    """Start announcing this server on the local network (``--advertise``)."""
    try:
        advertiser = Advertiser(role, name, args.host, url.port, url.fingerprint or "", tags)
    except ValueError as exc:
        raise SystemExit(f"didomagic-runner: {exc}") from None
    await advertiser.start()
    return advertiser


def _log_status_page(url: ConnectionURL, args: argparse.Namespace, state_dir: Path) -> None:
    where = (
        "the one given"
        if args.admin_token or os.environ.get("DIDOMAGIC_ADMIN_TOKEN")
        else f"kept in {state_dir / 'admin-token'}"
    )
    logger.info("status page: https://%s/status (admin token: %s)", url.address, where)


async def serve(args: argparse.Namespace) -> None:
    """Run the runner until SIGTERM, SIGINT or (optionally) standard input closes."""
    limits = limits_of(args)
    try:
        host = probe(
            network=limits.no_network,
            bwrap=limits.sandbox == "bwrap",
            use_cgroups=not args.no_cgroups,
        )
        sandbox = Sandbox(limits, host)
    except SandboxUnavailable as exc:
        raise SystemExit(f"didomagic-runner: cannot start: {exc}") from None
    state_dir, certfile, keyfile = _prepare(args, "runner")
    token = _load_token(args.token, state_dir)
    envs = EnvCache(state_dir / "envs", state_dir / "uv-cache", install_settings_of(args))
    envs.prepare()
    sandbox.environments = envs.root
    settings = RunnerSettings(
        host=args.host,
        port=args.port,
        tags=tuple(dict.fromkeys((*args.tags, *slurm.job_tags(os.environ)))),
        token=token,
        admin_token=_admin_token(args, state_dir, token),
        certfile=certfile,
        keyfile=keyfile,
        max_sessions=args.max_sessions,
        max_queue=args.max_queue,
        max_output=args.max_output,
        cell_timeout=args.cell_timeout,
        idle_timeout=args.idle_timeout,
        session_grace=args.session_grace,
        max_connections=args.max_connections,
        warm_kernels=args.warm_kernels,
        max_message_size=args.max_message_size,
        limits=limits,
        client_ca=_readable(args.client_ca),
        handshake_timeout=args.handshake_timeout,
        max_values=args.max_values,
        upload_timeout=args.upload_timeout,
        max_handshakes=args.max_handshakes,
        bulk_port=None if args.no_bulk else args.bulk_port,
    )
    if args.name:
        settings.name = args.name
    fdlimit.raise_nofile(logger, settings.max_connections, settings.max_handshakes)
    _remove_stale_work_dirs(Path(tempfile.gettempdir()))
    _remove_stale_work_dirs(MEMORY_BACKED)
    work_root = Path(tempfile.mkdtemp(prefix=_WORK_PREFIX))
    private_root = _memory_backed_dir()
    sandbox.hide = tuple(p for p in (state_dir, work_root, private_root) if p is not None)
    if limits.sandbox != "bwrap":
        logger.info("sessions are not isolated from each other without --sandbox bwrap")
    server = RunnerServer(settings, work_root, private_root, sandbox, envs)
    stop = _stop_event(args.exit_on_stdin_eof)
    link: MediatorLink | None = None
    advertiser: Advertiser | None = None
    link_task: asyncio.Task[None] | None = None
    idle: asyncio.Task[None] | None = None
    try:
        port = await server.start()
        url = _announce(f"runner {settings.name}", args, port, settings.token, certfile)
        logger.info(
            "tags: %s; %d session slots, queue of %d",
            ",".join(settings.tags) or "none",
            settings.max_sessions,
            settings.max_queue,
        )
        _publish(url, "connection URL", args.url_file)
        _log_status_page(url, args, state_dir)
        if args.advertise:
            advertiser = await _advertise("runner", settings.name, args, url, settings.tags)
        own_url = (  # its own certificate is trusted as a client's: see listen()
            dataclasses.replace(url, client_cert=str(certfile), client_key=str(keyfile))
            if settings.client_ca
            else url
        )

        async def open_own_session(job: JobRecord) -> RunnerConnection | None:
            if server.active >= settings.max_sessions:
                return None  # the job waits in the job queue, not in a session queue
            return await open_connection(own_url)

        server.jobs = JobService(
            JobStore(state_dir / "jobs"),
            open_own_session,
            settings.name,
            args.job_ttl,
            settings.requests,
            settings.idle_timeout,
        )
        server.jobs.start()
        if args.mediator is not None:
            link = MediatorLink(server, args.mediator, args.heartbeat)
            link_task = asyncio.create_task(link.run())
        if args.exit_when_idle is not None:
            idle = asyncio.create_task(stop_when_idle(server, args.exit_when_idle, stop))
        await stop.wait()
        logger.info("stopping: closing sessions and shutting kernels down")
    finally:
        if advertiser is not None:
            await advertiser.stop()
        if idle is not None:
            idle.cancel()
        if link is not None and link_task is not None:
            await link.stop()
            link_task.cancel()
            await asyncio.gather(link_task, return_exceptions=True)
        await server.stop()
        shutil.rmtree(work_root, ignore_errors=True)
        if private_root is not None:
            shutil.rmtree(private_root, ignore_errors=True)
        if args.url_file:
            args.url_file.unlink(missing_ok=True)
        if getattr(args, "remove_state_on_exit", False):
            shutil.rmtree(state_dir, ignore_errors=True)
    logger.info("stopped")


async def mediate(args: argparse.Namespace) -> None:
    """Run the mediator until SIGTERM or SIGINT."""
    state_dir, certfile, keyfile = _prepare(args, "mediator")
    token = _load_token(args.token, state_dir)
    runner_token = _load_token(
        args.runner_token, state_dir, "DIDOMAGIC_RUNNER_TOKEN", "runner-token"
    )
    settings = MediatorSettings(
        host=args.host,
        port=args.port,
        name=args.name,
        token=token,
        runner_token=runner_token,
        admin_token=_admin_token(args, state_dir, token, runner_token),
        certfile=certfile,
        keyfile=keyfile,
        state_dir=state_dir,
        job_ttl=args.job_ttl,
        client_ca=_readable(args.client_ca),
        handshake_timeout=args.handshake_timeout,
        shared_runner_token=not args.no_shared_runner_token,
        max_connections=args.max_connections,
        max_handshakes=args.max_handshakes,
        idle_timeout=args.idle_timeout,
        requests=RequestLimits(args.max_message_size, args.max_values, args.upload_timeout),
    )
    if settings.token == settings.runner_token:
        raise SystemExit(
            "didomagic-runner mediator: the client token and the runner token must differ, "
            "so that one role's credential cannot act as the other."
        )
    fdlimit.raise_nofile(logger, settings.max_connections, settings.max_handshakes)
    mediator = Mediator(settings)
    stop = _stop_event()
    advertiser: Advertiser | None = None
    try:
        port = await mediator.start()
        client_url = _announce(f"mediator {settings.name}", args, port, settings.token, certfile)
        runner_url = ConnectionURL(
            client_url.host, client_url.port, settings.runner_token, client_url.fingerprint
        )
        _publish(client_url, "client URL (for %runners add)", args.url_file)
        _log_status_page(client_url, args, state_dir)
        _publish(runner_url, "runner URL (for didomagic-runner --mediator)", args.runner_url_file)
        if args.advertise:
            advertiser = await _advertise("mediator", settings.name, args, client_url)
        if args.no_shared_runner_token:
            logger.info(
                "--no-shared-runner-token: the runner URL above is refused; give each runner "
                "its own with 'didomagic-runner mediator add-runner NAME'"
            )
        if args.launcher == "slurm":
            mediator.launcher = _slurm_launcher(args, runner_url)
            mediator.launcher.start()
        await stop.wait()
        logger.info("stopping")
    finally:
        if advertiser is not None:
            await advertiser.stop()
        await mediator.stop()
        for path in (args.url_file, args.runner_url_file):
            if path:
                path.unlink(missing_ok=True)
    logger.info("stopped")


def _slurm_launcher(args: argparse.Namespace, runner_url: ConnectionURL) -> Launcher:
    """The launcher ``--launcher slurm`` asks for; exit if Slurm's commands are missing."""
    launcher = Launcher(
        LauncherSettings(slurm_options.template_of(args), args.max_runners, args.launcher_poll),
        str(runner_url),
    )
    missing = launcher.commands.available()
    if missing:
        raise SystemExit(f"didomagic-runner mediator: --launcher slurm: {missing}.")
    logger.info(
        "launching up to %d runners on Slurm for tags %s",
        args.max_runners,
        ",".join(launcher.settings.template.runner_tags()) or "none",
    )
    return launcher


MEMORY_BACKED = Path("/dev/shm")
"""Linux's memory-backed file system: values reach kernels at memory speed through it."""


_WORK_PREFIX = f"didomagic-runner-{os.getpid()}-"
"""Work directories carry the runner's pid, so a later runner can tell which are stale."""


def _remove_stale_work_dirs(parent: Path) -> None:
    """Remove work directories of this user's runners that died without cleaning up (SIGKILL)."""
    if not parent.is_dir():
        return
    for path in parent.glob("didomagic-runner-*-*"):
        pid_text = path.name.split("-")[2]
        try:
            info = path.lstat()  # a link planted under that name is never followed
            if (
                not pid_text.isdigit()
                or not stat.S_ISDIR(info.st_mode)
                or info.st_uid != os.getuid()
            ):
                continue
            os.kill(int(pid_text), 0)  # still running: not stale
        except ProcessLookupError:
            logger.info("removing %s, left behind by a runner that is gone", path)
            for _ in range(3):  # its orphaned kernels may still be writing as they exit
                shutil.rmtree(path, ignore_errors=True)
                if not path.exists():
                    break
        except (OSError, OverflowError):  # not ours to look at, or no pid at all
            continue


def _memory_backed_dir() -> Path | None:
    """A private directory in memory-backed storage, or None where there is none."""
    if not MEMORY_BACKED.is_dir() or not os.access(MEMORY_BACKED, os.W_OK | os.X_OK):
        return None
    try:
        return Path(tempfile.mkdtemp(prefix=_WORK_PREFIX, dir=MEMORY_BACKED))
    except OSError:
        return None


def _wait_stdin_eof(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    while sys.stdin.buffer.read(4096):
        pass
    loop.call_soon_threadsafe(stop.set)


def gen_cert(args: argparse.Namespace) -> None:
    """Write a certificate and key, and print the fingerprint."""
    certfile, keyfile, fingerprint = certs.generate(args.out, [args.host])
    print(f"certificate: {certfile}\nkey:         {keyfile}\nSHA-256 fingerprint: {fingerprint}")


def _from_environment(role: str) -> list[str]:
    """Flags from ``DIDOMAGIC_*`` variables (secrets are then removed from the environment)."""
    try:
        return environment.arguments(role, os.environ)
    except ConfigurationError as exc:
        raise SystemExit(f"didomagic-runner: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``didomagic-runner`` and ``python -m runner``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["slurm-script"]:
        slurm_options.print_script(slurm_options.slurm_script_parser().parse_args(argv[1:]))
        return 0
    if argv[:1] == ["gen-cert"]:
        gen_cert(gen_cert_parser().parse_args(argv[1:]))
        return 0
    if argv[:1] == ["gen-client-cert"]:
        gen_client_cert(gen_client_cert_parser().parse_args(argv[1:]))
        return 0
    if argv[:1] == ["mediator"] and argv[1:2] in (["add-runner"], ["remove-runner"]):
        return enrol.main(argv[1], argv[2:])
    if argv[:1] == ["mediator"]:
        parser = mediator_parser()
        margs = parse_with_config(parser, _from_environment("mediator") + argv[1:])
        if margs.print_config:
            print(render(parser, margs), end="")
            return 0
        _configure_logging(margs.log_level)
        eventloops.run(mediate(margs))  # uvloop where available (didomagic.eventloops)
        return 0
    parser = serve_parser()
    args = parse_with_config(parser, _from_environment("runner") + argv)
    if args.print_config:
        print(render(parser, args), end="")
        return 0
    if args.check_sandbox:
        print(report(limits_of(args), probe(use_cgroups=not args.no_cgroups)))
        return 0
    _configure_logging(args.log_level)
    eventloops.run(serve(args))  # uvloop where available (didomagic.eventloops)
    return 0
