"""Per-cell limits a runner enforces: output floods are cut, --cell-timeout caps every cell."""

from __future__ import annotations

from IPython.utils.capture import capture_output

from didomagic.errors import CellTimeout


def test_an_output_flood_is_cut_with_a_note_and_the_cell_goes_on(shell, ns, runner_factory):
    runner = runner_factory("--max-output", "100000")
    with capture_output() as cap:
        result = shell.run_cell(
            f"%%remote --runner {runner.url}\n"
            "for i in range(20000):\n    print('x' * 100)\ndone = i"
        )
    assert result.success, result.error_in_exec
    assert ns["done"] == 19999  # the cell ran to the end and its values came back
    assert len(cap.stdout) < 150_000  # 2 MB were printed remotely
    assert "(--max-output) was cut here; the cell kept running" in cap.stderr
    with capture_output() as cap:
        assert shell.run_cell(f"%%remote --runner {runner.url}\nprint('next')").success
    assert cap.stdout.strip().endswith("next")  # the next cell has its own budget
    assert "output cut at --max-output" in runner.log


def test_the_runner_cell_timeout_caps_every_cell(shell, ns, runner_factory):
    runner = runner_factory("--cell-timeout", "1")
    with capture_output():
        result = shell.run_cell(f"%%remote --runner {runner.url}\nimport time\ntime.sleep(30)")
    error = result.error_in_exec
    assert isinstance(error, CellTimeout) and "the runner's --cell-timeout of 1 s" in str(error)
    with capture_output():
        result = shell.run_cell(
            f"%%remote --runner {runner.url} --timeout 0.5\nimport time\ntime.sleep(30)"
        )
    assert "its timeout of 0.5 s" in str(result.error_in_exec)  # a shorter one still applies
    assert shell.run_cell(f"%%remote --runner {runner.url}\nalive = True").success
    assert ns["alive"] is True


def test_an_idle_session_is_ended_and_the_next_cell_says_so(shell, ns, runner_factory):
    from .conftest import wait_until

    runner = runner_factory("--idle-timeout", "1")
    assert shell.run_cell(f"%%remote --runner {runner.url}\nremote_state = 41").success
    wait_until(lambda: "(--idle-timeout); ending it" in runner.log, "the idle session to end")
    wait_until(lambda: "closed" in runner.log.split("ending it")[-1], "its kernel to be freed")
    with capture_output() as cap:
        result = shell.run_cell(
            f"%%remote --runner {runner.url}\nfresh = 'remote_state' not in globals()"
        )
    assert result.success and ns["fresh"] is True
    assert "ended this notebook's idle session (--idle-timeout)" in cap.stderr


def test_connections_beyond_the_limit_are_refused_at_once(runner_factory):
    import pytest

    from didomagic.client import dial
    from didomagic.errors import RunnerBusy
    from didomagic.loop import background_loop
    from didomagic.urls import ConnectionURL

    runner = runner_factory("--max-connections", "2")
    url = ConnectionURL.parse(runner.url)
    held = [background_loop().run(dial(url)) for _ in range(2)]  # open, saying nothing
    with pytest.raises(RunnerBusy, match=r"too many connections \(--max-connections 2\)"):
        background_loop().run(dial(url))
    for ws in held:
        background_loop().run(ws.close())
    # Room again once they are gone: a real session runs a cell.
    from didomagic.api import RemoteSession
    from didomagic.protocol import Execute, Status

    session = RemoteSession(url)
    result, _ = session.execute(Execute("c", "y = 2", fetch=("y",)), [], lambda o: None)
    session.close()
    assert result.status is Status.OK and [v.name for v in result.values] == ["y"]
    assert "(--max-connections 2)" in runner.log
