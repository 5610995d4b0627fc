"""A remote cell behaves like the local one: changes in place, live globals, error names.

Real runner processes, real kernels, through the magic.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from IPython.utils.capture import capture_output

from didomagic.errors import RemoteError
from runner.errortext import cell_error

from .test_remote import remote

MODEL = """
import numpy as np
from IPython.utils.capture import capture_output
class Model:
    '''A scikit-learn-style estimator defined in the notebook.'''
    def __init__(self):
        self.coef_ = None
    def fit(self, X, y):
        self.coef_ = np.linalg.lstsq(X, y, rcond=None)[0]
        return self
    def predict(self, X):
        return X @ self.coef_
rng = np.random.default_rng(0)
X = rng.normal(size=(200, 3))
y = X @ np.array([1.0, -2.0, 0.5])
m = Model()
"""


def last_cell_line(runner) -> tuple[int, int, int]:
    """``(values in, held, out)`` of the runner's last cell, from its log."""
    found = re.findall(r"\((\d+) values in, (\d+) held, (\d+) out\)", runner.log)
    assert found, runner.log[-2000:]
    values_in, held, out = found[-1]
    return int(values_in), int(held), int(out)


def test_fit_in_place_comes_back_and_the_runner_keeps_its_newer_copy(shell, ns, module_runner):
    shell.run_cell(MODEL)
    result, cap = remote(shell, module_runner.url, "m.fit(X, y)\nfitted_id = id(m)")
    assert result.success, cap.stdout + cap.stderr
    assert np.allclose(ns["m"].coef_, [1.0, -2.0, 0.5])  # the change in place came back
    assert last_cell_line(module_runner)[2] == 2  # fitted_id, and m changed in place

    local = shell.run_cell("local_prediction = m.predict(X[:2])")  # a local cell reads it
    assert local.success

    result, cap = remote(shell, module_runner.url, "same = id(m) == fitted_id\np = m.predict(X)")
    assert result.success, cap.stdout + cap.stderr
    assert ns["same"] is True  # the runner's object was not overwritten by the notebook's copy
    assert np.allclose(ns["p"], ns["y"])
    values_in, held, _ = last_cell_line(module_runner)
    # m and X unchanged: not sent again; the int fitted_id is (and the file bundle, if it
    # has news for the kernel)
    assert held == 2 and 1 <= values_in <= 2

    shell.run_cell("m.coef_ = m.coef_ * 0")  # changed in the notebook since: it is sent
    result, cap = remote(shell, module_runner.url, "zero = float(abs(m.predict(X)).sum())")
    assert result.success, cap.stdout + cap.stderr
    assert ns["zero"] == 0.0
    values_in, held, _ = last_cell_line(module_runner)
    assert held == 1 and 1 <= values_in <= 2  # m (and maybe the file bundle) sent, X held


def test_items_append_in_remote_and_local_cells(shell, ns, module_runner):
    shell.run_cell("items = [1, 2]")
    assert remote(shell, module_runner.url, "items.append(3)")[0].success
    assert ns["items"] == [1, 2, 3]
    assert remote(shell, module_runner.url, "items.append(4)")[0].success
    assert ns["items"] == [1, 2, 3, 4]  # the runner kept its [1, 2, 3]: no stale copy came over
    shell.run_cell("items.append(5)")
    assert remote(shell, module_runner.url, "items.append(6)")[0].success
    assert ns["items"] == [1, 2, 3, 4, 5, 6]


def test_a_change_in_place_before_an_exception_comes_back(shell, ns, module_runner):
    shell.run_cell("counts = {'a': 1}")
    result, _ = remote(shell, module_runner.url, "counts['b'] = 2\n1 / 0")
    assert isinstance(result.error_in_exec, RemoteError)
    assert ns["counts"] == {"a": 1, "b": 2}  # as a local run would leave it


def test_a_pmf_style_incr_comes_back(shell, ns, module_runner):
    shell.run_cell(
        "class Pmf(dict):\n"
        "    def Incr(self, x, term=1):\n"
        "        self[x] = self.get(x, 0) + term\n"
        "pmf = Pmf({1: 0.5})\n"
    )
    assert remote(shell, module_runner.url, "pmf.Incr(2, 0.2)")[0].success
    assert ns["pmf"] == {1: 0.5, 2: 0.2} and type(ns["pmf"]).__name__ == "Pmf"


def test_a_by_value_class_sees_the_live_namespace_on_both_sides(shell, ns, module_runner):
    shell.run_cell(
        "class Report:\n"
        "    def frame(self):\n"
        "        return eval('df1')\n"
        "    def later(self):\n"
        "        return defined_after_the_class\n"
    )
    assert remote(shell, module_runner.url, "df1 = [1, 2, 3]")[0].success
    result, cap = remote(
        shell,
        module_runner.url,
        "defined_after_the_class = 'late'\n"
        "got, late = Report().frame(), Report().later()\n"
        "class Seen:\n"
        "    def frame(self):\n"
        "        return eval('df1')\n"
        "seen = Seen()\n",
    )
    assert result.success, cap.stdout + cap.stderr
    assert ns["got"] == [1, 2, 3] and ns["late"] == "late"
    shell.run_cell("df1 = 'the notebook now'")
    back = shell.run_cell("seen.frame()")  # a class born on the runner, back in the notebook
    assert back.success and back.result == "the notebook now"


def test_a_by_value_function_still_carries_the_globals_it_names(shell, ns, module_runner):
    shell.run_cell("scale = 3\ndef times(v):\n    return v * scale\n")
    result, cap = remote(shell, module_runner.url, "out = times(2)")
    assert result.success, cap.stdout + cap.stderr
    assert ns["out"] == 6
    shell.run_cell("scale = 5")
    assert remote(shell, module_runner.url, "out = times(2)")[0].success
    assert ns["out"] == 10  # the notebook's current global, not the runner's older one


def test_an_error_while_displaying_names_the_real_exception(shell, ns, module_runner):
    result, cap = remote(
        shell,
        module_runner.url,
        "class Shown:\n    def _repr_html_(self):\n        raise ValueError('bad html')\nShown()",
    )
    error = result.error_in_exec
    assert isinstance(error, RemoteError), cap.stdout
    assert (error.ename, error.evalue) == ("ValueError", "bad html")
    assert "NoneType" not in cap.stdout and "RemoteError: ValueError: bad html" in cap.stdout


def test_an_exception_raised_without_a_traceback_is_named(shell, ns, module_runner):
    result, cap = remote(shell, module_runner.url, "raise KeyError('k').with_traceback(None)")
    error = result.error_in_exec
    assert isinstance(error, RemoteError)
    assert error.ename == "KeyError" and "NoneType" not in cap.stdout


@pytest.mark.parametrize(
    ("reply", "published", "expected"),
    [
        (  # the reply names nothing; the error the kernel showed does
            {"ename": "NoneType", "evalue": "None", "traceback": []},
            {"ename": "ValueError", "evalue": "bad", "traceback": ["tb"]},
            ("ValueError", "bad", ["tb"]),
        ),
        (  # nothing published: the traceback's last line names it (colours stripped)
            {
                "ename": "NoneType",
                "evalue": "None",
                "traceback": ["x", "\x1b[31mOSError\x1b[39m: disk"],
            },
            None,
            ("OSError", "disk", ["x", "\x1b[31mOSError\x1b[39m: disk"]),
        ),
        (  # no traceback at all, no name: still a name and a message, never NoneType
            {"status": "error"},
            None,
            ("CellFailed", "the kernel reported a failure without naming an exception", []),
        ),
        (  # a named error stays as it is
            {"ename": "KeyError", "evalue": "'k'", "traceback": []},
            None,
            ("KeyError", "'k'", []),
        ),
    ],
)
def test_cell_error_always_names_an_error(reply, published, expected):
    error = cell_error(reply, published)
    assert (error["ename"], error["evalue"], error["traceback"]) == expected


def test_local_mode_brings_changes_in_place_back_too(shell, ns):
    shell.run_cell("log = []")
    with capture_output():
        result = shell.run_cell("%%remote --local\nlog.append('ran')")
    assert result.success
    assert ns["log"] == ["ran"]


def test_held_versions_never_send_an_older_copy_over_a_newer_one():
    from didomagic import serialize
    from didomagic.versions import HeldVersions

    notebook = {"a": [1], "b": [2], "n": 3}
    held = HeldVersions()

    def cell() -> tuple[list[str], tuple[str, ...]]:
        packed, _ = serialize.pack_names(notebook, sorted(notebook))
        versions = held.of(notebook, packed)
        assert "n" not in versions  # a scalar is just sent
        values, _, names = held.hold(
            [p.header for p in packed], [p.parts for p in packed], versions
        )
        return [v.name for v in values], names

    assert cell() == (["a", "b", "n"], ())
    # the runner changed b in place; it could not be unpacked here: its copy is newer
    held.after_cell(notebook, [("b", ())], {}, {"b": "could not be unpickled"}, ())
    assert cell() == (["n"], ("a", "b"))
    held.after_cell(notebook, [], {"a": "could not be read"}, {}, ())  # a failed to load there
    notebook["b"].append(3)  # changed in the notebook since: sent
    assert cell() == (["a", "b", "n"], ())
