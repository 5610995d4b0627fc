"""The benchmark suite cannot rot: its quick mode runs end to end, and every bar has its row.

Behaviour only, never timings: which rows and bars the table and the JSON
have, not what they measure.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench, features, localcode, relay
from benchmarks.bench import GROUPS, Measure, main, meets, ratios, show

from .conftest import TIMEOUT

ROOT = Path(__file__).resolve().parent.parent

ISSUE_BARS = [
    (r"^trivial cell / ipyparallel view\.execute$", "<= 1.2"),
    (r"^didomagic: \S+ \S+ array into a cell / ipyparallel push$", ">= 2"),
    (r"^didomagic: \S+ \S+ array returned / ipyparallel pull$", ">= 2"),
    (r"^didomagic: \S+ \S+ array into a cell / raw blocking TLS socket$", ">= 0.75"),
    (r"^didomagic: \S+ \S+ array returned / raw blocking TLS socket$", ">= 0.75"),
    (r"^didomagic: re-run with the \S+ \S+ input unchanged - trivial cell \(ms\)$", "<= 50"),
    (r"^1,000 small variables - trivial cell \(ms\)$", "<= 30"),
    (r"^relay: trivial cell, mediator / direct$", "<= 1.3"),
    (r"^relay: \S+ \S+ array into a cell, mediator / direct$", ">= 0.8"),
    (r"^relay: \S+ \S+ array returned, mediator / direct$", ">= 0.8"),
    (r"^unused packages: trivial cell, on - off \(ms\)$", "<= 3"),
    (r"^unused local modules: trivial cell, on - off \(ms\)$", "<= 3"),
    (r"^unused file reads: notebook-side work per cell \(ms\)$", "<= 3"),
    (r"^unused widgets: notebook-side work per cell \(ms\)$", "<= 3"),
    (r"^later cell, 50 local modules unchanged - trivial cell, no modules \(ms\)$", "<= 3"),
    (r"^widget updates per second, remote / local kernel$", "-"),
    (r"^remote widget updates that reached the notebook \(fraction\)$", ">= 1"),
    (r"^new session, cached package set - no packages \(ms\)$", "<= 100"),
    (r"^mediator pick a runner, p99 \(ms\)$", "< 10"),
]
"""Every bar of issue 16 (and the suite's older ones), as the table names it."""


def _missing(bars: list[tuple[str, str]]) -> list[str]:
    return [
        f"{pattern} {bar}"
        for pattern, bar in ISSUE_BARS
        if not any(re.search(pattern, what) and b == bar for what, b in bars)
    ]


def _made_up() -> list[Measure]:
    """One row of every kind the suite makes, with invented values (seconds, MB/s)."""
    ms, rate = "ms", "MB/s"
    rows = [
        ("baseline: jupyter_client execute round trip", ms, 0.005),
        ("baseline: ipyparallel view.execute round trip", ms, 0.004),
        ("baseline: ipyparallel push 1 GB", rate, 500.0),
        ("baseline: ipyparallel pull 1 GB", rate, 500.0),
        ("baseline: raw TLS websocket, 1 GB in 1 MiB messages", rate, 500.0),
        ("baseline: raw blocking TLS socket, 1 GB in 1 MiB writes", rate, 1300.0),
        ("didomagic: trivial warm %%remote cell (x = 1)", ms, 0.006),
        ("didomagic: first cell of a new session (warm pool)", ms, 0.04),
        ("didomagic: 1 GB array into a cell", rate, 1100.0),
        ("didomagic: re-run with the 1 GB input unchanged", ms, 0.05),
        ("didomagic: 1 GB array returned", rate, 900.0),
        ("didomagic: a cell reading 1,000 small variables", ms, 0.03),
        (f"{relay.TRIVIAL}, {relay.RELAYED}", ms, 0.008),
        (f"{relay.TRIVIAL}, {relay.DIRECT}", ms, 0.006),
        (f"relay: 1 GB {relay.INTO}, {relay.RELAYED}", rate, 800.0),
        (f"relay: 1 GB {relay.INTO}, {relay.DIRECT}", rate, 1000.0),
        (f"relay: 1 GB {relay.BACK}, {relay.RELAYED}", rate, 700.0),
        (f"relay: 1 GB {relay.BACK}, {relay.DIRECT}", rate, 1000.0),
        (localcode.TRIVIAL, ms, 0.006),
        (localcode.UNCHANGED, ms, 0.007),
        (localcode.CHECK, ms, 0.0005),
        (features.PACKAGES_ON, ms, 0.006),
        (features.PACKAGES_OFF, ms, 0.006),
        (features.CODE_ON, ms, 0.006),
        (features.CODE_OFF, ms, 0.005),
        (features.FILES_WORK, ms, 0.0002),
        (features.WIDGETS_WORK, ms, 0.00003),
        (features.REMOTE_RATE, "msgs/s", 1000.0),
        (features.LOCAL_RATE, "msgs/s", 2000.0),
        (features.REMOTE_ARRIVED, "fraction", 1.0),
        (features.LOCAL_ARRIVED, "fraction", 1.0),
        ("didomagic: new session, no packages (package runner)", ms, 0.04),
        ("didomagic: new session, cached set of 3 packages", ms, 0.05),
        ("didomagic: cold build of 3 small wheels (local uv cache)", ms, 0.2),
        ("mediator: pick a runner (500 runners, 5000 sessions waiting)", ms, 0.002),
        ("mediator: registration storm of 500 runners", "s", 1.0),
    ]
    return [Measure(name, unit, [value]) for name, unit, value in rows]


def test_ratios_of_a_full_run_have_every_bar_and_the_table_shows_them():
    measures = _made_up()
    bars = ratios(measures)
    assert _missing([(what, bar) for what, _, bar in bars]) == []
    by = {what: value for what, value, _ in bars}
    assert by["relay: trivial cell, mediator / direct"] == pytest.approx(0.008 / 0.006)
    assert by["relay: 1 GB array returned, mediator / direct"] == pytest.approx(0.7)
    assert by["unused local modules: trivial cell, on - off (ms)"] == pytest.approx(1.0)
    assert by["unused widgets: notebook-side work per cell (ms)"] == pytest.approx(0.03)
    table = show(measures, bars)
    for what, _, bar in bars:
        assert re.search(rf"^{re.escape(what)} +\S+  {re.escape(bar)}( |$)", table, re.M), what
    row = next(line for line in table.splitlines() if line.startswith("relay: trivial cell"))
    assert row.endswith("<= 1.3   NO")  # 1.33: the table says the bar is missed


def test_a_group_left_out_leaves_out_its_bars_only():
    measures = [m for m in _made_up() if not m.name.startswith("relay: ")]
    whats = [what for what, _, _ in ratios(measures)]
    assert not any(w.startswith("relay: ") for w in whats)
    assert "trivial cell / ipyparallel view.execute" in whats


def test_meets_reads_each_kind_of_bar():
    assert meets(1.2, "<= 1.2") is True
    assert meets(1.21, "<= 1.2") is False
    assert meets(0.8, ">= 0.8") is True
    assert meets(9.9, "< 10") is True
    assert meets(10.0, "< 10") is False
    assert meets(3.0, "-") is None


def test_only_refuses_an_unknown_group(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--only", "relay,nonsense"])
    assert exited.value.code == 2
    assert "unknown group nonsense" in capsys.readouterr().err
    assert "relay" in GROUPS and "mediator" in GROUPS


def test_a_failing_group_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def run_group(group, dm, quick, failures):
        if group == "cells":
            raise RuntimeError("the runner went away")
        failures["relay: one part"] = "could not be measured"
        return [Measure(f"{relay.TRIVIAL}, {relay.DIRECT}", "ms", [0.006])]

    monkeypatch.setattr(bench, "run_group", run_group)
    out = tmp_path / "results.json"
    assert main(["--only", "cells,relay", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["failures"] == {
        "cells": "RuntimeError: the runner went away",
        "relay: one part": "could not be measured",
    }
    assert [m["name"] for m in report["measures"]] == [f"{relay.TRIVIAL}, {relay.DIRECT}"]
    assert "NOT MEASURED: cells: RuntimeError: the runner went away" in capsys.readouterr().out


def test_quick_benchmark_measures_everything_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20 * TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == {}
    names = {m["name"] for m in report["measures"]}
    for expected in (
        "baseline: jupyter_client execute round trip",
        "baseline: ipyparallel view.execute round trip",
        "didomagic: trivial warm %%remote cell (x = 1)",
        "didomagic: first cell of a new session (warm pool)",
        "didomagic: a cell reading 1,000 small variables",
        "didomagic: first cell, embedded runner from nothing",
        "didomagic: new session, cached set of 3 packages",
        "didomagic: cold build of 3 small wheels (local uv cache)",
        features.REMOTE_RATE,
        features.LOCAL_RATE,
    ):
        assert expected in names, expected
    assert any(n.startswith("baseline: raw blocking TLS socket") for n in names)
    assert any(n.startswith("mediator: pick a runner (20 runners") for n in names)
    assert all(m["median"] > 0 for m in report["measures"])
    bars = [(r["what"], r["bar"]) for r in report["ratios"]]
    assert _missing(bars) == []
    assert all(r["met"] in (True, False, None) for r in report["ratios"])
    assert set(report["machine"]["groups"]) == set(GROUPS)
    for what, _ in bars:  # the printed table has every row of the JSON
        assert what in done.stdout, what


def test_the_unchanged_input_a_b_runs_end_to_end():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.unchanged_ab", "--size", "4e6", "--rounds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "check on" in done.stdout and "check off" in done.stdout
