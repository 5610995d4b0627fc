"""The ``%%remote`` cell magic: argument parsing over :mod:`didomagic.api`."""

from __future__ import annotations

from typing import Any

from IPython.core.magic import Magics, cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from didomagic import api


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


@magics_class
class RemoteMagics(Magics):
    """Magics that run notebook cells on didomagic runners."""

    @magic_arguments()
    @argument(
        "--runner",
        default=None,
        help="connection URL of the runner (default: $DIDOMAGIC_RUNNER, else an "
        "embedded runner on this machine)",
    )
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
    @cell_magic
    def remote(self, line: str, cell: str) -> Any:
        """Run this cell on a runner; the values it reads go there, the ones it binds come back.

        Output streams into the cell as it is produced; a remote exception fails
        the cell with the remote traceback.
        """
        args = parse_argstring(self.remote, line)
        if args.timeout is not None and not args.timeout > 0:
            from IPython.core.error import UsageError

            raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
        spec = api.CellSpec(
            code=cell, push=args.push, pull=args.pull, sync=not args.no_sync, timeout=args.timeout
        )
        return api.run_cell(
            spec,
            self.shell.user_ns,
            runner=args.runner,
            local=args.local,
            transform=self.shell.transform_cell,
            hidden=self.shell.user_ns_hidden,
        )
