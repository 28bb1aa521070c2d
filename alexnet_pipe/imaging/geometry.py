"""Which way up and what size: the EXIF orientation, the stored size and the resize.

The orientation is read from the EXIF block (of a JPEG's header, or of what Pillow decoded) and
applied to the pixels, as Pillow's ``ImageOps.exif_transpose`` would. The stored size follows
``im2rec --resize``: the short side becomes ``ImageSettings.short_side``; or, with ``--resize squash``,
Caffe's ``convert_imageset --resize_height H --resize_width W``: every image becomes exactly W x H
(upright), its aspect ratio ignored. Pixels are BGR.
"""

from __future__ import annotations

import math
import struct
import warnings

import cv2
import numpy as np
from PIL import Image

from alexnet_pipe.config import ImageSettings
from alexnet_pipe.imaging.reasons import BadImage

_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> what makes the stored pixels upright (as Pillow's ImageOps.exif_transpose).
_UPRIGHT = {
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: cv2.transpose,
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.rotate(cv2.transpose(a), cv2.ROTATE_180),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}
# Downscaling blur: a Gaussian of sigma 0.4 * sqrt(r^2 - 1) input pixels tops the blur the image
# already has up to that of a pixel at the output scale r (how scale-space pyramids do it).
# Then bicubic sampling. Measured on photographs (benchmarks/convert.md): 3x faster than
# INTER_AREA (whose non-integer path is scalar code) and closer to an antialiased Lanczos.
_BLUR_PER_SCALE = 0.4


def image_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8; 1 = upright) of an image Pillow decoded. Call only after
    ``im.load()``: for a PNG ``getexif()`` itself decodes the pixels, and a decode error swallowed
    here would leave a half-decoded image that a later ``load()`` accepts as complete."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data": handled here, not news
            value = int(im.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        return 1
    return value if 1 <= value <= 8 else 1


def exif_orientation(segment: bytes) -> int:
    """Orientation (tag 0x0112 of IFD0) from an APP1 "Exif" payload; 1 if absent or malformed."""
    tiff = segment[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    try:
        if order is None or struct.unpack(order + "H", tiff[2:4])[0] != 42:
            return 1
        ifd = struct.unpack(order + "I", tiff[4:8])[0]
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag, kind = struct.unpack(order + "HH", tiff[entry : entry + 4])
            if tag == _EXIF_ORIENTATION:
                fmt = {3: "H", 4: "I"}.get(kind)  # SHORT as the standard says; LONG from odd writers
                value = struct.unpack(order + fmt, tiff[entry + 8 : entry + 8 + struct.calcsize(fmt)])[0] if fmt else 1
                return value if 1 <= value <= 8 else 1
    except struct.error:  # offsets past the end: a broken EXIF block must not lose a good image
        return 1
    return 1


def upright(bgr: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels turned upright for the EXIF ``orientation`` (1: as they are)."""
    return bgr if orientation == 1 else _UPRIGHT[orientation](bgr)


def target_size(width: int, height: int, short_side: int, upscale: bool = True) -> tuple[int, int]:
    """The stored size: the shorter side becomes exactly ``short_side``, the aspect ratio kept.

    As ``im2rec --resize``: up or down (the long side is rounded). ``upscale=False`` never scales
    up (a smaller image keeps its size); ``short_side`` 0 keeps every size. Both sides are treated
    alike, so the target of a rotated image is the rotated target. Example: 500x375 -> 341x256,
    100x80 -> 320x256 (kept as 100x80 without upscaling).
    """
    short = min(width, height)
    if short_side == 0 or short == short_side or (short < short_side and not upscale):
        return width, height
    scale = short_side / short
    if width <= height:
        return short_side, max(1, round(height * scale))
    return max(1, round(width * scale)), short_side


def target_within_limit(width: int, height: int, settings: ImageSettings) -> tuple[int, int]:
    """The stored size; a sliver scaled up to the short side must not become a memory bomb, and an
    input below ``--min-short-side`` is skipped."""
    if min(width, height) < settings.min_short_side:
        raise BadImage(f"its short side, {min(width, height)} px ({width}x{height}), is below --min-short-side "
                       f"{settings.min_short_side}")
    if settings.squash is not None:  # the upright stored size: see decode_target and upright_target
        th, tw = settings.squash
        to = f"squashing {width}x{height} to {tw}x{th} gives"
    else:
        tw, th = target_size(width, height, settings.short_side, settings.upscale)
        to = f"scaling {width}x{height} to short side {settings.short_side} gives {tw}x{th} ="
    if tw * th > settings.max_pixels:
        raise BadImage(f"{to} {tw * th} pixels, over the limit of {settings.max_pixels}")
    return tw, th


_SIDES_SWAPPED = (5, 6, 7, 8)  # EXIF orientations that turn the image a quarter


def decode_target(target: tuple[int, int], settings: ImageSettings, orientation: int | None) -> tuple[int, int]:
    """The size a decoder scales towards (staying >= it), in the input's own orientation, for the
    ``target_within_limit`` of its size. That target is already in the input's orientation for a short
    side; a squash target is upright, so it is turned back, or, with the orientation not yet known
    (None), made square on its long side, right either way."""
    if settings.squash is None or target[0] == target[1]:
        return target
    if orientation is None:
        return max(target), max(target)
    return target[::-1] if orientation in _SIDES_SWAPPED else target


def upright_target(target: tuple[int, int], settings: ImageSettings, orientation: int) -> tuple[int, int]:
    """The size the upright pixels are resized to: a short-side target turned with the image when the
    orientation swaps its sides (the target of the full-size input, not of the DCT-scaled one: rounding
    differs); a squash target as it is."""
    if settings.squash is None and orientation in _SIDES_SWAPPED:
        return target[::-1]
    return target


_INTERPOLATION = {"cubic": cv2.INTER_CUBIC, "linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


def resize(bgr: np.ndarray, size: tuple[int, int], resize_filter: str = "antialias") -> np.ndarray:
    """Scale to ``size`` with ``resize_filter`` (config.RESIZE_FILTERS). "antialias": downscale by
    a Gaussian pre-blur + bicubic (INTER_AREA from 2x down), upscale bicubic."""
    h, w = bgr.shape[:2]
    if (w, h) == size:
        return bgr
    if resize_filter != "antialias":
        return cv2.resize(bgr, size, interpolation=_INTERPOLATION[resize_filter])
    rx, ry = w / size[0], h / size[1]
    if rx >= 2 and ry >= 2:  # only past 8x DCT scaling, or non-JPEG inputs; area is sharp enough here
        return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
    if rx > 1 or ry > 1:
        sx = _BLUR_PER_SCALE * math.sqrt(max(rx * rx - 1, 0))
        sy = _BLUR_PER_SCALE * math.sqrt(max(ry * ry - 1, 0))
        bgr = cv2.GaussianBlur(bgr, (0, 0), sigmaX=max(sx, 1e-3), sigmaY=max(sy, 1e-3))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_CUBIC)
