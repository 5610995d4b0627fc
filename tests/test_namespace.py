"""Which names a cell reads before binding, binds and deletes: the hard cases."""

from __future__ import annotations

import pytest

from didomagic.namespace import analyze_cell, analyze_source


def names(cell: str) -> tuple[set[str], set[str], set[str]]:
    found = analyze_cell(cell)
    return set(found.reads), set(found.writes), set(found.deletes)


@pytest.mark.parametrize(
    ("cell", "reads", "writes"),
    [
        ("y = x + 1", {"x"}, {"y"}),
        ("x = 1\ny = x", set(), {"x", "y"}),
        ("print(u); u = 2; print(u)", {"print", "u"}, {"u"}),  # read before, then after
        ("x += 1", {"x"}, {"x"}),
        ("x: int = v", {"int", "v"}, {"x"}),
        ("x: int", {"int"}, set()),  # an annotation alone binds nothing
        ("a, (b, *c) = t", {"t"}, {"a", "b", "c"}),
        ("for i in items:\n    total = total + i", {"items", "total"}, {"i", "total"}),
        ("with open(p) as fh:\n    s = fh.read()", {"open", "p"}, {"fh", "s"}),
        ("try:\n    f()\nexcept E as e:\n    m = e", {"f", "E"}, {"e", "m"}),
        ("if (n := len(seq)) > 2:\n    pass", {"len", "seq"}, {"n"}),
        ("import numpy as np, os.path\nfrom a import b as c", set(), {"np", "os", "c"}),
        ("z = [v * k for v in data]", {"data", "k"}, {"z"}),  # v is the comprehension's own
        ("z = {k: w for k in ks for w in k}", {"ks"}, {"z"}),
        ("[w2 := k for k in ks]", {"ks"}, {"w2"}),  # a walrus binds outside the comprehension
        ("def f(a):\n    return a + g\nout = f(1)", {"g"}, {"f", "out"}),
        ("def f():\n    return g\ng = 1", {"g"}, {"f", "g"}),  # g used later: still sent
        ("g = 1\ndef f():\n    return g", set(), {"g", "f"}),
        (
            "def outer():\n    v = 1\n    def inner():\n        return v + G\n    return inner",
            {"G"},
            {"outer"},
        ),
        ("def setg():\n    global G\n    G = H", {"H"}, {"setg", "G"}),
        (
            "class C(Base):\n    k = K\n    def m(self):\n        return w",
            {"Base", "K", "w"},
            {"C"},
        ),
        ("@deco\ndef f(x=D) -> R:\n    pass", {"deco", "D", "R"}, {"f"}),
        ("f = lambda t=D: t + E", {"D", "E"}, {"f"}),
        (
            "match p:\n    case {'k': v, **rest}:\n        pass\n    case [a, *more]:\n"
            "        pass",
            {"p"},
            {"v", "rest", "a", "more"},
        ),
    ],
)
def test_reads_and_writes(cell, reads, writes):
    got_reads, got_writes, _ = names(cell)
    assert got_reads == reads
    assert got_writes == writes


def test_del_needs_the_name_and_deletes_it():
    reads, writes, deletes = names("del q\nr = 1")
    assert reads == {"q"} and deletes == {"q"} and writes == {"r"}
    reads, _, deletes = names("q = 1\ndel q")
    assert "q" not in reads and deletes == {"q"}


@pytest.mark.parametrize(
    ("cell", "reads", "writes"),
    [
        ("!ls {path}", {"path"}, set()),
        ("files = !ls $d", {"d"}, {"files"}),
        ("%time r = compute(a)", {"compute", "a"}, {"r"}),
        ("%%time\nq = p + 1", {"p"}, {"q"}),
        ("x = 1;", set(), {"x"}),
        ("y = x\nx?", {"x"}, {"y"}),
    ],
)
def test_ipython_syntax_is_analysed_as_it_will_run(cell, reads, writes):
    got_reads, got_writes, _ = names(cell)
    assert got_reads - {"get_ipython"} == reads
    assert got_writes == writes


def test_a_cell_that_does_not_parse_moves_nothing():
    assert names("x = = 1") == (set(), set(), set())


def test_a_cell_too_deep_to_analyse_says_what_to_do():
    from didomagic.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="--no-sync --push"):
        analyze_source("total = " + " + ".join(f"v{i}" for i in range(5000)))
