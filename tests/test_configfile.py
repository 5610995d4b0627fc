"""``--config FILE`` and ``--print-config`` of the real command line."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from didomagic.client import query
from didomagic.loop import background_loop
from didomagic.urls import ConnectionURL

from .conftest import TIMEOUT


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_runner_started_from_a_file_alone_serves_as_configured(runner_factory, tmp_path):
    config = write(
        tmp_path / "runner.toml",
        'tags = ["gpu", "a100"]\nmax-sessions = 3\nmax_queue = 2\nwarm-kernels = 0\n',
    )
    runner = runner_factory("--config", str(config), name="from-file")
    info, _ = background_loop().run(query(ConnectionURL.parse(runner.url)))
    described = info.runners[0]
    assert described["tags"] == ["gpu", "a100"]
    assert (described["max_sessions"], described["max_queue"]) == (3, 2)


def test_the_command_line_wins_over_the_file(tmp_path):
    config = write(tmp_path / "c.toml", 'max-sessions = 3\ntags = ["cpu"]\n')
    done = cli("--config", str(config), "--max-sessions", "5", "--print-config")
    assert done.returncode == 0, done.stderr
    effective = tomllib.loads(done.stdout)
    assert effective["max-sessions"] == 5 and effective["tags"] == ["cpu"]


def test_print_config_redacts_tokens_and_is_a_valid_config(tmp_path):
    mediator = "wss://127.0.0.1:4941/#fp=" + "ab" * 32 + "&token=the-runner-secret"
    done = cli(
        "--token",
        "client-secret",
        "--admin-token",
        "admin-secret",
        "--mediator",
        mediator,
        "--print-config",
    )
    assert done.returncode == 0, done.stderr
    for secret in ("client-secret", "admin-secret", "the-runner-secret"):
        assert secret not in done.stdout
    effective = tomllib.loads(done.stdout)
    assert effective["token"] == "<redacted>"
    again = cli("--config", str(write(tmp_path / "round.toml", done.stdout)), "--print-config")
    assert again.returncode == 0, again.stderr  # what it prints is itself a valid file


def test_unknown_keys_are_named(tmp_path):
    config = write(tmp_path / "bad.toml", "max_sesions = 2\nbogus = true\nport = 0\n")
    done = cli("--config", str(config))
    assert done.returncode == 2
    assert "unknown keys 'max_sesions', 'bogus'" in done.stderr
    mediator = cli("mediator", "--config", str(write(tmp_path / "m.toml", "tags = ['x']\n")))
    assert mediator.returncode == 2 and "unknown key 'tags'" in mediator.stderr


def test_bad_values_say_which_key_and_why(tmp_path):
    cases = {
        'max-sessions = "many"\n': "max-sessions",
        "max-sessions = 0\n": "must be at least 1",
        'no-network = "yes"\n': "'no-network' is a switch",
        "port = [1, 2\n": "is not valid TOML",
    }
    for text, expected in cases.items():
        done = cli("--config", str(write(tmp_path / "v.toml", text)), "--print-config")
        assert done.returncode == 2 and expected in done.stderr, (text, done.stderr)
    missing = cli("--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
