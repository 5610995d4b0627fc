"""The documentation covers every flag and trait, and its links to the repository resolve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from didomagic.magics import RemoteMagics

from .conftest import TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def documentation() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))


def subcommands() -> list[str]:
    """The commands ``didomagic-runner`` dispatches on (its first word), besides serving."""
    source = (ROOT / "runner" / "cli.py").read_text()
    return sorted(set(re.findall(r'argv\[:1\] == \["([\w-]+)"\]', source)))


def flags(command: list[str]) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-m", "runner", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", done.stdout)) - {"--help"}


@pytest.mark.parametrize("command", [[], *([c] for c in subcommands())], ids=str)
def test_every_flag_of_the_command_line_is_documented(command):
    text = documentation()
    missing = sorted(
        f for f in flags(command) if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text)
    )
    where = " ".join(["didomagic-runner", *command])
    assert not missing, f"{where}: flags not documented in docs/: {missing}"


def test_there_are_subcommands_to_check():
    assert {"mediator", "gen-cert", "gen-client-cert"} <= set(subcommands())


def test_every_remote_magics_trait_is_documented():
    text = documentation()
    traits = RemoteMagics.class_trait_names(config=True)
    assert traits
    missing = sorted(t for t in traits if f"`{t}`" not in text)
    assert not missing, f"RemoteMagics traits not documented in docs/: {missing}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize(
    "page", [ROOT / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name
)
def test_links_to_repository_files_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web address or an anchor on the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"
