"""The content-addressed cache of large values in a runner session, through the magic."""

from __future__ import annotations

import numpy as np
from IPython.utils.capture import capture_output

from didomagic.api import CACHE_MIN, RemoteSession
from didomagic.progress import NoProgress
from didomagic.protocol import Execute
from didomagic.serialize import pack_names
from didomagic.urls import ConnectionURL

BIG = 4 * CACHE_MIN // 8  # float64 elements: well over the cache threshold


def sent_bytes(session: RemoteSession, namespace: dict, code: str, fetch=()) -> tuple[int, dict]:
    packed, _ = pack_names(namespace, list(namespace))
    from didomagic.api import _header

    request = Execute("c", code, tuple(_header(p) for p in packed), tuple(fetch))
    progress = NoProgress()  # counts the value bytes that went out
    result, buffers = session.execute(request, [p.parts for p in packed], lambda o: None, progress)
    assert result.status.value == "ok", result.error
    back = {}
    from didomagic.serialize import unpack_into

    unpack_into(back, [(v.name, b) for v, b in zip(result.values, buffers, strict=True)])
    return progress.sent, back


def test_an_unchanged_value_is_not_sent_again_and_a_changed_one_is(module_runner):
    session = RemoteSession(ConnectionURL.parse(module_runner.url))
    a = np.arange(BIG, dtype=np.float64)
    first, _ = sent_bytes(session, {"a": a}, "s = float(a.sum())")
    assert first >= a.nbytes
    again, back = sent_bytes(session, {"a": a}, "s = float(a.sum())", ["s"])
    assert again == 0 and back["s"] == float(a.sum())
    a[7] = -1.0  # changed in place, same size: must travel again
    changed, back = sent_bytes(session, {"a": a}, "s = float(a.sum())", ["s"])
    assert changed >= a.nbytes and back["s"] == float(a.sum())
    session.close()


def test_remote_changes_never_leak_into_the_cached_copy(module_runner):
    session = RemoteSession(ConnectionURL.parse(module_runner.url))
    a = np.zeros(BIG)
    sent_bytes(session, {"a": a}, "a[0] = 99.0")  # the cell changes its copy
    sent, back = sent_bytes(session, {"a": a}, "first = float(a[0])", ["first"])
    assert sent == 0 and back["first"] == 0.0  # the notebook's value, not the mutated one
    session.close()


def test_the_same_bytes_under_two_names_and_a_new_session(module_runner):
    url = ConnectionURL.parse(module_runner.url)
    session = RemoteSession(url)
    a = np.ones(BIG)
    b = a.copy()
    sent, back = sent_bytes(session, {"a": a, "b": b}, "ok = bool((a == b).all())", ["ok"])
    assert sent >= a.nbytes + b.nbytes and back["ok"]
    b[1] = 5.0
    sent, back = sent_bytes(session, {"a": a, "b": b}, "x = float(b[1] - a[1])", ["x"])
    assert a.nbytes <= sent < 2 * a.nbytes and back["x"] == 4.0  # only b went
    session.close()
    fresh = RemoteSession(url)  # a new remote session holds nothing: everything travels
    sent, back = sent_bytes(fresh, {"a": a}, "n = a.size", ["n"])
    assert sent >= a.nbytes and back["n"] == BIG
    fresh.close()


def test_the_magic_reuses_the_cache_and_read_only_arrays_stay_read_only(shell, ns, module_runner):
    ns["a"] = np.ones(BIG)
    ns["frozen"] = np.ones(BIG)
    ns["frozen"].flags.writeable = False
    for _ in range(2):
        with capture_output():
            result = shell.run_cell(
                f"%%remote --runner {module_runner.url}\n"
                "total = float(a.sum())\nwritable = frozen.flags.writeable\nback = frozen"
            )
        assert result.success, result.error_in_exec
        assert ns["total"] == BIG
    assert not ns["back"].flags.writeable  # as the user had it
    assert ns["writable"] is False
