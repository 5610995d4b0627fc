"""The helper loaded into every runner kernel: moves values in and out of its namespace.

The runner and the agent share a private *exchange* directory. The runner
writes each incoming value to a file there, then sends the cell as an ordinary
``execute_request``: its metadata (key :data:`DESCRIPTION_KEY`) names this run
of the cell (a token of its own: clients may reuse cell ids) and the notebook's
execution count, its first buffer describes the values and
the names to fetch, in JSON (a buffer, because ipykernel parses a request's
metadata several times and its buffers never). The agent's ``pre_run_cell``
hook reads that description from the request it is running (so a cell can
never see another cell's) and loads the values into the user namespace; its
``post_run_cell`` hook pickles the names the client asked for into ``out.bin``,
and the cell's ``execute_reply`` carries their headers, the failures and the
deleted names back, in its metadata under the same key. The cell thus costs
one kernel round trip, and values never pass through ZMQ.

After a cell that raised, only names the cell actually rebound go back, so a
stale value from an earlier cell never overwrites the notebook's. Values the
cell read and changed in place go back too, raised or not (see
:mod:`didomagic.versions`); names the client marks *held* are not sent again:
the kernel keeps its own object.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from didomagic import serialize
from didomagic.filebundle import FILES_VALUE, Bundle
from didomagic.protocol import CODE_VALUE, cloudpickle_version, python_version
from didomagic.versions import InPlaceTracker
from runner import asking, cleanpages, codeimport, kernelcosts
from runner.mirror import Mirror

DESCRIPTION_KEY = "didomagic"
"""The metadata key that names a cell's run in its request, and holds its result in the reply."""

INPUT_FILE = "in.bin"
"""Where the runner writes a cell's incoming values that are not cached, end to end."""

OUTPUT_FILE = "out.bin"
"""Where the agent writes the values going back, end to end."""


class Agent:
    """Loads and dumps values around each cell of one kernel."""

    def __init__(self, shell: Any, exchange: Path) -> None:
        self.shell = shell
        self.exchange = exchange
        self._request: dict[str, Any] | None = None
        self._before: dict[str, Any] = {}
        self._failures: dict[str, str] = {}
        self._mapped = cleanpages.from_environment(exchange)
        """The value files mapped here, so clean pages of a value need no hash after a cell."""
        self._versions = InPlaceTracker(self._mapped)
        self.mirror = Mirror(Path.cwd(), asking.ask)
        """The notebook's project folder, mirrored under the kernel's working directory."""
        self._bundle: Bundle | None = None
        self._quiet: Bundle | None = None
        """The last files bundle, less what it brought once (a cell without one uses it)."""
        self._info: Any = None
        """The ``pre_run_cell`` info of the cell being run (a nested ``run_cell`` has its own)."""
        self._loaded: object = object()
        """The run whose values were loaded (a nested ``run_cell`` shares its request)."""
        self._result: tuple[Any, dict[str, Any]] | None = None
        """The last cell's result (its run, and what its reply carries), until the reply goes."""

    def _parent(self) -> dict[str, Any]:
        kernel = getattr(self.shell, "kernel", None)
        return (kernel.get_parent() if kernel is not None else None) or {}

    def description(self) -> dict[str, Any] | None:
        """The cell the kernel runs now, as the runner named it (None: not a runner's cell)."""
        described = (self._parent().get("metadata") or {}).get(DESCRIPTION_KEY)
        return described if isinstance(described, dict) else None

    def pre_run_cell(self, info: Any = None) -> None:
        """Load the values the runner sent for this cell (described in its request)."""
        named = self.description()
        if named is None or named.get("run") == self._loaded:  # none, or a nested run_cell
            return
        self._loaded, self._info = named.get("run"), info
        try:
            request = json.loads(memoryview(self._parent()["buffers"][0]).tobytes())
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            print(f"didomagic: the runner's description of this cell: {exc!r}", file=sys.stderr)
            return
        ns = self.shell.user_ns
        pairs, failures, code_failures = [], {}, {}
        files_parts: list[memoryview] | None = None
        mapped: dict[str, memoryview] = {}
        temporary: set[str] = set()
        codeimport.new_cell()
        for value in request["values"]:
            path = value["path"]  # a string: a thousand Path objects would cost milliseconds
            try:
                view = mapped.get(path)
                if view is None or value["keep"]:  # one cached file may hold two names' bytes:
                    view = mapped[path] = serialize.map_file(Path(path))  # each its own copy
                    self._mapped.register(view)
                parts = serialize.slice_parts(view, value["offset"], value["sizes"])
                if value["name"] == CODE_VALUE:  # the notebook's modules, before any value
                    code_failures = codeimport.apply_bundle(parts, ns)
                elif value["name"] == FILES_VALUE:  # the notebook's files: set up below
                    files_parts = parts
                else:
                    pairs.append((value["name"], parts))
            except Exception as exc:
                failures[value["name"]] = f"could not be read: {serialize.describe(exc)}"
            if not value["keep"]:  # cached values stay for later cells of the session
                temporary.add(path)
        for path in temporary:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        problems: list[str] = []
        if files_parts is not None:
            try:
                self._bundle = serialize.unpack(files_parts)
                problems = self.mirror.before_cell(self._bundle)
                self._quiet = dataclasses.replace(self._bundle, tree=None, files={}, stale=[])
            except Exception as exc:
                self._bundle, problems = None, [f"the notebook's files: {serialize.describe(exc)}"]
        elif self._quiet is not None:  # nothing new: as the last bundle said
            self._bundle = self._quiet
            problems = self.mirror.before_cell(self._quiet)
        for problem in problems:
            print(f"didomagic: {problem}", file=sys.stderr)
        failures.update(serialize.unpack_into(ns, pairs))
        for name, _ in pairs:
            if name not in failures:
                self._versions.loaded(ns, name)
        if failures:
            where = _versions(request.get("origin", {}))
            failures = {
                name: codeimport.explain(reason) or f"{reason} ({where})"
                for name, reason in failures.items()
            }
        self._failures = failures
        held = request.get("held", [])
        for name in self._versions.start(ns, [*(name for name, _ in pairs), *held]):
            if name in held:
                self._failures[name] = (
                    "was not on the runner any more (its kernel was replaced?); "
                    "run the cell again to send it"
                )
        self._failures.update(code_failures)
        self._before = serialize.snapshot(ns, request["fetch"])
        self._request = request

    def post_run_cell(self, result: Any = None) -> None:
        """Pickle the names to send back into ``out.bin``; keep the result for the reply."""
        if self._request is None or getattr(result, "info", None) is not self._info:
            return  # not a runner's cell, or a nested run_cell within one
        request, self._request, self._info = self._request, None, None
        ns = self.shell.user_ns
        succeeded = bool(getattr(result, "success", False))
        names = serialize.names_to_return(ns, self._before, succeeded)
        widgets = {name for name in names if _is_widget(ns.get(name))}
        packed, failures = serialize.pack_names(ns, [n for n in names if n not in widgets])
        changed, change_failures = self._versions.changed(ns, skip=names)
        packed += changed
        failures.update(change_failures)
        self._versions.returned(ns, packed)
        bundle, self._bundle = self._bundle, None
        if isinstance(bundle, Bundle):
            files = self.mirror.after_cell(bundle.get, bundle.return_limit)
            if files is not None:
                packed.append(serialize.pack(FILES_VALUE, files))
        deleted = [name for name in request["deletes"] if name not in ns]
        self._versions.forget(deleted)
        try:
            offsets = serialize.write_values(
                self.exchange / OUTPUT_FILE, [item.parts for item in packed]
            )
        except OSError as exc:  # over --max-file-size, say: the values go back without the files
            if not any(item.name == FILES_VALUE for item in packed):
                raise
            packed = [item for item in packed if item.name != FILES_VALUE]
            failures[FILES_VALUE] = f"the files the cell wrote could not go back: {exc}"
            offsets = serialize.write_values(
                self.exchange / OUTPUT_FILE, [item.parts for item in packed]
            )
        values = [
            {"name": item.name, "sizes": [p.nbytes for p in item.parts], "offset": offset}
            for item, offset in zip(packed, offsets, strict=True)
        ]
        failures = {name: f"{reason} (on the runner)" for name, reason in failures.items()}
        failures.update({name: WIDGET_STAYS for name in widgets})
        self._result = (
            self._loaded,
            {"values": values, "failures": {**self._failures, **failures}, "deleted": deleted},
        )
        self._before, self._failures = {}, {}

    def reply_metadata(self, parent: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
        """Put the result of the cell that ``parent`` ran into its reply's ``metadata``."""
        result, self._result = self._result, None
        described = (parent.get("metadata") or {}).get(DESCRIPTION_KEY)
        run = described.get("run") if isinstance(described, dict) else None
        if result is not None and run == result[0]:
            metadata[DESCRIPTION_KEY] = result[1]
        return metadata


WIDGET_STAYS = "it is a widget, so it stays on the runner (it shows and answers in the notebook)"


def _is_widget(value: Any) -> bool:
    """An ipywidgets widget (it cannot be pickled; it lives where its comm is)."""
    widgets = sys.modules.get("ipywidgets")
    return widgets is not None and isinstance(value, widgets.Widget)


def _versions(origin: dict[str, str]) -> str:
    """Where a value failed to load, naming both sides' versions (pickles depend on them)."""
    return (
        f"on the runner: Python {python_version()}, cloudpickle {cloudpickle_version()}; "
        f"the client pickled it with Python {origin.get('python', '?')}, cloudpickle "
        f"{origin.get('cloudpickle', '?')}"
    )


def install(exchange: str) -> None:
    """Register the agent's hooks in this kernel (called once, silently, by the runner)."""
    from IPython import get_ipython

    shell = get_ipython()
    asking.configure(exchange)
    codeimport.install()
    agent = Agent(shell, Path(exchange))
    shell.events.register("pre_run_cell", agent.pre_run_cell)
    shell.events.register("post_run_cell", agent.post_run_cell)
    _reply_with(shell.kernel, agent)
    shell.set_custom_exc((KeyboardInterrupt,), _interrupted)
    kernelcosts.install(shell)
    plain = _plain_python_first(shell.transform_cell)
    shell.transform_cell = _counted(shell, agent, plain)


def _reply_with(kernel: Any, agent: Agent) -> None:
    """Make every ``execute_reply`` of ``kernel`` carry the agent's result for its cell."""
    finish = kernel.finish_metadata

    def finish_metadata(parent: Any, metadata: Any, reply_content: Any) -> Any:
        return agent.reply_metadata(parent, finish(parent, metadata, reply_content))

    kernel.finish_metadata = finish_metadata


def _interrupted(shell: Any, etype: Any, value: Any, tb: Any, tb_offset: Any = None) -> list[str]:
    """An interrupted cell's traceback is one line: formatting the full one costs a Cancel
    hundreds of milliseconds, and the client shows the interrupt as one line anyway."""
    return [f"{etype.__name__}: {value}" if str(value) else etype.__name__]


def _counted(shell: Any, agent: Agent, transform: Any) -> Any:
    """Number the next cell as the notebook did (IPython reads the count right after this).

    The count comes in the cell's description; it is applied once per request
    (the kernel transforms a cell twice, and a nested ``run_cell`` keeps its own).
    """
    counted: object = object()

    def transform_cell(raw_cell: str) -> str:
        nonlocal counted
        described = agent.description()
        if described is not None and described.get("run") != counted:
            counted = described.get("run")
            count = described.get("count")
            if type(count) is int and count > 0:
                shell.execution_count = count
        return str(transform(raw_cell))

    return transform_cell


def _plain_python_first(transform: Any) -> Any:
    """Skip IPython's input transforms for cells that already parse as plain Python.

    Those transforms only rewrite syntax that is not Python (magics, ``!``,
    ``?``, prompts, stray indentation), yet tokenize the whole cell: for a
    10 KB cell that is 8 ms, twice what parsing it costs.
    """

    last: tuple[str, str] = ("", "")  # the kernel transforms each cell twice: parse it once

    def transform_cell(raw_cell: str) -> str:
        nonlocal last
        if raw_cell == last[0] and raw_cell:
            return last[1]
        try:
            compile(raw_cell, "<cell>", "exec", ast.PyCF_ONLY_AST)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return str(transform(raw_cell))
        plain = raw_cell if raw_cell.endswith("\n") else raw_cell + "\n"
        last = (raw_cell, plain)
        return plain

    return transform_cell


class PackageVersionConflict(Exception):
    """The kernel already imported another version of a package a new environment holds."""


def use_packages(site: str | None, previous: str | None = None) -> None:
    """Put the environment at ``site`` in front of ``sys.path``, replacing ``previous``.

    ``site`` None takes ``previous`` away (the runner's own packages suffice).
    The session's state is kept: import caches are invalidated so that newly
    installed modules are found. A distribution the kernel has already
    imported cannot change version under it; that raises
    :class:`PackageVersionConflict` and changes nothing.
    """
    import importlib
    import importlib.metadata
    import site as site_module
    import sys

    after = [p for p in sys.path if p != previous]
    if site is not None:
        after.insert(0, site)
    names = {
        dist.metadata["Name"]
        for where in (site, previous)
        if where is not None
        for dist in importlib.metadata.distributions(path=[where])
    }
    conflicts = []
    for name in sorted(n for n in names if n):
        now = next(iter(importlib.metadata.distributions(name=name, path=sys.path)), None)
        later = next(iter(importlib.metadata.distributions(name=name, path=after)), None)
        if now is None or (later is not None and later.version == now.version):
            continue
        loaded = sorted(m for m in _top_level_modules(now) if m in sys.modules)
        if loaded:
            to = later.version if later is not None else "none"
            conflicts.append(f"{name} {now.version} (imported as {', '.join(loaded)}) → {to}")
    if conflicts:
        raise PackageVersionConflict(
            "this session's kernel has already imported "
            + "; ".join(conflicts)
            + ". A module cannot change version inside a running kernel: run the cell in a "
            "fresh session with %%remote --new-session (the remote state is lost), or keep "
            "the version already imported."
        )
    sys.path[:] = after
    if site is not None:
        site_module.addsitedir(site)  # its .pth files, if any
    importlib.invalidate_caches()


def _top_level_modules(dist: Any) -> set[str]:
    """The importable top-level names a distribution provides."""
    text = dist.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip()}
    names = set()
    for file in dist.files or ():
        first = file.parts[0]
        if first.endswith((".dist-info", ".data")) or first in ("..", "bin"):
            continue
        names.add(first.removesuffix(".py").split(".")[0])
    return names
