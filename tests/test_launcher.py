"""The launcher's bookkeeping with Slurm's commands faked (the real ones: tests/test_slurm.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from runner.launcher import Launcher, LauncherSettings, LaunchFailed
from runner.slurm import JobState, SlurmCommands, SlurmError, SlurmTemplate


class FakeCommands(SlurmCommands):
    """sbatch hands out ids 1, 2, ...; states are what the test sets; scancel is recorded."""

    def __init__(self, fail: str = "") -> None:
        super().__init__()
        self.fail = fail
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.jobs: dict[str, JobState] = {}

    async def submit(self, script: str) -> str:
        if self.fail:
            raise SlurmError(self.fail)
        job_id = str(len(self.submitted) + 1)
        self.submitted.append(script)
        self.jobs[job_id] = JobState(job_id, "PENDING", "Resources")
        return job_id

    async def states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        return {i: self.jobs[i] for i in job_ids if i in self.jobs}

    async def cancel(self, job_ids: Sequence[str]) -> None:
        self.cancelled += job_ids


def launcher(commands: FakeCommands, max_runners: int = 2) -> Launcher:
    template = SlurmTemplate(gres="gpu:1", partition="a100")
    return Launcher(LauncherSettings(template, max_runners, poll=0.01), "wss://m/", commands)


def test_claims_share_jobs_up_to_max_runners_and_stop_cancels_them():
    async def scenario() -> None:
        commands = FakeCommands()
        pool = launcher(commands)
        assert pool.can_serve(["gpu", "a100"], "linux") and not pool.can_serve(["tpu"])
        first = await pool.claim("a")
        assert first is not None and await pool.claim("a") is first  # one job per waiter
        assert pool.note(first) == "launching a runner: Slurm job 1, pending (Resources)"
        second = await pool.claim("b")
        assert second is not None and second.id == "2"
        assert await pool.claim("c") is None  # two alive: the cap
        assert "all 2 launched runners (--max-runners) are busy" in pool.note(None)
        pool.release("b")
        again = await pool.claim("c")
        assert again is second  # an unclaimed job is taken before submitting another
        pool.registered({"slurm_job": "1"})
        assert await pool.claim("a") is None  # its job's runner is up: still at the cap
        rows = {row["name"]: row for row in pool.listing([])}
        assert rows["slurm-2"]["status"] == "pending" and "slurm-1" not in rows
        await pool.stop()
        assert commands.cancelled == ["1", "2"] and len(commands.submitted) == 2

    asyncio.run(scenario())


def test_a_failed_submission_or_a_job_that_died_early_fails_its_waiters():
    async def scenario() -> None:
        broken = launcher(FakeCommands(fail="sbatch: error: invalid partition"))
        with pytest.raises(LaunchFailed, match="invalid partition"):
            await broken.claim("a")
        with pytest.raises(LaunchFailed, match="invalid partition"):  # held back, not resent
            await broken.claim("b")

        commands = FakeCommands()
        pool = launcher(commands)
        pool.start()
        job = await pool.claim("a")
        assert job is not None
        commands.jobs[job.id] = JobState(job.id, "FAILED", "NonZeroExitCode")
        while job.id in pool.jobs:
            await asyncio.sleep(0.01)
        with pytest.raises(LaunchFailed, match=r"Slurm job 1 ended \(failed"):
            await pool.claim("a")
        await pool.stop()

    asyncio.run(scenario())


def test_a_lost_runner_is_named_by_its_job_only_when_the_job_ends():
    async def scenario() -> None:
        commands = FakeCommands()
        pool = launcher(commands)
        commands.jobs["7"] = JobState("7", "RUNNING")
        runner = {"name": "slurm-7", "slurm_job": "7"}
        assert await pool.lost_reason(runner) is None  # it closed the session itself
        commands.jobs["7"] = JobState("7", "CANCELLED")
        reason = await pool.lost_reason(runner)
        assert reason == "Slurm job 7 cancelled: runner slurm-7 stopped mid-session"
        assert await pool.lost_reason({"name": "plain"}) is None

    asyncio.run(scenario())


class GatedCommands(FakeCommands):
    """Holds the next ``squeue`` at a gate, answering with the jobs known when it was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.asked = asyncio.Event()
        self.gate = asyncio.Event()

    async def states(self, job_ids: Sequence[str]) -> dict[str, JobState]:
        if not self.armed:
            return await super().states(job_ids)
        self.armed = False
        snapshot = dict(self.jobs)
        self.asked.set()
        await self.gate.wait()
        return {i: snapshot[i] for i in job_ids if i in snapshot}


def test_a_job_submitted_while_squeue_runs_is_not_taken_for_gone():
    async def scenario() -> None:
        commands = GatedCommands()
        pool = launcher(commands)
        first = await pool.claim("a")
        commands.armed = True
        pool.start()
        await commands.asked.wait()  # the poller's squeue started before the next sbatch
        second = await pool.claim("b")
        commands.gate.set()
        await asyncio.sleep(0.05)  # a few polls
        assert first is not None and second is not None and second.id in pool.jobs
        assert await pool.claim("b") is second
        await pool.stop()
        with pytest.raises(LaunchFailed, match="stopping"):
            await pool.claim("c")

    asyncio.run(scenario())
