"""The dataset mean store: exact pixel statistics, ``mean.json``, and old-format detection.

Current format (``mean.json``)::

    {"format": "alexnet-pipe-mean", "version": 1, "channel_order": "RGB",
     "mean": [r, g, b], "std": [r, g, b] | null, "value_range": [0, 255], ...}

Old formats are full mean images (neon's ``dataset_cache.pkl``, Caffe's
``mean.binaryproto``, ``mean.npy``); readers refuse them and point at ``update-mean``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DatasetError, OldMeanFormatError
from .fsutil import atomic_write_json

MEAN_FILE = "mean.json"
MEAN_FORMAT = "alexnet-pipe-mean"
MEAN_VERSION = 1
OLD_MEAN_FILES = ("dataset_cache.pkl", "mean.binaryproto", "mean.npy")


@dataclass(frozen=True)
class ChannelMean:
    """Per-channel mean (and std, when known) on the 0..255 scale."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float] | None = None
    channel_order: str = "RGB"
    images: int = 0
    pixels: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel order must be RGB or BGR, got {self.channel_order}")
        if len(self.mean) != 3 or (self.std is not None and len(self.std) != 3):
            raise ValueError("mean and std need exactly three channels")

    def rgb(self) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
        """(mean, std) in RGB order, the order DALI decodes to."""
        if self.channel_order == "RGB":
            return tuple(self.mean), None if self.std is None else tuple(self.std)
        return tuple(self.mean[::-1]), None if self.std is None else tuple(self.std[::-1])

    def to_json(self) -> dict:
        return {
            "format": MEAN_FORMAT,
            "version": MEAN_VERSION,
            "channel_order": self.channel_order,
            "value_range": [0, 255],
            "mean": list(self.mean),
            "std": None if self.std is None else list(self.std),
            "images": self.images,
            "pixels": self.pixels,
            "source": self.source,
        }


@dataclass
class PixelStats:
    """Exact integer sums over RGB pixels, so merging shards in any order gives the same mean."""

    images: int = 0
    pixels: int = 0
    sums: list[int] = field(default_factory=lambda: [0, 0, 0])
    sq_sums: list[int] = field(default_factory=lambda: [0, 0, 0])

    def add_image(self, width: int, height: int, sums, sq_sums) -> None:
        self.images += 1
        self.pixels += width * height
        for c in range(3):
            self.sums[c] += sums[c]
            self.sq_sums[c] += sq_sums[c]

    def merge(self, other: "PixelStats") -> None:
        self.images += other.images
        self.pixels += other.pixels
        for c in range(3):
            self.sums[c] += other.sums[c]
            self.sq_sums[c] += other.sq_sums[c]

    def to_json(self) -> dict:
        return {"images": self.images, "pixels": self.pixels, "sums": self.sums, "sq_sums": self.sq_sums}

    @classmethod
    def from_json(cls, obj: dict) -> "PixelStats":
        return cls(obj["images"], obj["pixels"], list(obj["sums"]), list(obj["sq_sums"]))

    def to_mean(self, source: str) -> ChannelMean:
        if not self.pixels:
            raise DatasetError("no training pixels to compute a mean from (the train split is empty)")
        n = self.pixels
        mean = tuple(s / n for s in self.sums)
        # Var = E[x^2] - E[x]^2 computed from exact integers: no catastrophic cancellation.
        std = tuple(math.sqrt(max(0, q * n - s * s)) / n for s, q in zip(self.sums, self.sq_sums))
        return ChannelMean(mean, std, "RGB", self.images, self.pixels, source)


def write_mean(path: Path, mean: ChannelMean) -> None:
    atomic_write_json(path, mean.to_json())


def parse_mean(obj: dict, where: str) -> ChannelMean:
    """Validate a mean.json object; a full-image or unknown mean raises OldMeanFormatError."""
    if not isinstance(obj, dict) or obj.get("format") != MEAN_FORMAT:
        raise OldMeanFormatError(f"{where} is not an alexnet-pipe mean file")
    if obj.get("version") != MEAN_VERSION:
        raise OldMeanFormatError(f"{where} has mean format version {obj.get('version')}, expected {MEAN_VERSION}")
    mean, std = obj.get("mean"), obj.get("std")
    if not (isinstance(mean, list) and len(mean) == 3 and all(isinstance(v, (int, float)) for v in mean)):
        raise OldMeanFormatError(f"{where} does not hold one mean value per channel")
    return ChannelMean(
        tuple(float(v) for v in mean),
        None if std is None else tuple(float(v) for v in std),
        obj.get("channel_order", "RGB"),
        int(obj.get("images", 0)),
        int(obj.get("pixels", 0)),
        str(obj.get("source", "")),
    )


def read_mean_file(path: Path) -> ChannelMean:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path} ({exc})") from exc
    return parse_mean(obj, str(path))


def load_dataset_mean(root: Path) -> ChannelMean:
    """The per-channel mean of a dataset directory.

    Raises:
        OldMeanFormatError: only an old full-image mean is there; the message names the fix.
        DatasetError: no mean at all.
    """
    fix = f"run: alexnet-pipe update-mean {root}"
    path = root / MEAN_FILE
    old = [name for name in OLD_MEAN_FILES if (root / name).exists()]
    if path.exists():
        try:
            return read_mean_file(path)
        except OldMeanFormatError as exc:
            raise OldMeanFormatError(f"{exc}: {root} holds an old mean format; {fix}") from exc
    if old:
        raise OldMeanFormatError(f"{root} holds an old full-image mean ({', '.join(old)}); {fix}")
    raise DatasetError(f"{root} has no {MEAN_FILE}; convert the dataset with alexnet-pipe convert")
