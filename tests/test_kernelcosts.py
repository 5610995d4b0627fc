"""The patches of runner.kernelcosts, on stand-ins for ipykernel's objects (pure logic).

That a real runner kernel still shows everything with them is proved in
tests/test_cell_description.py and every test that runs a remote cell.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from runner import kernelcosts


class Stream:
    """The attributes of ipykernel's OutStream that say whether a flush has work to do."""

    def __init__(self) -> None:
        self._flush_pending = False
        self._subprocess_flush_pending = False
        self._buffers: defaultdict[Any, list[str]] = defaultdict(list)
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        self._flush_pending = False
        self._buffers = defaultdict(list)


def test_a_flush_with_nothing_pending_is_skipped_and_one_with_something_is_not():
    stream = Stream()
    assert kernelcosts.skip_idle_flush(stream)
    stream.flush()
    assert stream.flushes == 0
    stream._buffers["parent"].append("text")
    stream._flush_pending = True
    stream.flush()
    assert stream.flushes == 1
    stream._subprocess_flush_pending = True
    stream.flush()
    assert stream.flushes == 2


def test_a_stream_that_cannot_tell_is_left_alone():
    class Other:
        def flush(self) -> None:
            pass

    other = Other()
    assert not kernelcosts.skip_idle_flush(other)
    assert "flush" not in vars(other)


class Shell:
    autoawait = True

    def __init__(self) -> None:
        self.asked: list[str | None] = []

    def should_run_async(
        self, raw_cell: str, *, transformed_cell: str | None = None, preprocessing_exc_tuple=None
    ) -> bool:
        self.asked.append(transformed_cell)
        return "await" in (transformed_cell or raw_cell)


def test_the_async_check_is_answered_once_per_cell():
    shell = Shell()
    kernelcosts.remember_async_check(shell)
    assert shell.should_run_async("x = 1", transformed_cell="x = 1\n") is False
    assert shell.should_run_async("x = 1", transformed_cell="x = 1\n") is False
    assert shell.should_run_async("await f()", transformed_cell="await f()\n") is True
    assert shell.should_run_async("await f()", transformed_cell="await f()\n") is True
    assert shell.asked == ["x = 1\n", "await f()\n"]
    shell.autoawait = False  # IPython's own answer whenever it is off, or the transform failed
    shell.should_run_async("await f()", transformed_cell="await f()\n")
    shell.should_run_async("x", transformed_cell="x\n", preprocessing_exc_tuple=(None, None, None))
    assert len(shell.asked) == 4


class Kernel:
    def __init__(self) -> None:
        self.published: list[tuple[str, ...]] = []

    def _publish_status(self, status: str, channel: str, parent: Any = None) -> None:
        self.published.append(("status", status))

    def _publish_execute_input(self, code: str, parent: Any, execution_count: int) -> None:
        self.published.append(("execute_input", code))


def test_only_the_idle_status_is_published():
    kernel = Kernel()
    assert kernelcosts.publish_less(kernel)
    kernel._publish_status("busy", "shell", parent={})
    kernel._publish_execute_input("x = 1", {}, 3)
    kernel._publish_status("idle", "shell", parent={})
    kernel._publish_status("starting", "shell")
    assert kernel.published == [("status", "idle"), ("status", "starting")]
