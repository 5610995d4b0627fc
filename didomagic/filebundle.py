"""What travels between the notebook's files and a runner kernel's mirror of them, as data.

Shared by the notebook side (:mod:`didomagic.files`) and the kernel side
(:mod:`runner.mirror`). Both directions travel as an ordinary value of the
cell, under :data:`FILES_VALUE`, so they are sent, cached and stored with a
detached job like any value; the agent takes it out of the namespace.

Going in, a :class:`Bundle`. Coming back, a plain dict (so it passes
``--safe-results``): ``{"files": {path: bytes}, "mtimes": {path: ns},
"left": {path: size}}``. Paths are relative to the project root, in POSIX form.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

FILES_VALUE = "__didomagic_files__"
"""The name the files travel under, both ways."""

RESOURCE = "file"
"""The request channel resource the kernel asks for files and listings with."""

DEFAULT_RETURN_LIMIT = 20 << 20
"""Files a cell writes come back by themselves up to this total (``--return-limit``)."""

DEFAULT_FILES_LIMIT = 1 << 30
"""The most one file served, or a cell's ``--files`` together, may hold (``--files-limit``)."""

TREE_LIMIT = 20_000
"""The most entries of the project tree shown to a new session up front."""


@dataclass(frozen=True)
class FileOptions:
    """A cell's file options: ``--files``, ``--get``, ``--files-limit``, ``--return-limit``.

    ``send`` and ``get`` are glob patterns relative to the notebook's folder.
    """

    send: tuple[str, ...] = ()
    get: tuple[str, ...] = ()
    files_limit: int = DEFAULT_FILES_LIMIT
    return_limit: int = DEFAULT_RETURN_LIMIT


@dataclass
class SentFile:
    """A file sent with the cell (``--files``); ``data`` is None when the runner has it."""

    size: int
    mtime_ns: int
    digest: str
    data: pickle.PickleBuffer | memoryview | None = None


@dataclass
class Bundle:
    """The notebook's files as a cell sees them: where it works, and what it gets up front."""

    root: str
    """Which project this is (a tag of the root's path and its name): the kernel's working
    directory mirrors one project at a time, and starts over when the notebook moves."""
    cwd: str
    """The notebook's working directory, relative to the root."""
    tree: list[tuple[str, str, bool, int, int]] | None = None
    """``(folder, name, is_dir, size, mtime_ns)`` entries, for a new session (else None)."""
    files: dict[str, SentFile] = field(default_factory=dict)
    """Files sent up front, by path."""
    stale: list[str] = field(default_factory=list)
    """Paths the runner was served that changed in the notebook's folder since."""
    get: list[str] = field(default_factory=list)
    """``--get`` patterns (root-relative): matching files come back whatever their size."""
    return_limit: int = DEFAULT_RETURN_LIMIT
    lazy: bool = True
    """Whether the kernel may ask the notebook for files while the cell runs."""
