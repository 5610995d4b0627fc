"""Exceptions raised by didomagic.

Every error a user can meet is a subclass of :class:`DidomagicError`, carries a
message that says what went wrong and what to do next, and renders in a notebook
as that one paragraph, without the plumbing's traceback::

    DidomagicError
    ├── ConfigurationError        a bad connection URL, option or argument
    ├── ProtocolError             a peer sent something the wire format forbids
    ├── ConnectError              no session could be opened
    │   ├── RunnerUnreachable     (``absent``: nothing listens there, or its mediator lost it)
    │   ├── FingerprintMismatch   the runner's certificate is not the pinned one
    │   ├── AuthenticationFailed  missing or wrong token
    │   ├── VersionMismatch       protocol, Python or cloudpickle versions differ
    │   ├── RunnerBusy            every session slot and queue place is taken
    │   └── NoMatchingRunner      no known runner has the tags / OS asked for
    ├── ConnectionLost            the connection broke during a cell
    │   └── SessionEnded          the kept remote session is gone (grace, restart)
    ├── TransferFailed            a bulk connection broke; the session is fine
    ├── JobError                  a detached job cannot be found, pulled or submitted
    ├── RunnerStartError          the embedded runner did not start
    ├── ItemFailed                one call of map() failed; carries its index
    ├── FileRefused               a path the notebook side will not serve (PermissionError)
    ├── FilesTooLarge             files over a --files-limit (names the biggest)
    └── CellFailed                the cell ran but did not finish normally
        ├── RemoteError           the cell raised; carries the remote traceback
        │   └── PackageError      the runner could not give the cell the packages it asked for
        ├── CellTimeout           --timeout expired; the cell was interrupted
        ├── CellInterrupted       stop button or Cancel (also a KeyboardInterrupt)
        └── KernelDied            the runner's kernel died during the cell
"""

from __future__ import annotations

import os
from types import TracebackType

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class DidomagicError(Exception):
    """Base class of every didomagic error.

    IPython shows an exception's ``_render_traceback_`` instead of its Python
    traceback; ours is the message alone, so a failed cell shows one clear
    paragraph rather than frames from inside didomagic.
    """

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


class ConfigurationError(DidomagicError, ValueError):
    """A connection URL, option or argument is not valid."""


class ProtocolError(DidomagicError):
    """A message broke the wire protocol (malformed, out of order, too large)."""


class ConnectError(DidomagicError):
    """A session with a runner could not be opened."""


class RunnerUnreachable(ConnectError):
    """Nothing answered at the runner's address, or the TLS handshake failed.

    ``absent`` is True when the runner's host refused the connection, or its
    mediator has no link to it now: unlike a network failure, this says the
    runner process is not there.
    """

    def __init__(self, message: str, absent: bool = False) -> None:
        super().__init__(message)
        self.absent = absent


class FingerprintMismatch(ConnectError):
    """The runner's certificate does not have the fingerprint pinned in its URL."""

    def __init__(self, address: str, expected: str, got: str) -> None:
        self.address = address
        self.expected = expected
        self.got = got
        super().__init__(
            f"The runner at {address} presented a certificate with SHA-256 fingerprint "
            f"{got}, but the connection URL pins {expected}. Nothing was sent to it "
            "(not even the token). If the runner was restarted with a new certificate, "
            "copy its new connection URL; otherwise something else is answering at that "
            "address."
        )


class AuthenticationFailed(ConnectError):
    """The runner refused the token."""


class VersionMismatch(ConnectError):
    """The two sides cannot exchange pickles or messages safely."""


class RunnerBusy(ConnectError):
    """The runner has no free session slot and no free place in its queue."""


class NoMatchingRunner(ConnectError):
    """No known runner has every tag (and the OS) a cell asked for."""


class ConnectionLost(DidomagicError):
    """The connection to the runner broke while a cell was in flight."""


class SessionEnded(ConnectionLost):
    """The remote session is gone for good: its grace period ran out, or its runner restarted.

    The message names the runner and when the session ended; the next cell opens
    a new session.
    """


class TransferFailed(DidomagicError):
    """A cell's values did not all cross their bulk connection (see ``didomagic.bulk``).

    The session and its websocket are fine: values sent did not run the cell,
    values returned stay bound in the remote session. Run the cell again.
    """


class RunnerStartError(DidomagicError):
    """The embedded runner subprocess did not start."""


class CellTooLarge(DidomagicError, ValueError):
    """A cell sends more bytes of values than the runner accepts (its --max-message-size)."""


class CellFailed(DidomagicError):
    """The cell ran on the runner but did not finish normally."""


class RemoteError(CellFailed):
    """The cell raised an exception on the runner.

    ``ename`` and ``evalue`` name the remote exception; ``traceback`` holds the
    remote traceback lines (with ANSI colours), which IPython shows in place of
    a local traceback.
    """

    def __init__(self, ename: str, evalue: str, traceback: list[str], runner: str = "") -> None:
        self.ename = ename
        self.evalue = evalue
        self.traceback = list(traceback)
        self.runner = runner
        where = f" on runner {runner}" if runner else " on the runner"
        super().__init__(f"{ename}: {evalue} (raised{where})")

    def _render_traceback_(self) -> list[str]:
        return [*self.traceback, f"RemoteError: {self}"]


class PackageError(RemoteError):
    """The runner could not give the cell its packages; the cell did not run.

    ``ename`` says why: ``PackageInstallError`` (the installer's own message
    follows), ``PackageVersionConflict`` (the kernel already imported another
    version: start a fresh session), ``InstallsDisabled`` (``--no-install``)
    or ``PackageRequestError`` (a requirement the runner does not accept).
    The session and its state are intact.
    """

    ENAMES = frozenset(
        {"PackageInstallError", "PackageVersionConflict", "InstallsDisabled", "PackageRequestError"}
    )

    def __init__(self, ename: str, evalue: str, traceback: list[str], runner: str = "") -> None:
        super().__init__(ename, evalue, traceback, runner)
        where = f"runner {runner}" if runner else "the runner"
        self.args = (f"{ename} on {where}, so the cell did not run: {evalue}",)

    def _render_traceback_(self) -> list[str]:
        return [f"PackageError: {self}"]


class CellTimeout(CellFailed):
    """The cell ran longer than its timeout and was interrupted."""


class CellInterrupted(CellFailed, KeyboardInterrupt):
    """The cell was interrupted (the stop button, or Cancel); one line, no traceback.

    Also a :class:`KeyboardInterrupt`, so code that stops on one stops on this.
    """


class KernelDied(CellFailed):
    """The runner's kernel process died while running the cell."""


class ItemFailed(DidomagicError):
    """One call of :func:`didomagic.map` failed; ``index`` says which, ``__cause__`` why."""

    def __init__(
        self,
        index: int,
        error: BaseException,
        results: list[object] | None = None,
        cancelled: list[int] | None = None,
    ) -> None:
        self.index = index
        self.error = error
        self.results = results or []
        """Every item's result in input order; ``None`` where it failed or did not run."""
        self.cancelled = cancelled or []
        """Items stopped or never started because of the failure (``cancel_on_error``)."""
        super().__init__(f"map item {index} failed: {type(error).__name__}: {error}")


class FileRefused(DidomagicError, PermissionError):
    """A runner asked for a path the notebook side does not serve (outside the root, excluded)."""


class FilesTooLarge(DidomagicError):
    """The files a cell would send up front are over the size limit (the message names them)."""


class JobError(DidomagicError):
    """A detached job could not be found, submitted or pulled (the message says why)."""


def without_our_frames(exc: BaseException) -> BaseException:
    """``exc`` with didomagic's own frames cut from its traceback (the user's code stays).

    A ``--local`` cell's exception, or any error a magic lets through, then
    shows the user's frames only, as the same code run in a plain cell would.
    A bare interrupt becomes a one-line :class:`CellInterrupted`.
    """
    if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, DidomagicError):
        return CellInterrupted("Interrupted.")
    kept: list[TracebackType] = []
    tb = exc.__traceback__
    while tb is not None:
        if not os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE):
            kept.append(tb)
        tb = tb.tb_next
    rebuilt: TracebackType | None = None
    for frame_tb in reversed(kept):
        rebuilt = TracebackType(rebuilt, frame_tb.tb_frame, frame_tb.tb_lasti, frame_tb.tb_lineno)
    return exc.with_traceback(rebuilt)
