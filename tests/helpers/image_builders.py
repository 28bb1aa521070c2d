"""Builders of odd and broken images, made with real codecs (Pillow) or zlib, and colour checks."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from alexnet_pipe.config import ImageSettings
from alexnet_pipe.imaging.encode import Encoded

TOL = 8  # grey levels allowed between a block's mean and its expected colour (JPEG error)
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def blocks(colours: list[list[tuple]], size: int = 16) -> np.ndarray:
    """An image of ``size``-pixel square blocks; ``colours[row][col]`` is each block's value."""
    rows = [np.concatenate([np.full((size, size, len(c)), c, np.uint8) for c in row], 1) for row in colours]
    return np.concatenate(rows, 0)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG from raw filtered scanlines (filter byte 0 per row), for what Pillow cannot write."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge RGB image, with a tiny (wrong) body: ~100 bytes."""
    return png_bytes(width, height, 8, 2, b"\0" * 64)


def smooth_rgb(height: int, width: int) -> np.ndarray:
    """Gradients: compress well and survive JPEG with little error."""
    y, x = np.mgrid[0:height, 0:width]
    red, green = x * 255 // max(1, width - 1), y * 255 // max(1, height - 1)
    return np.stack([red, green, (x + y) % 256], -1).astype(np.uint8)


def noisy_jpeg(height: int = 128, width: int = 128, **kw) -> bytes:
    """A JPEG whose scan data is most of the file, so cutting it in half lands in the pixels."""
    arr = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(arr), "JPEG", quality=90, **kw)


def cut(data: bytes, fraction: float) -> bytes:
    """The first ``fraction`` of a file, as a partial download or copy leaves it."""
    return data[: int(len(data) * fraction)]


def with_exif_orientation(arr: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


# Stored pixels for a display image D, per EXIF orientation: the viewer applies the inverse.
# 6: "rotate 90 clockwise to view", so stored = D turned 90 anticlockwise (np.rot90 k=1).
STORED_ROTATION = {3: 2, 6: 1, 8: -1}


def display_image() -> np.ndarray:
    """48x32 (w x h): red top-left, green top-right, white elsewhere; tells rotations and mirrors apart."""
    return blocks([[RED, WHITE, GREEN], [WHITE, WHITE, WHITE]])


def sof_marker(jpeg: bytes) -> int:
    """The frame marker (0xC0 baseline, 0xC2 progressive, ...) found by walking the segments."""
    assert jpeg[:2] == b"\xff\xd8", "not a JPEG"
    pos = 2
    while pos + 4 <= len(jpeg):
        assert jpeg[pos] == 0xFF, f"bad segment at {pos}"
        marker = jpeg[pos + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return 0xFF00 | marker
        pos += 2 + struct.unpack(">H", jpeg[pos + 2 : pos + 4])[0]
    raise AssertionError("no SOF marker")


def decoded(enc: Encoded) -> np.ndarray:
    """Check the invariants of every stored image; return its decoded pixels (H, W, 3)."""
    im = Image.open(io.BytesIO(enc.jpeg))
    im.load()
    assert im.format == "JPEG"
    assert im.mode == "RGB"
    assert sof_marker(enc.jpeg) == 0xFFC0, "stored JPEG is not baseline"
    assert "progressive" not in im.info and "progression" not in im.info
    assert im.size == (enc.width, enc.height)
    return np.asarray(im)


def block_colour(arr: np.ndarray, row: int, col: int, size: int = 16) -> np.ndarray:
    """Mean colour of the inner half of a block (edges carry chroma-subsampling bleed)."""
    q = size // 4
    return arr[row * size + q : (row + 1) * size - q, col * size + q : (col + 1) * size - q].reshape(-1, 3).mean(0)


def assert_colour(arr: np.ndarray, row: int, col: int, expected, tol: float = TOL) -> None:
    got = block_colour(arr, row, col)
    assert np.all(np.abs(got - np.array(expected)) <= tol), f"block {row},{col}: {got.round(1)} != {expected}"


def _truncated_png() -> bytes:
    data = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    return cut(data, 0.5)


def _corrupt_png() -> bytes:
    """Scrambled IDAT payload with the chunk CRC left alone: zlib fails mid-image."""
    data = bytearray(encode(Image.fromarray(blocks([[RED, BLUE, GREEN], [WHITE, RED, BLUE]])), "PNG"))
    start = data.find(b"IDAT") + 4
    size = struct.unpack(">I", data[start - 8 : start - 4])[0]
    for i in range(start + size // 2, start + size // 2 + 8):
        data[i] ^= 0x5A
    return bytes(data)


BAD_INPUTS = {
    # name: (bytes, settings override or None, words the reason must contain)
    "empty": (b"", None, ["empty"]),
    "text": (b"n01440764 tench, Tinca tinca\n" * 20, None, ["not an image"]),
    "random": (np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes(), None, ["not an image"]),
    "truncated_jpeg": (cut(noisy_jpeg(), 0.5), None, ["truncated"]),
    "truncated_jpeg_near_end": (cut(noisy_jpeg(), 0.9), None, ["truncated"]),
    "jpeg_without_end_marker": (noisy_jpeg()[:-2], None, ["truncated"]),
    "truncated_pass_through_candidate": (cut(noisy_jpeg(256, 320), 0.95), None, ["truncated"]),
    "truncated_progressive_jpeg": (cut(noisy_jpeg(progressive=True), 0.75), None, ["truncated"]),
    "truncated_png": (_truncated_png(), None, ["truncated"]),
    "corrupt_png": (_corrupt_png(), None, ["corrupt"]),
    "bomb_30000": (bomb_png(30000, 30000), None, ["decompression bomb"]),
    # Above max_pixels (89,478,485) but under Pillow's own error limit (twice that): our check.
    "bomb_10000": (bomb_png(10000, 10000), None, ["decompression bomb", "100000000", "89478485"]),
    # 2 x 2000 is small, but scaled up to short side 256 it would be 256 x 256000 pixels.
    "sliver_scaled_over_limit": (
        encode(Image.fromarray(smooth_rgb(2000, 2)), "PNG"),
        ImageSettings(max_pixels=10_000_000),
        ["256x256000", "over the limit of 10000000"],
    ),
    "over_custom_limit": (
        encode(Image.fromarray(smooth_rgb(100, 100)), "JPEG"),
        ImageSettings(max_pixels=5000),
        ["decompression bomb", "10000", "5000"],
    ),
}
