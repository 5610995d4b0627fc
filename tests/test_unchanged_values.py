"""An unchanged value is not sent again, and a change in place on either side always travels.

Through the magic, against real runners started three ways: the runner
kernel's clean-page check on (``/proc/self/pagemap``), off
(``DIDOMAGIC_PAGEMAP=off``: every value read is hashed after the cell), and
given a pagemap that lies (``/dev/zero``: every page would read clean, so the
probe must turn the check off, or the changes below go unnoticed).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
import pytest

from runner import sandbox
from tests.conftest import RunnerProcess, skip_missing, start_runner

from .test_remote import remote

SIZE = 64 * 2**20  # one byte each, 64 MB: large enough to be cached and held
POSITIONS = [0, SIZE // 2, SIZE - 1]

MODES = {"pagemap": None, "off": "off", "lying": "/dev/zero"}

ON_SIDE = (
    "agent = next(f.__self__ for f in get_ipython().events.callbacks['post_run_cell'] "
    "if type(getattr(f, '__self__', None)).__name__ == 'Agent')\n"
    "fast = agent._mapped.flags is not None\n"
    "del agent"
)
"""A remote cell that says whether the kernel's agent uses the clean-page check."""


@pytest.fixture(scope="module", params=list(MODES))
def runner(request, tmp_path_factory) -> Iterator[RunnerProcess]:
    """A runner whose kernels check clean pages, hash everything, or are handed a lying pagemap."""
    path = MODES[request.param]
    env = {} if path is None else {"DIDOMAGIC_PAGEMAP": path}
    process = start_runner(tmp_path_factory.mktemp(request.param), "--max-sessions", "4", env=env)
    yield process
    assert process.stop() == 0, process.log


@pytest.fixture
def fast(request, runner) -> bool:
    """Whether this runner's kernels should use the clean-page check."""
    return request.node.callspec.params["runner"] == "pagemap"


def run(shell, runner: RunnerProcess, code: str) -> tuple[int, int, int]:
    """Run ``code`` remotely; return ``(values in, held, out)`` from the runner's log."""
    result, cap = remote(shell, runner.url, code)
    assert result.success, cap.stdout + cap.stderr
    found = re.findall(r"\((\d+) values in, (\d+) held, (\d+) out\)", runner.log)
    assert found, runner.log[-2000:]
    values_in, held, out = found[-1]
    return int(values_in), int(held), int(out)


def start(shell, ns, runner: RunnerProcess, fast: bool) -> None:
    """A fresh array sent once; check the agent's clean-page check is on where it should be."""
    ns["a"] = np.zeros(SIZE, dtype=np.uint8)
    run(shell, runner, ON_SIDE + "\nn = a.nbytes")
    assert ns["fast"] is fast
    assert ns["n"] == SIZE


@pytest.mark.parametrize("position", POSITIONS, ids=["start", "middle", "end"])
def test_a_change_in_place_in_the_notebook_is_sent_again(shell, ns, runner, fast, position):
    start(shell, ns, runner, fast)
    _, held, _ = run(shell, runner, "n = a.nbytes")
    assert held >= 1  # unchanged: a stays on the runner
    ns["a"][position] ^= 1  # one byte, changed in the notebook between two cells
    values_in, _, _ = run(shell, runner, f"v = int(a[{position}])")
    assert ns["v"] == 1 and values_in >= 1  # a travelled again


WRITES = {
    "one byte": "a[{p}] = 7",
    "through a slice": "view = a[{p}:]\nview[0] = 7\ndel view",
    "np.copyto": "np.copyto(a[{p}:{p} + 1], np.full(1, 7, np.uint8))",
    "through a second name": "alias = a\nalias[{p}] = 7\ndel alias",
}


CHANGES = [
    *(("one byte", position) for position in POSITIONS),
    *((write, SIZE // 2) for write in list(WRITES)[1:]),
]


@pytest.mark.parametrize(("write", "position"), CHANGES)
def test_a_change_in_place_on_the_runner_comes_back(shell, ns, runner, fast, write, position):
    start(shell, ns, runner, fast)
    run(shell, runner, "import numpy as np")
    before = ns["a"]
    run(shell, runner, WRITES[write].format(p=position))
    assert ns["a"] is not before and ns["a"][position] == 7
    assert int(ns["a"].sum()) == 7  # only that byte changed
    _, held, out = run(shell, runner, "n = a.nbytes")  # the runner's copy is the notebook's
    assert held >= 1 and out == 1  # a held, and not sent back: only n


def test_a_change_to_one_of_several_buffers_of_a_value_comes_back(shell, ns, runner, fast):
    start(shell, ns, runner, fast)
    ns["d"] = {"x": np.zeros(SIZE // 2, np.uint8), "y": np.zeros(SIZE // 2, np.uint8)}
    run(shell, runner, "n = len(d)")
    _, held, out = run(shell, runner, "n = len(d)")
    assert held >= 1 and out == 1
    run(shell, runner, "d['y'][-1] = 3")
    assert ns["d"]["y"][-1] == 3 and int(ns["d"]["x"].sum()) == 0


def test_every_later_change_on_the_runner_is_noticed_too(shell, ns, runner, fast):
    start(shell, ns, runner, fast)
    for step, position in enumerate([SIZE // 2, SIZE // 2, 0, SIZE - 1], start=1):
        run(shell, runner, f"a[{position}] = {step}")  # the same page twice, then others
        assert ns["a"][position] == step
        _, held, out = run(shell, runner, "n = a.nbytes")
        assert held >= 1 and out == 1  # unchanged since: a stays put
    assert ns["a"][[0, SIZE // 2, SIZE - 1]].tolist() == [3, 2, 4]
    ns["a"][1] = 9  # and the notebook's own change after all that still travels
    run(shell, runner, "v = int(a[1]) + int(a[0])")
    assert ns["v"] == 12


def test_a_value_rebound_on_either_side_behaves_as_before(shell, ns, runner, fast):
    start(shell, ns, runner, fast)
    run(shell, runner, "a = a[:10].copy()\na[0] = 5")  # rebound remotely: comes back
    assert ns["a"].tolist() == [5] + [0] * 9
    ns["a"] = np.ones(SIZE, dtype=np.uint8)  # rebound in the notebook: sent
    run(shell, runner, "s = int(a.sum())")
    assert ns["s"] == SIZE
    _, held, out = run(shell, runner, "s = int(a.sum())")
    assert held >= 1 and out == 1


def test_two_names_with_the_same_bytes_stay_two_arrays(shell, ns, runner, fast):
    ns["a"] = np.zeros(SIZE, dtype=np.uint8)
    ns["b"] = ns["a"].copy()  # equal bytes: the runner keeps one file for both
    run(shell, runner, "import numpy as np\nn = a.nbytes + b.nbytes")
    run(shell, runner, "a[0] = 1")
    assert ns["a"][0] == 1 and ns["b"][0] == 0
    run(shell, runner, "c = int(b[0])\nd = int(a[0])")
    assert (ns["c"], ns["d"]) == (0, 1)


def test_a_kernel_in_a_bwrap_box_checks_clean_pages_too(shell, ns, runner_factory):
    host = sandbox.probe()
    if host.bwrap is not None:
        skip_missing(f"no bubblewrap: {host.bwrap}")
    boxed = runner_factory("--sandbox", "bwrap")  # its own /proc: the pagemap is there
    start(shell, ns, boxed, fast=True)
    run(shell, boxed, "a[5] = 7")
    assert ns["a"][5] == 7
    _, held, out = run(shell, boxed, "n = a.nbytes")
    assert held >= 1 and out == 1
