"""Re-publishing a remote cell's outputs in the notebook, as if the cell ran here."""

from __future__ import annotations

import sys
from typing import Any

from IPython.display import clear_output, publish_display_data

from didomagic.inert import inert_bundle
from didomagic.protocol import Output


class RemoteResult:
    """The value of a remote cell's last expression, shown with the runner's rich reprs.

    Returned by ``%%remote`` so the notebook shows it as the cell's ``Out[n]``.
    """

    def __init__(self, data: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
        self.data = data
        self.metadata = metadata or {}

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        return self.data, self.metadata

    def __repr__(self) -> str:
        return str(self.data.get("text/plain", "<remote result>"))


def show(output: Output, safe: bool = False) -> RemoteResult | None:
    """Show one remote output here; return it instead when it is the cell's result.

    ``safe`` (``--safe-results``): rich outputs keep only their inert MIME
    types (see :mod:`didomagic.inert`); what was dropped is said in one line.
    """
    content = output.content
    if safe and output.msg_type in ("display_data", "update_display_data", "execute_result"):
        data, dropped = inert_bundle(content.get("data") or {})
        if dropped:
            print(
                f"didomagic: --safe-results dropped {', '.join(dropped)} from this output "
                "(it could run code in the notebook's front end)",
                file=sys.stderr,
            )
        metadata = {k: v for k, v in (content.get("metadata") or {}).items() if k in data}
        content = {**content, "data": data, "metadata": metadata}
    if output.msg_type == "stream":
        stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
        stream.write(content.get("text", ""))
        stream.flush()
    elif output.msg_type in ("display_data", "update_display_data"):
        publish_display_data(
            content.get("data", {}),
            content.get("metadata", {}),
            transient=content.get("transient") or None,
            update=output.msg_type == "update_display_data",
        )
    elif output.msg_type == "clear_output":
        clear_output(wait=bool(content.get("wait", False)))
    elif output.msg_type == "execute_result":
        return RemoteResult(content.get("data", {}), content.get("metadata", {}))
    return None
