"""Caffe's ``BlobProto``, the message of a ``mean.binaryproto`` (pure encode/decode, no I/O).

The fields used: ``num``/``channels``/``height``/``width`` (1-4, legacy shape), packed float
``data`` (5), ``shape`` (7, a ``BlobShape``) and ``double_data`` (8). Caffe's
``compute_image_mean`` writes the legacy shape 1 x C x H x W and packed float data, BGR.
"""

from __future__ import annotations

import numpy as np

import alexnet_pipe.formats.protobuf as pb
from alexnet_pipe.errors import FormatError, InputError


def encode_blobproto(arr: np.ndarray) -> bytes:
    """Serialise an array as a BlobProto the way Caffe's ``compute_image_mean`` does.

    Args:
        arr: at most 4 axes, e.g. a C x H x W mean image; missing leading axes become 1.
    Returns:
        num/channels/height/width (legacy shape) and packed float32 ``data``.
    """
    arr = np.asarray(arr)
    if arr.ndim > 4:
        raise InputError(f"a legacy BlobProto holds at most 4 axes, got shape {arr.shape}")
    dims = (1,) * (4 - arr.ndim) + arr.shape
    parts = [pb.varint_field(number, dim) for number, dim in zip((1, 2, 3, 4), dims)]
    data = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    if data:
        parts.append(pb.bytes_field(5, data))
    return b"".join(parts)


MAX_DIMS = 4  # Caffe's legacy shape; a mean image never needs more


def _blob_shape(buf: memoryview) -> list[int]:
    """``BlobShape { repeated int64 dim = 1 [packed = true]; }``, packed or not, at most 4 dims."""
    dims: list[int] = []

    def add(dim: int) -> None:
        if dim >= 1 << 63:  # int64 two's complement: a negative dim is corrupt, not just large
            raise FormatError(f"BlobShape has a negative dimension: {dim - (1 << 64)}")
        if len(dims) == MAX_DIMS:
            raise FormatError(f"BlobShape has more than {MAX_DIMS} dimensions; a mean blob has at most {MAX_DIMS}")
        dims.append(dim)

    for number, wire, value in pb.iter_fields(buf):
        if number != 1:
            continue
        if wire == pb.VARINT:
            add(value)
        elif wire == pb.LENGTH:
            pos = 0
            while pos < len(value):
                dim, pos = pb.decode_varint(value, pos)
                add(dim)
        else:
            raise FormatError(f"BlobShape.dim has wire type {wire}, expected varint")
    return dims


def decode_blobproto(buf: bytes | memoryview) -> np.ndarray:
    """Parse a BlobProto into an array of the shape it states.

    The shape comes from ``shape.dim`` (field 7) when present, else from the legacy
    num/channels/height/width (missing ones count as 1). Values come from ``double_data``
    when it is non-empty (as in Caffe's ``Blob::FromProto``), else from ``data``. The values
    are gathered as raw little-endian bytes into one buffer, never as Python floats, so the
    array costs its own size (plus the file) and no more.

    Returns:
        float32 (or float64 for ``double_data``) array, e.g. (1, 3, 256, 256) for Caffe's mean.
    Raises:
        FormatError: truncated bytes, no shape, more than 4 dims, or a value count that does
        not fit the shape.
    """
    legacy: dict[int, int] = {}
    shape: list[int] | None = None
    floats = bytearray()  # packed or unpacked repeated float, in order
    doubles = bytearray()
    for number, wire, value in pb.iter_fields(buf):
        if number in (1, 2, 3, 4):
            if wire != pb.VARINT:
                raise FormatError(f"BlobProto field {number} has wire type {wire}, expected varint")
            legacy[number] = pb.to_int32(value)
        elif number in (5, 8):
            width, fixed, target = (4, pb.FIXED32, floats) if number == 5 else (8, pb.FIXED64, doubles)
            if wire == pb.LENGTH and len(value) % width == 0:
                target += value
            elif wire == fixed:  # unpacked repeated float, as old writers did
                target += value
            else:
                kind = "float" if number == 5 else "double"
                raise FormatError(f"BlobProto field {number} has wire type {wire} or a partial element; "
                                  f"expected packed {kind}")
        elif number == 7:
            if wire != pb.LENGTH:
                raise FormatError(f"BlobProto.shape has wire type {wire}, expected a message")
            shape = (shape or []) + _blob_shape(value)  # repeated sub-messages merge
            if len(shape) > MAX_DIMS:
                raise FormatError(f"BlobShape has more than {MAX_DIMS} dimensions; a mean blob has at most {MAX_DIMS}")
        # diff=6, double_diff=9 and unknown fields are not part of a mean: skip them.
    if shape is None:
        if not legacy:
            raise FormatError("BlobProto has neither shape nor num/channels/height/width")
        shape = [legacy.get(n, 1) for n in (1, 2, 3, 4)]
        if any(d < 0 for d in shape):
            raise FormatError(f"BlobProto has a negative dimension: {shape}")
    values = np.frombuffer(doubles, "<f8") if doubles else np.frombuffer(floats, "<f4")
    count = 1
    for d in shape:
        count *= d
    if values.size != count:
        raise FormatError(
            f"BlobProto shape {tuple(shape)} needs {count} values but the data holds {values.size} "
            "(truncated or not a Caffe mean file)"
        )
    try:
        return values.astype(np.float64 if doubles else np.float32, copy=False).reshape(shape)
    except ValueError:  # no values, and another dim past what numpy can index (2**62 x 0)
        raise FormatError(f"BlobProto shape {tuple(shape)} is too large to be an array") from None
