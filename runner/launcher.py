"""Runners on demand: the mediator submits a runner job when work waits for one.

Like dask-jobqueue's ``adapt()``: a session (or a detached job) that no up
runner can serve, but the launcher's job template can, *claims* a launched
job — one already submitted that nobody claimed, else a new one, never more
than ``max_runners`` alive at once. The job's runner dials out to the
mediator and registers; the waiting session is matched by the mediator's own
choice (whichever matching runner frees first — the launched one, or another).
A launched runner exits once idle (``--exit-when-idle``), which ends its job.

While a session waits, its client is told where the launch stands with
:class:`~didomagic.protocol.Queued` notes ("launching a runner: Slurm job 12,
pending (Resources)"). A job that ends before its runner registers fails
the sessions waiting on it with the job's state, and holds back further
submissions for :data:`FAILURE_BACKOFF` seconds so a broken template does not
flood the queue. Stopping the launcher cancels every job it submitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from didomagic import matching
from didomagic.errors import ConnectError
from runner.slurm import JobState, SlurmCommands, SlurmError, SlurmTemplate
from runner.wire import wait_set

logger = logging.getLogger("didomagic.mediator.launcher")

FAILURE_BACKOFF = 30.0
"""Seconds without new submissions after a job ended before its runner registered."""

LOST_WAIT = 3.0
"""Seconds the mediator waits for a lost runner's job to reach its final state."""

REASON_LIMIT = 120
"""Bytes a websocket close reason may hold (the protocol allows 123)."""

T = TypeVar("T")


class LaunchFailed(ConnectError):
    """The runner job could not be submitted, or ended before its runner registered."""


@dataclass(frozen=True)
class LauncherSettings:
    """The job template and how far the launcher may go."""

    template: SlurmTemplate
    max_runners: int = 4
    poll: float = 2.0
    """Seconds between two looks at the jobs' states while any is alive."""


@dataclass
class Launched:
    """One runner job this launcher submitted."""

    id: str
    state: JobState
    registered: bool = False
    """Its runner has registered with the mediator."""

    def text(self) -> str:
        """``Slurm job 12, pending (Resources)``."""
        return f"Slurm job {self.id}, {self.state.text()}"


class Launcher:
    """Submits, watches and cancels the runner jobs of one mediator."""

    def __init__(
        self, settings: LauncherSettings, runner_url: str, commands: SlurmCommands | None = None
    ) -> None:
        self.settings = settings
        self.commands = commands or SlurmCommands()
        self._script = settings.template.script(runner_url)
        self.jobs: dict[str, Launched] = {}
        """Jobs alive (not ended), by Slurm job id."""
        self._claims: dict[Hashable, Launched] = {}
        self._failure = ""
        self._failed_at = -FAILURE_BACKOFF
        self._lock = asyncio.Lock()
        self._pulse = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        self._stopping = False

    # -- life cycle

    def start(self) -> None:
        """Watch the jobs' states in the background."""
        self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        """Stop watching and cancel every job still alive (pending or running)."""
        self._stopping = True
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        alive = list(self.jobs)
        if alive:
            logger.info("cancelling the runner jobs this mediator submitted: %s", ", ".join(alive))
            try:
                await self.commands.cancel(alive)
            except SlurmError as exc:
                logger.error("could not cancel runner jobs %s: %s", ", ".join(alive), exc)
        self.jobs.clear()

    # -- what the mediator tells the launcher

    def can_serve(self, tags: Iterable[str], os: str = "", name: str = "") -> bool:
        """True when a runner of the template would match these requirements."""
        return not name and matching.matches(self.settings.template.description(), tags, os)

    def changed(self) -> None:
        """The pool changed (a runner registered, reported load or went down): wake waiters."""
        self._pulse.set()
        self._pulse = asyncio.Event()

    def registered(self, description: dict[str, Any]) -> None:
        """A runner registered; if it is one of ours, its job no longer needs a claimant."""
        job = self.jobs.get(str(description.get("slurm_job", "")))
        if job is not None and not job.registered:
            job.registered = True
            logger.info("the runner of Slurm job %s registered", job.id)
            for key in [k for k, v in self._claims.items() if v is job]:
                del self._claims[key]
        self.changed()

    # -- waiting sessions

    async def claim(self, key: Hashable) -> Launched | None:
        """The launched job ``key`` waits for: its own, an unclaimed one, or a new one.

        None when ``max_runners`` jobs are alive and none is free to claim.
        Raise :class:`LaunchFailed` when ``sbatch`` fails or a job ended before
        its runner registered.
        """
        async with self._lock:
            if self._stopping:
                raise LaunchFailed(
                    "The mediator is stopping and has cancelled its runner jobs; try again "
                    "once it is back."
                )
            current = self._claims.get(key)
            if current is not None:
                if current.id in self.jobs and not current.registered:
                    return current
                del self._claims[key]
                if not current.registered:
                    raise LaunchFailed(self._ended_text(current))
            claimed = set(map(id, self._claims.values()))
            for job in self.jobs.values():
                if not job.registered and id(job) not in claimed:
                    self._claims[key] = job
                    return job
            if len(self.jobs) >= self.settings.max_runners:
                return None
            if time.monotonic() - self._failed_at < FAILURE_BACKOFF:
                raise LaunchFailed(self._failure)
            job = await self._submit()
            self._claims[key] = job
            return job

    def release(self, key: Hashable) -> None:
        """``key`` no longer waits (it got a runner, or left)."""
        self._claims.pop(key, None)

    async def wait_for(
        self,
        key: Hashable,
        choose: Callable[[], T | None],
        say: Callable[[str], Awaitable[None]],
        gone: asyncio.Future[Any],
    ) -> T | None:
        """Launch as needed until ``choose`` finds a runner; None if ``gone`` ends first.

        ``say`` gets each new note on the launch for the waiting client.
        """
        said = ""
        try:
            while True:
                pulse = self._pulse
                found = choose()
                if found is not None:
                    return found
                note = self.note(await self.claim(key))
                if note != said:
                    await say(note)
                    said = note
                waiter = asyncio.ensure_future(wait_set(pulse, self.settings.poll))
                await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if gone.done():
                    return None
        finally:
            self.release(key)

    def note(self, job: Launched | None) -> str:
        """What a waiting client is told about its launch."""
        if job is None:
            return (
                f"waiting for a runner: all {self.settings.max_runners} launched runners "
                "(--max-runners) are busy"
            )
        if job.state.state == "RUNNING":
            return f"launching a runner: {job.text()}; waiting for it to register"
        return f"launching a runner: {job.text()}"

    # -- listing and losses

    def listing(self, views: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The mediator's runner views with job states added, and a row per job not up yet.

        A row for the launcher itself comes first: it is "up" and always takes a
        session (which then waits at the mediator), so a notebook that chooses
        among listed runners sends sessions with the template's tags here.
        """
        for view in views:
            job = self.jobs.get(str(view.get("slurm_job", "")))
            if job is not None:
                view["slurm_state"] = job.state.state
                if view.get("status") == "up" and not view.get("reason"):
                    view["reason"] = job.text()
        template = self.settings.template
        views.insert(
            0,
            {
                "name": "slurm-launcher",
                "tags": list(template.runner_tags()),
                "os": "linux",
                "status": "up",
                "reason": f"launches Slurm runner jobs on demand ({len(self.jobs)} of "
                f"{self.settings.max_runners} alive)",
                "launcher": "slurm",
                "sessions": 0,
                "max_sessions": 1,
                "queue": 0,
                "max_queue": 1,
            },
        )
        for job in self.jobs.values():
            if not job.registered:
                views.append(
                    {
                        "name": f"slurm-{job.id}",
                        "tags": list(template.runner_tags()),
                        "os": "linux",
                        "status": "pending" if job.state.state == "PENDING" else "starting",
                        "reason": job.text(),
                        "slurm_job": job.id,
                        "slurm_state": job.state.state,
                        "sessions": 0,
                        "max_sessions": template.max_sessions,
                    }
                )
        return views

    async def lost_reason(self, description: dict[str, Any]) -> str | None:
        """Why a runner in a Slurm job ended a session: its job is ending, named with its state.

        None when the runner is not in a Slurm job, or its job still runs (the
        runner closed the session itself, e.g. ``--idle-timeout``).
        """
        job_id = str(description.get("slurm_job") or "")
        if not job_id:
            return None
        state = await self._state(job_id)
        if state is not None and state.state == "RUNNING":
            return None
        deadline = time.monotonic() + LOST_WAIT
        while state is not None and not state.ended and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # COMPLETING while Slurm kills its processes
            state = await self._state(job_id)
        ended = state is not None and state.ended
        how = state.text() if ended else "was stopped (cancelled, preempted or out of time)"
        name = description.get("name", "?")
        reason = f"Slurm job {job_id} {how}: runner {name} stopped mid-session"
        return reason.encode()[:REASON_LIMIT].decode(errors="ignore")

    # -- inside

    async def _state(self, job_id: str) -> JobState | None:
        try:
            return (await self.commands.states([job_id])).get(job_id)
        except SlurmError as exc:
            logger.warning("could not ask Slurm about job %s: %s", job_id, exc)
            return None

    async def _submit(self) -> Launched:
        try:
            job_id = await self.commands.submit(self._script)
        except SlurmError as exc:
            self._failure = f"Could not submit a runner job to Slurm: {exc}"
            self._failed_at = time.monotonic()
            raise LaunchFailed(self._failure) from None
        job = Launched(job_id, JobState(job_id, "PENDING"))
        self.jobs[job_id] = job
        logger.info("submitted Slurm job %s for a runner (%d alive)", job_id, len(self.jobs))
        with contextlib.suppress(SlurmError):  # the first state, for the first note
            state = (await self.commands.states([job_id])).get(job_id)
            if state is not None and job_id in self.jobs:
                job.state = state
        return job

    def _ended_text(self, job: Launched) -> str:
        return (
            f"Slurm job {job.id} ended ({job.state.text()}) before its runner registered "
            "with the mediator. Look at the job's output file (sbatch --output; by default "
            f"slurm-{job.id}.out in the mediator's directory) to see why."
        )

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll)
            if not self.jobs:
                continue
            asked = list(self.jobs)  # jobs submitted later may be missing from the answer
            try:
                states = await self.commands.states(asked)
            except SlurmError as exc:
                logger.warning("could not read the runner jobs' states: %s", exc)
                continue
            changed = False
            for job_id in asked:
                job = self.jobs.get(job_id)
                if job is None:
                    continue
                state = states.get(job_id, JobState(job_id, "COMPLETED", "gone from squeue"))
                if state != job.state:
                    job.state, changed = state, True
                if state.ended:
                    del self.jobs[job_id]
                    logger.info("Slurm job %s ended: %s", job_id, state.text())
                    if not job.registered:
                        self._failure = self._ended_text(job)
                        self._failed_at = time.monotonic()
            if changed:
                self.changed()
