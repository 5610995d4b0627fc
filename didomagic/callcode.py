"""The code a remote function call runs, shared by :mod:`didomagic.calls` and jobs.

A call travels as one value, ``(fn, args, kwargs)``, and a small cell that
calls it and keeps the outcome under :data:`RESULT_NAME` until it travels
back; :func:`unwrap` turns that outcome into the return value or the raised
exception here.
"""

from __future__ import annotations

from typing import Any

from didomagic import serialize
from didomagic.errors import ConfigurationError

CALL = "__didomagic_call__"
"""The remote name the ``(fn, args, kwargs)`` value of a call travels under."""
RESULT_NAME = "__didomagic_out__"
"""The remote name a call's outcome is kept under until it travels back."""
FN = "__didomagic_fn__"
"""The remote name a map's function stays bound under for its later calls."""


def call_code(with_function: bool) -> str:
    """The cell that makes one call remotely and keeps its outcome in ``__didomagic_out__``.

    With ``with_function`` the sent tuple carries the function too (and it stays
    bound in the session, so later calls of a map send only their arguments).
    """
    function = f"{FN}, " if with_function else ""
    return f"""\
globals().pop({RESULT_NAME!r}, None)
{function}__didomagic_args__, __didomagic_kwargs__ = {CALL}
del {CALL}
try:
    {RESULT_NAME} = (True, {FN}(*__didomagic_args__, **__didomagic_kwargs__))
except Exception as __didomagic_error__:
    import traceback as __didomagic_tb__
    {RESULT_NAME} = (False, __didomagic_error__, __didomagic_tb__.format_exc())
    del __didomagic_tb__
    raise  # the cell fails too, so a detached job ends "failed"
finally:
    del __didomagic_args__, __didomagic_kwargs__
"""


CALL_CODE = call_code(with_function=True)
MAP_CODE = call_code(with_function=False)


def pack_call(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[serialize.Packed]:
    """Pack one call as the value :data:`CALL`; raise if it cannot be pickled."""
    packed, failures = serialize.pack_names({CALL: (fn, args, kwargs)}, [CALL])
    if failures:
        raise ConfigurationError(
            f"The function or its arguments cannot be sent: {failures[CALL]}. Everything a "
            "remote call needs must be picklable with cloudpickle."
        )
    return packed


def unwrap(out: tuple[Any, ...], runner: str) -> Any:
    """A remote call's return value, or raise its exception with the remote traceback noted."""
    if out[0]:
        return out[1]
    exc, remote_tb = out[1], out[2]
    exc.add_note(f"Remote traceback (runner {runner}):\n{remote_tb.rstrip()}")
    raise exc
