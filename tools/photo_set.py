#!/usr/bin/env python3
"""An ImageNet-like JPEG set cut from real photographs, for the converter benchmark.

    .venv/bin/python tools/photo_set.py OUT [--images 2400] [--photos DIR | --photo-python PY]

No photographs ship with the project. The base photographs are the colour photos bundled in
scikit-image (``skimage/data``: astronaut, chelsea, coffee, hubble_deep_field, ihc,
motorcycle_left/right, retina, rocket) and scikit-learn (``china.jpg``, ``flower.jpg``), read
from a separate virtualenv that has those packages (``--photo-python``; never a project
dependency), or every .png/.jpg in ``--photos DIR``.

Each image is a random crop of a base photo at a random scale and aspect ratio, resized with
Lanczos (down) or bicubic (up) and saved at a random quality, so that the set looks like
ImageNet's train images: 85% with the long side in 400..500 px, 15% in 800..1600 px, aspect
ratios mostly 4:3 and 3:4, qualities 75..95, mean file size about 56 KiB. Written as
``OUT/train/c<k>/img_<n>.JPEG`` in 10 classes; the set is a pure function of (bases, seed, n).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                  "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
ASPECTS = ((4 / 3, 0.55), (3 / 4, 0.20), (1.0, 0.07), (3 / 2, 0.08), (2 / 3, 0.04), (16 / 9, 0.06))
QUALITIES = ((75, 0.20), (85, 0.30), (90, 0.25), (95, 0.25))
LARGE_SHARE = 0.15  # long side 800..1600; the rest 400..500
CLASSES = 10
STAMP = ".photo_set.json"  # hidden: scan() ignores dot files
DEFAULT_PHOTO_PYTHON = "/work/venvs/mxnet/bin/python"
SETUP_HINT = ("python3 -m venv /work/venvs/mxnet && /work/venvs/mxnet/bin/pip install \"numpy<1.24\" mxnet==1.9.1 "
              "opencv-python-headless==4.10.0.84 scikit-image scikit-learn")

_FIND = """
import json, os, skimage.data, sklearn.datasets
d = os.path.dirname(skimage.data.__file__)
s = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
print(json.dumps([os.path.join(d, n) for n in %r] + [os.path.join(s, n) for n in %r]))
"""


def find_photos(photos: Path | None, photo_python: str) -> list[Path]:
    """The base photographs: every .png/.jpg in ``photos``, or the bundled ones of scikit-image
    and scikit-learn as installed for ``photo_python``."""
    if photos is not None:
        found = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not found:
            raise SystemExit(f"{photos} holds no .png or .jpg photographs")
        return found
    try:
        out = subprocess.run([photo_python, "-c", _FIND % (SKIMAGE_PHOTOS, SKLEARN_PHOTOS)], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"cannot list the photographs bundled with scikit-image/scikit-learn through "
                         f"{photo_python} ({exc}); make that virtualenv with:\n  {SETUP_HINT}\n"
                         "or pass --photos DIR") from None
    return [Path(p) for p in json.loads(out)]


@dataclass(frozen=True)
class SetStats:
    images: int
    mean_kib: float
    median_kib: float
    share_400_500: float
    share_800_1600: float
    mean_megapixels: float

    def describe(self) -> str:
        return (f"{self.images} JPEGs, mean {self.mean_kib:.1f} KiB (median {self.median_kib:.1f}), "
                f"{100 * self.share_400_500:.0f}% with the long side in 400-500 px, "
                f"{100 * self.share_800_1600:.0f}% in 800-1600 px, mean {self.mean_megapixels:.2f} Mpx")


def set_stats(files: list[Path]) -> SetStats:
    sizes, longs, pixels = [], [], []
    for p in files:
        sizes.append(p.stat().st_size / 1024)
        with Image.open(p) as im:
            longs.append(max(im.size))
            pixels.append(im.width * im.height / 1e6)
    n = len(files)
    return SetStats(n, statistics.fmean(sizes), statistics.median(sizes), sum(400 <= v <= 500 for v in longs) / n,
                    sum(800 <= v <= 1600 for v in longs) / n, statistics.fmean(pixels))


def _pick(rng: np.random.Generator, table) -> float:
    values, weights = zip(*table)
    return values[rng.choice(len(values), p=np.asarray(weights) / sum(weights))]


def make_photo_set(out: Path, n: int, bases: list[Path], seed: int = 0) -> list[Path]:
    """Write (or reuse, when ``out`` already holds exactly this set) ``n`` JPEGs; return their paths."""
    spec = {"n": n, "seed": seed, "bases": [p.name for p in bases], "version": 1}
    stamp = out / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == spec:
        return sorted((out / "train").rglob("*.JPEG"))
    if out.exists() and any(out.iterdir()):
        if not stamp.is_file():
            raise SystemExit(f"{out} exists and was not made by tools/photo_set.py; choose another directory")
        import shutil

        shutil.rmtree(out)
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in bases]
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        large = rng.random() < LARGE_SHARE
        long_side = rng.uniform(800, 1600) if large else rng.uniform(400, 500)
        aspect = _pick(rng, ASPECTS)
        w, h = ((round(long_side), round(long_side / aspect)) if aspect >= 1
                else (round(long_side * aspect), round(long_side)))
        base = photos[rng.integers(len(photos))]
        bh, bw = base.shape[:2]
        zoom_min = max(w / bw, h / bh)  # the crop must fit in the photo
        zoom = rng.uniform(zoom_min, max(1.6 * zoom_min, 1.2))
        cw, ch = min(bw, round(w / zoom)), min(bh, round(h / zoom))
        x, y = int(rng.integers(0, bw - cw + 1)), int(rng.integers(0, bh - ch + 1))
        crop = Image.fromarray(base[y : y + ch, x : x + cw])
        im = crop.resize((w, h), Image.Resampling.LANCZOS if zoom < 1 else Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = out / "train" / f"c{i % CLASSES}" / f"img_{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, "JPEG", quality=int(_pick(rng, QUALITIES)))
        files.append(path)
    stamp.write_text(json.dumps(spec))
    return sorted(files)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--images", type=int, default=2400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--photos", type=Path, default=None, help="base photographs (.png/.jpg) to cut from")
    ap.add_argument("--photo-python", default=DEFAULT_PHOTO_PYTHON,
                    help="python of a virtualenv with scikit-image and scikit-learn (for their bundled photos)")
    args = ap.parse_args()
    files = make_photo_set(args.out, args.images, find_photos(args.photos, args.photo_python), args.seed)
    print(set_stats(files).describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
