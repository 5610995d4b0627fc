"""The ``%%remote`` cell magic, ``%remote on|off|attach|...``, ``%%local``, ``%runners``, ``%jobs``.

Argument parsing over the API. The magics' defaults are traitlets on
:class:`RemoteMagics`, settable in ``ipython_config.py`` or with
``%config RemoteMagics.default_tags = ['gpu']``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Enum, Float, List, Unicode

from didomagic import api, linecommands, reattach
from didomagic.autoremote import RemoteMode, run_here
from didomagic.errors import ConfigurationError, without_our_frames
from didomagic.filebundle import DEFAULT_FILES_LIMIT, DEFAULT_RETURN_LIMIT, FileOptions
from didomagic.files import parse_size
from didomagic.linecommands import LineCall, command

PARSED_KEPT = 64
"""Option lines of ``%%remote`` whose parse is kept (the same few come again and again)."""


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def cell_pins(pip: list[str] | None, requirements: str | None) -> tuple[str, ...]:
    """``--pip`` and ``--requirements`` as one tuple of requirement strings."""
    from didomagic import packages

    try:
        pins = [packages.check_requirement(p) for p in pip or ()]
        if requirements:
            pins += packages.read_requirements(
                requirements,
                lambda option: print(
                    f"didomagic: {requirements}: {option} skipped (runners install from "
                    "their own index)",
                    file=sys.stderr,
                ),
            )
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    return tuple(pins)


RUNNERS_USAGE = """\
%runners                          list runners: status, resources, load
%runners add URL [--name NAME]    remember a runner's or mediator's connection URL
    [--client-cert F --client-key F]  present this certificate (runners with --client-ca)
    [--safe-results]                  accept only plain data back from this runner
%runners add NAME --token T       add a runner %runners discover found, pinned to its fingerprint
%runners discover [--timeout S]   runners and mediators that advertise on the local network
%runners remove NAME              forget one
%runners use NAME                 run cells without --runner/--tags there (this notebook)
%runners use --clear              back to $DIDOMAGIC_RUNNER or the embedded runner
%runners sessions                 the remote sessions this user holds (%remote attach ID)
%runners --text                   the listing as plain text, even in a notebook"""


class _RunnersParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise UsageError(f"%runners: {message}\n{RUNNERS_USAGE}")


def _runners_parser() -> argparse.ArgumentParser:
    parser = _RunnersParser(prog="%runners", add_help=False)
    actions = ["list", "add", "remove", "use", "discover", "sessions"]
    parser.add_argument("action", nargs="?", default="list", choices=actions)
    parser.add_argument("target", nargs="?", default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--clear", action="store_true")
    parser.add_argument("--client-cert", default=None)
    parser.add_argument("--client-key", default=None)
    parser.add_argument("--safe-results", action="store_true")
    parser.add_argument("--text", action="store_true")
    parser.add_argument("--token", default=None)
    parser.add_argument("--timeout", type=float, default=None)
    return parser


@command(
    "on", "%remote on [options]    run every following cell remotely, with these %%remote options"
)
def _remote_on(call: LineCall) -> None:
    """``%remote on [options]``: every following cell runs remotely with those options."""
    call.magics._parse(call.rest)  # a mistake is reported now, not at every cell
    call.magics.mode.start(call.rest)
    print(
        "didomagic: remote mode on: every cell runs remotely"
        + (f" with {call.rest.strip()}" if call.rest.strip() else "")
        + " until %remote off (%%local runs one cell here)."
    )


@command("off", "%remote off             back to running cells here")
def _remote_off(call: LineCall) -> None:
    """``%remote off``: cells run here again."""
    if call.words:
        raise UsageError(f"%remote off takes nothing after it.\n{linecommands.usage()}")
    was = call.magics.mode.on
    call.magics.mode.stop()
    print(
        "didomagic: remote mode off: cells run here."
        if was
        else "didomagic: remote mode was not on."
    )


@magics_class
class RemoteMagics(Magics):
    """Magics that run notebook cells on didomagic runners.

    Defaults for every ``%%remote`` cell are the traits below (``%config
    RemoteMagics`` lists them); a cell's own options win.
    """

    default_runner = Unicode(
        "",
        help="Runner (a connection URL or a configured name) for cells that name none "
        "(no --runner, --tags or --os). '%runners use' overrides it for the notebook. "
        "Empty: $DIDOMAGIC_RUNNER, else an embedded runner on this machine.",
    ).tag(config=True)
    default_tags = List(
        Unicode(),
        default_value=[],
        help="Tags a runner must have, for cells that give no --runner, --tags or --os "
        "(e.g. ['gpu']).",
    ).tag(config=True)
    default_os = Unicode(
        "", help="OS a runner must run (linux, darwin, windows), for cells that give none."
    ).tag(config=True)
    timeout = Float(
        None,
        allow_none=True,
        help="Seconds after which a remote cell is interrupted, for cells without --timeout "
        "(None: no limit).",
    ).tag(config=True)
    progress = Enum(
        ["auto", "widget", "text", "none"],
        default_value="auto",
        help="How a remote cell shows its progress: a widget row, a text line, nothing, or "
        "auto (the widget where ipywidgets can show one, else text).",
    ).tag(config=True)
    sync = Bool(
        True,
        help="Send the values a cell reads and fetch the ones it binds automatically "
        "(False: as --no-sync, only --push/--pull names travel).",
    ).tag(config=True)
    packages = Enum(
        ["match", "none"],
        default_value=None,
        allow_none=True,
        help="'match': every cell as --packages match (the notebook's versions of the "
        "packages it uses go to the runner); 'none': never. None: $DIDOMAGIC_PACKAGES, "
        "else none.",
    ).tag(config=True)
    safe_results = Bool(
        False,
        help="Runners added with '%runners add' accept only plain data back (as "
        "--safe-results), unless the command says otherwise.",
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.mode = RemoteMode(shell)
        """The notebook-wide mode (``%remote on``)."""
        self._parsed: dict[str, argparse.Namespace] = {}

    @magic_arguments()
    @argument(
        "--runner",
        default=None,
        help="connection URL or name of the runner (default: the notebook's default, "
        "else $DIDOMAGIC_RUNNER, else an embedded runner on this machine)",
    )
    @argument(
        "--tags",
        type=_names,
        default=(),
        help="run on a runner with all these tags (gpu,a100): the least loaded match",
    )
    @argument("--os", default="", help="run on a runner with this OS (linux, darwin, windows)")
    @argument("--push", type=_names, default=(), help="also send these names (a,b)")
    @argument("--pull", type=_names, default=(), help="also fetch these names back (c,d)")
    @argument(
        "--no-sync",
        action="store_true",
        help="send and fetch no names automatically (--push/--pull still apply)",
    )
    @argument(
        "--timeout",
        type=float,
        default=None,
        help="interrupt the remote cell after this many seconds",
    )
    @argument(
        "--local",
        action="store_true",
        help="run here, through the same pack/unpack path (for debugging)",
    )
    @argument(
        "--detach",
        action="store_true",
        help="submit the cell as a job and return at once; %%jobs pull ID gets its results",
    )
    @argument(
        "--pip",
        action="append",
        default=None,
        metavar="SPEC",
        help="a package the runner's kernel must have, e.g. pandas==2.2.3 (repeatable); the "
        "runner installs it into a cached environment if it lacks it",
    )
    @argument("--requirements", default=None, metavar="FILE", help="packages from this file")
    @argument(
        "--packages",
        choices=["match", "none"],
        default=None,
        help="match: give the runner this notebook's versions of the packages the cell "
        "imports and its values need (default: RemoteMagics.packages, else "
        "$DIDOMAGIC_PACKAGES, else none)",
    )
    @argument(
        "--new-session",
        action="store_true",
        help="end this notebook's session on the runner first: the cell starts in a fresh "
        "kernel (remote state is lost)",
    )
    @argument("--name", default="", help="a name for the --detach job")
    @argument(
        "--session",
        default=None,
        help="run in this held remote session (an id from %%runners sessions), taking it back",
    )
    @argument(
        "--files",
        type=_names,
        default=(),
        help="send these files up front (data.csv,images/*.png), for subprocesses and jobs",
    )
    @argument(
        "--get",
        type=_names,
        default=(),
        help="bring these files back from the runner whatever their size (out/*.bin)",
    )
    @argument(
        "--files-limit",
        type=parse_size,
        default=DEFAULT_FILES_LIMIT,
        help="the most one file served, or all --files, may hold (default 1G)",
    )
    @argument(
        "--return-limit",
        type=parse_size,
        default=DEFAULT_RETURN_LIMIT,
        help="files the cell writes come back by themselves up to this total (default 20M)",
    )
    @argument(
        "--retries",
        type=int,
        default=0,
        help="with --detach: run the job again on another runner this often if its runner is lost",
    )
    @line_cell_magic
    def remote(self, line: str, cell: str | None = None) -> Any:
        """Run this cell on a runner; the values it reads go there, the ones it binds come back.

        Output streams into the cell as it is produced; a remote exception fails
        the cell with the remote traceback. As a line magic: ``%remote on
        [options]`` runs every following cell remotely, ``%remote off`` stops that;
        ``%remote attach ID``, ``%remote detach [ID]`` and ``%remote close ID``
        handle held sessions (``%remote help`` lists them all).
        """
        if cell is None:
            return linecommands.dispatch(line, self)
        __tracebackhide__ = True  # IPython shows the user's frames, not this one
        try:
            with self.mode.suspended():
                return self._remote_cell(line, cell)
        except BaseException as exc:
            raise without_our_frames(exc) from exc.__cause__

    def _parse(self, line: str) -> Any:
        parsed = self._parsed.get(line)  # a notebook runs the same few option lines again
        if parsed is None:
            try:
                parsed = parse_argstring(self.remote, line)
            except UsageError as exc:
                raise UsageError(f"%%remote: {exc}\n{linecommands.usage()}") from None
            if len(self._parsed) >= PARSED_KEPT:
                self._parsed.clear()
            self._parsed[line] = parsed
        return argparse.Namespace(**vars(parsed))  # (its values are only read)

    @cell_magic
    def local(self, line: str, cell: str) -> Any:
        """Run this cell here, in the notebook, while ``%remote on`` is in force."""
        if line.strip():
            raise UsageError("%%local takes no options")
        return run_here(self.shell, cell)

    def _remote_cell(self, line: str, cell: str) -> Any:
        args = self._parse(line)
        if args.timeout is not None and not args.timeout > 0:
            raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
        if args.runner and (args.tags or args.os):
            raise UsageError("give either --runner or --tags/--os, not both")
        if (args.name or args.retries) and not args.detach:
            raise UsageError("--name and --retries are for --detach jobs")
        if args.retries < 0:
            raise UsageError(f"--retries must be 0 or more, got {args.retries}")
        if args.detach and args.local:
            raise UsageError("--detach and --local do not go together")
        if args.session and (
            args.runner or args.tags or args.os or args.local or args.detach or args.new_session
        ):
            raise UsageError(
                "--session runs in a held session: no --runner/--tags/--os/--local/--detach/"
                "--new-session"
            )
        runner, tags, os = args.runner, args.tags, args.os
        if not (runner or tags or os):  # the cell names nothing: the configured defaults
            tags, os = tuple(self.default_tags), self.default_os
            if not (tags or os) and self.default_runner and api.default_pool().default is None:
                runner = self.default_runner
        spec = api.CellSpec(
            code=cell,
            push=args.push,
            pull=args.pull,
            sync=self.sync and not args.no_sync,
            timeout=args.timeout if args.timeout is not None else self.timeout,
            tags=tags,
            os=os,
            pip=cell_pins(args.pip, args.requirements),
            packages=args.packages or self.packages or "",
            files=FileOptions(args.files, args.get, args.files_limit, args.return_limit),
        )
        if args.new_session and not args.local:
            api.default_pool().session(runner, tags, os).close()
        if args.detach:
            from didomagic import detached as jobs

            job = jobs.submit_cell(
                spec,
                self.shell.user_ns,
                name=args.name,
                runner=runner,
                retries=args.retries,
                transform=self.shell.transform_cell,
                hidden=self.shell.user_ns_hidden,
            )
            print(
                f"didomagic: submitted job {job.id}"
                + (f" ({args.name})" if args.name else "")
                + f" to {job.holder_name}. %jobs shows its state; %jobs pull {job.id} "
                "gets its results, from this or any other notebook."
            )
            return None
        return api.run_cell(
            spec,
            self.shell.user_ns,
            runner=runner,
            local=args.local,
            transform=self.shell.transform_cell,
            hidden=self.shell.user_ns_hidden,
            progress=None if self.progress == "auto" else self.progress,
            session=reattach.session_for(args.session) if args.session else None,
        )

    @line_magic
    def runners(self, line: str) -> Any:
        """List, add, remove or choose runners. ``%runners help`` shows the forms."""
        if line.strip() in ("help", "-h", "--help"):
            print(RUNNERS_USAGE)
            return None
        try:
            words = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%runners: {exc}\n{RUNNERS_USAGE}") from None
        args = _runners_parser().parse_args(words)
        if args.action == "sessions":
            reattach.show_sessions()
            return None
        if args.action == "discover":
            from didomagic import lan

            found = lan.discover_and_remember(args.timeout or lan.DISCOVER_TIMEOUT)
            print(lan.text_table(found, [e.url for e in api.default_pool().entries()]))
            return None
        if args.action == "add":
            if not args.target:
                raise UsageError(f"%runners add needs a connection URL.\n{RUNNERS_USAGE}")
            target = args.target
            if "://" not in target and args.token is not None:  # a discovered one, by name
                from didomagic import lan

                found = lan.find(target, args.timeout or lan.DISCOVER_TIMEOUT)
                target = str(lan.connection_url(found, args.token))
                args.name = args.name or found.name
            entry = api.add_runner(
                target,
                args.name,
                client_cert=args.client_cert,
                client_key=args.client_key,
                safe_results=args.safe_results or self.safe_results,
            )
            print(f"didomagic: added {entry.name} ({entry.url.address})")
            return None
        if args.action == "remove":
            if not args.target:
                raise UsageError(f"%runners remove needs a name.\n{RUNNERS_USAGE}")
            entry = api.remove_runner(args.target)
            print(f"didomagic: removed {entry.name}")
            return None
        if args.action == "use":
            if not args.target and not args.clear:
                raise UsageError(f"%runners use needs a name (or --clear).\n{RUNNERS_USAGE}")
            api.use(None if args.clear else args.target)
            print(
                f"didomagic: cells without --runner or --tags now run on {args.target}"
                if args.target
                else "didomagic: no default runner for this notebook"
            )
            return None
        return self._show_runners(text=args.text)

    def _show_runners(self, text: bool) -> Any:
        from didomagic.progress import widgets_available
        from didomagic.runners_view import RunnerTable, text_table

        pool = api.default_pool()
        views = api.runners(pool)
        if text or not widgets_available() or not views:
            print(text_table(views, pool.default))
            return None
        from didomagic.display import show_until_next_cell

        table = RunnerTable(views, pool.default, lambda name: api.use(name, pool))
        show_until_next_cell(table, table.static)
        return None

    @line_magic
    def jobs(self, line: str) -> Any:
        """List detached jobs, or ``pull`` / ``cancel`` / ``delete`` one by id."""
        from didomagic import detached as jobs
        from didomagic.jobs_view import JobTable, text_table
        from didomagic.progress import widgets_available

        words = line.split()
        text = "--text" in words
        words = [w for w in words if w != "--text"]
        if not words or words == ["list"]:
            found = jobs.jobs()
            if text or not widgets_available() or not found:
                print(text_table(found))
                return None
            return JobTable(found)
        if len(words) != 2 or words[0] not in ("pull", "cancel", "delete"):
            raise UsageError(JOBS_USAGE)
        action, job_id = words
        if action == "pull":
            return jobs.pull_into(job_id, self.shell.user_ns)
        if action == "cancel":
            record = jobs.cancel(job_id)
            print(f"didomagic: job {job_id} is {record['state']}")
            return None
        jobs.delete(job_id)
        print(f"didomagic: job {job_id} deleted")
        return None


JOBS_USAGE = """\
%jobs [--text]        list the jobs of every runner and mediator in %runners
%jobs pull ID|NAME    show the job's outputs and bind the names it assigned here
%jobs cancel ID       stop a queued or running job
%jobs delete ID       forget a job and its stored results"""
