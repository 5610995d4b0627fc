"""Tiny wheels written directly as zip files, for the package tests and benchmark.

A wheel is a zip with the package's files, a ``.dist-info`` directory holding
``METADATA``, ``WHEEL`` and a ``RECORD`` that lists every file with its hash.
Writing one takes a millisecond, so tests build their own offline index.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def write_wheel(
    folder: Path,
    name: str,
    version: str,
    files: Mapping[str, str] | None = None,
    requires: Iterable[str] = (),
) -> Path:
    """Write ``name-version-py3-none-any.whl`` into ``folder``; return its path.

    ``files`` maps paths inside the wheel to their text (default: a package
    ``name`` whose ``__version__`` is ``version``); ``requires`` are its
    dependencies (``Requires-Dist``).
    """
    module = name.replace("-", "_")
    if files is None:
        files = {f"{module}/__init__.py": f"__version__ = {version!r}\n"}
    info = f"{module}-{version}.dist-info"
    metadata = "".join(
        [
            "Metadata-Version: 2.1\n",
            f"Name: {name}\n",
            f"Version: {version}\n",
            *(f"Requires-Dist: {r}\n" for r in requires),
        ]
    )
    wheel = (
        "Wheel-Version: 1.0\nGenerator: didomagic-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    entries = {**files, f"{info}/METADATA": metadata, f"{info}/WHEEL": wheel}
    record = [
        f"{path},{_record_hash(text.encode())},{len(text.encode())}"
        for path, text in entries.items()
    ]
    record.append(f"{info}/RECORD,,")
    entries[f"{info}/RECORD"] = "\n".join(record) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for inner, text in entries.items():
            zf.writestr(inner, text)
    return path
