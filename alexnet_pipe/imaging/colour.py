"""Colour: any decoded Pillow image -> 8-bit sRGB, through its ICC profile when it has one.

Alpha is composited over white, 16-bit greyscale scaled (not clipped), palettes, greyscale and
CMYK converted. An input with a non-sRGB ICC profile is converted to sRGB (LittleCMS through
``PIL.ImageCms``) and never passed through; an unusable profile keeps the image, read as sRGB,
with a note for the log saying why.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageCms

from alexnet_pipe.imaging.reasons import BadImage

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_GREY_MODES = ("1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_COLOUR_MODES = ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA")
_SAME_AS_SRGB = 2  # a profile that moves no colour of the probe by more than this is sRGB (grey levels)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Alpha is composited over white; 16-bit is scaled, not clipped."""
    mode = im.mode
    if mode in ("P", "L", "RGB") and "transparency" in im.info:
        # PNG tRNS: a palette alpha table, or one grey/RGB value that means "fully transparent".
        # Pillow applies either when converting to RGBA; composite like any other alpha.
        im = im.convert("RGBA")
        mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGB")
        mode = im.mode
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        # 16-bit greyscale (PNG/TIFF): map 0..65535 onto 0..255; Pillow's convert would clip. Float: round and
        # clip. In place, in float32 (exact here: v / 257 is never within float32's error of a half): one array
        # of 4 bytes a pixel (float64 temporaries made the decode's peak 37 bytes a pixel: imaging/budget.py).
        arr = np.array(im, dtype=np.float32)
        if mode != "F":
            arr /= 257.0
        np.clip(np.rint(arr, out=arr), 0, 255, out=arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    try:
        return im.convert("RGB")  # L, 1, CMYK (Adobe-inverted handled by the decoder), YCbCr, LAB, HSV
    except (ValueError, OSError) as exc:
        raise BadImage(f"unsupported image mode {mode} ({exc})") from exc


class _UnusableProfile(Exception):
    """The image's ICC profile cannot be applied; the image is read as sRGB (the message says why)."""


@functools.cache
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@functools.cache
def _probe(mode: str) -> Image.Image:
    """Colours to compare a profile's conversion with the identity: a 6-level RGB cube or a grey ramp."""
    if mode == "L":
        return Image.fromarray(np.arange(0, 256, 5, dtype=np.uint8)[None, :], "L")
    levels = np.arange(0, 256, 51, dtype=np.uint8)
    cube = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(1, -1, 3)
    return Image.fromarray(cube, "RGB")


@functools.lru_cache(maxsize=16)
def _to_srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from pixels of ``mode`` (RGB, L or CMYK) described by the profile ``icc``
    to sRGB, or None when the profile is sRGB already: its conversion moves no colour by more
    than ``_SAME_AS_SRGB`` levels (every sRGB profile variant, whatever it is called).

    Cached per profile: most photographs of a collection share a handful of profiles.
    Raises ``_UnusableProfile`` for a profile LittleCMS cannot read or apply to these pixels.
    """
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
    except Exception as exc:  # a corrupt profile: LittleCMS refuses it, in whatever words
        raise _UnusableProfile(f"unreadable ICC profile ({type(exc).__name__}: {exc})") from exc
    wanted = {"RGB": "RGB", "L": "GRAY", "CMYK": "CMYK"}[mode]
    if space != wanted:
        raise _UnusableProfile(f"an ICC profile for {space or 'unknown'} colours on {wanted} pixels")
    try:
        transform = ImageCms.buildTransform(profile, _srgb_profile(), mode, "RGB")
        if mode == "CMYK":
            return transform
        probe = _probe(mode)
        moved = np.asarray(transform.apply(probe), np.int16) - np.asarray(probe.convert("RGB"), np.int16)
    except Exception as exc:
        raise _UnusableProfile(f"unusable ICC profile ({type(exc).__name__}: {exc})") from exc
    return None if np.abs(moved).max() <= _SAME_AS_SRGB else transform


def icc_is_srgb(icc: bytes | None, components: int) -> bool:
    """True when a JPEG's pixels need no colour conversion (no profile, or an sRGB one)."""
    if icc is None:
        return True
    try:
        return _to_srgb_transform(icc, "L" if components == 1 else "RGB") is None
    except _UnusableProfile:
        return False  # Pillow's path reads it and notes why the profile is not used


def to_srgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """Any Pillow mode -> 8-bit sRGB: ``_to_rgb``, through the image's ICC profile when it has one
    that is not sRGB. A profile that cannot be used (corrupt, or for other pixels than these) is
    ignored: the image is kept, read as sRGB as untagged images are, and ``notes`` says why."""
    icc = im.info.get("icc_profile")
    if not icc:
        return _to_rgb(im)
    if not isinstance(icc, (bytes, bytearray)):  # a TIFF tag of the wrong type: text, numbers
        notes.append(f"unreadable ICC profile (a {type(icc).__name__}, not bytes); colours read as sRGB")
        return _to_rgb(im)
    if im.mode == "CMYK":
        mode = "CMYK"
    elif im.mode in _GREY_MODES:
        mode = "L"
    elif im.mode in _COLOUR_MODES:
        mode = "RGB"
    else:  # YCbCr, LAB, HSV: no profile of ours describes them
        notes.append(f"ICC profile not applied to {im.mode} pixels; colours read as sRGB")
        return _to_rgb(im)
    try:
        transform = _to_srgb_transform(bytes(icc), mode)
    except _UnusableProfile as exc:
        notes.append(f"{exc}; colours read as sRGB")
        return _to_rgb(im)
    if mode == "CMYK":
        return im.convert("RGB") if transform is None else transform.apply(im)
    rgb = _to_rgb(im)  # alpha composited over white, 16-bit scaled: then the colours converted
    if transform is None:
        return rgb
    return transform.apply(rgb if mode == "RGB" else rgb.getchannel(0))
