"""Runners launched on a real Slurm by the mediator (``--launcher slurm``).

A private cluster (see :mod:`tests.slurm_cluster`) with one node and two
fake GPUs; the mediator, the runners in their batch jobs and the notebook
side are real processes and real sessions.
"""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from IPython.utils.capture import capture_output

import didomagic
from didomagic.api import RemoteSession
from didomagic.client import Requirements, query
from didomagic.config import Config
from didomagic.errors import ConfigurationError, ConnectionLost
from didomagic.loop import background_loop
from didomagic.progress import TextProgress
from didomagic.protocol import Execute
from didomagic.serialize import unpack
from didomagic.urls import ConnectionURL
from runner import environment
from runner.cli import main
from runner.slurm import SlurmCommands, job_tags, parse_squeue_format, parse_squeue_json

from .conftest import TIMEOUT, MediatorProcess, start_mediator, wait_until
from .slurm_cluster import SlurmCluster, require_slurm, start_cluster

IDLE = "2"
"""Seconds a launched runner waits idle before it exits (--slurm-idle)."""

GPU = Requirements(tags=("gpu",))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """One node with two fake GPUs; SLURM_CONF points this process (and mediators) at it."""
    require_slurm()
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        cluster.stop()


@pytest.fixture
def config(private_config: Path) -> Iterator[Config]:
    private_config.unlink(missing_ok=True)
    yield Config()
    private_config.unlink(missing_ok=True)


def launching_mediator(tmp_path: Path, *args: str) -> MediatorProcess:
    """A mediator that launches runners with one fake GPU each on the test cluster."""
    return start_mediator(
        tmp_path / "mediator",
        "--launcher",
        "slurm",
        "--slurm-gres",
        "gpu:1",
        "--slurm-idle",
        IDLE,
        "--launcher-poll",
        "0.2",
        "--slurm-output",
        str(tmp_path / "slurm-%j.out"),
        "--slurm-runner-args",
        "--heartbeat 0.5 --warm-kernels 1",
        *args,
    )


def listing(url: str) -> dict[str, dict]:
    """The mediator's view of its runners (launched, pending, down), by name."""
    info, _ = background_loop().run(query(ConnectionURL.parse(url)))
    return {d["name"]: d for d in info.runners}


def gpus_and_runner(session: RemoteSession, progress: TextProgress | None = None) -> tuple:
    """Run a cell that reports the GPUs its kernel sees and the runner it runs on."""
    code = (
        "import os\n"
        "seen = (os.environ.get('CUDA_VISIBLE_DEVICES'), os.environ['DIDOMAGIC_RUNNER_NAME'])"
    )
    result, buffers = session.execute(
        Execute("c", code, fetch=("seen",)), [], lambda output: None, progress
    )
    assert result.status.value == "ok", result.error
    return unpack([memoryview(b) for b in buffers[0]])


def text_progress() -> TextProgress:
    return TextProgress(io.StringIO())


def written(progress: TextProgress) -> str:
    assert isinstance(progress.stream, io.StringIO)
    return progress.stream.getvalue()


def test_gpu_sessions_get_launched_runners_and_the_jobs_end(shell, ns, cluster, tmp_path, config):
    mediator = launching_mediator(tmp_path, "--max-runners", "3")
    try:
        url = ConnectionURL.parse(mediator.url)
        shell.run_line_magic("runners", f"add {mediator.url}")
        with capture_output() as cap:
            result = shell.run_cell(
                "%%remote --tags gpu\nimport os\n"
                "gpus_a, runner_a = os.environ['CUDA_VISIBLE_DEVICES'], "
                "os.environ['DIDOMAGIC_RUNNER_NAME']"
            )
        assert result.success, result.error_in_exec
        assert "launching a runner: Slurm job" in cap.stderr
        job_a = ns["runner_a"].removeprefix("slurm-")
        assert cluster.state(job_a) == "RUNNING"
        assert ns["gpus_a"] in ("0", "1")  # the kernel sees only its job's GPU

        second = RemoteSession(url, GPU)
        gpus_b, runner_b = gpus_and_runner(second)
        assert runner_b != ns["runner_a"] and {gpus_b, ns["gpus_a"]} == {"0", "1"}

        third = RemoteSession(url, GPU)
        progress = text_progress()
        outcome: list[tuple] = []
        waiting = threading.Thread(target=lambda: outcome.append(gpus_and_runner(third, progress)))
        waiting.start()
        try:
            wait_until(lambda: "pending (Resources)" in written(progress), "the third to pend")
        except AssertionError:
            raise AssertionError(written(progress) + str(cluster.jobs())) from None
        pending = [v for v in listing(mediator.url).values() if v["status"] == "pending"]
        assert len(pending) == 1 and pending[0]["slurm_state"] == "PENDING"
        job_c = pending[0]["slurm_job"]
        assert "Resources" in pending[0]["reason"]
        with capture_output() as cap:
            shell.run_line_magic("runners", "")
        assert f"slurm-{job_c}" in cap.stdout and "pending" in cap.stdout
        launched = listing(mediator.url)[runner_b]
        assert launched["reason"].startswith("Slurm job") and launched["slurm_state"] == "RUNNING"
        assert {"gpu", "batch"} <= set(launched["tags"])  # what the job got, and its partition

        second.close()  # its runner is free again: the waiting session takes it
        waiting.join(TIMEOUT)
        assert outcome and outcome[0] == (gpus_b, runner_b)
        third.close()
        didomagic.api.default_pool().close()  # the notebook's session on runner_a ends too

        job_b = runner_b.removeprefix("slurm-")
        wait_until(
            lambda: cluster.state(job_a) == cluster.state(job_b) == "COMPLETED",
            "the idle runners to exit and their jobs to complete",
        )
        assert mediator.stop() == 0, mediator.log
        wait_until(lambda: cluster.state(job_c) == "CANCELLED", "the mediator to cancel its job")
        assert not cluster.alive()  # the mediator leaves no job behind
    finally:
        if mediator.process.poll() is None:
            mediator.stop()


def test_never_more_jobs_than_max_runners(cluster, tmp_path):
    mediator = launching_mediator(tmp_path, "--max-runners", "1")
    try:
        before = set(cluster.jobs())
        url = ConnectionURL.parse(mediator.url)
        first = RemoteSession(url, GPU)
        _, runner = gpus_and_runner(first)
        second, progress, outcome = RemoteSession(url, GPU), text_progress(), []
        waiting = threading.Thread(target=lambda: outcome.append(gpus_and_runner(second, progress)))
        waiting.start()
        wait_until(lambda: "(--max-runners) are busy" in written(progress), "the busy note")
        assert set(cluster.jobs()) - before == {runner.removeprefix("slurm-")}
        first.close()
        waiting.join(TIMEOUT)
        assert outcome and outcome[0][1] == runner  # the one runner, free again
        second.close()
    finally:
        assert mediator.stop() == 0, mediator.log


def test_a_cancelled_job_fails_its_session_naming_the_job(cluster, tmp_path):
    mediator = launching_mediator(tmp_path)
    try:
        session = RemoteSession(ConnectionURL.parse(mediator.url), GPU)
        _, runner = gpus_and_runner(session)
        job = runner.removeprefix("slurm-")
        errors: list[BaseException] = []

        def sleep_long() -> None:
            try:
                session.execute(Execute("s", "import time\ntime.sleep(60)"), [], lambda o: None)
            except BaseException as exc:
                errors.append(exc)

        cell = threading.Thread(target=sleep_long)
        cell.start()
        wait_until(lambda: session._connection and session._connection.running, "the cell")
        cluster.run("scancel", job)
        cell.join(TIMEOUT)
        assert errors and isinstance(errors[0], ConnectionLost)
        assert f"Slurm job {job} cancelled" in str(errors[0])
    finally:
        assert mediator.stop() == 0, mediator.log


def _once_then_quick(mark: str) -> str:
    """Slow the first time it runs anywhere, quick the second time (a retry)."""
    import os
    import pathlib
    import time

    path = pathlib.Path(mark)
    first = not path.exists()
    with path.open("a") as f:
        f.write(os.environ["DIDOMAGIC_RUNNER_NAME"] + "\n")
    if first:
        time.sleep(60)
    return os.environ["DIDOMAGIC_RUNNER_NAME"]


def test_a_detached_job_retries_on_another_launched_runner(cluster, tmp_path, config):
    mediator = launching_mediator(tmp_path)
    try:
        config.add("m", ConnectionURL.parse(mediator.url))
        mark = tmp_path / "marks"
        job = didomagic.submit(_once_then_quick, str(mark), tags=["gpu"], retries=1)
        wait_until(mark.exists, "the job to start on a launched runner")
        first = mark.read_text().split()[0]
        cluster.run("scancel", first.removeprefix("slurm-"))
        record = job.wait(TIMEOUT)
        assert record["state"] == "done" and record["attempts"] == 2, record
        assert job.result() != first and mark.read_text().split() == [first, job.result()]
        assert cluster.state(first.removeprefix("slurm-")) == "CANCELLED"
    finally:
        assert mediator.stop() == 0, mediator.log


def test_slurm_script_prints_the_batch_script_a_hand_submitted_runner_uses(
    cluster, tmp_path, capsys
):
    mediator = start_mediator(tmp_path / "mediator")
    try:
        argv = ["slurm-script", "--slurm-gres", "gpu:1", "--slurm-memory", "100M"]
        argv += ["--slurm-tags", "by-hand", "--slurm-idle", "60"]
        assert main([*argv, "--slurm-output", str(tmp_path / "slurm-%j.out")]) == 0
        script = capsys.readouterr().out
        assert "#SBATCH --gres=gpu:1\n#SBATCH --mem=100M\n" in script
        assert "DIDOMAGIC_MEDIATOR_URL:?" in script and "--tags by-hand" in script
        env = {**cluster.env, "DIDOMAGIC_MEDIATOR_URL": mediator.runner_url}
        job = subprocess.run(
            ["sbatch", "--parsable"], input=script, env=env, capture_output=True, text=True
        ).stdout.strip()
        runner = wait_until(
            lambda: listing(mediator.url).get(f"slurm-{job}"), "the hand-submitted runner"
        )
        assert set(runner["tags"]) == {"by-hand", "gpu", "batch"}  # batch: the partition
        assert runner["slurm_job"] == job
        cluster.run("scancel", job)
    finally:
        assert mediator.stop() == 0, mediator.log


@pytest.mark.parametrize("json_output", [True, False], ids=["squeue --json", "squeue -o"])
def test_commands_submit_read_states_and_cancel_on_the_real_slurm(cluster, tmp_path, json_output):
    commands = SlurmCommands(env=cluster.env, json=json_output)
    script = f"#!/bin/bash\n#SBATCH --output={tmp_path}/out-%j\nsleep 60\n"

    async def scenario() -> None:
        job = await commands.submit(script)
        state = (await commands.states([job, "999999"]))[job]  # a forgotten id is absent
        assert state.state in ("PENDING", "RUNNING") and not state.ended
        await commands.cancel([job])
        while not (await commands.states([job]))[job].ended:
            await asyncio.sleep(0.05)
        assert (await commands.states([job]))[job].text() == "cancelled"
        assert commands.json is json_output

    asyncio.run(scenario())


def test_squeue_output_and_job_environment_parse(tmp_path):
    new_style = '{"jobs": [{"job_id": 7, "job_state": ["PENDING"], "state_reason": "Priority"}]}'
    assert parse_squeue_json(new_style)["7"].text() == "pending (Priority)"
    old_style = '{"jobs": [{"job_id": 8, "job_state": "RUNNING", "nodes": "n1"}]}'
    assert parse_squeue_json(old_style)["8"].text() == "running on n1"
    assert parse_squeue_format("9|CANCELLED|None|n2\n")["9"].ended
    job = {"SLURM_JOB_ID": "9", "SLURM_JOB_PARTITION": "a100", "SLURM_JOB_GPUS": "2,3"}
    assert job_tags(job) == ("gpu", "a100")
    assert job_tags({"CUDA_VISIBLE_DEVICES": "0"}) == ()  # not in a Slurm job
    assert job_tags({"SLURM_JOB_ID": "9", "CUDA_VISIBLE_DEVICES": ""}) == ()


def test_settings_come_from_environment_variables_and_secret_files(tmp_path):
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    environ = {
        "DIDOMAGIC_TOKEN_FILE": str(secret),
        "DIDOMAGIC_MEDIATOR_URL": "wss://m:1/#token=t",
        "DIDOMAGIC_TAGS": "gpu",
        "DIDOMAGIC_ARGS": "--max-queue 2",
    }
    argv = environment.arguments("runner", environ)
    assert argv == [
        "--mediator", "wss://m:1/#token=t", "--tags", "gpu", "--token", "s3cret",
        "--max-queue", "2",
    ]  # fmt: skip
    assert "DIDOMAGIC_MEDIATOR_URL" not in environ and "DIDOMAGIC_TOKEN_FILE" not in environ
    with pytest.raises(ConfigurationError, match=r"DIDOMAGIC_TOKEN_FILE=.*cannot read"):
        environment.arguments("mediator", {"DIDOMAGIC_TOKEN_FILE": str(tmp_path / "absent")})
