"""The benchmark suite's quick mode runs end to end, so the suite cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_measures_everything_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
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
    ):
        assert expected in names, expected
    assert any(n.startswith("baseline: raw blocking TLS socket") for n in names)
    assert any(n.startswith("mediator: pick a runner (20 runners") for n in names)
    assert all(m["median"] > 0 for m in report["measures"])
    bars = {r["what"] for r in report["ratios"]}
    assert "trivial cell / ipyparallel view.execute" in bars
    assert "trivial cell / ipyparallel view.execute" in done.stdout  # the printed table


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
