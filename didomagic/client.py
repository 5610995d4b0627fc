"""An asyncio connection to one runner: pinned TLS, token, and the cell exchange.

Certificate pinning happens *during* the TLS handshake: the client first
fetches the runner's certificate over a connection on which it sends nothing,
checks its SHA-256 against the fingerprint in the connection URL, and then
connects with that certificate as the only trust anchor. An impostor at the
same address fails the second handshake and never sees the token, which only
travels in the ``Authorization`` header of the websocket upgrade.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
from collections.abc import Callable, Sequence

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

import didomagic
from didomagic.errors import (
    AuthenticationFailed,
    ConnectionLost,
    FingerprintMismatch,
    ProtocolError,
    RunnerBusy,
    RunnerUnreachable,
    VersionMismatch,
)
from didomagic.protocol import (
    MAX_TEXT_SIZE,
    PROTOCOL_VERSION,
    Error,
    ErrorCode,
    Execute,
    Hello,
    Interrupt,
    Output,
    Result,
    Role,
    Session,
    State,
    Welcome,
    cloudpickle_version,
    python_version,
)
from didomagic.urls import ConnectionURL

logger = logging.getLogger("didomagic.client")

OPEN_TIMEOUT = 20.0
"""Seconds to reach a runner and complete both handshakes."""

_pinned: dict[tuple[str, str], bytes] = {}
"""Certificates already fetched and checked, by (address, fingerprint)."""


async def _fetch_certificate(url: ConnectionURL, timeout: float) -> bytes:
    """The DER certificate the runner presents; nothing is sent after the handshake."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(url.host, url.port, ssl=probe), timeout
        )
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise _unreachable(url, exc) from None
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return bytes(der)


async def tls_context(url: ConnectionURL, timeout: float = OPEN_TIMEOUT) -> ssl.SSLContext:
    """A client TLS context that trusts only the pinned certificate (or the system CAs)."""
    if url.fingerprint is None:
        return ssl.create_default_context()
    key = (url.address, url.fingerprint)
    der = _pinned.get(key)
    if der is None:
        der = await _fetch_certificate(url, timeout)
        got = hashlib.sha256(der).hexdigest()
        if got != url.fingerprint:
            raise FingerprintMismatch(url.address, url.fingerprint, got)
        _pinned[key] = der
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the pin identifies the runner, whatever its name
    context.load_verify_locations(cadata=der)
    return context


def _unreachable(url: ConnectionURL, exc: BaseException) -> RunnerUnreachable:
    reason = str(exc) or type(exc).__name__
    return RunnerUnreachable(
        f"Cannot reach the runner at {url.address}: {reason}. Check that didomagic-runner is "
        "running there, that the address and port in the connection URL are right, and that "
        "no firewall is in the way."
    )


class RunnerConnection:
    """An open session with a runner. Use :func:`open_connection` to make one."""

    def __init__(
        self, ws: ClientConnection, session: Session, welcome: Welcome, url: ConnectionURL
    ) -> None:
        self.ws = ws
        self.session = session
        self.welcome = welcome
        self.url = url
        self.running: str | None = None

    @property
    def runner_name(self) -> str:
        """The runner's name, as it introduced itself."""
        return str(self.welcome.runner.get("name") or self.url.address)

    @property
    def closed(self) -> bool:
        """True once the websocket is closed (the remote session is gone)."""
        return self.ws.close_code is not None

    async def execute(
        self,
        request: Execute,
        parts: Sequence[Sequence[memoryview]],
        on_output: Callable[[Output], None],
    ) -> tuple[Result, list[list[bytearray]]]:
        """Run one cell: send it and its values, stream outputs, return the result and values."""
        self.running = request.cell
        try:
            await self.ws.send(self.session.send(request))
            for frame in self.session.frames(parts):
                await self.ws.send(frame)
            result: Result | None = None
            buffers: list[list[bytearray]] = []
            while result is None or self.session.state is not State.IDLE:
                frame = await self.ws.recv()
                if isinstance(frame, bytes):
                    chunk = self.session.receive_binary(frame)
                    buffers[chunk.value][chunk.part][
                        chunk.offset : chunk.offset + len(chunk.data)
                    ] = chunk.data
                    continue
                message = self.session.receive(frame)
                if isinstance(message, Output):
                    on_output(message)
                elif isinstance(message, Result):
                    result = message
                    buffers = [[bytearray(n) for n in v.sizes] for v in message.values]
                elif isinstance(message, Error):
                    raise ProtocolError(f"the runner ended the session: {message.message}")
            return result, buffers
        except ProtocolError:
            await self.ws.close(1002, "protocol error")
            raise
        except ConnectionClosed as exc:
            raise ConnectionLost(
                f"The connection to runner {self.runner_name} was lost while the cell was "
                f"running ({exc}). The cell may or may not have finished there, and the "
                "remote session's state is gone; the next cell opens a new session."
            ) from None
        finally:
            self.running = None

    async def interrupt(self) -> None:
        """Ask the runner to interrupt the running cell."""
        if self.running is not None and not self.closed:
            with contextlib.suppress(ConnectionClosed, ProtocolError):
                await self.ws.send(self.session.send(Interrupt(self.running)))

    async def close(self) -> None:
        """End the session (the runner frees its kernel)."""
        await self.ws.close()


async def open_connection(url: ConnectionURL, timeout: float = OPEN_TIMEOUT) -> RunnerConnection:
    """Connect, authenticate and say hello; raise a :class:`ConnectError` subclass on failure."""
    context = await tls_context(url, timeout)
    try:
        ws = await connect(
            url.websocket_uri,
            ssl=context,
            server_hostname=url.host,
            additional_headers={"Authorization": f"Bearer {url.token}"},
            user_agent_header=f"didomagic/{didomagic.__version__}",
            compression=None,
            max_size=MAX_TEXT_SIZE,
            write_limit=4 << 20,
            proxy=None,  # a token must never be handed to a proxy
            open_timeout=timeout,
            logger=logging.getLogger("didomagic.client.websockets"),
        )
    except InvalidStatus as exc:
        if exc.response.status_code == 401:
            raise AuthenticationFailed(
                f"The runner at {url.address} refused the token (missing or wrong). Copy the "
                "connection URL again from the runner's output or its --url-file; a runner "
                "started with a new --token or state directory has a new one."
            ) from None
        raise _unreachable(url, exc) from None
    except ssl.SSLCertVerificationError as exc:
        if url.fingerprint is None:
            raise RunnerUnreachable(
                f"The certificate of {url.address} is not trusted by this system's CAs "
                f"({exc.verify_message}). For a runner with a self-signed certificate, use its "
                "full connection URL, which pins the certificate with #fp=…."
            ) from None
        _pinned.pop((url.address, url.fingerprint), None)
        raise RunnerUnreachable(
            f"The TLS handshake with {url.address} failed: its certificate is not the pinned "
            "one. The runner may have been restarted with a new certificate; copy its new "
            "connection URL."
        ) from None
    except (OSError, TimeoutError, InvalidHandshake, ssl.SSLError) as exc:
        raise _unreachable(url, exc) from None
    session = Session(Role.CLIENT)
    try:
        await ws.send(
            session.send(
                Hello(
                    PROTOCOL_VERSION, python_version(), cloudpickle_version(), didomagic.__version__
                )
            )
        )
        reply = session.receive(await asyncio.wait_for(ws.recv(), timeout))
    except (ConnectionClosed, TimeoutError) as exc:
        await ws.close()
        raise _unreachable(url, exc) from None
    if isinstance(reply, Error):
        await ws.close()
        raise _refusal(reply)
    assert isinstance(reply, Welcome)
    logger.debug("session opened with runner %s", reply.runner.get("name"))
    return RunnerConnection(ws, session, reply, url)


def _refusal(error: Error) -> Exception:
    kinds: dict[ErrorCode, type[Exception]] = {
        ErrorCode.VERSION: VersionMismatch,
        ErrorCode.BUSY: RunnerBusy,
    }
    return kinds.get(error.code, ProtocolError)(error.message)
