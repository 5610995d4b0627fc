"""The notebook's end of the request channel: handlers that answer a runner kernel's asks.

While a cell runs, code in the runner's kernel may ask the notebook side for a
resource (``runner.asking.ask``): a module's source, a file. The ask reaches
the client as an :class:`~didomagic.protocol.Ask`; the client looks up the
handler registered for its ``resource`` and sends back what it returns as an
:class:`~didomagic.protocol.Answer` and binary frames.

A handler is a plain function ``handler(request) -> Reply``. It runs in a
worker thread (it may read files), never on the I/O loop, and must answer:
an exception becomes a refusal naming it (and is logged). Handlers see only
what the request names; they decide what they are willing to serve.

    from didomagic.resources import Reply, register_handler

    def serve_greeting(request):
        if request.name != "hello":
            return Reply.not_found(f"no greeting {request.name!r}")
        return Reply.found(b"hi there", meta={"lang": "en"})

    register_handler("greeting", serve_greeting)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from didomagic.protocol import AnswerStatus, Ask

logger = logging.getLogger("didomagic.client")

Part = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Request:
    """One ask, as a handler sees it.

    ``state`` is a dict private to the runner session the ask came from
    (empty when the session opens, dropped when it ends): a handler keeps what
    it has sent to that session there, under a key of its own.
    """

    resource: str
    name: str
    args: dict[str, Any]
    state: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """A handler's answer: a status, why (when not found or refused), a description, bytes."""

    status: AnswerStatus
    message: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    parts: tuple[Part, ...] = ()

    @classmethod
    def found(cls, *parts: Part, meta: dict[str, Any] | None = None) -> Reply:
        """The resource, as zero or more byte parts, with a JSON description."""
        return cls(AnswerStatus.FOUND, "", dict(meta or {}), parts)

    @classmethod
    def not_found(cls, message: str) -> Reply:
        """There is no such resource (the kernel raises its usual not-found error)."""
        return cls(AnswerStatus.NOT_FOUND, message)

    @classmethod
    def refused(cls, message: str) -> Reply:
        """The notebook side will not serve this (outside what it serves, or a failure)."""
        return cls(AnswerStatus.REFUSED, message)


Handler = Callable[[Request], Reply]

_handlers: dict[str, Handler] = {}
_lock = threading.Lock()


def register_handler(resource: str, handler: Handler) -> None:
    """Answer asks for ``resource`` with ``handler`` from now on (replacing any before)."""
    with _lock:
        _handlers[resource] = handler


def unregister_handler(resource: str) -> None:
    """Stop answering asks for ``resource`` (they are refused)."""
    with _lock:
        _handlers.pop(resource, None)


def handlers() -> dict[str, Handler]:
    """The handlers registered now, by resource."""
    with _lock:
        return dict(_handlers)


class Responder:
    """Answers the asks of one runner session.

    ``handlers`` defaults to the registry (looked up at each ask, so a handler
    registered later is used); pass a mapping for a fixed set (``{}`` refuses
    everything, as a detached job's holder does).
    """

    def __init__(self, handlers: Mapping[str, Handler] | None = None, refusal: str = "") -> None:
        self._fixed = handlers
        self._refusal = refusal
        self.state: dict[str, Any] = {}
        """Per-session state shared by this session's handlers (see :class:`Request`)."""

    def answer(self, ask: Ask) -> Reply:
        """The reply to ``ask`` (call it in a worker thread: handlers may do I/O)."""
        table = handlers() if self._fixed is None else self._fixed
        handler = table.get(ask.resource)
        if handler is None:
            return Reply.refused(
                self._refusal
                or f"the notebook side serves no {ask.resource!r} resources "
                f"(it serves: {', '.join(sorted(table)) or 'nothing'})"
            )
        try:
            reply = handler(Request(ask.resource, ask.name, dict(ask.args), self.state))
        except Exception as exc:
            logger.exception("the %s handler failed on %r", ask.resource, ask.name)
            return Reply.refused(
                f"the notebook side failed to serve {ask.resource} {ask.name!r}: "
                f"{type(exc).__name__}: {exc}"
            )
        if not isinstance(reply, Reply):
            return Reply.refused(f"the {ask.resource} handler returned no Reply")
        if reply.status is AnswerStatus.REFUSED:
            logger.warning("refused %s %r to a runner: %s", ask.resource, ask.name, reply.message)
        return reply
