"""Command-line options of the Slurm job template, shared by ``mediator`` and ``slurm-script``.

::

    didomagic-runner mediator --launcher slurm --slurm-gres gpu:1 --max-runners 4 ...
    didomagic-runner slurm-script --slurm-partition gpu --slurm-gres gpu:1 [--mediator URL]
"""

from __future__ import annotations

import argparse
import shlex
import sys

from runner.argtypes import positive as _positive
from runner.argtypes import seconds as _seconds
from runner.argtypes import tags as _tags
from runner.slurm import JOB_NAME, SlurmTemplate


def add_template_options(p: argparse.ArgumentParser) -> None:
    """The ``--slurm-*`` flags that describe the runner job."""
    g = p.add_argument_group(
        "Slurm runner jobs",
        "The batch job that runs one launched runner. Its runner gets the tag gpu when the "
        "job got GPUs, and the partition as a tag.",
    )
    g.add_argument("--slurm-partition", default="", help="sbatch --partition (default: none)")
    g.add_argument("--slurm-gres", default="", help="sbatch --gres, e.g. gpu:1 (default: none)")
    g.add_argument("--slurm-cpus", type=_positive, default=None, help="sbatch --cpus-per-task")
    g.add_argument("--slurm-memory", default="", help="sbatch --mem, e.g. 16G (default: none)")
    g.add_argument("--slurm-time", default="", help="sbatch --time, e.g. 2:00:00 (default: none)")
    g.add_argument(
        "--slurm-sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="another #SBATCH option, e.g. --account=lab (repeatable)",
    )
    g.add_argument(
        "--slurm-setup",
        action="append",
        default=[],
        metavar="LINE",
        help="a shell line run before the runner, e.g. 'module load cuda' (repeatable)",
    )
    g.add_argument(
        "--slurm-python",
        default=sys.executable,
        help="the Python of the environment the runner runs in, with didomagic installed "
        "(default: this one, which suits a file system shared with the compute nodes)",
    )
    g.add_argument(
        "--slurm-tags",
        type=_tags,
        default=(),
        help="more tags for launched runners, e.g. a100 (default: none)",
    )
    g.add_argument(
        "--slurm-max-sessions",
        type=_positive,
        default=1,
        help="sessions one launched runner serves at once (default 1)",
    )
    g.add_argument(
        "--slurm-idle",
        type=_seconds,
        default=300.0,
        help="a launched runner exits (and its job ends) after this many idle seconds "
        "(its --exit-when-idle; default 300)",
    )
    g.add_argument("--slurm-job-name", default=JOB_NAME, help=f"sbatch --job-name ({JOB_NAME})")
    g.add_argument("--slurm-output", default="", help="sbatch --output (default: Slurm's)")
    g.add_argument(
        "--slurm-runner-args",
        default="",
        help="more didomagic-runner flags for launched runners, in one string, "
        "e.g. '--memory-limit 32G' (default: none)",
    )


def template_of(args: argparse.Namespace) -> SlurmTemplate:
    """The job template the ``--slurm-*`` flags describe."""
    return SlurmTemplate(
        partition=args.slurm_partition,
        gres=args.slurm_gres,
        cpus=args.slurm_cpus,
        memory=args.slurm_memory,
        time_limit=args.slurm_time,
        sbatch_lines=tuple(args.slurm_sbatch),
        setup=tuple(args.slurm_setup),
        python=args.slurm_python,
        tags=args.slurm_tags,
        max_sessions=args.slurm_max_sessions,
        exit_when_idle=args.slurm_idle,
        job_name=args.slurm_job_name,
        output=args.slurm_output,
        runner_args=tuple(shlex.split(args.slurm_runner_args)),
    )


def slurm_script_parser() -> argparse.ArgumentParser:
    """The parser of ``slurm-script``."""
    p = argparse.ArgumentParser(
        prog="didomagic-runner slurm-script",
        description="Print the batch script 'mediator --launcher slurm' would submit, to "
        "submit runners by hand (sbatch < script). Without --mediator the script expects "
        "DIDOMAGIC_MEDIATOR_URL in the environment (sbatch passes it on).",
    )
    p.add_argument(
        "--mediator",
        default=None,
        help="the mediator's runner URL, written into the script (keep the script private)",
    )
    add_template_options(p)
    return p


def print_script(args: argparse.Namespace) -> None:
    """Print the batch script for ``args``."""
    print(template_of(args).script(args.mediator), end="")
