"""Slurm as commands: the runner job's batch script, ``sbatch``, ``squeue``, ``scancel``.

A :class:`SlurmTemplate` renders the ``#SBATCH`` script of one runner job
(the shape of dask-jobqueue's job templates); :class:`SlurmCommands` submits
it with ``sbatch --parsable``, reads job states from ``squeue --json`` (or
``squeue -h -o`` where that has no JSON) and cancels with ``scancel``. Slurm's
Python bindings follow Slurm's own version closely, so the commands, whose
machine-readable output is stable, are the interface.

The runner inside a job learns what Slurm gave it from its environment:
:func:`job_tags` and :func:`job_description`.

The mediator's runner URL (it carries the runner token) goes into the
script as an environment variable that the runner reads and removes (see
:mod:`runner.environment`), never onto the runner's command line, where every
user of the compute node could read it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("didomagic.mediator.slurm")

JOB_NAME = "didomagic-runner"
"""The default name of runner jobs (``squeue`` shows it)."""

COMMAND_TIMEOUT = 30.0
"""Seconds one Slurm command may take before it counts as failed."""

FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "TIMEOUT",
    }
)
"""Job states after which the job runs no more."""

URL_ENV = "DIDOMAGIC_MEDIATOR_URL"
"""The variable the batch script sets to the mediator's runner URL."""


class SlurmError(RuntimeError):
    """A Slurm command failed; the message has its output."""


@dataclass(frozen=True)
class JobState:
    """One job as ``squeue`` reports it."""

    id: str
    state: str
    reason: str = ""
    nodes: str = ""

    @property
    def ended(self) -> bool:
        """True once the job runs no more."""
        return self.state in FINAL_STATES

    def text(self) -> str:
        """``pending (Resources)``, ``running on node1``, ``cancelled``, ``failed (...)``."""
        words = self.state.lower().replace("_", " ")
        stale = self.ended and self.state != "FAILED"  # e.g. Resources, left from pending
        if self.reason and self.reason != "None" and not stale:
            return f"{words} ({self.reason})"
        return f"{words} on {self.nodes}" if self.nodes and self.state == "RUNNING" else words


@dataclass(frozen=True)
class SlurmTemplate:
    """The batch job that runs one runner, and the tags that runner will have."""

    partition: str = ""
    gres: str = ""
    """Generic resources per job, e.g. ``gpu:1`` (``--gres``)."""
    cpus: int | None = None
    memory: str = ""
    """Memory per node in sbatch's syntax, e.g. ``16G``."""
    time_limit: str = ""
    """sbatch's ``--time``, e.g. ``2:00:00``."""
    sbatch_lines: tuple[str, ...] = ()
    """Further ``#SBATCH`` options, e.g. ``--account=lab``."""
    setup: tuple[str, ...] = ()
    """Shell lines run before the runner, e.g. ``module load cuda``."""
    python: str = "python3"
    """The interpreter of the environment the runner runs in (didomagic installed)."""
    tags: tuple[str, ...] = ()
    """Tags given to the runner besides those Slurm's allocation implies."""
    max_sessions: int = 1
    exit_when_idle: float = 300.0
    job_name: str = JOB_NAME
    output: str = ""
    """sbatch's ``--output`` (default: Slurm's ``slurm-%j.out`` in the submit directory)."""
    runner_args: tuple[str, ...] = ()
    """More ``didomagic-runner`` flags, e.g. ``--memory-limit 32G``."""

    def runner_tags(self) -> tuple[str, ...]:
        """The tags a runner of this job will have (see :func:`job_tags`)."""
        implied = []
        if self.gres.split(":", 1)[0] == "gpu":
            implied.append("gpu")
        if self.partition:
            implied.append(self.partition)
        return tuple(dict.fromkeys((*self.tags, *implied)))

    def description(self) -> dict[str, Any]:
        """What a runner of this job will say about itself, as far as known before it runs."""
        return {"tags": list(self.runner_tags()), "os": "linux"}

    def script(self, url: str | None = None) -> str:
        """The batch script; ``url`` is the mediator's runner URL (else read from the env)."""
        options = [f"--job-name={self.job_name}"]
        if self.partition:
            options.append(f"--partition={self.partition}")
        if self.gres:
            options.append(f"--gres={self.gres}")
        if self.cpus:
            options.append(f"--cpus-per-task={self.cpus}")
        if self.memory:
            options.append(f"--mem={self.memory}")
        if self.time_limit:
            options.append(f"--time={self.time_limit}")
        if self.output:
            options.append(f"--output={self.output}")
        options.extend(line.removeprefix("#SBATCH").strip() for line in self.sbatch_lines)
        lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in options), ""]
        if url is not None:
            lines.append(f"export {URL_ENV}={shlex.quote(url)}")
        else:
            lines.append(f': "${{{URL_ENV}:?set it to the mediator runner URL}}"')
        lines.extend(self.setup)
        command = [
            self.python,
            "-m",
            "runner",
            "--port",
            "0",
            "--max-sessions",
            str(self.max_sessions),
            "--exit-when-idle",
            f"{self.exit_when_idle:g}",
        ]
        if self.tags:
            command += ["--tags", ",".join(self.tags)]
        command += self.runner_args
        quoted = " ".join(shlex.quote(word) for word in command)
        lines += [
            'state="${TMPDIR:-/tmp}/didomagic-runner-$SLURM_JOB_ID"',
            f'exec {quoted} --name "slurm-$SLURM_JOB_ID" --state-dir "$state"',
            "",
        ]
        return "\n".join(lines)


@dataclass
class SlurmCommands:
    """Runs ``sbatch``, ``squeue`` and ``scancel`` (found on the PATH, or given)."""

    sbatch: str = "sbatch"
    squeue: str = "squeue"
    scancel: str = "scancel"
    env: Mapping[str, str] | None = None
    """The commands' environment (default: the mediator's own)."""
    json: bool | None = field(default=None, repr=False)
    """Whether ``squeue --json`` works (learnt on first use)."""

    def available(self) -> str | None:
        """None when every command is found, else which one is missing."""
        for command in (self.sbatch, self.squeue, self.scancel):
            if shutil.which(command) is None:
                return f"{command} is not on the PATH"
        return None

    async def _run(self, *argv: str, stdin: str | None = None) -> str:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=dict(self.env) if self.env is not None else None,
            )
        except OSError as exc:
            raise SlurmError(f"cannot run {argv[0]}: {exc}") from None
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                out, err = await process.communicate(stdin.encode() if stdin else None)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise SlurmError(f"{argv[0]} took more than {COMMAND_TIMEOUT:g} s") from None
        if process.returncode != 0:
            detail = (err or out).decode(errors="replace").strip()
            raise SlurmError(f"{' '.join(argv[:2])} failed ({process.returncode}): {detail}")
        return out.decode(errors="replace")

    async def submit(self, script: str) -> str:
        """Submit a batch script (on standard input); return the job id."""
        out = await self._run(self.sbatch, "--parsable", stdin=script)
        job_id = out.strip().split(";", 1)[0]  # "id" or "id;cluster"
        if not job_id.isdigit():
            raise SlurmError(f"sbatch printed no job id: {out.strip()!r}")
        return job_id

    async def states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        """The states of these jobs (of this user's); a job Slurm has forgotten is absent."""
        if not job_ids:
            return {}
        if self.json is not False:
            try:
                found = parse_squeue_json(
                    await self._run(self.squeue, "--me", "-t", "all", "--json")
                )
                self.json = True
            except (SlurmError, ValueError, KeyError, TypeError) as exc:
                if self.json:
                    raise SlurmError(f"squeue --json: {exc}") from None
                logger.info("squeue has no usable --json (%s); using -o formats", exc)
                self.json = False
        if self.json is False:
            # Not --jobs: squeue fails on an id it has already forgotten.
            out = await self._run(self.squeue, "--me", "-h", "-t", "all", "-o", "%i|%T|%r|%N")
            found = parse_squeue_format(out)
        wanted = set(job_ids)
        return {i: s for i, s in found.items() if i in wanted}

    async def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancel these jobs (pending or running)."""
        if job_ids:
            await self._run(self.scancel, *job_ids)


def parse_squeue_json(text: str) -> dict[str, JobState]:
    """Jobs from ``squeue --json``: job state a string (Slurm 22) or a list (23.11 on)."""
    jobs: dict[str, JobState] = {}
    for job in json.loads(text)["jobs"]:
        state = job.get("job_state", "")
        if isinstance(state, list):
            state = state[0] if state else ""
        job_id = str(job["job_id"])
        jobs[job_id] = JobState(
            job_id, str(state), str(job.get("state_reason") or ""), str(job.get("nodes") or "")
        )
    return jobs


def parse_squeue_format(text: str) -> dict[str, JobState]:
    """Jobs from ``squeue -h -o '%i|%T|%r|%N'``."""
    jobs: dict[str, JobState] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) == 4 and fields[0]:
            jobs[fields[0]] = JobState(*fields)
    return jobs


def job_gpus(environ: Mapping[str, str]) -> str:
    """The GPUs Slurm gave this job (``0,1``), or "" when none or not in a job."""
    if "SLURM_JOB_ID" not in environ:
        return ""
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = environ.get(name, "").strip()
        if value and value != "NoDevFiles":
            return value
    return ""


def job_tags(environ: Mapping[str, str]) -> tuple[str, ...]:
    """Tags implied by the Slurm job this process runs in: ``gpu`` and the partition."""
    if "SLURM_JOB_ID" not in environ:
        return ()
    tags = ["gpu"] if job_gpus(environ) else []
    partition = environ.get("SLURM_JOB_PARTITION", "").strip()
    if partition:
        tags.append(partition)
    return tuple(tags)


def job_description(environ: Mapping[str, str]) -> dict[str, Any]:
    """The Slurm job this process runs in, for the runner's description (empty if none)."""
    job_id = environ.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        return {}
    return {
        "slurm_job": job_id,
        "slurm_partition": environ.get("SLURM_JOB_PARTITION", ""),
        "slurm_gpus": job_gpus(environ),
    }
