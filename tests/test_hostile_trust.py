"""What a runner, or a runner at a mediator, must not be able to do to the people who use it.

Issue 11, items 2, 3 and 6: a runner is known at its mediator by its own
credential, and what it reports is checked; a notebook accepts back only what
its cell could have produced, and under ``--safe-results`` only inert output and
plain data of bounded size; kernels in ``--sandbox bwrap`` see nothing of other
sessions or of the runner's own state.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import pytest
from IPython.utils.capture import capture_output

from didomagic import api
from didomagic.protocol import Execute

from .conftest import rss
from .fake_runner import FakeRunner, Reply, pickled

# ------------------------------------------------------------------ item 3: what comes back


def _run(fake: FakeRunner, code: str, ns: dict[str, Any], safe: bool = False, **spec: Any) -> Any:
    pool = api.SessionPool()
    try:
        return api.run_cell(api.CellSpec(code, **spec), ns, runner=str(fake.url(safe)), pool=pool)
    finally:
        pool.close()


@pytest.mark.parametrize("safe", [False, True], ids=["normal", "safe-results"])
def test_a_runner_cannot_overwrite_or_delete_names_the_cell_never_touched(tmp_path, capsys, safe):
    def hostile(request: Execute, sent: dict[str, list[bytes]]) -> Reply:
        return Reply(
            values={"b": pickled(2), "untouched": pickled("overwritten by the runner")},
            deleted=("precious",),
        )

    ns: dict[str, Any] = {"a": 1, "untouched": "mine", "precious": [1, 2, 3]}
    with FakeRunner(tmp_path, hostile) as fake:
        _run(fake, "b = a + 1", ns, safe)
    assert ns["b"] == 2  # what the cell binds comes back
    assert ns["untouched"] == "mine" and ns["precious"] == [1, 2, 3]
    err = capsys.readouterr().err
    assert "'untouched'" in err and "'precious'" in err and "refused" in err, err


@pytest.mark.parametrize("name", ["__builtins__", "", "a.b", "__name__", "1x", "class"])
def test_a_runner_cannot_bind_dunder_or_invalid_names(tmp_path, capsys, name):
    def hostile(request: Execute, sent: dict[str, list[bytes]]) -> Reply:
        return Reply(values={name: pickled({"open": "evil"}), "b": pickled(7)})

    ns: dict[str, Any] = {"__builtins__": __builtins__}
    with FakeRunner(tmp_path, hostile) as fake:
        _run(fake, "b = 7", ns, pull=(name,) if name.isidentifier() else ())
    assert ns["b"] == 7
    if name == "__builtins__":
        assert ns["__builtins__"] is __builtins__
    else:
        assert name not in ns
    err = capsys.readouterr().err
    assert f"{name!r}" in err and "refused" in err, err


def test_names_the_cell_sent_and_pulled_names_may_come_back(tmp_path, capsys):
    def honest(request: Execute, sent: dict[str, list[bytes]]) -> Reply:
        items = pickle.loads(sent["items"][0])
        return Reply(values={"items": pickled([*items, 4]), "extra": pickled("pulled")})

    ns: dict[str, Any] = {"items": [1, 2, 3]}
    with FakeRunner(tmp_path, honest) as fake:
        _run(fake, "items.append(4)", ns, pull=("extra",))
    assert ns["items"] == [1, 2, 3, 4] and ns["extra"] == "pulled"
    assert "refused" not in capsys.readouterr().err


ACTIVE_OUTPUTS = [
    ("display_data", {"data": {"application/javascript": "alert(1)", "text/plain": "js"}}),
    (
        "display_data",
        {
            "data": {
                "text/html": "<b>bold</b><script>alert(2)</script>"
                '<img src="x.png" onerror="alert(3)"><a href="javascript:alert(4)">link</a>',
                "text/plain": "html",
            }
        },
    ),
    ("display_data", {"data": {"text/markdown": "*fine*", "image/png": "iVBORw0KGgo="}}),
    ("execute_result", {"data": {"text/html": "<iframe src='https://evil'></iframe><i>r</i>"}}),
]


def _published(cap: Any) -> list[dict[str, Any]]:
    return [dict(output.data) for output in cap.outputs]


def test_safe_results_republishes_only_inert_output(shell, ns, tmp_path):
    fake = FakeRunner(tmp_path, lambda r, s: Reply(outputs=ACTIVE_OUTPUTS))
    with fake, capture_output() as cap:
        shown = _run(fake, "pass", ns, safe=True)
    bundles = [*_published(cap), shown.data]
    text = repr(bundles)
    assert "application/javascript" not in text and "alert" not in text, text
    assert "<script" not in text and "onerror" not in text and "iframe" not in text, text
    assert bundles[0] == {"text/plain": "js"}
    assert "<b>bold</b>" in bundles[1]["text/html"]
    assert bundles[2] == {"text/markdown": "*fine*", "image/png": "iVBORw0KGgo="}
    assert "<i>r</i>" in shown.data["text/html"]
    assert "application/javascript" in cap.stderr and "--safe-results" in cap.stderr, cap.stderr


def test_without_safe_results_rich_output_is_republished_as_it_came(shell, ns, tmp_path):
    fake = FakeRunner(tmp_path, lambda r, s: Reply(outputs=ACTIVE_OUTPUTS[:1]))
    with fake, capture_output() as cap:
        _run(fake, "pass", ns)
    assert _published(cap)[0]["application/javascript"] == "alert(1)"


class _Call:
    """Pickles as ``fn(*args)``: what a hostile runner sends to make the client build something."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


GIB = 1 << 30
BOMBS = {
    "bytearray": _Call(bytearray, GIB),
    "set-of-range": _Call(set, range(1 << 24)),
    "numpy-bytes-scalar": _Call(np._core.multiarray.scalar, np.dtype(f"S{GIB}")),
    "numpy-empty-array": _Call(np._core.multiarray._reconstruct, np.ndarray, (GIB,), b"b"),
    "numpy-ndarray": _Call(np.ndarray, (GIB,), np.dtype(np.uint8)),
}


@pytest.mark.parametrize("kind", list(BOMBS))
def test_safe_results_caps_what_a_tiny_pickle_may_decode_to(tmp_path, capsys, kind):
    bomb = pickle.dumps(BOMBS[kind], protocol=5)
    assert len(bomb) < 200
    before = rss(os.getpid())
    ns: dict[str, Any] = {}
    with FakeRunner(tmp_path, lambda r, s: Reply(values={"x": [bomb], "y": pickled(1)})) as fake:
        _run(fake, "x = y = 1", ns, safe=True)
    assert "x" not in ns and ns["y"] == 1
    assert rss(os.getpid()) < before + (256 << 20)
    err = capsys.readouterr().err
    assert "'x' was not synced" in err and "decode" in err, err


def test_safe_results_still_takes_large_plain_data(tmp_path):
    array = np.arange(1 << 20, dtype=np.float64)  # 8 MiB in-band, and out of band
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(array, protocol=5, buffer_callback=buffers.append)
    out_of_band = [stream, *(bytes(b.raw()) for b in buffers)]
    reply = Reply(values={"inband": pickled(array), "oob": out_of_band, "blob": pickled(b"z" * 9)})
    ns: dict[str, Any] = {}
    with FakeRunner(tmp_path, lambda r, s: reply) as fake:
        _run(fake, "inband = oob = blob = 1", ns, safe=True)
    assert np.array_equal(ns["inband"], array) and np.array_equal(ns["oob"], array)
    assert ns["blob"] == b"z" * 9
