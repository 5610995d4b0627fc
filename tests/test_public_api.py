"""The public names stay importable."""

from __future__ import annotations

import didomagic
import didomagic.errors as errors


def test_every_public_name_exists():
    for name in didomagic.__all__:
        assert hasattr(didomagic, name), name


def test_every_error_is_a_didomagic_error_that_renders_as_one_paragraph():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert len(classes) >= 14
    for cls in classes:
        assert issubclass(cls, errors.DidomagicError), cls
    assert errors.CellTimeout("late")._render_traceback_() == ["CellTimeout: late"]
