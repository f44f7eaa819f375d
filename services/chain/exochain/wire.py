"""Protobuf wire encoding of the few messages built on hot paths, from already serialised parts.

Building a message with protobuf's Python API costs about a microsecond per nested message, and the
chain builds several per operation (a block holds thousands, a push hundreds). These helpers write
the same fields as bytes (tag, then varint or length-delimited value) from the operations' own
serialisations, and the caller parses the result once, in C (`FromString`), or stores it. The
output is a valid encoding of the message (fields in field-number order, default values left out);
tests compare it with the protobuf API's.
"""

from __future__ import annotations

from collections.abc import Iterable

WIRE_VARINT = 0
WIRE_LENGTH_DELIMITED = 2


def tag(field_number: int, wire_type: int) -> bytes:
    return varint((field_number << 3) | wire_type)


def varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field_tag: bytes, data: bytes) -> bytes:
    """A length-delimited field (bytes, string or message): tag, varint length, data."""
    size = len(data)
    if size < 0x80:
        return field_tag + bytes((size,)) + data
    return field_tag + varint(size) + data


def varint_field(field_tag: bytes, value: int) -> bytes:
    """A varint field (integers, bools); empty for 0, protobuf's default."""
    return field_tag + varint(value) if value else b""


def repeated(field_tag: bytes, items: Iterable[bytes]) -> bytes:
    return b"".join(length_delimited(field_tag, item) for item in items)
