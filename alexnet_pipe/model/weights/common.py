"""What every importer returns, and the checks they share (pure: no file I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from alexnet_pipe.errors import FormatError
from alexnet_pipe.model.alexnet import AlexNetConfig

SHORT_SIDE = 256  # all three sources resize the short side (Caffe: both sides) to 256 before the centre crop


@dataclass
class Imported:
    """One source's weights in this project's layout, with what the source implies about its input.

    ``mean_rgb``/``std_rgb`` are in R, G, B order and in the units of ``value_range``;
    ``channel_order`` is the order the network's input channels are in (after normalising).
    """

    source_format: str  # e.g. "neon v1.4 pickle"
    network: str  # which published network the shapes identify
    model_config: AlexNetConfig
    state_dict: dict[str, torch.Tensor]
    channel_order: str
    value_range: tuple[float, float]
    mean_rgb: tuple[float, float, float]
    std_rgb: tuple[float, float, float] | None
    source_class_order: str  # what the source's fc8 rows are ordered by, for the notes
    notes: list[str] = field(default_factory=list)
    # (height, width) the source squashed every image to, aspect ignored (Caffe); None: the short side
    squash: tuple[int, int] | None = None


def expect_shape(what: str, arr: np.ndarray, shape: tuple[int, ...], hint: str = "") -> None:
    """Refuse an array whose shape is not ``shape`` (the message names the layer and both shapes)."""
    if tuple(arr.shape) != tuple(shape):
        raise FormatError(f"{what} has shape {tuple(arr.shape)}, expected {tuple(shape)}{hint}")


def tensor(arr: np.ndarray) -> torch.Tensor:
    """float32, contiguous, owning its memory (the state dict outlives the file's buffer)."""
    return torch.from_numpy(np.array(arr, dtype=np.float32, order="C", copy=True))


def check_numeric(what: str, arr: object) -> np.ndarray:
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        kind = type(arr).__name__ if not isinstance(arr, np.ndarray) else f"a {arr.dtype} array"
        raise FormatError(f"{what} is {kind}, expected a float array")
    if not np.isfinite(arr).all():
        raise FormatError(f"{what} holds NaN or infinite values; the weights are damaged")
    return arr
