"""A mediator with several runners, all real processes: matching, relaying, failures, map."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from IPython.utils.capture import capture_output

import didomagic
from didomagic.api import RemoteSession, SessionPool
from didomagic.client import Requirements, open_connection, query
from didomagic.config import Config
from didomagic.errors import (
    AuthenticationFailed,
    ConnectionLost,
    ItemFailed,
    NoMatchingRunner,
    RunnerBusy,
)
from didomagic.loop import background_loop
from didomagic.protocol import Execute
from didomagic.urls import ConnectionURL

from .conftest import TIMEOUT, start_mediator, wait_until

HEARTBEAT = "0.3"


def pool_of(url: str) -> dict[str, dict]:
    """The mediator's view of its runners, by name."""
    info, _ = background_loop().run(query(ConnectionURL.parse(url)))
    assert info.role == "mediator"
    return {d["name"]: d for d in info.runners}


def wait_for_up(url: str, *names: str) -> dict[str, dict]:
    def all_up() -> dict[str, dict] | None:
        runners = pool_of(url)
        return runners if all(runners.get(n, {}).get("status") == "up" for n in names) else None

    return wait_until(all_up, f"runners {names} up at the mediator")


@pytest.fixture
def mediator(tmp_path):
    process = start_mediator(tmp_path / "mediator")
    yield process
    assert process.stop() in (0, -signal.SIGKILL), process.log


@pytest.fixture
def config(private_config):
    private_config.unlink(missing_ok=True)
    yield Config()
    private_config.unlink(missing_ok=True)


def join(runner_factory, mediator, name, *args):
    return runner_factory(
        "--mediator", mediator.runner_url, "--heartbeat", HEARTBEAT, *args, name=name
    )


def where(session: RemoteSession) -> str:
    session.execute(Execute("w", "import os\nx = 1"), [], lambda output: None)
    return session.runner_name


def test_tags_through_the_mediator_and_the_listing(shell, ns, runner_factory, mediator, config):
    join(runner_factory, mediator, "cpu1", "--tags", "cpu")
    join(runner_factory, mediator, "gpu1", "--tags", "gpu,a100")
    wait_for_up(mediator.url, "cpu1", "gpu1")
    with capture_output() as cap:
        shell.run_line_magic("runners", f"add {mediator.url}")
    assert "added mediator" in cap.stdout
    result = shell.run_cell(
        "%%remote --tags a100\nimport os\nwhere = os.environ['DIDOMAGIC_RUNNER_NAME']"
    )
    assert result.success, result.error_in_exec
    assert ns["where"] == "gpu1"
    result = shell.run_cell("%%remote --tags cpu --os linux\nwhere = 'cpu:' + os.uname()[1]")
    assert result.success and ns["where"].startswith("cpu:")
    with capture_output() as cap:
        shell.run_line_magic("runners", "--text")
    lines = cap.stdout.splitlines()
    rows = {line.split()[0]: line for line in lines[1:3]}
    assert set(rows) == {"cpu1", "gpu1"}
    assert "via mediator" in rows["gpu1"] and "gpu,a100" in rows["gpu1"] and " up " in rows["gpu1"]
    with capture_output():
        result = shell.run_cell("%%remote --tags tpu\nx = 1")
    assert isinstance(result.error_in_exec, NoMatchingRunner)
    assert "gpu1 [gpu,a100]" in str(result.error_in_exec)
    # --runner NAME finds a runner in a configured mediator's pool.
    result = shell.run_cell("%%remote --runner cpu1\nwhere = os.environ['DIDOMAGIC_RUNNER_NAME']")
    assert result.success and ns["where"] == "cpu1"
    didomagic.api.default_pool().close()


def test_roles_have_separate_tokens(mediator):
    client_url = ConnectionURL.parse(mediator.url)
    runner_url = ConnectionURL.parse(mediator.runner_url)
    with pytest.raises(AuthenticationFailed):  # a runner token cannot open a session
        background_loop().run(open_connection(runner_url))
    with pytest.raises(AuthenticationFailed):  # nor list the pool
        background_loop().run(query(runner_url))
    from didomagic.client import dial

    with pytest.raises(AuthenticationFailed):  # a client token cannot register a runner
        background_loop().run(dial(client_url, "register"))
    assert "token=" not in mediator.log.replace("token=***", "")


def test_free_slots_before_queues_then_busy(runner_factory, mediator):
    for name in ("g1", "g2"):
        join(
            runner_factory,
            mediator,
            name,
            "--tags",
            "gpu",
            "--max-sessions",
            "1",
            "--max-queue",
            "1",
            "--warm-kernels",
            "2",
        )
    wait_for_up(mediator.url, "g1", "g2")
    url = ConnectionURL.parse(mediator.url)
    gpu = Requirements(tags=("gpu",))
    first, second = RemoteSession(url, gpu), RemoteSession(url, gpu)
    names = {where(first), where(second)}
    assert names == {"g1", "g2"}  # the second went to the free runner, not a queue
    wait_until(
        lambda: all(d["sessions"] == 1 for d in pool_of(mediator.url).values()),
        "both runners to report one session",
    )
    queued = []

    def wait_in_queue(index: int, started: threading.Event) -> None:
        session = RemoteSession(url, gpu)

        class Watch(didomagic.progress.NoProgress):
            def queued(self, position: int) -> None:
                queued.append(position)
                started.set()

        session.execute(Execute("q", "x = 1"), [], lambda o: None, Watch())
        session.close()

    events = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=wait_in_queue, args=(i, events[i])) for i in (0, 1)]
    for thread, event in zip(threads, events, strict=True):
        thread.start()
        assert event.wait(TIMEOUT)
        # the mediator hears of the queue from the runner's next load report
        in_queue = len(queued)
        wait_until(
            lambda n=in_queue: sum(d["queue"] for d in pool_of(mediator.url).values()) == n,
            "the queue to show at the mediator",
        )
    assert queued == [1, 1]  # one in each runner's queue
    with pytest.raises(RunnerBusy, match=r"g1 \[gpu\].*1/1 sessions, queue 1/1"):
        background_loop().run(open_connection(url, gpu))
    first.close()
    second.close()
    for thread in threads:
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def test_a_runner_killed_mid_cell_then_the_next_cell_moves(
    shell, ns, runner_factory, mediator, config
):
    runners = {n: join(runner_factory, mediator, n, "--tags", "gpu") for n in ("k1", "k2")}
    wait_for_up(mediator.url, "k1", "k2")
    config.add("m", ConnectionURL.parse(mediator.url))
    assert shell.run_cell(
        "%%remote --tags gpu\nimport os\nfirst = os.environ['DIDOMAGIC_RUNNER_NAME']"
    ).success
    victim = runners[ns["first"]]
    code = "import time\nprint('started', flush=True)\ntime.sleep(60)"

    class Tap:
        def write(self, text: str) -> int:
            if "started" in text:
                victim.process.kill()
            return len(text)

        def flush(self) -> None:
            pass

    import sys

    saved, sys.stdout = sys.stdout, Tap()
    try:
        result = shell.run_cell(f"%%remote --tags gpu\n{code}")
    finally:
        sys.stdout = saved
    assert isinstance(result.error_in_exec, ConnectionLost)
    wait_until(
        lambda: pool_of(mediator.url)[ns["first"]]["status"] == "down", "the mediator to notice"
    )
    result = shell.run_cell("%%remote --tags gpu\nsecond = os.environ['DIDOMAGIC_RUNNER_NAME']")
    assert result.success, result.error_in_exec
    assert {ns["first"], ns["second"]} == {"k1", "k2"}
    didomagic.api.default_pool().close()


def test_a_restarted_mediator_gets_its_runners_back(runner_factory, mediator, tmp_path):
    join(runner_factory, mediator, "s1", "--tags", "gpu")
    join(runner_factory, mediator, "s2", "--tags", "cpu")
    wait_for_up(mediator.url, "s1", "s2")
    port = mediator.port
    mediator.process.kill()
    mediator.process.wait(TIMEOUT)
    again = start_mediator(tmp_path / "mediator", "--port", str(port))
    try:
        assert again.url == mediator.url  # same state directory: same certificate and tokens
        wait_for_up(again.url, "s1", "s2")
        session = RemoteSession(ConnectionURL.parse(again.url), Requirements(tags=("gpu",)))
        assert where(session) == "s1"
        session.close()
    finally:
        assert again.stop() == 0, again.log


def test_a_lost_heartbeat_marks_a_runner_down_until_it_is_back(runner_factory, mediator):
    runner = join(runner_factory, mediator, "hb", "--tags", "gpu")
    wait_for_up(mediator.url, "hb")
    os.kill(runner.process.pid, signal.SIGSTOP)
    try:
        down = wait_until(
            lambda: (d := pool_of(mediator.url)["hb"])["status"] == "down" and d,
            "the runner to be marked down",
        )
        assert "heartbeat lost" in down["reason"]
        with pytest.raises(NoMatchingRunner, match="down or busy"):
            background_loop().run(
                open_connection(ConnectionURL.parse(mediator.url), Requirements(tags=("gpu",)))
            )
    finally:
        os.kill(runner.process.pid, signal.SIGCONT)
    wait_for_up(mediator.url, "hb")
    session = RemoteSession(ConnectionURL.parse(mediator.url), Requirements(tags=("gpu",)))
    assert where(session) == "hb"
    session.close()
    assert "heartbeat lost" in mediator.log and "runner hb registered" in mediator.log


def test_map_uses_every_runner_and_keeps_input_order(runner_factory, mediator, config, tmp_path):
    names = ("m1", "m2", "m3")
    started = tmp_path / "started"
    started.mkdir()
    where = str(started)
    for name in names:
        join(runner_factory, mediator, name, "--max-sessions", "1")
    wait_for_up(mediator.url, *names)
    config.add("m", ConnectionURL.parse(mediator.url))
    pool = SessionPool()

    def work(i):
        import os
        import time

        name = os.environ["DIDOMAGIC_RUNNER_NAME"]
        open(os.path.join(where, name), "w").close()
        # Each runner's first item waits (bounded) until all three have one, however slowly a
        # loaded machine opens the sessions: a map that skipped a runner fails below.
        deadline = time.monotonic() + 30
        while len(os.listdir(where)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        return i * i, name

    results = didomagic.map(work, range(9), pool=pool, progress="text")
    assert [r[0] for r in results] == [i * i for i in range(9)]
    assert {r[1] for r in results} == set(names)

    def flaky(i):
        if i == 2:
            raise KeyError(f"item {i}")
        return i

    with pytest.raises(ItemFailed) as info:
        didomagic.map(flaky, range(6), pool=pool, progress="none")
    assert info.value.index == 2 and isinstance(info.value.__cause__, KeyError)
    assert info.value.results[:2] == [0, 1] and info.value.results[3:] == [3, 4, 5]

    def slow_unless_two(i):
        import time

        if i == 0:
            raise RuntimeError("first item fails")
        time.sleep(60)

    with pytest.raises(ItemFailed) as info:
        didomagic.map(slow_unless_two, range(3), pool=pool, cancel_on_error=True, progress="none")
    assert info.value.index == 0 and info.value.cancelled == [1, 2]
    pool.close()
