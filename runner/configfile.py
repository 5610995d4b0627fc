"""``--config FILE``: a runner's or mediator's flags from a TOML file, and ``--print-config``.

Servers are started from service units and job scripts, where a file is
easier to keep than a long command line. Every long flag has a key: its name
without the leading dashes, with dashes or underscores (``max-sessions = 4``
or ``max_sessions = 4``). Values are TOML's own types: a number, a string, a
boolean for a switch, a list for a comma-separated flag (``tags = ["gpu",
"a100"]``) or a repeatable one. Flags given on the command line win over the
file. A key that is no flag is an error that names it, so a typo never goes
unnoticed.

The file becomes command-line words placed before the real ones, so each value
is parsed and checked by the very ``type=`` function its flag has.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SECRET_KEYS = frozenset({"token", "runner_token", "admin_token"})
"""Flags whose values ``--print-config`` never shows."""

_NOT_KEYS = frozenset({"help", "config", "print_config"})
"""Flags that make no sense in a file."""


class ConfigFileError(ValueError):
    """The configuration file cannot be used; the message says which key or line and why."""


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and ``--print-config`` to a server's parser."""
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="read flags from this TOML file (keys are flag names: max-sessions = 4, "
        'tags = ["gpu"]); flags on the command line win; an unknown key is an error',
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration (file and flags together) as TOML, "
        "tokens redacted, and exit",
    )


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv`` with the file ``--config`` names (if any) underneath it."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--config", type=Path, default=None)
    known, _ = probe.parse_known_args(list(argv))
    if known.config is None:
        return parser.parse_args(list(argv))
    try:
        words = config_words(parser, load(known.config))
    except ConfigFileError as exc:
        parser.error(f"--config {known.config}: {exc}")
    return parser.parse_args([*words, *argv])


def load(path: Path) -> dict[str, Any]:
    """The TOML table in ``path``; raise :class:`ConfigFileError` with the reason."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError("no such file") from None
    except OSError as exc:
        raise ConfigFileError(f"cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"is not valid TOML: {exc}") from None


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each long option's action, by its key (the dest)."""
    return {
        action.dest: action
        for action in parser._actions
        if action.dest not in _NOT_KEYS and any(o.startswith("--") for o in action.option_strings)
    }


def config_words(parser: argparse.ArgumentParser, table: dict[str, Any]) -> list[str]:
    """Command-line words equivalent to ``table``; raise on an unknown key or a bad value."""
    flags = _flags(parser)
    unknown = [key for key in table if key.replace("-", "_") not in flags]
    if unknown:
        raise ConfigFileError(
            "unknown key"
            + ("s " if len(unknown) > 1 else " ")
            + ", ".join(map(repr, unknown))
            + "; keys are the flags of --help without the dashes (e.g. max-sessions)"
        )
    words: list[str] = []
    for key, value in table.items():
        action = flags[key.replace("-", "_")]
        option = next(o for o in action.option_strings if o.startswith("--"))
        words += _words(key, option, action, value)
    return words


def _words(key: str, option: str, action: argparse.Action, value: Any) -> list[str]:
    if action.nargs == 0:  # a switch: store_true and its kin
        if not isinstance(value, bool):
            raise ConfigFileError(f"{key!r} is a switch: give true or false, not {value!r}")
        return [option] if value else []
    if isinstance(value, dict):
        raise ConfigFileError(f"{key!r} takes a value, not a table")
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        return [w for item in items for w in (option, _text(key, item))]
    if isinstance(value, list):
        return [option, ",".join(_text(key, item) for item in value)]
    return [option, _text(key, value)]


def _text(key: str, value: Any) -> str:
    if isinstance(value, bool | dict | list):
        raise ConfigFileError(f"{key!r}: {value!r} is not a plain value")
    return str(value)


def render(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The effective configuration as TOML (a valid ``--config`` file), secrets redacted."""
    lines = []
    for dest in _flags(parser):
        value = getattr(args, dest, None)
        key = dest.replace("_", "-")
        if value is None:
            lines.append(f"# {key} is not set")
        elif dest in SECRET_KEYS:
            lines.append(f'{key} = "<redacted>"')
        elif hasattr(value, "redacted"):  # a connection URL carries a token
            lines.append(f"{key} = {_toml(value.redacted())}")
        else:
            lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
