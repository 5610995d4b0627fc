"""``GET /healthz``: a liveness and readiness answer that needs no token and tells nothing.

Kubernetes probes (and load balancers) ask it over HTTPS without credentials;
the answer is ``200 ok`` and nothing else (no name, version or load), given in
the websocket server's HTTP hook before any token is checked. Every other
path goes on to the server's own check.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

HEALTH_PATH = "/healthz"
"""The path probes ask."""

Hook = Callable[[ServerConnection, Request], Response | None]
"""A websockets ``process_request`` hook."""


def with_health(authenticate: Hook) -> Hook:
    """``authenticate``, answering ``/healthz`` first (whatever its query string)."""

    def hook(connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] == HEALTH_PATH:
            return connection.respond(HTTPStatus.OK, "ok\n")
        return authenticate(connection, request)

    return hook
