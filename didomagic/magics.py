"""The ``%%remote`` cell magic and the ``%runners`` line magic: argument parsing over the API."""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from didomagic import api


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


RUNNERS_USAGE = """\
%runners                          list runners: status, resources, load
%runners add URL [--name NAME]    remember a runner's or mediator's connection URL
    [--client-cert F --client-key F]  present this certificate (runners with --client-ca)
    [--safe-results]                  accept only plain data back from this runner
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
    actions = ["list", "add", "remove", "use", "sessions"]
    parser.add_argument("action", nargs="?", default="list", choices=actions)
    parser.add_argument("target", nargs="?", default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--clear", action="store_true")
    parser.add_argument("--client-cert", default=None)
    parser.add_argument("--client-key", default=None)
    parser.add_argument("--safe-results", action="store_true")
    parser.add_argument("--text", action="store_true")
    return parser


@magics_class
class RemoteMagics(Magics):
    """Magics that run notebook cells on didomagic runners."""

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
    @argument("--name", default="", help="a name for the --detach job")
    @argument(
        "--session",
        default=None,
        help="run in this held remote session (an id from %%runners sessions), taking it back",
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
        the cell with the remote traceback. As a line magic: ``%remote attach
        ID``, ``%remote detach [ID]``, ``%remote close ID`` (``%remote help``).
        """
        from didomagic import reattach

        if cell is None:
            return reattach.line_command(line, self.shell.user_ns)
        args = parse_argstring(self.remote, line)
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
        if args.session and (args.runner or args.tags or args.os or args.local or args.detach):
            raise UsageError(
                "--session runs in a held session: no --runner/--tags/--os/--local/--detach"
            )
        spec = api.CellSpec(
            code=cell,
            push=args.push,
            pull=args.pull,
            sync=not args.no_sync,
            timeout=args.timeout,
            tags=args.tags,
            os=args.os,
        )
        if args.detach:
            from didomagic import detached as jobs

            job = jobs.submit_cell(
                spec,
                self.shell.user_ns,
                name=args.name,
                runner=args.runner,
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
            runner=args.runner,
            local=args.local,
            transform=self.shell.transform_cell,
            hidden=self.shell.user_ns_hidden,
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
            from didomagic.reattach import show_sessions

            show_sessions()
            return None
        if args.action == "add":
            if not args.target:
                raise UsageError(f"%runners add needs a connection URL.\n{RUNNERS_USAGE}")
            entry = api.add_runner(
                args.target,
                args.name,
                client_cert=args.client_cert,
                client_key=args.client_key,
                safe_results=args.safe_results,
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
        return RunnerTable(views, pool.default, lambda name: api.use(name, pool))

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
