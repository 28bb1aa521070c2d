#!/usr/bin/env python3
"""Generate a procedurally drawn ImageNet-layout image set (see alexnet_pipe.apps.synthetic).

    python tools/make_shapes.py OUT [--train 200] [--val 50] [--size 320x240] [--classes 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from alexnet_pipe.apps.synthetic import CLASSES, SynthConfig, make_image_tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=200, help="training images per class")
    ap.add_argument("--val", type=int, default=50, help="validation images per class")
    ap.add_argument("--size", default="320x240", help="WIDTHxHEIGHT")
    ap.add_argument("--classes", type=int, default=len(CLASSES), help=f"1..{len(CLASSES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--texture", type=float, default=1.0, help="background clutter: 1 photo-like, 0.3 easy")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    cfg = SynthConfig(args.out, args.train, args.val, (w, h), CLASSES[: args.classes], args.seed, texture=args.texture)
    t0 = time.perf_counter()
    counts = make_image_tree(cfg)
    print(f"wrote {counts} images of {w}x{h} to {args.out} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
