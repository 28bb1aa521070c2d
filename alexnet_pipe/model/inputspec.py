"""What a network expects as input: crop, channel order, value range, mean and std.

Weights trained here take RGB pixels in 0..255 minus the dataset's per-channel mean. Imported
weights expect what their source fed them: BGR for neon and Caffe, 0..1 with ImageNet's std for
torchvision. Every weights file records this (its ``data`` block); ``InputSpec`` reads it back and
turns it into the per-channel (mean, std) the DALI pipeline and ``predict`` apply to 0..255
decoded pixels, so training, testing and prediction feed a network exactly what it was made for.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from alexnet_pipe.errors import InputError

CHANNEL_ORDERS = ("RGB", "BGR")
Triple = tuple[float, float, float]


@dataclass(frozen=True)
class InputSpec:
    """A network's input. ``mean_rgb``/``std_rgb`` are in R, G, B order and in the units of
    ``value_range`` (0..255 or 0..1); ``channel_order`` is the order of the input's channels."""

    crop: int
    mean_rgb: Triple = (0.0, 0.0, 0.0)
    std_rgb: Triple | None = None  # None: mean subtraction only (neon, Caffe)
    channel_order: str = "RGB"
    value_range: tuple[float, float] = (0.0, 255.0)
    short_side: int = 256  # the short side the validation images are resized to before the centre crop
    # (height, width) every image is squashed to instead, aspect ignored (convert --resize squash, Caffe's
    # 256x256); None: the short side rule. Not recorded when None: files from before read as None.
    squash: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.channel_order not in CHANNEL_ORDERS:
            raise InputError(f"channel order must be one of {CHANNEL_ORDERS}, got {self.channel_order!r}")
        if tuple(self.value_range) not in ((0.0, 255.0), (0.0, 1.0)):
            raise InputError(f"value range must be 0..255 or 0..1, got {self.value_range}")
        if len(self.mean_rgb) != 3 or (self.std_rgb is not None and len(self.std_rgb) != 3):
            raise InputError("mean and std need three values each (R, G, B)")
        if self.std_rgb is not None and min(self.std_rgb) <= 0:
            raise InputError(f"std values must be > 0, got {self.std_rgb}")
        if self.squash is not None and (len(self.squash) != 2 or min(self.squash) < 1):
            raise InputError(f"squash must be a height and a width >= 1, got {self.squash}")

    @classmethod
    def from_data(cls, data: Mapping, crop: int) -> InputSpec:
        """The spec a weights file's ``data`` block records (files from before the block had the
        input fields read as RGB 0..255, which is what they were trained on)."""
        std = data.get("std_rgb")
        return cls(
            crop=int(crop),
            mean_rgb=tuple(float(v) for v in data.get("mean_rgb", (0.0, 0.0, 0.0))),
            std_rgb=None if std is None else tuple(float(v) for v in std),
            channel_order=str(data.get("channel_order", "RGB")),
            value_range=tuple(float(v) for v in data.get("value_range", (0, 255))),
            # 0: the dataset kept every image at its own size (convert --short-side 0)
            short_side=256 if data.get("short_side") is None else int(data["short_side"]),
            squash=None if data.get("squash") is None else tuple(int(v) for v in data["squash"]),
        )

    def to_data(self) -> dict:
        """The input fields of a weights file's ``data`` block (the inverse of ``from_data``)."""
        return {
            "mean_rgb": [float(v) for v in self.mean_rgb],
            "std_rgb": None if self.std_rgb is None else [float(v) for v in self.std_rgb],
            "crop": self.crop, "short_side": self.short_side, "channel_order": self.channel_order,
            "value_range": [v if v != int(v) else int(v) for v in self.value_range],
            **({"squash": list(self.squash)} if self.squash is not None else {}),  # only when set: files as before
        }

    def geometry(self) -> str:
        """How an image is sized before the centre crop, in words: ``short side 256``, ``squashed to 256x256``."""
        if self.squash is not None:
            return f"squashed to {self.squash[1]}x{self.squash[0]}"
        return f"short side {self.short_side}" if self.short_side else "size kept"

    @property
    def native(self) -> bool:
        """True for this project's own input (RGB, 0..255)."""
        return self.channel_order == "RGB" and tuple(self.value_range) == (0.0, 255.0)

    def pixel_normalization(self) -> tuple[Triple, Triple]:
        """(mean, std) per input channel, in ``channel_order``, in 0..255 pixel units: the network's
        input is ``(pixel - mean) / std`` for pixels decoded as 0..255 in that channel order."""
        scale = 255.0 / self.value_range[1]
        mean = [m * scale for m in self.mean_rgb]
        std = [s * scale for s in self.std_rgb] if self.std_rgb is not None else [scale] * 3
        if self.channel_order == "BGR":
            mean, std = mean[::-1], std[::-1]
        return tuple(mean), tuple(std)

    def normalize(self, rgb: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 RGB pixels -> 3 x H x W float32 network input."""
        mean, std = self.pixel_normalization()
        pixels = rgb[..., ::-1] if self.channel_order == "BGR" else rgb
        out = (pixels.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def describe(self) -> str:
        """One line for logs: ``BGR 0..255, mean R,G,B 123.7,116.3,103.5``."""
        lo, hi = self.value_range
        text = f"{self.channel_order} {lo:g}..{hi:g}, mean R,G,B {','.join(f'{v:g}' for v in self.mean_rgb)}"
        return text + (f", std {','.join(f'{v:g}' for v in self.std_rgb)}" if self.std_rgb is not None else "")
