"""The few pieces of the protobuf wire format that Caffe's messages need (pure, no I/O).

A field key is ``(field_number << 3) | wire_type`` written as a varint. Wire types used:
0 varint, 1 fixed64, 2 length-delimited (bytes, packed repeated), 5 fixed32.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from alexnet_pipe.errors import FormatError

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


def encode_varint(value: int) -> bytes:
    """Encode an int as a varint; negative values use 64-bit two's complement (as int32 does)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Read a varint at ``pos``; return (value, position after it)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise FormatError("protobuf: varint runs past the end of the message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise FormatError("protobuf: varint longer than 10 bytes")


def to_int32(value: int) -> int:
    """Interpret a decoded varint as a signed int32 (protobuf ``int32``)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def key(field_number: int, wire_type: int) -> bytes:
    return encode_varint((field_number << 3) | wire_type)


def varint_field(field_number: int, value: int) -> bytes:
    return key(field_number, VARINT) + encode_varint(value)


def bytes_field(field_number: int, value: bytes) -> bytes:
    return key(field_number, LENGTH) + encode_varint(len(value)) + value


def iter_fields(buf: bytes | memoryview) -> Iterator[tuple[int, int, object]]:
    """Yield (field_number, wire_type, value) for each field of a message.

    Varints come as int, fixed32/fixed64 as their raw 4/8 bytes, length-delimited as a
    memoryview into ``buf`` (no copy). Unknown fields are yielded too; callers skip them.
    """
    view = memoryview(buf)
    pos, end = 0, len(view)
    while pos < end:
        tag, pos = decode_varint(view, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise FormatError("protobuf: field number 0")
        if wire == VARINT:
            value, pos = decode_varint(view, pos)
        elif wire == LENGTH:
            size, pos = decode_varint(view, pos)
            if pos + size > end:
                raise FormatError("protobuf: length-delimited field runs past the end")
            value, pos = view[pos : pos + size], pos + size
        elif wire in (FIXED32, FIXED64):
            width = 4 if wire == FIXED32 else 8
            if pos + width > end:
                raise FormatError("protobuf: fixed-width field runs past the end")
            value, pos = bytes(view[pos : pos + width]), pos + width
        else:
            raise FormatError(f"protobuf: unsupported wire type {wire}")
        yield number, wire, value


def packed_floats(value: memoryview, double: bool = False) -> list[float]:
    """Decode a packed repeated float (or double) field."""
    width = 8 if double else 4
    if len(value) % width:
        raise FormatError("protobuf: packed float field has a partial element")
    return list(struct.unpack(f"<{len(value) // width}{'d' if double else 'f'}", value))
