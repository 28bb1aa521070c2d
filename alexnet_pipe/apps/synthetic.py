"""Procedurally drawn, learnable image sets in the ImageNet folder layout (demo, tests, benchmarks).

Ten classes of shapes and textures, each drawn at a random place, scale and colour over a
textured background, so a small network can learn them and JPEG sizes resemble photographs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "hstripes", "vstripes", "checker", "dots")


@dataclass(frozen=True)
class SynthConfig:
    root: Path
    train_per_class: int = 200
    val_per_class: int = 50
    size: tuple[int, int] = (320, 240)  # width, height; ImageNet-like is about (500, 375)
    classes: tuple[str, ...] = CLASSES
    seed: int = 0
    quality: int = 92
    texture: float = 1.0  # background clutter: 1 = photo-like (benchmarks), ~0.3 = easy to learn (demo)

    def __post_init__(self) -> None:
        unknown = set(self.classes) - set(CLASSES)
        if unknown:
            raise ValueError(f"unknown synthetic classes {sorted(unknown)}; choose from {CLASSES}")
        if self.size[0] < 16 or self.size[1] < 16:
            raise ValueError(f"images must be at least 16x16, got {self.size}")


def _background(rng: np.random.Generator, w: int, h: int, texture: float = 1.0) -> Image.Image:
    """Smooth colour field + oriented texture + noise: at texture 1 compresses like a photograph."""
    coarse = rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    angle, period = rng.uniform(0, math.pi), rng.uniform(3, 12)
    stripes = 18 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) / period)[..., None]
    noise = rng.normal(0, 10, (h, w, 3))
    field = 128 + texture * (0.6 * base - 77 + stripes + noise)
    return Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))


def _draw(cls: str, im: Image.Image, rng: np.random.Generator) -> None:
    w, h = im.size
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.18, 0.38) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    box = (cx - r, cy - r, cx + r, cy + r)
    if cls == "circle":
        d.ellipse(box, fill=colour)
    elif cls == "square":
        d.rectangle(box, fill=colour)
    elif cls == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif cls == "star":
        pts = [(cx + (r if k % 2 == 0 else r / 2.5) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r / 2.5) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=colour)
    elif cls == "cross":
        t = r / 3
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=colour)
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=colour)
    elif cls == "ring":
        d.ellipse(box, outline=colour, width=max(2, int(r / 4)))
    elif cls in ("hstripes", "vstripes"):
        step = max(4, int(r / 3))
        for k in range(int(-r), int(r), step * 2):
            if cls == "hstripes":
                d.rectangle((cx - r, cy + k, cx + r, cy + k + step), fill=colour)
            else:
                d.rectangle((cx + k, cy - r, cx + k + step, cy + r), fill=colour)
    elif cls == "checker":
        step = max(4, int(r / 2))
        for i, x in enumerate(range(int(cx - r), int(cx + r), step)):
            for j, y in enumerate(range(int(cy - r), int(cy + r), step)):
                if (i + j) % 2 == 0:
                    d.rectangle((x, y, x + step - 1, y + step - 1), fill=colour)
    elif cls == "dots":
        dr = max(2, r / 6)
        for _ in range(12):
            x, y = cx + rng.uniform(-r, r), cy + rng.uniform(-r, r)
            d.ellipse((x - dr, y - dr, x + dr, y + dr), fill=colour)


def draw_image(cls: str, size: tuple[int, int], rng: np.random.Generator, texture: float = 1.0) -> Image.Image:
    im = _background(rng, *size, texture)
    _draw(cls, im, rng)
    return im


def make_image_tree(cfg: SynthConfig) -> dict[str, int]:
    """Write ``root/{train,val}/<class>/<class>_<n>.JPEG``; return image counts per split."""
    counts = {}
    for split, n in (("train", cfg.train_per_class), ("val", cfg.val_per_class)):
        if n == 0:
            continue
        for cls in cfg.classes:
            # One generator per (split, class): any subset of classes draws the same images.
            rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1, CLASSES.index(cls)])
            folder = cfg.root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw_image(cls, cfg.size, rng, cfg.texture).save(folder / f"{cls}_{i}.JPEG", quality=cfg.quality)
        counts[split] = n * len(cfg.classes)
    return counts
