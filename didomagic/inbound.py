"""The values a peer sends, received into buffers that grow as their bytes arrive.

A result declares each part's size before its bytes follow. Allocating those
sizes up front would let a peer that declares a gigabyte and sends nothing
cost the notebook a gigabyte; so each part starts empty and grows frame by
frame (the wire protocol delivers a part's bytes in order and never more
than was declared).
"""

from __future__ import annotations

from collections.abc import Sequence

from didomagic.errors import ProtocolError
from didomagic.protocol import Chunk, ValueHeader


class Inbound:
    """The parts of the values one message declared, as far as they have arrived."""

    def __init__(self, values: Sequence[ValueHeader] = ()) -> None:
        self.parts: list[list[bytearray]] = [[bytearray() for _ in v.sizes] for v in values]

    def add(self, chunk: Chunk) -> None:
        """Append the bytes of one chunk to its part (chunks come in order)."""
        buffer = self.parts[chunk.value][chunk.part]
        if len(buffer) != chunk.offset:
            raise ProtocolError(
                f"bytes for value {chunk.value} part {chunk.part} at offset {chunk.offset} "
                f"arrived after {len(buffer)} bytes"
            )
        buffer += chunk.data
