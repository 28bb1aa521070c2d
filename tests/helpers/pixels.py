"""Test helpers for drawings: find an exact pixel block in a rendered image, read an SVG's text."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def find_block(haystack: np.ndarray, needle: np.ndarray) -> tuple[int, int] | None:
    """(y, x) of the top-left corner where ``needle`` (H x W x 3) sits, pixel for pixel, in ``haystack``."""
    h, w = needle.shape[:2]
    for y, x in np.argwhere(np.all(haystack == needle[0, 0], axis=-1)):
        if y + h <= haystack.shape[0] and x + w <= haystack.shape[1] and \
                np.array_equal(haystack[y:y + h, x:x + w], needle):
            return int(y), int(x)
    return None


def svg_text(path: Path) -> str:
    """All text of an SVG file (it must parse as XML), joined by newlines."""
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    return "\n".join(t for el in root.iter() for t in (el.text, el.tail) if t and t.strip())


def is_pdf(path: Path) -> bool:
    data = Path(path).read_bytes()
    return data.startswith(b"%PDF-") and b"%%EOF" in data[-64:]


def float32_limit_sums(images: int, size: int = 8):
    """``images`` RGB arrays at float32's integer limit for centre sums (boxes of 255, and three
    random ones smaller than the canvas or cut from larger images), and the CentreSums of them
    (added as BGR, as the converter does); 258 boxes of 255 sum squares to just under 2^24."""
    from alexnet_pipe.imaging.centre_sums import CentreSums

    rng = np.random.default_rng(images)
    arrays = [np.full((9, 12, 3), 255, np.uint8) for _ in range(images - 3)]
    arrays += [rng.integers(200, 256, shape, dtype=np.uint8) for shape in [(5, 7, 3), (8, 3, 3), (30, 11, 3)]]
    sums = CentreSums(size, images)
    for arr in arrays:
        sums.add(arr[..., ::-1])  # BGR in, RGB out
    return arrays, sums
