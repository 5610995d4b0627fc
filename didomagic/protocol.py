"""The didomagic wire protocol: message types, encoding and the session state machine.

Theory of operation
-------------------
A client and a runner talk over one websocket. Control messages are JSON text
frames; values travel as binary frames. Nothing in this module does I/O: the
client and the runner feed it what they receive and send what it returns, the
way ``websockets.protocol`` separates the protocol from the transport.

One session, from the client's point of view::

    client                                runner
    hello ─────────────────────────────▶            versions checked
          ◀───────────────────────────── welcome    (or error, then close)
    execute ───────────────────────────▶            declares values + their sizes
    binary frames (values) ────────────▶
          ◀───────────────────────────── installing (when the cell asks for packages)
          ◀───────────────────────────── output     stream, display_data, ...
    interrupt ─────────────────────────▶            (any time while running)
          ◀───────────────────────────── ask        the kernel needs a resource
    answer ────────────────────────────▶            declares its parts' sizes
    binary frames (the answer's parts) ▶
          ◀───────────────────────────── result     declares returned values
          ◀───────────────────────────── binary frames (values)
    execute ... (the next cell)

Widgets (the Jupyter comm protocol) cross at any time once the session is open,
in or between cells: the runner's kernel's comm messages go to the client as
:class:`Comm`, the notebook frontend's answers go to the runner as
:class:`CommMsg` (the runner's kernel handles each under the frontend's own
message id, reports outputs it makes meanwhile as :class:`SideOutput`, and says
:class:`CommDone` once idle again). Their binary buffers travel base64-encoded
inside the message, apart from the value frames, so a widget update may cross
a cell's values on the wire without disturbing them.

A session outlives its connection. A connection that drops without a close
frame of code 1000 leaves the session kept on the runner for its grace period
(a close with 1000 ends it at once). A new connection takes it back::

    attach ────────────────────────────▶            session id + ticket (+ the cell
          ◀───────────────────────────── attached    waited for, outputs received)
          ◀───────────────────────────── output     the missed outputs, then live ones
          ◀───────────────────────────── result     of a cell that ran meanwhile

The ticket comes in the welcome; only the client that holds it (with the same
client identity) can attach. ``attached.cell`` is the cell that runs, or whose
result waits, on the runner ("" when there is none): the connection is then in
RUNNING, else IDLE. A first message ``list-sessions`` gets the sessions of the
client's identity, as a ``session-list``, like a query.

A value is pickled with protocol 5: one pickle stream plus zero or more
out-of-band buffers (array memory). Its *parts* are that stream and those
buffers; a :class:`ValueHeader` declares each part's size, and the binary
frames that follow carry the bytes of all parts in order. A large part travels
as zero-copy slices of at most :data:`CHUNK_SIZE` bytes; consecutive small
parts (under :data:`SMALL_PART`) share frames, so a thousand small values cost
a few frames, not a thousand. Since every size is declared first, a receiver
always knows where each byte goes and can write it straight into its
destination.

:class:`Session` enforces the order above with a transition table. A message
that is not legal in the current state raises :class:`ProtocolError`, so each
side rejects out-of-order or unexpected input in one place.

While a cell runs, its kernel may need something only the notebook side has (a
module's source, a file): the runner sends an :class:`Ask` and the client
replies with one :class:`Answer` whose parts follow at once as binary frames,
sized first like values. Several asks may be open at a time; each answer names
its ask, and the runner sends the cell's result only once every ask of the
cell is answered, so no answer ever crosses a result on the wire.

Bulk transfers: a runner that listens on a bulk port says so in its welcome
(``bulk``). A client that reaches it directly may then move a cell's large
values there instead of as binary frames: an ``execute`` with ``bulk_in``
declares its values as usual but sends no frames; the runner answers with a
:class:`BulkTicket`, and the client opens a TLS connection to the bulk port
(pinned like the websocket), sends :func:`bulk_claim` (the ticket, the
session, the cell, the direction) and then every declared byte, in order;
the runner answers one status byte (:data:`BULK_OK`, or a refusal with its
reason). With ``bulk_out``, a result may carry a ticket in ``bulk``: the
client opens a connection with it and the runner sends the status byte, then
the values' bytes. A ticket is random, bound to one session, cell and
direction, used once, and void after :data:`BULK_TICKET_TTL` seconds.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum, StrEnum
from typing import Any, ClassVar, TypeVar

from didomagic.errors import ProtocolError, VersionMismatch

PROTOCOL_VERSION = 5
"""Bumped on any change that an older peer could misread."""

RUNNER_GONE_CODE = 1011
"""The close code of a relay whose runner is known to be gone (its reason says why, e.g. a
Slurm job cancelled): the session ended with it, so the client does not try to reattach."""

CLIENT_HEADER = "X-Didomagic-Client"
"""The handshake header carrying the client's identity secret; jobs belong to its hash."""

CHUNK_SIZE = 1 << 20
"""Largest binary frame a sender produces (1 MiB)."""

SMALL_PART = 64 << 10
"""Parts smaller than this are packed together into shared frames."""

MAX_TEXT_SIZE = 16 << 20
"""Largest control message accepted (16 MiB: a cell's source fits with room)."""

CODE_VALUE = "__didomagic_code__"
"""The reserved value name of a cell's code bundle (see ``didomagic.localcode``): its parts
are a JSON manifest and module sources, read by the runner kernel, never bound to a name."""

MAX_OPEN_ASKS = 256
"""Asks a runner may have waiting for their answers at once, per session."""
MAX_DEPTH = 64
"""Deepest nesting of lists and objects accepted inside a message's free-form fields."""

DIGEST_LENGTH = 32
"""Hex digits of a value's digest (XXH3-128, as ``serialize.Digester`` writes it)."""

_DIGEST = re.compile(f"[0-9a-f]{{{DIGEST_LENGTH}}}")

BULK_TICKET_BYTES = 32
"""Random bytes of a bulk ticket (see "Bulk transfers" at the end of this module)."""

BULK_MIN = 4 << 20
"""Values smaller than this in all (per cell, per result) keep to the websocket."""

BULK_TICKET_TTL = 30.0
"""Seconds a bulk ticket admits its connection; unused by then, it is void."""

_TICKET = re.compile(f"[0-9a-f]{{{2 * BULK_TICKET_BYTES}}}")


def python_version() -> str:
    """This interpreter's ``major.minor`` version, as exchanged in the hello."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def cloudpickle_version() -> str:
    """The installed cloudpickle version, as exchanged in the hello."""
    import cloudpickle

    return str(cloudpickle.__version__)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class ValueHeader:
    """A value that travels: its name and the byte size of each of its parts.

    ``digest`` (a content hash, set for large values) lets a runner session keep
    the value's bytes; a later cell whose value has the same name and digest
    declares it ``cached`` and sends no frames for it.
    """

    name: str
    sizes: tuple[int, ...]
    digest: str = ""
    cached: bool = False

    @property
    def nbytes(self) -> int:
        """Total size of the value's parts."""
        return sum(self.sizes)


@dataclass(frozen=True)
class Message:
    """Base class of every control message; ``kind`` is its wire ``type``."""

    kind: ClassVar[str] = ""


@dataclass(frozen=True)
class Hello(Message):
    """Client → runner or mediator, first message: what the client speaks and needs.

    ``tags``, ``os`` and ``runner`` (a runner name) are requirements a mediator
    matches runners against; a runner reached directly ignores them.
    """

    kind: ClassVar[str] = "hello"
    protocol: int
    python: str
    cloudpickle: str
    client: str = ""
    tags: tuple[str, ...] = ()
    os: str = ""
    runner: str = ""


@dataclass(frozen=True)
class Queued(Message):
    """Runner → client, before the welcome: every slot is busy; ``position`` 1 is next.

    A mediator that is launching a runner for the session sends ``position``
    0 and a ``note`` on where the launch stands ("launching a runner: Slurm
    job 12, pending (Resources)"), again whenever it changes.
    """

    kind: ClassVar[str] = "queued"
    position: int
    note: str = ""


@dataclass(frozen=True)
class Query(Message):
    """Client → runner or mediator, first message instead of a hello: describe yourself.

    Takes no session slot and touches no kernel; the answer is an :class:`Info`.
    """

    kind: ClassVar[str] = "query"


@dataclass(frozen=True)
class Info(Message):
    """Answer to a :class:`Query`: ``role`` is "runner" or "mediator"; one entry per runner.

    Each entry is a runner description (see ``runner.resources``): name, tags,
    os, arch, python, cpus, memory, GPUs and load.
    """

    kind: ClassVar[str] = "info"
    role: str
    runners: tuple[dict[str, Any], ...] = ()
    name: str = ""


@dataclass(frozen=True)
class Welcome(Message):
    """Runner → client: the session is open; ``runner`` describes the runner.

    ``ticket`` is the secret an :class:`Attach` presents to take the session
    back after its connection dropped. ``bulk`` is the runner's bulk port on
    the same host (0: none, or the session is relayed): large values may
    travel there instead of as binary frames (see "Bulk transfers" below).
    """

    kind: ClassVar[str] = "welcome"
    protocol: int
    python: str
    cloudpickle: str
    session: str
    runner: dict[str, Any] = field(default_factory=dict)
    ticket: str = ""
    bulk: int = 0


@dataclass(frozen=True)
class Attach(Message):
    """Client → runner or mediator, first message instead of a hello: take a session back.

    ``cell`` is the cell the client still waits for ("" for none) and
    ``received`` how many of its outputs arrived, so only the missed ones come.
    """

    kind: ClassVar[str] = "attach"
    protocol: int
    python: str
    cloudpickle: str
    session: str
    ticket: str
    cell: str = ""
    received: int = 0


@dataclass(frozen=True)
class Attached(Message):
    """Runner → client: the session is back on this connection.

    ``cell`` runs (or its result waits) on the runner, "" for none; its outputs
    from number ``resume`` on follow, then its result. ``resume`` above the
    client's ``received`` means the outputs between were dropped (--max-output).
    """

    kind: ClassVar[str] = "attached"
    session: str
    cell: str = ""
    resume: int = 0
    runner: dict[str, Any] = field(default_factory=dict)
    bulk: int = 0
    """The runner's bulk port, as in :class:`Welcome`."""


@dataclass(frozen=True)
class ListSessions(Message):
    """Client → runner or mediator, first message: the sessions this client identity holds."""

    kind: ClassVar[str] = "list-sessions"


@dataclass(frozen=True)
class SessionList(Message):
    """Answer to :class:`ListSessions`: one entry per session (id, runner, age, cell, state)."""

    kind: ClassVar[str] = "session-list"
    sessions: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Execute(Message):
    """Client → runner: run ``code``; the declared values follow as binary frames.

    ``fetch`` names are sent back after the cell if they are bound then;
    ``deletes`` are names the cell deletes, reported back if they are gone;
    ``held`` are names the cell reads whose value the runner's session holds
    at the version the client has (no bytes travel; the kernel keeps its own).
    ``packages`` are requirements (``name==1.0``, ``name>=2``) the cell's
    kernel must see, installed by the runner from its own index if needed
    (see ``runner.envs``); never URLs, paths or index options.
    ``bulk_in``: the values' bytes come over a bulk connection, not as
    binary frames (the runner answers with a :class:`BulkTicket`);
    ``bulk_out``: the client can take large returned values over one too.
    """

    kind: ClassVar[str] = "execute"
    cell: str
    code: str
    values: tuple[ValueHeader, ...] = ()
    fetch: tuple[str, ...] = ()
    deletes: tuple[str, ...] = ()
    timeout: float | None = None
    parent: str = ""
    """The notebook's request id: the runner's kernel runs the cell under it (see CommMsg)."""
    count: int = 0
    """The notebook's execution count, so a remote traceback says "Cell In[count]"."""

    packages: tuple[str, ...] = ()
    held: tuple[str, ...] = ()
    bulk_in: bool = False
    bulk_out: bool = False

    def __post_init__(self) -> None:
        _check_request_id(self.kind, "parent", self.parent, empty=True)


@dataclass(frozen=True)
class Installing(Message):
    """Runner → client, before the cell runs: packages are being installed for it.

    ``count`` is how many distributions go in (0 while resolving); ``line``
    is the installer's latest output line; ``done`` marks the last message,
    sent once the packages are in place (the cell runs next).
    """

    kind: ClassVar[str] = "installing"
    cell: str
    count: int
    line: str = ""
    done: bool = False


@dataclass(frozen=True)
class Interrupt(Message):
    """Client → runner: interrupt the running cell (like the stop button)."""

    kind: ClassVar[str] = "interrupt"
    cell: str


@dataclass(frozen=True)
class Output(Message):
    """Runner → client: one iopub message of the running cell, as the kernel sent it.

    ``msg_type`` is one of :data:`OUTPUT_TYPES`; ``content`` is the Jupyter
    message content, unchanged.
    """

    kind: ClassVar[str] = "output"
    cell: str
    msg_type: str
    content: dict[str, Any]


OUTPUT_TYPES = frozenset(
    {"stream", "display_data", "update_display_data", "execute_result", "clear_output"}
)

COMM_TYPES = frozenset({"comm_open", "comm_msg", "comm_close"})
"""The Jupyter comm messages a session forwards (widgets: ``jupyter.widget`` and
``jupyter.widget.control`` targets, or any other)."""

MAX_REQUEST_ID = 128
"""Longest message id a :class:`CommMsg` or an :class:`Execute` may name."""


def _check_request_id(kind: str, name: str, value: str, *, empty: bool = False) -> None:
    """A Jupyter message id: printable ASCII without spaces, at most MAX_REQUEST_ID long."""
    ok = (bool(value) or empty) and len(value) <= MAX_REQUEST_ID
    ok = ok and all("!" <= ch <= "~" for ch in value)
    if not ok:
        raise ProtocolError(
            f"{kind}.{name} must be a message id of 1 to {MAX_REQUEST_ID} printable ASCII "
            f"characters without spaces, got {value!r:.60}"
        )


def _check_comm(kind: str, msg_type: str, content: dict[str, Any], buffers: Sequence[str]) -> None:
    if msg_type not in COMM_TYPES:
        raise ProtocolError(
            f"{kind}.msg_type must be one of {sorted(COMM_TYPES)}, got {msg_type!r:.60}"
        )
    if not isinstance(content.get("comm_id"), str) or not content["comm_id"]:
        raise ProtocolError(f"{kind}.content must name its comm_id (a non-empty string)")
    for item in buffers:
        if not isinstance(item, str):
            raise ProtocolError(f"{kind}.buffers must be base64 strings")


def encode_buffers(buffers: Sequence[bytes | bytearray | memoryview]) -> tuple[str, ...]:
    """A comm message's binary buffers as the base64 strings a :class:`Comm` carries."""
    return tuple(base64.b64encode(bytes(b)).decode("ascii") for b in buffers)


def decode_buffers(buffers: Sequence[str]) -> list[bytes]:
    """The bytes of base64-encoded comm buffers; :class:`ProtocolError` if one is not base64."""
    try:
        return [base64.b64decode(b, validate=True) for b in buffers]
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"a comm buffer is not valid base64: {exc}") from None


@dataclass(frozen=True)
class Comm(Message):
    """Runner → client: a comm message of the runner's kernel (a widget opens, changes, closes).

    ``msg_type`` is one of :data:`COMM_TYPES`; ``content`` and ``metadata``
    are the Jupyter message's, unchanged; ``buffers`` its binary buffers,
    base64. ``request`` is the :class:`CommMsg` the kernel was handling when it
    sent this ("" when it came from a cell or a thread).
    """

    kind: ClassVar[str] = "comm"
    msg_type: str
    content: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    buffers: tuple[str, ...] = ()
    request: str = ""

    def __post_init__(self) -> None:
        _check_comm(self.kind, self.msg_type, self.content, self.buffers)
        _check_request_id(self.kind, "request", self.request, empty=True)


@dataclass(frozen=True)
class CommMsg(Message):
    """Client → runner: the notebook frontend's message to a comm the runner's kernel opened.

    ``request`` is the frontend's message id; the runner's kernel handles the
    message under that id, so an ``Output`` widget there captures into the
    right place here. Fields as in :class:`Comm`.
    """

    kind: ClassVar[str] = "comm-msg"
    request: str
    msg_type: str
    content: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    buffers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_comm(self.kind, self.msg_type, self.content, self.buffers)
        _check_request_id(self.kind, "request", self.request)


@dataclass(frozen=True)
class SideOutput(Message):
    """Runner → client: an output of the runner's kernel outside any cell.

    Made while it handled the :class:`CommMsg` ``request`` (a widget
    callback), or by a thread after its cell ended (``request`` is then "").
    """

    kind: ClassVar[str] = "side-output"
    msg_type: str
    content: dict[str, Any]
    request: str = ""

    def __post_init__(self) -> None:
        if self.msg_type not in OUTPUT_TYPES:
            raise ProtocolError(
                f"{self.kind}.msg_type must be one of {sorted(OUTPUT_TYPES)}, got "
                f"{self.msg_type!r:.60}"
            )
        _check_request_id(self.kind, "request", self.request, empty=True)


@dataclass(frozen=True)
class CommDone(Message):
    """Runner → client: the runner's kernel is done with the :class:`CommMsg` ``request``."""

    kind: ClassVar[str] = "comm-done"
    request: str

    def __post_init__(self) -> None:
        _check_request_id(self.kind, "request", self.request)


ASIDE = (Comm, SideOutput, CommDone, CommMsg)
"""Messages that cross in any state of an open session, beside the cells."""


class Status(StrEnum):
    """How a cell ended."""

    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    KERNEL_DIED = "kernel-died"
    INTERRUPTED = "interrupted"
    TRANSFER_FAILED = "transfer-failed"
    """The cell's values did not all arrive over its bulk connection; it did not run."""


@dataclass(frozen=True)
class Result(Message):
    """Runner → client: the cell ended; the declared values follow as binary frames.

    ``failures`` maps a name to why it could not travel (either way);
    ``deleted`` lists names of ``Execute.deletes`` that are unbound now;
    ``error`` holds ``ename``, ``evalue`` and ``traceback`` for an error,
    or a ``message`` for a timeout, a dead kernel or a failed transfer.
    ``bulk`` (a :class:`BulkTicket`'s hex ticket) says the values' bytes come
    over a bulk connection the client opens with it, not as binary frames.
    """

    kind: ClassVar[str] = "result"
    cell: str
    status: Status
    values: tuple[ValueHeader, ...] = ()
    deleted: tuple[str, ...] = ()
    failures: dict[str, str] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    bulk: str = ""

    def __post_init__(self) -> None:
        _check_ticket(self.kind, "bulk", self.bulk, empty=True)


@dataclass(frozen=True)
class BulkTicket(Message):
    """Runner → client, after an ``Execute`` with ``bulk_in``: send the values with ``ticket``.

    ``ticket`` (hex) admits one bulk connection, for this session, this cell
    and this direction, within :data:`BULK_TICKET_TTL` seconds.
    """

    kind: ClassVar[str] = "bulk-ticket"
    cell: str
    ticket: str

    def __post_init__(self) -> None:
        _check_ticket(self.kind, "ticket", self.ticket)


def _check_ticket(kind: str, name: str, value: str, *, empty: bool = False) -> None:
    if not (empty and not value) and not _TICKET.fullmatch(value):
        raise ProtocolError(
            f"{kind}.{name} must be {2 * BULK_TICKET_BYTES} lower-case hex digits, got "
            f"{value!r:.80}"
        )


@dataclass(frozen=True)
class Ask(Message):
    """Runner → client, while a cell runs: its kernel needs a resource from the notebook side.

    ``resource`` says what sort (``"module"``, ``"file"``, ...: one handler per
    sort on the client), ``name`` which one, ``args`` small extra details.
    ``id`` is the runner's, unique among the session's open asks.
    """

    kind: ClassVar[str] = "ask"
    cell: str
    id: str
    resource: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)


class AnswerStatus(StrEnum):
    """What became of an :class:`Ask`."""

    FOUND = "found"
    NOT_FOUND = "not-found"
    REFUSED = "refused"


@dataclass(frozen=True)
class Answer(Message):
    """Client → runner: the reply to the :class:`Ask` ``id``; its parts follow as binary frames.

    ``message`` says why for a resource not found or refused; ``meta`` is the
    handler's JSON description of what it sends; ``sizes`` the byte size of
    each part, in order (the frames carry them end to end, like a value's).
    """

    kind: ClassVar[str] = "answer"
    cell: str
    id: str
    status: AnswerStatus
    message: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    sizes: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        """Total size of the answer's parts."""
        return sum(self.sizes)


class ErrorCode(StrEnum):
    """Why a runner ends a session with an :class:`Error`."""

    PROTOCOL = "protocol"
    VERSION = "version"
    BUSY = "busy"
    NO_MATCH = "no-match"
    NOT_FOUND = "not-found"
    NOT_READY = "not-ready"
    BAD_REQUEST = "bad-request"
    INTERNAL = "internal"


@dataclass(frozen=True)
class Error(Message):
    """Runner → client: the session cannot go on; the runner closes it next."""

    kind: ClassVar[str] = "error"
    code: ErrorCode
    message: str


# -- detached jobs (the jobs channel: a connection to the /jobs endpoint)


@dataclass(frozen=True)
class Submit(Message):
    """Client → job holder: store this cell as a job; its values follow as binary frames.

    ``request_id`` is the client's: submitting the same one again returns the
    existing job instead of a second one (a retry after a dropped connection).
    ``retries`` is how often the job is run again elsewhere if its runner is lost.
    """

    kind: ClassVar[str] = "submit"
    request_id: str
    code: str
    values: tuple[ValueHeader, ...] = ()
    fetch: tuple[str, ...] = ()
    deletes: tuple[str, ...] = ()
    name: str = ""
    tags: tuple[str, ...] = ()
    os: str = ""
    retries: int = 0
    timeout: float | None = None
    packages: tuple[str, ...] = ()


@dataclass(frozen=True)
class ListJobs(Message):
    """Client → job holder: describe these jobs (all of them when ``ids`` is empty)."""

    kind: ClassVar[str] = "list-jobs"
    ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pull(Message):
    """Client → job holder: send a finished job's outputs and values."""

    kind: ClassVar[str] = "pull"
    job: str


@dataclass(frozen=True)
class CancelJob(Message):
    """Client → job holder: stop a queued or running job."""

    kind: ClassVar[str] = "cancel-job"
    job: str


@dataclass(frozen=True)
class DeleteJob(Message):
    """Client → job holder: forget a job and its stored results (cancelling it first)."""

    kind: ClassVar[str] = "delete-job"
    job: str


@dataclass(frozen=True)
class JobList(Message):
    """Job holder → client: the jobs asked about (or the one just submitted or changed)."""

    kind: ClassVar[str] = "job-list"
    jobs: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class JobData(Message):
    """Job holder → client: a finished job, like a :class:`Result`; values follow as frames.

    ``outputs`` are the cell's outputs in order, each ``{"msg_type", "content"}``.
    """

    kind: ClassVar[str] = "job-data"
    job: dict[str, Any]
    status: Status
    outputs: tuple[dict[str, Any], ...] = ()
    values: tuple[ValueHeader, ...] = ()
    deleted: tuple[str, ...] = ()
    failures: dict[str, str] = field(default_factory=dict)
    error: dict[str, Any] | None = None


# -- the link between a runner and a mediator (the runner dials out)


@dataclass(frozen=True)
class Register(Message):
    """Runner → mediator, first message on the link: the runner's description.

    ``id`` stays the same for the life of the runner process, so a runner that
    comes back (after a lost heartbeat or a mediator restart) replaces its old
    entry. The runner sends a :class:`Load` at least every ``heartbeat`` seconds.
    """

    kind: ClassVar[str] = "register"
    id: str
    runner: dict[str, Any]
    heartbeat: float
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Registered(Message):
    """Mediator → runner: the registration is accepted."""

    kind: ClassVar[str] = "registered"
    mediator: str


@dataclass(frozen=True)
class Load(Message):
    """Runner → mediator: the runner's load changed (or a heartbeat with the same load)."""

    kind: ClassVar[str] = "load"
    load: dict[str, Any]


@dataclass(frozen=True)
class LogLines(Message):
    """Runner → mediator: log lines the runner wrote since its last ones (the status page)."""

    kind: ClassVar[str] = "log"
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Dial(Message):
    """Mediator → runner: open a relay connection for a client session, naming ``ticket``.

    ``client`` is the client's identity (a hash of its secret) as the mediator
    saw it; sessions on the relay belong to it.
    """

    kind: ClassVar[str] = "dial"
    ticket: str
    client: str = ""


@dataclass(frozen=True)
class Leave(Message):
    """Runner → mediator: the runner is shutting down; forget it."""

    kind: ClassVar[str] = "leave"


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.kind: cls
    for cls in (
        Hello,
        Queued,
        Query,
        Info,
        Welcome,
        Attach,
        Attached,
        ListSessions,
        SessionList,
        Execute,
        Installing,
        Interrupt,
        Output,
        Result,
        BulkTicket,
        Ask,
        Answer,
        Error,
        Comm,
        CommMsg,
        SideOutput,
        CommDone,
        Register,
        Registered,
        Load,
        Dial,
        LogLines,
        Leave,
        Submit,
        ListJobs,
        Pull,
        CancelJob,
        DeleteJob,
        JobList,
        JobData,
    )
}


M = TypeVar("M", bound=Message)


def expect(message: Message, cls: type[M]) -> M:
    """Return ``message`` if it is a ``cls``; else raise :class:`ProtocolError` naming both."""
    if not isinstance(message, cls):
        raise ProtocolError(f"expected a {cls.kind} message, got {message.kind}")
    return message


# --------------------------------------------------------------------------- encoding


def encode(message: Message) -> str:
    """Serialize a message to the JSON text of one websocket frame."""
    body = {f.name: getattr(message, f.name) for f in fields(message)}
    body["type"] = message.kind
    return json.dumps(body, separators=(",", ":"), default=_plain)


def _plain(obj: object) -> object:
    """JSON for what ``json`` does not know: enums and value headers (no deep copies)."""
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, ValueHeader):
        return {"name": obj.name, "sizes": obj.sizes, "digest": obj.digest, "cached": obj.cached}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def decode(text: str | bytes) -> Message:
    """Parse and validate one text frame; raise :class:`ProtocolError` if it is not valid."""
    if len(text) > MAX_TEXT_SIZE:
        raise ProtocolError(f"control message of {len(text)} bytes exceeds {MAX_TEXT_SIZE}")
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"control message is not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(
            f"control message is nested too deeply (at most {MAX_DEPTH} levels)"
        ) from None
    if not isinstance(body, dict):
        raise ProtocolError("control message must be a JSON object")
    kind = body.pop("type", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(
            f"unknown message type {kind!r}; expected one of {sorted(MESSAGE_TYPES)}"
        )
    known = {f.name for f in fields(cls)}
    extra = set(body) - known
    if extra:
        raise ProtocolError(f"{kind} message has unknown fields {sorted(extra)}")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in body:
            if _is_required(f):
                raise ProtocolError(f"{kind} message is missing the field {f.name!r}")
            continue
        values[f.name] = _FIELD_TYPES[f.type](kind, f.name, body[f.name])
    return cls(**values)


def _is_required(f: Any) -> bool:
    from dataclasses import MISSING

    return f.default is MISSING and f.default_factory is MISSING


def _check(kind: str, name: str, ok: bool, expected: str, value: object) -> None:
    if not ok:
        raise ProtocolError(
            f"{kind}.{name} must be {expected}, got {type(value).__name__} {value!r:.60}"
        )


def _as_int(kind: str, name: str, v: Any) -> int:
    _check(kind, name, isinstance(v, int) and not isinstance(v, bool), "an integer", v)
    return int(v)


def _as_bool(kind: str, name: str, v: Any) -> bool:
    _check(kind, name, isinstance(v, bool), "true or false", v)
    return bool(v)


def _as_str(kind: str, name: str, v: Any) -> str:
    _check(kind, name, isinstance(v, str), "a string", v)
    return str(v)


def _as_str_tuple(kind: str, name: str, v: Any) -> tuple[str, ...]:
    _check(
        kind,
        name,
        isinstance(v, list) and all(isinstance(s, str) for s in v),
        "a list of strings",
        v,
    )
    return tuple(v)


def _as_sizes(kind: str, name: str, v: Any) -> tuple[int, ...]:
    ok = isinstance(v, list) and all(type(s) is int and s >= 0 for s in v)
    _check(kind, name, ok, "a list of sizes (integers >= 0)", v)
    return tuple(v)


def _check_depth(kind: str, name: str, v: Any) -> None:
    """Raise unless ``v`` nests lists and objects at most :data:`MAX_DEPTH` deep."""
    stack = [(v, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ProtocolError(f"{kind}.{name} is nested too deeply (at most {MAX_DEPTH} levels)")
        if type(item) is dict:
            stack.extend((x, depth + 1) for x in item.values())
        elif type(item) is list:
            stack.extend((x, depth + 1) for x in item)


def _as_object(kind: str, name: str, v: Any) -> dict[str, Any]:
    _check(kind, name, isinstance(v, dict), "a JSON object", v)
    _check_depth(kind, name, v)
    return dict(v)


def _as_optional_object(kind: str, name: str, v: Any) -> dict[str, Any] | None:
    return None if v is None else _as_object(kind, name, v)


def _as_str_map(kind: str, name: str, v: Any) -> dict[str, str]:
    ok = isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
    _check(kind, name, ok, "an object of strings", v)
    return dict(v)


def _as_object_tuple(kind: str, name: str, v: Any) -> tuple[dict[str, Any], ...]:
    ok = isinstance(v, list) and all(isinstance(x, dict) for x in v)
    _check(kind, name, ok, "a list of JSON objects", v)
    _check_depth(kind, name, v)
    return tuple(dict(x) for x in v)


def _as_seconds(kind: str, name: str, v: Any) -> float:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    _check(kind, name, ok, "a positive number of seconds", v)
    return float(v)


def _as_timeout(kind: str, name: str, v: Any) -> float | None:
    if v is None:
        return None
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    _check(kind, name, ok, "a positive number of seconds or null", v)
    return float(v)


_HEADER_KEYS = frozenset({"name", "sizes", "digest", "cached"})


def _as_values(kind: str, name: str, v: Any) -> tuple[ValueHeader, ...]:
    _check(kind, name, isinstance(v, list), "a list of values", v)
    headers = []
    for item in v:  # exact type checks: a cell may declare thousands of values
        ok = type(item) is dict and item.keys() <= _HEADER_KEYS
        if ok:
            value_name, sizes = item.get("name"), item.get("sizes")
            digest, cached = item.get("digest", ""), item.get("cached", False)
            ok = (
                type(value_name) is str
                and type(sizes) is list
                and len(sizes) >= 1
                and type(digest) is str
                and type(cached) is bool
                and all(type(s) is int and s >= 0 for s in sizes)
            )
        _check(
            kind,
            name,
            ok,
            'a list of {"name": str, "sizes": [int >= 0, ...], "digest"?: str, "cached"?: bool}',
            item,
        )
        if digest and not _DIGEST.fullmatch(digest):
            raise ProtocolError(
                f"{kind}.{name}: value {value_name!r:.60} has the digest {digest!r:.60}; a "
                f"digest is empty or exactly {DIGEST_LENGTH} lower-case hex digits"
            )
        headers.append(ValueHeader(value_name, tuple(sizes), digest, cached))
    return tuple(headers)


def _enum_of(enum: type[Enum]) -> Callable[[str, str, Any], Any]:
    def convert(kind: str, name: str, v: Any) -> Any:
        try:
            return enum(v)
        except ValueError:
            raise ProtocolError(
                f"{kind}.{name} must be one of {[e.value for e in enum]}, got {v!r:.60}"
            ) from None

    return convert


_FIELD_TYPES: dict[str, Callable[[str, str, Any], Any]] = {
    "int": _as_int,
    "bool": _as_bool,
    "str": _as_str,
    "tuple[str, ...]": _as_str_tuple,
    "dict[str, Any]": _as_object,
    "dict[str, Any] | None": _as_optional_object,
    "dict[str, str]": _as_str_map,
    "float | None": _as_timeout,
    "float": _as_seconds,
    "tuple[dict[str, Any], ...]": _as_object_tuple,
    "tuple[ValueHeader, ...]": _as_values,
    "tuple[int, ...]": _as_sizes,
    "Status": _enum_of(Status),
    "AnswerStatus": _enum_of(AnswerStatus),
    "ErrorCode": _enum_of(ErrorCode),
}


# --------------------------------------------------------------------------- versions


def check_compatible(*, protocol: int, python: str, cloudpickle: str, side: str = "runner") -> None:
    """Raise :class:`VersionMismatch` unless the peer's versions match ours.

    Pickles made by cloudpickle only load under the same Python minor version
    and the same cloudpickle version, so both must match exactly.
    """
    ours = (PROTOCOL_VERSION, python_version(), cloudpickle_version())
    theirs = (protocol, python, cloudpickle)
    if ours == theirs:
        return
    here = "this side" if side == "runner" else "this notebook"
    raise VersionMismatch(
        f"Version mismatch: {here} has protocol {ours[0]}, Python {ours[1]}, cloudpickle "
        f"{ours[2]}; the {side} has protocol {theirs[0]}, Python {theirs[1]}, cloudpickle "
        f"{theirs[2]}. Values are pickled, so both sides need the same Python minor version "
        "and the same cloudpickle (and didomagic) version: install matching versions."
    )


# --------------------------------------------------------------------------- session


class Role(StrEnum):
    """Which end of the websocket a :class:`Session` (or :class:`Link`) tracks."""

    CLIENT = "client"
    RUNNER = "runner"
    MEDIATOR = "mediator"


class Channel(StrEnum):
    """What a connection is for: running cells in a session, or managing detached jobs."""

    CELLS = "cells"
    JOBS = "jobs"


class State(StrEnum):
    """Where a session stands (see the module docstring)."""

    HELLO = "hello"  # waiting for the client's hello (or query)
    WELCOME = "welcome"  # hello sent, waiting for the runner's welcome (or queued)
    QUERY = "query"  # query (or list-sessions) sent, waiting for the answer
    ATTACH = "attach"  # attach sent, waiting for attached
    IDLE = "idle"  # ready for the next cell
    UPLOAD = "upload"  # execute sent; its values are in flight
    RUNNING = "running"  # the cell runs on the runner
    ANSWER = "answer"  # the cell runs; an answer's parts are in flight
    DOWNLOAD = "download"  # result sent; its values are in flight
    WAIT = "wait"  # a jobs request sent, waiting for its answer
    CLOSED = "closed"


_SENDER = {
    Submit: Role.CLIENT,
    ListJobs: Role.CLIENT,
    Pull: Role.CLIENT,
    CancelJob: Role.CLIENT,
    DeleteJob: Role.CLIENT,
    JobList: Role.RUNNER,
    JobData: Role.RUNNER,
    Hello: Role.CLIENT,
    Query: Role.CLIENT,
    Attach: Role.CLIENT,
    ListSessions: Role.CLIENT,
    Attached: Role.RUNNER,
    SessionList: Role.RUNNER,
    Execute: Role.CLIENT,
    Interrupt: Role.CLIENT,
    Queued: Role.RUNNER,
    Info: Role.RUNNER,
    Welcome: Role.RUNNER,
    Output: Role.RUNNER,
    Installing: Role.RUNNER,
    Result: Role.RUNNER,
    BulkTicket: Role.RUNNER,
    Ask: Role.RUNNER,
    Answer: Role.CLIENT,
    Error: Role.RUNNER,
    Comm: Role.RUNNER,
    SideOutput: Role.RUNNER,
    CommDone: Role.RUNNER,
    CommMsg: Role.CLIENT,
}

_TRANSITIONS: dict[tuple[State, type[Message]], State] = {
    (State.HELLO, Hello): State.WELCOME,
    (State.HELLO, Query): State.QUERY,
    (State.QUERY, Info): State.CLOSED,
    (State.HELLO, ListSessions): State.QUERY,
    (State.QUERY, SessionList): State.CLOSED,
    (State.HELLO, Attach): State.ATTACH,
    (State.ATTACH, Attached): State.IDLE,  # RUNNING when it names a cell (see _advance)
    (State.WELCOME, Queued): State.WELCOME,
    (State.WELCOME, Welcome): State.IDLE,
    (State.IDLE, Execute): State.UPLOAD,
    (State.UPLOAD, Interrupt): State.UPLOAD,
    (State.RUNNING, Output): State.RUNNING,
    (State.RUNNING, Installing): State.RUNNING,
    (State.RUNNING, Interrupt): State.RUNNING,
    (State.RUNNING, Result): State.DOWNLOAD,  # only once every ask is answered
    (State.RUNNING, BulkTicket): State.RUNNING,  # (the cell starts once its bytes are in)
    (State.RUNNING, Ask): State.RUNNING,
    (State.RUNNING, Answer): State.ANSWER,  # then RUNNING once its parts have arrived
    (State.ANSWER, Ask): State.ANSWER,
    (State.ANSWER, Output): State.ANSWER,
    (State.ANSWER, Interrupt): State.ANSWER,
    # An interrupt may cross the result on the wire; it is then a no-op.
    (State.DOWNLOAD, Interrupt): State.DOWNLOAD,
    (State.IDLE, Interrupt): State.IDLE,
    # Widgets talk in and between cells, whatever the values are doing.
    **{
        (state, kind): state
        for state in (State.IDLE, State.UPLOAD, State.RUNNING, State.ANSWER, State.DOWNLOAD)
        for kind in ASIDE
    },
}
"""Legal moves: (state, message type) → next state. An :class:`Error` closes from any state."""

_JOB_TRANSITIONS: dict[tuple[State, type[Message]], State] = {
    (State.HELLO, Hello): State.WELCOME,
    (State.WELCOME, Welcome): State.IDLE,
    (State.IDLE, Submit): State.UPLOAD,  # then WAIT once every value byte has arrived
    (State.IDLE, ListJobs): State.WAIT,
    (State.IDLE, Pull): State.WAIT,
    (State.IDLE, CancelJob): State.WAIT,
    (State.IDLE, DeleteJob): State.WAIT,
    (State.WAIT, JobList): State.IDLE,
    (State.WAIT, JobData): State.DOWNLOAD,  # then IDLE once every value byte has arrived
}
"""The same for the jobs channel: one request, one answer, in turn."""

_TABLES = {Channel.CELLS: _TRANSITIONS, Channel.JOBS: _JOB_TRANSITIONS}
_AFTER_UPLOAD = {Channel.CELLS: State.RUNNING, Channel.JOBS: State.WAIT}


@dataclass(frozen=True)
class Chunk:
    """Where the bytes of one binary frame belong: value, part and offset in that part."""

    value: int
    part: int
    offset: int
    data: memoryview


class Session:
    """The state of one connection, for one role; validates every message in order.

    Call :meth:`send` before sending a control message, :meth:`receive` on each
    text frame received, :meth:`frames` to produce the binary frames of the
    values just declared, and :meth:`receive_binary` on each binary frame.
    """

    def __init__(self, role: Role, channel: Channel = Channel.CELLS) -> None:
        self.role = role
        self.channel = channel
        self.state = State.HELLO
        self._pending: deque[tuple[int, int, int]] = deque()  # (value, part, size) to move
        self._offset = 0  # bytes of the current part already moved
        self.asks: set[str] = set()
        """Ids of the asks sent (or received) and not answered yet."""

    # -- control messages

    def send(self, message: Message) -> str:
        """Check that this side may send ``message`` now, advance, and return its text."""
        if _SENDER.get(type(message)) is not self.role and not isinstance(message, Error):
            raise ProtocolError(f"a {self.role.value} does not send {message.kind} messages")
        self._advance(message)
        return encode(message)

    def receive(self, text: str | bytes) -> Message:
        """Decode a received text frame, check it is legal now, and advance."""
        message = decode(text)
        if self._receiving_blobs() and not isinstance(message, (Interrupt, Error, *ASIDE)):
            raise ProtocolError(
                f"got a {message.kind} message while "
                f"{self._bytes_left()} bytes of values were still expected"
            )
        if _SENDER.get(type(message), self.role) is self.role and not isinstance(message, Error):
            raise ProtocolError(f"a {self.role.value} does not receive {message.kind} messages")
        self._advance(message)
        return message

    def _advance(self, message: Message) -> None:
        if isinstance(message, Error):
            self.state = State.CLOSED
            return
        nxt = _TABLES[self.channel].get((self.state, type(message)))
        if nxt is None:
            raise ProtocolError(
                f"{message.kind} message is not allowed in state {self.state.value!r}"
            )
        if isinstance(message, Ask | Answer | Result):
            self._track_ask(message)
        if isinstance(message, Execute | Result | Submit | JobData):
            self._expect(() if _over_bulk(message) else message.values)
        elif isinstance(message, Answer):
            self._expect((ValueHeader(message.id, message.sizes),))
        if isinstance(message, Attached) and message.cell:
            nxt = State.RUNNING  # the cell's outputs and result follow
        self.state = nxt
        self._settle()

    def _track_ask(self, message: Ask | Answer | Result) -> None:
        """Each ask is answered once, by its id; a result comes only after every answer."""
        if isinstance(message, Ask):
            if message.id in self.asks:
                raise ProtocolError(f"ask id {message.id!r:.40} is already open")
            if len(self.asks) >= MAX_OPEN_ASKS:
                raise ProtocolError(f"more than {MAX_OPEN_ASKS} asks open at once")
            self.asks.add(message.id)
        elif isinstance(message, Answer):
            if message.id not in self.asks:
                raise ProtocolError(f"answer to an ask that is not open: {message.id!r:.40}")
            self.asks.discard(message.id)
        elif self.asks:
            raise ProtocolError(f"result message while {len(self.asks)} asks are unanswered")

    # -- binary frames

    def _receiving_blobs(self) -> bool:
        upload_in = self.state in (State.UPLOAD, State.ANSWER) and self.role is Role.RUNNER
        download_in = self.state is State.DOWNLOAD and self.role is Role.CLIENT
        return upload_in or download_in

    def _expect(self, values: Sequence[ValueHeader]) -> None:
        self._pending = deque(
            (v, p, size)
            for v, header in enumerate(values)
            if not header.cached  # the receiver has these bytes already
            for p, size in enumerate(header.sizes)
            if size > 0
        )
        self._offset = 0

    def _bytes_left(self) -> int:
        return sum(size for _, _, size in self._pending) - self._offset

    def _settle(self) -> None:
        """Leave UPLOAD / DOWNLOAD once every declared byte has moved."""
        if self._pending:
            return
        if self.state is State.UPLOAD:
            self.state = _AFTER_UPLOAD[self.channel]
        elif self.state is State.ANSWER:
            self.state = State.RUNNING
        elif self.state is State.DOWNLOAD:
            self.state = State.IDLE

    def _take(self, nbytes: int) -> tuple[int, int, int]:
        """Consume up to ``nbytes`` of the current part; return (value, part, offset)."""
        value, part, size = self._pending[0]
        offset = self._offset
        self._offset += nbytes
        if self._offset == size:
            self._pending.popleft()
            self._offset = 0
        return value, part, offset

    def receive_binary(self, data: bytes | bytearray | memoryview) -> list[Chunk]:
        """Place one received binary frame: where each of its bytes goes, part by part.

        Raise if no bytes were expected or the frame holds more than was declared.
        """
        if not self._receiving_blobs() or not self._pending:
            raise ProtocolError(f"unexpected binary frame in state {self.state.value!r}")
        view = memoryview(data)
        if view.nbytes == 0:
            raise ProtocolError("empty binary frame")
        if view.nbytes > self._bytes_left():
            raise ProtocolError(
                f"binary frame of {view.nbytes} bytes overruns the declared values "
                f"({self._bytes_left()} bytes left)"
            )
        chunks, position = [], 0
        while position < view.nbytes:
            _, _, size = self._pending[0]
            take = min(size - self._offset, view.nbytes - position)
            value, part, offset = self._take(take)
            chunks.append(Chunk(value, part, offset, view[position : position + take]))
            position += take
        self._settle()
        return chunks

    def frames(self, parts: Sequence[Sequence[memoryview]]) -> Iterator[memoryview]:
        """Yield the binary frames for the values just declared by :meth:`send`.

        ``parts[v][p]`` is the memory of part ``p`` of value ``v``. A large part
        goes as zero-copy slices of at most :data:`CHUNK_SIZE` bytes; runs of
        small parts are joined into frames of at most that size.
        """
        sending = (self.state in (State.UPLOAD, State.ANSWER) and self.role is Role.CLIENT) or (
            self.state is State.DOWNLOAD and self.role is Role.RUNNER
        )
        if self._pending and not sending:
            raise ProtocolError(f"no values to send in state {self.state.value!r}")
        while self._pending:
            value, part, size = self._pending[0]
            buf = self._declared(parts, value, part, size)
            if size >= SMALL_PART or self._offset:
                end = min(self._offset + CHUNK_SIZE, size)
                chunk = buf[self._offset : end]
                self._take(end - self._offset)
                yield chunk
                continue
            batch, total = [], 0
            while self._pending:
                value, part, size = self._pending[0]
                if size >= SMALL_PART or total + size > CHUNK_SIZE:
                    break
                batch.append(self._declared(parts, value, part, size))
                total += size
                self._take(size)
            yield batch[0] if len(batch) == 1 else memoryview(b"".join(batch))
        self._settle()

    @staticmethod
    def _declared(
        parts: Sequence[Sequence[memoryview]], value: int, part: int, size: int
    ) -> memoryview:
        buf = parts[value][part]
        if buf.nbytes != size:
            raise ProtocolError(
                f"value {value} part {part} has {buf.nbytes} bytes, declared {size}"
            )
        return buf


# --------------------------------------------------------------------------- link

_LINK_SENDER = {
    Register: Role.RUNNER,
    Load: Role.RUNNER,
    LogLines: Role.RUNNER,
    Leave: Role.RUNNER,
    Registered: Role.MEDIATOR,
    Dial: Role.MEDIATOR,
}


class Link:
    """The state of a runner's link to a mediator, for one role.

    The runner sends :class:`Register` first and waits for :class:`Registered`;
    then it sends :class:`Load` (changes and heartbeats) and finally
    :class:`Leave`, while the mediator sends :class:`Dial` for each relayed
    session. An :class:`Error` from the mediator ends the link.
    """

    def __init__(self, role: Role) -> None:
        if role not in (Role.RUNNER, Role.MEDIATOR):
            raise ValueError("a link has a runner end and a mediator end")
        self.role = role
        self.asked = False  # register sent
        self.registered = False  # registered received
        self.closed = False

    def send(self, message: Message) -> str:
        """Check that this end may send ``message`` now and return its text."""
        self._advance(message, self.role)
        return encode(message)

    def receive(self, text: str | bytes) -> Message:
        """Decode a received text frame and check that it is legal now."""
        message = decode(text)
        self._advance(message, Role.MEDIATOR if self.role is Role.RUNNER else Role.RUNNER)
        return message

    def _advance(self, message: Message, sender: Role) -> None:
        if self.closed:
            raise ProtocolError(f"{message.kind} message on a closed link")
        if isinstance(message, Error):
            self.closed = True
            return
        if _LINK_SENDER.get(type(message)) is not sender:
            raise ProtocolError(f"a {sender.value} does not send {message.kind} messages on a link")
        if isinstance(message, Register):
            if self.asked:
                raise ProtocolError("register message sent twice on one link")
            self.asked = True
        elif isinstance(message, Registered):
            if not self.asked or self.registered:
                raise ProtocolError("registered message without a pending registration")
            self.registered = True
        elif not self.registered:
            raise ProtocolError(f"{message.kind} message before the registration completed")
        elif isinstance(message, Leave):
            self.closed = True


# --------------------------------------------------------------------------- bulk claims

BULK_MAGIC = b"DMB1"
"""The first bytes a client sends on a bulk connection."""

BULK_OK = b"\x00"
"""The runner's status byte for a claim it accepts (upload: once every byte is in)."""

BULK_REFUSED = b"\x01"
"""The status byte of a refusal; up to :data:`MAX_BULK_REASON` bytes of UTF-8 reason follow."""

MAX_BULK_CLAIM = 1024
"""Largest claim body (JSON) accepted on a bulk connection."""

MAX_BULK_REASON = 512
"""Largest refusal reason a runner sends on a bulk connection."""


class Direction(StrEnum):
    """Which way a bulk connection carries values."""

    IN = "in"  # client → runner: a cell's values
    OUT = "out"  # runner → client: a result's values


@dataclass(frozen=True)
class BulkClaim:
    """What a client presents on a bulk connection: a ticket and what it believes it is for."""

    ticket: str
    session: str
    cell: str
    direction: Direction

    def __post_init__(self) -> None:
        _check_ticket("bulk claim", "ticket", self.ticket)


def bulk_claim(claim: BulkClaim) -> bytes:
    """The bytes that open a bulk connection: magic, a 2-byte length, the claim as JSON."""
    body = json.dumps(
        {
            "ticket": claim.ticket,
            "session": claim.session,
            "cell": claim.cell,
            "direction": claim.direction.value,
        },
        separators=(",", ":"),
    ).encode()
    if len(body) > MAX_BULK_CLAIM:
        raise ProtocolError(f"bulk claim of {len(body)} bytes exceeds {MAX_BULK_CLAIM}")
    return BULK_MAGIC + len(body).to_bytes(2, "big") + body


BULK_CLAIM_HEAD = len(BULK_MAGIC) + 2
"""Bytes before a claim's body: the magic and the body's length."""


def bulk_claim_length(head: bytes) -> int:
    """The body length announced by the first :data:`BULK_CLAIM_HEAD` bytes; raise if bad."""
    if len(head) != BULK_CLAIM_HEAD or head[: len(BULK_MAGIC)] != BULK_MAGIC:
        raise ProtocolError("not a didomagic bulk claim (bad magic)")
    length = int.from_bytes(head[len(BULK_MAGIC) :], "big")
    if not 0 < length <= MAX_BULK_CLAIM:
        raise ProtocolError(f"bulk claim length {length} is not in 1..{MAX_BULK_CLAIM}")
    return length


def parse_bulk_claim(body: bytes) -> BulkClaim:
    """The claim in a bulk connection's body; raise :class:`ProtocolError` if malformed."""
    try:
        fields_ = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bulk claim is not valid JSON: {exc}") from None
    keys = {"ticket", "session", "cell", "direction"}
    if not (
        isinstance(fields_, dict)
        and fields_.keys() == keys
        and all(type(fields_[k]) is str for k in keys)
    ):
        raise ProtocolError(f"bulk claim must be an object of the strings {sorted(keys)}")
    direction = _enum_of(Direction)("bulk claim", "direction", fields_["direction"])
    return BulkClaim(fields_["ticket"], fields_["session"], fields_["cell"], direction)


def bulk_refusal(reason: str) -> bytes:
    """A runner's refusal on a bulk connection: the status byte, then the reason."""
    return BULK_REFUSED + reason.encode()[:MAX_BULK_REASON]


def _over_bulk(message: Execute | Result | Submit | JobData) -> bool:
    """Whether the values a message declares travel over a bulk connection, not as frames."""
    if isinstance(message, Execute):
        return message.bulk_in
    return isinstance(message, Result) and bool(message.bulk)
