"""Caffe's ``BlobProto``, the message of a ``mean.binaryproto`` (pure encode/decode, no I/O).

The fields used: ``num``/``channels``/``height``/``width`` (1-4, legacy shape), packed float
``data`` (5), ``shape`` (7, a ``BlobShape``) and ``double_data`` (8). Caffe's
``compute_image_mean`` writes the legacy shape 1 x C x H x W and packed float data, BGR.
"""

from __future__ import annotations

import struct

import numpy as np

from . import protobuf as pb
from .errors import FormatError


def encode_blobproto(arr: np.ndarray) -> bytes:
    """Serialise an array as a BlobProto the way Caffe's ``compute_image_mean`` does.

    Args:
        arr: at most 4 axes, e.g. a C x H x W mean image; missing leading axes become 1.
    Returns:
        num/channels/height/width (legacy shape) and packed float32 ``data``.
    """
    arr = np.asarray(arr)
    if arr.ndim > 4:
        raise ValueError(f"a legacy BlobProto holds at most 4 axes, got shape {arr.shape}")
    dims = (1,) * (4 - arr.ndim) + arr.shape
    parts = [pb.varint_field(number, dim) for number, dim in zip((1, 2, 3, 4), dims)]
    data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    if data:
        parts.append(pb.bytes_field(5, data))
    return b"".join(parts)


def _blob_shape(buf: memoryview) -> list[int]:
    """``BlobShape { repeated int64 dim = 1 [packed = true]; }``, packed or not."""
    dims: list[int] = []
    for number, wire, value in pb.iter_fields(buf):
        if number != 1:
            continue
        if wire == pb.VARINT:
            dims.append(value)
        elif wire == pb.LENGTH:
            pos = 0
            while pos < len(value):
                dim, pos = pb.decode_varint(value, pos)
                dims.append(dim)
        else:
            raise FormatError(f"BlobShape.dim has wire type {wire}, expected varint")
    # int64 two's complement: a negative dim is corrupt, not just large.
    signed = [d - (1 << 64) if d >= 1 << 63 else d for d in dims]
    if any(d < 0 for d in signed):
        raise FormatError(f"BlobShape has a negative dimension: {signed}")
    return dims


def decode_blobproto(buf: bytes | memoryview) -> np.ndarray:
    """Parse a BlobProto into an array of the shape it states.

    The shape comes from ``shape.dim`` (field 7) when present, else from the legacy
    num/channels/height/width (missing ones count as 1). Values come from ``double_data``
    when it is non-empty (as in Caffe's ``Blob::FromProto``), else from ``data``.

    Returns:
        float32 (or float64 for ``double_data``) array, e.g. (1, 3, 256, 256) for Caffe's mean.
    Raises:
        FormatError: truncated bytes, no shape, or a value count that does not fit the shape.
    """
    legacy: dict[int, int] = {}
    shape: list[int] | None = None
    floats: list[float] = []
    doubles: list[float] = []
    for number, wire, value in pb.iter_fields(buf):
        if number in (1, 2, 3, 4):
            if wire != pb.VARINT:
                raise FormatError(f"BlobProto field {number} has wire type {wire}, expected varint")
            legacy[number] = pb.to_int32(value)
        elif number == 5:
            if wire == pb.LENGTH:
                floats.extend(pb.packed_floats(value))
            elif wire == pb.FIXED32:  # unpacked repeated float, as old writers did
                floats.append(struct.unpack("<f", value)[0])
            else:
                raise FormatError(f"BlobProto.data has wire type {wire}, expected packed float")
        elif number == 7:
            if wire != pb.LENGTH:
                raise FormatError(f"BlobProto.shape has wire type {wire}, expected a message")
            shape = (shape or []) + _blob_shape(value)  # repeated sub-messages merge
        elif number == 8:
            if wire == pb.LENGTH:
                doubles.extend(pb.packed_floats(value, double=True))
            elif wire == pb.FIXED64:
                doubles.append(struct.unpack("<d", value)[0])
            else:
                raise FormatError(f"BlobProto.double_data has wire type {wire}, expected packed double")
        # diff=6, double_diff=9 and unknown fields are not part of a mean: skip them.
    if shape is None:
        if not legacy:
            raise FormatError("BlobProto has neither shape nor num/channels/height/width")
        shape = [legacy.get(n, 1) for n in (1, 2, 3, 4)]
        if any(d < 0 for d in shape):
            raise FormatError(f"BlobProto has a negative dimension: {shape}")
    values = np.asarray(doubles, np.float64) if doubles else np.asarray(floats, np.float32)
    count = int(np.prod(shape, dtype=object))
    if values.size != count:
        raise FormatError(
            f"BlobProto shape {tuple(shape)} needs {count} values but the data holds {values.size} "
            "(truncated or not a Caffe mean file)"
        )
    return values.reshape(shape)
