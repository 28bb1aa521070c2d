"""Small frozen configs that flow from the CLI into the jobs.

Each checks itself in ``__post_init__`` so a bad value fails before any work starts.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMATS = ("lmdb", "recordio")


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ImageSettings:
    """How every image is normalised before it is stored. Part of the output's identity."""

    short_side: int = 256  # scale the shorter side down to this; 0 keeps the size
    quality: int = 90  # JPEG quality of re-encoded images
    max_pixels: int = 89_478_485  # larger images are skipped as decompression bombs
    passthrough: bool = True  # keep a clean small-enough baseline RGB JPEG's bytes as they are

    def __post_init__(self) -> None:
        if self.short_side < 0:
            raise ValueError(f"short side must be >= 0 (0 keeps the size), got {self.short_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.quality}")
        if self.max_pixels < 1:
            raise ValueError(f"max pixels must be >= 1, got {self.max_pixels}")


@dataclass(frozen=True)
class ConvertConfig:
    """Inputs of the `convert` job."""

    src: Path
    dst: Path
    formats: tuple[str, ...] = ("lmdb",)
    image: ImageSettings = field(default_factory=ImageSettings)
    shard_size: int = 5000
    workers: int = field(default_factory=default_workers)
    seed: int = 0
    force: bool = False
    progress: bool = True
    val_labels: Path | None = None  # overrides auto-detection of the flat-val label file
    synsets: Path | None = None  # overrides auto-detection of the synset list

    def __post_init__(self) -> None:
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {self.formats}")
        if self.shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {self.shard_size}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    def settings(self) -> dict:
        """The settings that define the output bytes (recorded in the manifest)."""
        return {
            "formats": list(self.formats),
            **asdict(self.image),
            "shard_size": self.shard_size,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class VerifyConfig:
    """Inputs of the `verify` job."""

    root: Path
    workers: int = field(default_factory=default_workers)
    decode: bool = True  # decode every image (slow); False checks structure and checksums only
    progress: bool = True

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class UpdateMeanConfig:
    """Inputs of the `update-mean` job."""

    path: Path
    into: Path | None = None  # where mean.json goes for a Caffe/npy file (default: beside it)
    channel_order: str | None = None  # override the channel order of an .npy mean (rgb/bgr)

    def __post_init__(self) -> None:
        if self.channel_order not in (None, "rgb", "bgr"):
            raise ValueError(f"channel order must be rgb or bgr, got {self.channel_order}")
