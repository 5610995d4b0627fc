"""What a runner, or a runner at a mediator, must not be able to do to the people who use it.

Issue 11, items 2, 3 and 6: a runner is known at its mediator by its own
credential, and what it reports is checked; a notebook accepts back only what
its cell could have produced, and under ``--safe-results`` only inert output and
plain data of bounded size; kernels in ``--sandbox bwrap`` see nothing of other
sessions or of the runner's own state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from IPython.utils.capture import capture_output
from websockets.exceptions import ConnectionClosed

from didomagic import api
from didomagic.client import dial, query
from didomagic.errors import AuthenticationFailed, KernelDied
from didomagic.loop import background_loop
from didomagic.protocol import Error, Execute, Link, Load, Register, Registered, Role
from didomagic.urls import ConnectionURL
from runner import sandbox

from .conftest import (
    SECRETS,
    TIMEOUT,
    MediatorProcess,
    kernel_count,
    rss,
    skip_missing,
    start_mediator,
    wait_until,
)
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


@pytest.mark.parametrize(
    "evil",
    [
        "<script>alert(1)</script>",
        "<SCRIPT SRC=//evil/x.js></SCRIPT>",
        '<img src=x onerror="alert(1)">',
        '<a href=" jav&#x09;ascript:alert(1)">x</a>',
        "<svg><script>alert(1)</script></svg>",
        '<iframe srcdoc="<script>alert(1)</script>"></iframe>',
        "<style>body{display:none}</style>",
        '<div style="position:fixed;top:0">cover</div><form action=x><input></form>',
        "<!--<script>--><b onmouseover=alert(1)>b</b>",
        "<object data=x></object><embed src=x><math><mi>x</mi></math>",
    ],
)
def test_html_cleaning_leaves_no_active_part(evil):
    from didomagic.inert import clean_html

    cleaned, removed = clean_html(evil)
    assert removed
    lowered = cleaned.lower()
    for active in (
        "<script",
        "onerror",
        "onmouseover",
        "javascript",
        "<iframe",
        "<style",
        "style=",
    ):
        assert active not in lowered, cleaned
    for active in ("<form", "<object", "<embed", "<svg", "<math", "<input"):
        assert active not in lowered, cleaned


@pytest.mark.parametrize(
    ("mime", "evil"),
    [
        ("text/markdown", "[x](javascript:alert(1))"),
        ("text/markdown", "[x](j&#97;vascript:alert(1))"),
        ("text/markdown", "[x](java\tscript:alert(1))"),
        ("text/markdown", "<img/src=x/onerror=alert(1)>"),
        ("text/markdown", "<script>alert(1)</script>"),
        ("image/svg+xml", "<svg><script>alert(1)</script></svg>"),
        ("image/svg+xml", "<svg onload='alert(1)'></svg>"),
        ("image/svg+xml", '<svg><a href="javascript:alert(1)"><text>x</text></a></svg>'),
        ("image/svg+xml", "<svg><foreignObject><iframe/></foreignObject></svg>"),
    ],
)
def test_active_markdown_and_svg_are_dropped(mime, evil):
    from didomagic.inert import inert_bundle

    kept, dropped = inert_bundle({mime: evil, "text/plain": "plain"})
    assert kept == {"text/plain": "plain"} and dropped == [mime]


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


# ------------------------------------------------------------------ item 2: who a runner is

HEARTBEAT = "0.3"


def add_runner(mediator: MediatorProcess, name: str) -> str:
    """Issue ``name`` its own credential at ``mediator``; return the runner URL printed."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "runner", "mediator", "add-runner", name),
            *("--state-dir", str(mediator.state_dir), "--port", str(mediator.port)),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip()
    SECRETS.add(ConnectionURL.parse(url).token)  # it must never reach a log either
    return url


def pool_of(mediator: MediatorProcess) -> dict[str, dict[str, Any]]:
    """The mediator's listing, by runner name."""
    info, _ = background_loop().run(query(ConnectionURL.parse(mediator.url)))
    return {d["name"]: d for d in info.runners}


def description(name: str, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """A runner description that looks inviting (many free slots), with ``changes``."""
    return {"name": name, "tags": ["gpu"], "sessions": 0, "max_sessions": 64, **(changes or {})}


class FakeLink:
    """A runner's link to a mediator, spoken by hand: register, then whatever the test sends."""

    def __init__(self, url: str) -> None:
        self.url = ConnectionURL.parse(url)
        self.ws: Any = None
        self.link = Link(Role.RUNNER)

    def register(self, runner: dict[str, Any], id: str = "fake-runner-id") -> Any:
        """Send a registration; return the mediator's answer (Registered or Error)."""

        async def go() -> Any:
            self.ws = await dial(self.url, "register")
            await self.ws.send(self.link.send(Register(id, runner, float(HEARTBEAT))))
            return self.link.receive(await self.ws.recv())

        return background_loop().run(go())

    def report(self, load: dict[str, Any]) -> Any:
        """Send a load report; return what the mediator answers before it closes the link."""

        async def go() -> Any:
            await self.ws.send(self.link.send(Load(load)))
            try:
                return self.link.receive(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
            except ConnectionClosed:
                return None

        return background_loop().run(go())

    def frames_left(self) -> list[str]:
        """Every frame the mediator sent after its answer, until it closed the link."""

        async def go() -> list[str]:
            frames = []
            with contextlib.suppress(ConnectionClosed):
                async for frame in self.ws:
                    frames.append(frame)
            return frames

        return background_loop().run(go())


def _cell_where(url: str) -> str:
    pool = api.SessionPool()
    try:
        ns: dict[str, Any] = {}
        api.run_cell(
            api.CellSpec("import os\nwhere = os.environ['DIDOMAGIC_RUNNER_NAME']"),
            ns,
            runner=url,
            pool=pool,
        )
        return str(ns["where"])
    finally:
        pool.close()


def test_an_impostor_holding_another_runners_credential_is_refused_and_gets_no_cell(
    tmp_path, runner_factory
):
    mediator = start_mediator(tmp_path / "mediator")
    try:
        # Before alpha had a credential, someone took its name with the shared token.
        squatter = FakeLink(mediator.runner_url)
        assert isinstance(squatter.register(description("alpha"), id="squatter"), Registered)
        alpha_url, beta_url = add_runner(mediator, "alpha"), add_runner(mediator, "beta")
        runner_factory("--mediator", alpha_url, "--heartbeat", HEARTBEAT, name="alpha")
        wait_until(lambda: pool_of(mediator).get("alpha", {}).get("status") == "up", "alpha")
        assert squatter.frames_left() == []  # its link was closed, with no cell sent
        impostors = []
        for url, complaint in (
            (beta_url, "this runner credential is for runner 'beta'"),
            (mediator.runner_url, "'alpha' has a credential of its own"),
        ):
            impostor = FakeLink(url)
            answer = impostor.register(description("alpha"), id=f"impostor{len(impostors)}")
            assert isinstance(answer, Error) and complaint in answer.message, answer
            impostors.append(impostor)
        assert mediator.log.count("refused a registration") == 2, mediator.log
        for _ in range(3):  # the impostors' many free slots lure nothing
            assert _cell_where(mediator.url) == "alpha"
        for impostor in impostors:
            assert impostor.frames_left() == []  # no dial, no cell, no value
        info, _ = background_loop().run(query(ConnectionURL.parse(mediator.url)))
        assert [d["name"] for d in info.runners] == ["alpha"]  # the squatter is forgotten
        assert info.runners[0]["identity"] == "verified: credential of alpha"
        # A real runner started with beta's credential under alpha's name is told why.
        misnamed = runner_factory("--mediator", beta_url, "--heartbeat", HEARTBEAT, name="alpha")
        wait_until(lambda: "refused this runner" in misnamed.log, "the refusal in its log")
        assert "this runner credential is for runner 'beta'" in misnamed.log
        assert list(pool_of(mediator)) == ["alpha"]
        assert _cell_where(mediator.url) == "alpha"
    finally:
        assert mediator.stop() == 0, mediator.log


def test_without_the_shared_token_only_runners_with_their_own_credential_join(tmp_path):
    mediator = start_mediator(tmp_path / "mediator", "--no-shared-runner-token")
    try:
        with pytest.raises(AuthenticationFailed):
            FakeLink(mediator.runner_url).register(description("anyone"))
        own = FakeLink(add_runner(mediator, "own"))
        assert isinstance(own.register(description("own")), Registered)
        assert pool_of(mediator)["own"]["identity"] == "verified: credential of own"
    finally:
        assert mediator.stop() == 0, mediator.log


BAD_REPORTS = {
    "sessions-many": {"sessions": "many"},
    "negative": {"sessions": -1},
    "huge-count": {"max_sessions": 10**30},
    "huge-name": {"name": "n" * 100_000},
    "huge-tag-list": {"tags": ["t"] * 100_000},
    "tags-not-a-list": {"tags": "gpu"},
    "memory-text": {"memory_total": "lots"},
    "gpus-not-objects": {"gpus": ["A100"]},
    "rename": {"name": "someone-else"},
    "huge-extra-field": {"extra": "x" * 100_000},
}


def test_bad_descriptions_are_refused_and_other_runners_work_at_once(tmp_path, runner_factory):
    mediator = start_mediator(tmp_path / "mediator")
    try:
        runner_factory("--mediator", mediator.runner_url, "--heartbeat", HEARTBEAT, name="good")
        wait_until(lambda: pool_of(mediator).get("good", {}).get("status") == "up", "good")
        for case, change in BAD_REPORTS.items():
            bad = FakeLink(mediator.runner_url)
            answer = bad.register(description(f"bad-{case}"), id=f"bad-{case}")
            assert isinstance(answer, Registered), (case, answer)
            refusal = bad.report(description(f"bad-{case}", change))
            assert isinstance(refusal, Error) and "load report" in refusal.message, (case, refusal)
            listing = pool_of(mediator)  # at once: no wait for anything to expire
            assert listing["good"]["status"] == "up", (case, listing)
            assert listing[f"bad-{case}"]["status"] == "down", (case, listing)
            assert _cell_where(mediator.url) == "good", case
        for case, change in BAD_REPORTS.items():  # the same fields in a registration
            if case == "rename":
                continue
            answer = FakeLink(mediator.runner_url).register(description("again", change))
            assert isinstance(answer, Error) and "invalid registration" in answer.message, case
        assert _cell_where(mediator.url) == "good"
    finally:
        assert mediator.stop() == 0, mediator.log


def test_the_runner_listing_shows_the_identity_each_runner_proved(
    shell, tmp_path, runner_factory, private_config
):
    mediator = start_mediator(tmp_path / "mediator")
    try:
        alpha_url = add_runner(mediator, "alpha")
        runner_factory("--mediator", alpha_url, "--heartbeat", HEARTBEAT, name="alpha")
        runner_factory("--mediator", mediator.runner_url, "--heartbeat", HEARTBEAT, name="legacy")
        direct = runner_factory(name="direct")
        wait_until(lambda: len(pool_of(mediator)) == 2, "both runners at the mediator")
        private_config.unlink(missing_ok=True)
        with capture_output():
            shell.run_line_magic("runners", f"add {mediator.url} --name pool")
            shell.run_line_magic("runners", f"add {direct.url} --name direct")
        with capture_output() as cap:
            shell.run_line_magic("runners", "--text")
        rows = {line.split()[0]: line for line in cap.stdout.splitlines()[1:] if line.strip()}
        fingerprint = ConnectionURL.parse(direct.url).fingerprint
        assert "IDENTITY" in cap.stdout.splitlines()[0]
        assert "verified: credential of alpha" in rows["alpha"], cap.stdout
        assert "unverified (shared runner token)" in rows["legacy"], cap.stdout
        assert f"pinned certificate {fingerprint[:16]}" in rows["direct"], cap.stdout
    finally:
        private_config.unlink(missing_ok=True)
        assert mediator.stop() == 0, mediator.log


# ------------------------------------------------------------------ item 6: what a kernel sees


class Notebook:
    """One notebook's session on a runner: runs cells, returns the names they bind."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pool = api.SessionPool()

    def cell(self, code: str, **values: Any) -> dict[str, Any]:
        ns: dict[str, Any] = dict(values)
        api.run_cell(api.CellSpec(code), ns, runner=self.url, pool=self.pool)
        return ns

    def close(self) -> None:
        self.pool.close()


WHO_AM_I = (
    "import os\nfrom ipykernel.kernelapp import IPKernelApp\n"
    "kernel_file = IPKernelApp.instance().connection_file\n"
    "private = os.path.dirname(kernel_file)\n"
)

BIG = b"v" * (2 << 20)  # large enough to be kept in the session's value cache


def _work_dirs(pid: int) -> list[Path]:
    return [
        *Path("/dev/shm").glob(f"didomagic-runner-{pid}-*"),
        *Path(tempfile.gettempdir()).glob(f"didomagic-runner-{pid}-*"),
    ]


def test_without_bwrap_no_kernel_connection_file_stays_on_disk_and_the_limits_are_said(
    runner_factory,
):
    runner = runner_factory("--warm-kernels", "2")
    other = Notebook(runner.url)
    try:
        me = other.cell(WHO_AM_I)
        wait_until(lambda: "kernel" in runner.log and kernel_count(runner.process.pid) >= 3, "warm")
        found = [p for root in _work_dirs(runner.process.pid) for p in root.rglob("kernel.json")]
        assert found == [], found  # no key to sign messages to any kernel lies on disk
        assert not os.path.exists(me["kernel_file"])
    finally:
        other.close()
    report = subprocess.run(
        [sys.executable, "-m", "runner", "--check-sandbox"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "isolation between sessions: NONE without --sandbox bwrap" in report, report
    assert "Use --sandbox bwrap" in report


def test_a_bwrap_boxed_cell_sees_no_other_session_no_other_kernel_and_no_runner_state(
    runner_factory,
):
    if sandbox.probe_bwrap() is not None:
        skip_missing(f"no bubblewrap: {sandbox.probe_bwrap()}")
    # A state directory inside the environment the box shows read-only: it must still be hidden.
    state = Path(tempfile.mkdtemp(dir=sys.prefix, prefix="didomagic-test-state-"))
    try:
        runner = runner_factory(
            "--sandbox", "bwrap", "--state-dir", str(state), "--warm-kernels", "2"
        )
        victim, attacker = Notebook(runner.url), Notebook(runner.url)
        try:
            # The victim's session holds a large value in its cache (it reaches a boxed kernel).
            held = victim.cell(WHO_AM_I + "n = len(big)", big=BIG)
            assert held["n"] == len(BIG)
            caches = [p for root in _work_dirs(runner.process.pid) for p in root.rglob("*.bin")]
            assert len(caches) == 1, caches
            assert (state / "token").exists()
            secrets_of_others = {
                "cache": str(caches[0]),
                "cache_dir": str(caches[0].parent),
                "kernel_dir": held["private"],
                "kernel_file": held["kernel_file"],
                "state": str(state / "token"),
            }
            seen = attacker.cell(
                WHO_AM_I + "paths = " + repr(secrets_of_others) + "\n"
                "seen = {k: os.path.exists(p) for k, p in paths.items()}\n"
                "neighbours = sorted(os.listdir(os.path.dirname(private)))\n"
                "mine = os.path.basename(private)\n"
            )
            assert not any(seen["seen"].values()), seen["seen"]
            assert seen["neighbours"] == [seen["mine"], seen["mine"] + "-cache"], seen
            assert victim.cell("again = len(big)", big=BIG)["again"] == len(BIG)  # from cache
        finally:
            victim.close()
            attacker.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_a_sessions_cached_values_outlive_its_kernel(runner_factory):
    runner = runner_factory()
    notebook = Notebook(runner.url)
    try:
        assert notebook.cell("n = len(big)", big=BIG)["n"] == len(BIG)
        with pytest.raises(KernelDied):
            notebook.cell("import os\nos._exit(1)")
        # The client still counts on the runner holding `big`: it sends only its digest.
        assert notebook.cell("again = len(big)", big=BIG)["again"] == len(BIG)
    finally:
        notebook.close()
