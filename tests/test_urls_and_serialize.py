"""Connection URLs and value packing (pure logic)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from didomagic import serialize
from didomagic.errors import ConfigurationError
from didomagic.urls import ConnectionURL

FP = "ab" * 32


def test_url_round_trips_and_hides_the_token():
    url = ConnectionURL.parse(f"wss://127.0.0.1:4940/#fp={FP}&token=s3cret")
    assert (url.host, url.port, url.token, url.fingerprint) == ("127.0.0.1", 4940, "s3cret", FP)
    assert ConnectionURL.parse(str(url)) == url
    assert "s3cret" not in repr(url) and "s3cret" not in url.redacted()
    assert "s3cret" not in url.websocket_uri and FP not in url.websocket_uri


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (f"ws://h:1/#fp={FP}&token=t", "wss://"),
        ("wss://h/#token=t", "host and a port"),
        (f"wss://h:1/#fp={FP}", "no token"),
        ("wss://h:1/#fp=xyz&token=t", "not a SHA-256"),
        ("wss://h:99999/#token=t", "Not a connection URL"),
    ],
)
def test_bad_urls_say_what_is_wrong(text, complaint):
    with pytest.raises(ConfigurationError, match=complaint):
        ConnectionURL.parse(text)


def test_arrays_travel_out_of_band_and_come_back_equal(tmp_path):
    array = np.arange(1_000_000, dtype=np.float64)
    packed = serialize.pack("a", array)
    assert len(packed.parts) == 2 and packed.parts[1].nbytes == array.nbytes
    assert packed.parts[0].nbytes < 1000  # the array is not inside the pickle stream
    path = tmp_path / "a.bin"
    assert serialize.write_values(path, [packed.parts]) == [0]
    back = serialize.unpack(serialize.read_file(path, packed.header.sizes))
    assert np.array_equal(back, array) and back.flags.writeable


def test_many_values_share_one_file_and_come_back_by_offset(tmp_path):
    values = {f"v{i}": list(range(i)) for i in range(50)}
    packed, _ = serialize.pack_names(values, list(values))
    path = tmp_path / "many.bin"
    offsets = serialize.write_values(path, [p.parts for p in packed])
    view = serialize.map_file(path)
    back = {
        p.name: serialize.unpack(serialize.slice_parts(view, offset, p.header.sizes))
        for p, offset in zip(packed, offsets, strict=True)
    }
    assert back == values
    with pytest.raises(ValueError, match="expected at least"):
        serialize.slice_parts(view, offsets[-1], [10**6])


def test_one_bad_name_does_not_stop_the_others():
    ns = {"ok": 1, "lock": threading.Lock(), "f": lambda x: x + ok}  # noqa: F821
    packed, failures = serialize.pack_names(ns, ["ok", "lock", "f", "missing"])
    assert [p.name for p in packed] == ["ok", "f"]
    assert set(failures) == {"lock"} and "could not be pickled" in failures["lock"]
    target: dict[str, object] = {}
    bad = [("broken", [memoryview(b"not a pickle")])]
    failures = serialize.unpack_into(target, [(p.name, p.parts) for p in packed] + bad)
    assert target["ok"] == 1 and set(failures) == {"broken"}


def test_after_an_exception_only_rebound_names_return():
    value = object()
    ns = {"kept": value, "changed": 1}
    before = serialize.snapshot(ns, ["kept", "changed", "new", "gone"])
    ns["changed"], ns["new"] = 2, 3
    assert serialize.names_to_return(ns, before, succeeded=False) == ["changed", "new"]
    assert serialize.names_to_return(ns, before, succeeded=True) == ["kept", "changed", "new"]
