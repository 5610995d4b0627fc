"""A cell's description reaches the runner's agent inside its own execute_request.

The runner sends what a cell needs (its values, the names to fetch, the
notebook's execution count) in the request's metadata; these tests prove,
through a real runner and kernel, that every cell gets its own description and
no other: cells in a row under one notebook request, a ``run_cell`` nested in a
remote cell, a cell after its kernel died, a cell after a reattach. They also
check what the agent takes out of ipykernel's per-cell work (a flush with
nothing pending, a repeated compile) changes nothing a cell shows.
"""

from __future__ import annotations

import numpy as np
from IPython.utils.capture import capture_output

from didomagic import api, serialize
from didomagic.errors import KernelDied
from didomagic.protocol import Execute, Output, Status
from didomagic.session import RemoteSession
from didomagic.urls import ConnectionURL


def remote(shell, url: str, cell: str):  # type: ignore[no-untyped-def]
    with capture_output() as cap:
        result = shell.run_cell(f"%%remote --runner {url}\n{cell}")
    return result, cap


def test_cells_under_one_notebook_request_each_get_their_own_values(module_runner):
    """Cells sent from one notebook cell share its request id (and a client may reuse a
    cell id); each still loads its own values."""
    session = RemoteSession(ConnectionURL.parse(module_runner.url))
    try:
        for n in range(3):
            packed = serialize.pack("n", n)
            result, buffers = session.execute(
                Execute("same", "twice = n * 2", (packed.header,), ("twice",), parent="shared-id"),
                [packed.parts],
                lambda output: None,
            )
            assert result.status is Status.OK, result.error
            values = dict(zip((v.name for v in result.values), buffers, strict=True))
            assert serialize.unpack([bytes(p) for p in values["twice"]]) == n * 2
    finally:
        session.close()


def test_a_run_cell_nested_in_a_remote_cell_leaves_the_cells_values_alone(shell, ns, module_runner):
    ns["a"] = np.arange(3)
    result, cap = remote(
        shell,
        module_runner.url,
        "get_ipython().run_cell('inner = 5')\n"
        "a += inner\n"  # in place: comes back though the cell never rebinds it
        "outer = int(a.sum())",
    )
    assert result.success, cap.stdout + cap.stderr
    assert ns["outer"] == 3 + 3 * 5
    assert list(ns["a"]) == [5, 6, 7]
    result, _ = remote(shell, module_runner.url, "again = outer + 1")
    assert result.success and ns["again"] == 19


def test_the_notebooks_count_numbers_the_remote_traceback(module_runner):
    session = RemoteSession(ConnectionURL.parse(module_runner.url))
    try:
        for count in (17, 4):  # once per cell, whatever the kernel counted itself
            result, _ = session.execute(Execute(f"e{count}", "1 / 0", count=count), [], print)
            assert result.status is Status.ERROR
            assert f"In[{count}]" in "".join(result.error["traceback"]), result.error
    finally:
        session.close()


def test_a_cell_after_its_kernel_died_gets_its_description(shell, ns, module_runner):
    remote(shell, module_runner.url, "before = 1")
    result, _ = remote(shell, module_runner.url, "import os\nos._exit(1)")
    assert isinstance(result.error_in_exec, KernelDied)
    ns["sent"] = [1, 2, 3]
    result, cap = remote(shell, module_runner.url, "got = sum(sent)")
    assert result.success, cap.stdout + cap.stderr
    assert ns["got"] == 6


def test_a_cell_after_a_reattach_gets_its_description(module_runner):
    first = RemoteSession(ConnectionURL.parse(module_runner.url))
    try:
        packed = serialize.pack("k", 7)
        first.execute(Execute("c1", "kept = k", (packed.header,)), [packed.parts], lambda o: None)
        ticket = first.ticket
        assert ticket is not None
        first.detach()
        again = RemoteSession(ConnectionURL.parse(module_runner.url), ticket=ticket)
        packed = serialize.pack("m", 35)
        assert again.resume(lambda o: None) is None
        result, buffers = again.execute(
            Execute("c2", "total = kept + m", (packed.header,), ("total",)),
            [packed.parts],
            lambda o: None,
        )
        assert result.status is Status.OK, result.error
        assert serialize.unpack([bytes(p) for p in buffers[0]]) == 42
        again.close()
    finally:
        first.close()


def test_output_at_the_end_of_a_cell_arrives_before_its_result(module_runner):
    """Nothing printed is lost now that a flush with nothing pending is skipped."""
    session = RemoteSession(ConnectionURL.parse(module_runner.url))
    shown: list[Output] = []
    try:
        for n in range(5):
            code = (
                f"import sys\nprint('out{n}', end='')\nprint('err{n}', end='', file=sys.stderr)"
                if n % 2 == 0
                else f"x{n} = {n}"  # nothing printed: the next cell's output is still its own
            )
            result, _ = session.execute(Execute(f"p{n}", code), [], shown.append)
            assert result.status is Status.OK
            text = "".join(o.content.get("text", "") for o in shown if o.cell == f"p{n}")
            assert text == ("" if n % 2 else f"out{n}err{n}"), text
    finally:
        session.close()


def test_top_level_await_still_runs_after_plain_cells(shell, ns, module_runner):
    code = "import asyncio\nawait asyncio.sleep(0)\nawaited = 'yes'"
    for _ in range(2):  # the same cell twice, with a plain cell between
        result, cap = remote(shell, module_runner.url, code)
        assert result.success, cap.stdout + cap.stderr
        assert ns.pop("awaited") == "yes"
        result, _ = remote(shell, module_runner.url, "plain = 1")
        assert result.success


def test_a_local_run_of_a_remote_session_api_cell(module_runner):
    """The API without a notebook (no request id at all) gets its values too."""
    there: dict[str, object] = {"base": 40}
    pool = api.SessionPool()
    try:
        api.run_cell(api.CellSpec("answer = base + 2"), there, runner=module_runner.url, pool=pool)
    finally:
        pool.close()
    assert there["answer"] == 42
