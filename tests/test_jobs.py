"""Detached jobs with real runners, a real mediator and real process kills."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import nbformat
import pytest
from IPython.utils.capture import capture_output
from nbclient import NotebookClient

import didomagic
from didomagic import detached
from didomagic.api import SessionPool
from didomagic.config import Config
from didomagic.errors import JobError, RemoteError
from didomagic.loop import background_loop
from didomagic.protocol import Submit
from didomagic.serialize import pack_names
from didomagic.urls import ConnectionURL

from .conftest import TIMEOUT, start_mediator, wait_until

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture
def config(private_config):
    private_config.unlink(missing_ok=True)
    yield Config()
    private_config.unlink(missing_ok=True)


@pytest.fixture
def mediator(tmp_path):
    process = start_mediator(tmp_path / "mediator")
    yield process
    assert process.stop() in (0, -signal.SIGKILL), process.log


def state_of(job_id: str) -> str:
    return detached.job(job_id).status()["state"]


def wait_state(job_id: str, *states: str) -> dict:
    return wait_until(
        lambda: (r := detached.job(job_id).status())["state"] in states and r,
        f"job {job_id} to be {' or '.join(states)}",
    )


def submitted_id(text: str) -> str:
    match = re.search(r"submitted job (\S+)", text)
    assert match, text
    return match.group(1)


def test_detach_list_pull_delete_on_a_runner(shell, ns, runner_factory, config):
    runner = runner_factory(name="solo")
    config.add("solo", ConnectionURL.parse(runner.url))
    ns["x"] = 5
    with capture_output() as cap:
        result = shell.run_cell(
            "%%remote --detach --name squares\nprint('computing', flush=True)\n"
            "y = [i * i for i in range(x)]\nz = 'bound'"
        )
    assert result.success, result.error_in_exec
    job_id = submitted_id(cap.stdout)
    assert "y" not in ns  # nothing comes back until it is pulled
    wait_state(job_id, "done")
    with capture_output() as cap:
        shell.run_line_magic("jobs", "--text")
    header, line = cap.stdout.splitlines()[:2]
    assert header.split()[:5] == ["ID", "NAME", "HOLDER", "RUNNER", "STATE"]
    assert job_id in line and "squares" in line and "solo" in line and " done " in line
    with capture_output() as cap:
        shell.run_line_magic("jobs", f"pull {job_id}")
    assert "computing" in cap.stdout
    assert ns["y"] == [0, 1, 4, 9, 16] and ns["z"] == "bound"
    # A failed job: names bound before the error come back, then the remote error.
    with capture_output() as cap:
        shell.run_cell("%%remote --detach --name broken\npartial = 1\n1 / 0")
    failed = submitted_id(cap.stdout)
    record = wait_state(failed, "failed")
    assert record["reason"] == "ZeroDivisionError: division by zero"
    with capture_output():
        result = shell.run_cell("%jobs pull broken")  # by name
    assert isinstance(result.error_in_exec, RemoteError) and ns["partial"] == 1
    assert "ZeroDivisionError" in "".join(result.error_in_exec.traceback)
    with capture_output() as cap:
        shell.run_line_magic("jobs", f"delete {job_id}")
    assert [j["id"] for j in didomagic.jobs()] == [failed]
    with capture_output():
        result = shell.run_cell(f"%jobs pull {job_id}")
    assert isinstance(result.error_in_exec, JobError) and "No job" in str(result.error_in_exec)


def test_the_api_submits_functions_and_two_clients_get_the_same_results(runner_factory, config):
    runner = runner_factory(name="api")
    config.add("api", ConnectionURL.parse(runner.url))

    def shout(word, times=2):
        print("shouting", word)
        return (word.upper() + "!") * times

    job = didomagic.submit(shout, "hey", times=3)
    assert job.wait(TIMEOUT)["state"] == "done"
    assert job.result() == "HEY!HEY!HEY!"
    first = detached.job(job.id, SessionPool()).fetch()
    second = detached.job(job.id, SessionPool()).fetch()
    assert first.values == second.values and first.record == second.record
    assert [o.content for o in first.outputs] == [o.content for o in second.outputs]
    assert "shouting hey" in first.outputs[0].content["text"]

    def fails():
        raise LookupError("missing key")

    bad = didomagic.submit(fails)
    assert bad.wait(TIMEOUT)["state"] == "failed"
    with pytest.raises(LookupError, match="missing key") as info:
        bad.result()
    assert "Remote traceback (runner api)" in info.value.__notes__[0]


def test_the_same_request_id_is_one_job(runner_factory, config):
    runner = runner_factory(name="dedupe")
    url = ConnectionURL.parse(runner.url)
    packed, _ = pack_names({"a": 1}, ["a"])
    request = Submit(request_id="retry-me", code="b = a + 1", values=(packed[0].header,))
    parts = [p.parts for p in packed]
    first = background_loop().run(detached.submit_async(url, request, parts))
    again = background_loop().run(detached.submit_async(url, request, parts))
    assert first["id"] == again["id"]
    assert [j["id"] for j in background_loop().run(detached.list_async(url))] == [first["id"]]


def test_cancel_stops_a_running_job(runner_factory, config):
    runner = runner_factory("--max-sessions", "1", name="cancel")
    config.add("cancel", ConnectionURL.parse(runner.url))
    job = didomagic.submit(__import__("time").sleep, 60, name="sleeper")
    wait_state(job.id, "running")
    assert job.cancel()["state"] == "cancelled"
    record = wait_state(job.id, "cancelled")
    assert record["reason"] == "cancelled on request"
    # The runner stopped it: its session closed and the one slot is free again.
    wait_until(lambda: "closed" in runner.log.split("sleeper")[-1], "the job's session to close")
    quick = didomagic.submit(sum, [1, 2, 3])
    assert quick.wait(TIMEOUT)["state"] == "done" and quick.result() == 6
    with pytest.raises(JobError, match=r"cancelled .* has no results"):
        job.fetch()


def test_finished_jobs_expire_after_the_ttl(runner_factory, config):
    runner = runner_factory("--job-ttl", "1", name="ttl")
    config.add("ttl", ConnectionURL.parse(runner.url))
    job = didomagic.submit(len, "abc")
    assert job.wait(TIMEOUT)["state"] == "done"
    wait_until(lambda: not didomagic.jobs(), "the finished job to expire")
    assert "expired (--job-ttl 1s)" in runner.log


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


def test_a_lost_runner_fails_the_job_or_retries_it_elsewhere(
    runner_factory, mediator, config, tmp_path
):
    runners = {
        n: runner_factory("--tags", "gpu", "--mediator", mediator.runner_url, name=n)
        for n in ("j1", "j2")
    }
    config.add("m", ConnectionURL.parse(mediator.url))
    wait_until(lambda: sum(v.status == "up" for v in didomagic.runners()) == 2, "both runners up")
    mark = tmp_path / "retry.marks"
    job = didomagic.submit(_once_then_quick, str(mark), tags=["gpu"], retries=1)
    first = wait_state(job.id, "running")["runner"]
    wait_until(mark.exists, "the job to start")
    runners[first].process.kill()
    record = job.wait(TIMEOUT)
    assert record["state"] == "done" and record["attempts"] == 2
    assert job.result() != first and mark.read_text().split() == [first, job.result()]

    mark2 = tmp_path / "lost.marks"
    survivor = next(n for n in runners if n != first)
    lost = didomagic.submit(_once_then_quick, str(mark2), tags=["gpu"])
    assert wait_state(lost.id, "running")["runner"] == survivor
    wait_until(mark2.exists, "the job to start")
    runners[survivor].process.kill()
    record = lost.wait(TIMEOUT)
    assert record["state"] == "failed" and record["reason"].startswith("runner lost:")
    assert survivor in record["reason"]


def test_a_killed_mediator_loses_no_job_and_runs_none_twice(
    runner_factory, mediator, config, tmp_path
):
    runner_factory("--mediator", mediator.runner_url, "--max-sessions", "1", name="one")
    config.add("m", ConnectionURL.parse(mediator.url))
    wait_until(lambda: any(v.status == "up" for v in didomagic.runners()), "the runner up")
    running_mark, queued_mark = tmp_path / "running.marks", tmp_path / "queued.marks"
    running = didomagic.submit(_once_then_quick, str(running_mark), name="long")
    wait_state(running.id, "running")
    wait_until(running_mark.exists, "the long job to start")
    queued = didomagic.submit(_once_then_quick, str(queued_mark), name="next")
    queued_mark.write_text("")  # makes the queued job quick when it runs
    assert state_of(queued.id) == "queued"  # the only slot is busy
    port = mediator.port
    mediator.process.kill()
    mediator.process.wait(TIMEOUT)
    again = start_mediator(Path(mediator.state_dir).parent, "--port", str(port))
    try:
        assert again.url == mediator.url
        done = queued.wait(TIMEOUT)
        assert done["state"] == "done" and queued.result() == "one"
        lost = running.wait(TIMEOUT)
        assert lost["state"] == "failed" and "runner lost" in lost["reason"]
        assert "stopped while the job ran" in lost["reason"]
        assert running_mark.read_text().split() == ["one"]  # not run a second time
        assert queued_mark.read_text().split() == ["one"]  # run exactly once
        assert {j["id"] for j in didomagic.jobs()} == {running.id, queued.id}
    finally:
        assert again.stop() == 0, again.log


def test_a_notebook_submits_its_kernel_is_killed_and_another_notebook_pulls(runner_factory, config):
    runner = runner_factory(name="nbjobs")
    config.add("nbjobs", ConnectionURL.parse(runner.url))  # the kernels inherit the config
    submit = nbformat.read(NOTEBOOKS / "detached_submit.ipynb", as_version=4)
    NotebookClient(
        submit, timeout=4 * TIMEOUT, kernel_name="python3", shutdown_kernel="immediate"
    ).execute()  # "immediate" kills the kernel process right after the last cell
    texts = ["".join(o.get("text", "") for o in c.get("outputs", [])) for c in submit.cells]
    assert any("submitted job" in t and "nightly-report" in t for t in texts)
    assert any("nightly-report" in t and "HOLDER" in t for t in texts)  # %jobs --text
    pull = nbformat.read(NOTEBOOKS / "detached_pull.ipynb", as_version=4)
    NotebookClient(pull, timeout=4 * TIMEOUT, kernel_name="python3").execute()
    code = [c for c in pull.cells if c.cell_type == "code"]
    assert "'done'" in code[1].outputs[0]["data"]["text/plain"]
    assert "summed 3 ranges" in "".join(o.get("text", "") for o in code[2].outputs)
    assert code[3].outputs[0]["data"]["text/plain"] == "{10: 45, 20: 190, 30: 435}"
