"""Tiny, distinguishable images written with real codecs: the raw trees most tests convert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("ant", "bee", "cat")


def smooth_image(seed: int, width: int, height: int) -> np.ndarray:
    """A smooth gradient unique to ``seed``: survives JPEG well and identifies its source."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, k = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(40, 200)
        out[..., c] = k + 50 * np.sin(a * xx / 37 + b * yy / 29 + c)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_jpeg(path: Path, arr: np.ndarray, quality: int = 95) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, "JPEG", quality=quality)
    return path


def make_tree(root: Path, per_class: dict[str, int], sizes=((96, 72), (300, 200), (64, 160))) -> dict[str, np.ndarray]:
    """Write ``root/<split>/<class>/<n>.jpg``; return {relative name: source pixels}."""
    written = {}
    seed = 0
    for split, n in per_class.items():
        for cls in CLASSES:
            for i in range(n):
                w, h = sizes[seed % len(sizes)]
                arr = smooth_image(seed, w, h)
                write_jpeg(root / split / cls / f"{cls}_{i}.jpg", arr)
                written[f"{split}/{cls}/{cls}_{i}.jpg"] = arr
                seed += 1
    return written


def pass_through_tree(raw: Path) -> Path:
    """``raw/train/<class>/<i>.jpg``: 3 baseline JPEGs a class whose short side is already 48, so a
    convert at --short-side 48 stores them as they are and every stored pixel is known exactly."""
    sizes = [(64, 48), (48, 48), (48, 90), (100, 48), (49, 48)]
    k = 0
    for cls in CLASSES:
        for i in range(3):
            w, h = sizes[k % len(sizes)]
            path = raw / "train" / cls / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(smooth_image(200 + k, w, h)).save(path, "JPEG", quality=92)
            k += 1
    return raw
