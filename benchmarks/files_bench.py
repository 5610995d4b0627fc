"""Reading a notebook's local file on the runner: the first read, and an unchanged re-read.

The file lives in a temporary project folder on the notebook side; the
runner has none of it. The first read fetches it over the session's request
channel into the runner's mirror of the project; a re-read in a later cell
finds it there, unchanged, and nothing travels.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench import Measure, _mb, _rates


def file_read_measures(shell: Any, url: str, size: int, reps: int = 3) -> list[Measure]:
    """MB/s of ``open(name, 'rb').read()`` in a remote cell, first and unchanged re-read."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="didomagic-bench-files-") as tmp:
        project = Path(tmp)
        (project / ".git").mkdir()
        os.chdir(project)
        try:

            def read(name: str) -> float:
                started = time.perf_counter()
                result = shell.run_cell(
                    f"%%remote --runner {url} --files-limit 4G\n"
                    f"n = len(open({name!r}, 'rb').read())"
                )
                if not result.success or shell.user_ns.get("n") != size:
                    raise RuntimeError(f"bench file read failed: {result.error_in_exec}")
                return time.perf_counter() - started

            first, again = [], []
            for rep in range(reps):
                name = f"data-{rep}.bin"
                (project / name).write_bytes(os.urandom(size))
                first.append(read(name))
                again.append(read(name))
        finally:
            os.chdir(here)
    what = f"didomagic: {_mb(size)} local file"
    return [
        Measure(f"{what}, first read on the runner", "MB/s", _rates(size, first)),
        Measure(f"{what}, unchanged re-read", "MB/s", _rates(size, again)),
    ]
