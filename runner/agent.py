"""The helper loaded into every runner kernel: moves values in and out of its namespace.

The runner and the agent share a private *exchange* directory. Before sending
a cell as an ordinary ``execute_request``, the runner writes each incoming
value to a file there and then ``cell.json`` describing them. The agent's
``pre_run_cell`` hook loads those values into the user namespace; its
``post_run_cell`` hook pickles the names the client asked for into files and
writes ``result.json``. The cell thus costs one kernel round trip, and values
never pass through ZMQ.

After a cell that raised, only names the cell actually rebound go back, so a
stale value from an earlier cell never overwrites the notebook's. Values the
cell read and changed in place go back too, raised or not (see
:mod:`didomagic.versions`); names the client marks *held* are not sent again:
the kernel keeps its own object.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from didomagic import serialize
from didomagic.filebundle import FILES_VALUE, Bundle
from didomagic.protocol import CODE_VALUE, cloudpickle_version, python_version
from didomagic.versions import InPlaceTracker
from runner import asking, cleanpages, codeimport
from runner.mirror import Mirror

CELL_FILE = "cell.json"
RESULT_FILE = "result.json"


INPUT_FILE = "in.bin"
"""Where the runner writes a cell's incoming values that are not cached, end to end."""

OUTPUT_FILE = "out.bin"
"""Where the agent writes the values going back, end to end."""

COUNT_FILE = "count.json"
"""The notebook's execution count for the next cell, so its tracebacks say "Cell In[n]"."""


def write_json(path: Path, body: dict[str, Any]) -> None:
    """Write ``body`` to ``path`` atomically (a reader sees all of it or nothing)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)


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

    def pre_run_cell(self, info: Any = None) -> None:
        """Load the values the runner left for this cell."""
        cell = self.exchange / CELL_FILE
        if not cell.exists():
            self._request = None
            return
        request = json.loads(cell.read_text())
        cell.unlink()
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
        if files_parts is not None:
            try:
                self._bundle = serialize.unpack(files_parts)
                problems = self.mirror.before_cell(self._bundle)
            except Exception as exc:
                self._bundle, problems = None, [f"the notebook's files: {serialize.describe(exc)}"]
            for problem in problems:
                print(f"didomagic: {problem}", file=sys.stderr)
        failures.update(serialize.unpack_into(ns, pairs))
        for name, _ in pairs:
            if name not in failures:
                self._versions.loaded(ns, name)
        where = _versions(request.get("origin", {}))
        self._failures = {
            name: codeimport.explain(reason) or f"{reason} ({where})"
            for name, reason in failures.items()
        }
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
        """Pickle the names to send back and write ``result.json``."""
        request, self._request = self._request, None
        if request is None:
            return
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
        write_json(
            self.exchange / RESULT_FILE,
            {
                "values": values,
                "failures": {**self._failures, **failures},
                "deleted": deleted,
            },
        )
        self._before, self._failures = {}, {}


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
    shell.set_custom_exc((KeyboardInterrupt,), _interrupted)
    plain = _plain_python_first(shell.transform_cell)
    shell.transform_cell = _counted(shell, agent.exchange, plain)


def _interrupted(shell: Any, etype: Any, value: Any, tb: Any, tb_offset: Any = None) -> list[str]:
    """An interrupted cell's traceback is one line: formatting the full one costs a Cancel
    hundreds of milliseconds, and the client shows the interrupt as one line anyway."""
    return [f"{etype.__name__}: {value}" if str(value) else etype.__name__]


def _counted(shell: Any, exchange: Path, transform: Any) -> Any:
    """Number the next cell as the notebook did (IPython reads the count right after this)."""

    def transform_cell(raw_cell: str) -> str:
        path = exchange / COUNT_FILE
        if path.exists():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                shell.execution_count = int(json.loads(path.read_text())["count"])
            path.unlink(missing_ok=True)
        return str(transform(raw_cell))

    return transform_cell


def _plain_python_first(transform: Any) -> Any:
    """Skip IPython's input transforms for cells that already parse as plain Python.

    Those transforms only rewrite syntax that is not Python (magics, ``!``,
    ``?``, prompts, stray indentation), yet tokenize the whole cell: for a
    10 KB cell that is 8 ms, twice what parsing it costs.
    """

    def transform_cell(raw_cell: str) -> str:
        try:
            compile(raw_cell, "<cell>", "exec", ast.PyCF_ONLY_AST)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return str(transform(raw_cell))
        return raw_cell if raw_cell.endswith("\n") else raw_cell + "\n"

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
