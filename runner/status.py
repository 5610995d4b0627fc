"""The read-only status page at ``/status``: the pool, the jobs and the last log lines.

Served on the server's own TLS port during the HTTP upgrade, before any
websocket exists, for the holder of the admin token only (``--admin-token``):
a bearer token, or HTTP Basic with the token as the password so that a
browser can ask for it. The client and runner tokens do not open it. The page
refreshes itself, runs no script (a Content-Security-Policy forbids it), and
escapes every string, since runner names, tags and job names come from peers.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hmac
import html
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

STATUS_PATH = "status"
"""The page's path."""

REFRESH = 2
"""Seconds between the page's own reloads."""

LOG_LINES = 200
"""Log lines a server keeps for its page."""

LINE_LIMIT = 2000
"""Characters of one log line a mediator keeps from a runner (a longer one is cut)."""

RUNNER_LINES = 50
"""Log lines of each runner a mediator keeps for its page."""

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'"


class LogBuffer(logging.Handler):
    """The last :data:`LOG_LINES` log lines of this process, for the status page."""

    def __init__(self, capacity: int = LOG_LINES) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self.total = 0
        """Lines seen since start (so a reader can tell which lines are new)."""
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        """Keep one formatted line (a multi-line traceback stays one entry)."""
        try:
            self.lines.append(self.format(record))
            self.total += 1
        except Exception:  # never let the log break the server
            self.handleError(record)

    def since(self, seen: int) -> tuple[list[str], int]:
        """The lines after the first ``seen`` ones (as many as are still kept), and the total."""
        new = min(self.total - seen, len(self.lines))
        return list(self.lines)[len(self.lines) - new :] if new > 0 else [], self.total


_buffer: LogBuffer | None = None


def log_buffer() -> LogBuffer:
    """This process's :class:`LogBuffer`, attached to the ``didomagic`` loggers on first use."""
    global _buffer
    if _buffer is None:
        _buffer = LogBuffer()
        logging.getLogger("didomagic").addHandler(_buffer)
    return _buffer


def admin_allowed(request: Request, admin_token: str) -> bool:
    """True when the request carries the admin token (bearer, or Basic's password)."""
    if not admin_token:
        return False
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    presented = value.strip()
    if scheme.lower() == "basic":
        try:
            presented = base64.b64decode(presented, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.encode(), admin_token.encode())


@dataclass
class PageData:
    """What one rendering of the page shows."""

    title: str
    runners: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    logs: list[tuple[str, Sequence[str]]] = field(default_factory=list)
    """(whose log, its last lines), the server's own first."""


Authenticate = Callable[[ServerConnection, Request], Response | None]


def with_status_page(
    authenticate: Authenticate,
    admin_token: str,
    gather: Callable[[], Awaitable[PageData]],
) -> Callable[[ServerConnection, Request], Awaitable[Response | None]]:
    """Wrap a server's upgrade check so that ``/status`` serves the page to the admin."""

    async def process(connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0].strip("/") != STATUS_PATH:
            return authenticate(connection, request)
        if not admin_allowed(request, admin_token):
            logging.getLogger("didomagic.status").warning(
                "refused the status page to %s: missing or wrong admin token",
                connection.remote_address[0] if connection.remote_address else "?",
            )
            response = connection.respond(
                HTTPStatus.UNAUTHORIZED,
                "didomagic: the status page needs the admin token (--admin-token).\n",
            )
            response.headers = Headers(
                {**response.headers, "WWW-Authenticate": 'Basic realm="didomagic status"'}
            )
            return response
        body = render(await gather()).encode()
        return Response(
            HTTPStatus.OK.value,
            HTTPStatus.OK.phrase,
            Headers(
                {
                    "Content-Type": "text/html; charset=utf-8",
                    "Content-Length": str(len(body)),
                    "Content-Security-Policy": _CSP,
                    "Cache-Control": "no-store",
                    "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer",
                }
            ),
            body,
        )

    return process


def _cell(value: Any) -> str:
    if isinstance(value, list | tuple):
        value = ", ".join(map(str, value))
    return f"<td>{html.escape(str(value if value is not None else ''))}</td>"


def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]], empty: str) -> str:
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>'


def _gb(value: Any) -> str:
    return f"{value / 1e9:.1f} GB" if isinstance(value, int | float) else ""


def _runner_row(r: dict[str, Any]) -> list[Any]:
    gpus = r.get("gpus") or []
    return [
        r.get("name", "?"),
        r.get("identity", ""),
        r.get("tags") or [],
        r.get("status", "?"),
        f"{r.get('sessions', 0)}/{r.get('max_sessions', 0)}",
        f"{r.get('queue', 0)}/{r.get('max_queue', 0)}",
        r.get("cpus", ""),
        f"{_gb(r.get('memory_free'))} / {_gb(r.get('memory_total'))}",
        len(gpus) if isinstance(gpus, list) else "",
        r.get("reason", ""),
    ]


def _job_row(j: dict[str, Any]) -> list[Any]:
    age = time.time() - float(j.get("submitted") or time.time())
    return [
        j.get("id", ""),
        j.get("name", ""),
        j.get("state", ""),
        j.get("runner", ""),
        f"{age:.0f} s",
    ]


def render(data: PageData) -> str:
    """The whole page, every peer string escaped."""
    runners = _table(
        [
            "name",
            "identity",
            "tags",
            "status",
            "sessions",
            "queue",
            "CPUs",
            "memory free / total",
            "GPUs",
            "note",
        ],
        (_runner_row(r) for r in data.runners),
        "no runners",
    )
    jobs = _table(
        ["job", "name", "state", "runner", "age"], (_job_row(j) for j in data.jobs), "no jobs"
    )
    logs = "".join(
        f"<h3>{html.escape(who)}</h3><pre>{html.escape(chr(10).join(lines)) or '(empty)'}</pre>"
        for who, lines in data.logs
    )
    title = html.escape(data.title)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH}">
<title>{title}</title><style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }}
@media (prefers-color-scheme: dark) {{ body {{ color: #ddd; background: #1e1e1e; }}
  th {{ background: #333 !important; }} pre {{ background: #111 !important; }} }}
table {{ border-collapse: collapse; font-variant-numeric: tabular-nums; }}
th, td {{ padding: 3px 10px; text-align: left; white-space: nowrap;
  border-bottom: 1px solid #8884; }}
th {{ background: #eee; }} .scroll {{ overflow-x: auto; }}
pre {{ background: #f6f6f6; padding: .6em; max-height: 24em; overflow: auto; }}
.empty {{ color: #888; }}
</style></head><body>
<h1>{title}</h1><p>updated {time.strftime("%Y-%m-%d %H:%M:%S")}; refreshes every {REFRESH} s</p>
<h2 id="runners">Runners</h2>{runners}
<h2 id="jobs">Jobs</h2>{jobs}
<h2 id="logs">Logs</h2>{logs}
</body></html>
"""
