"""Image grids for ``inspect``: a batch drawn tile by tile with its labels and captions, one image
under a title, and ``denormalize``, which turns a normalised float batch back into uint8 pixels.

Tiles are drawn with nearest-neighbour sampling at native size or larger, so the pixels shown are
the batch's. matplotlib is imported inside the drawing functions; figures are written by
``apps/figure_file.py`` (format by suffix, atomically).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alexnet_pipe.apps.figure_file import check_output, save_figure
from alexnet_pipe.apps.figure_text import DPI, shorten, text_width, wrap
from alexnet_pipe.errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MIN_TILE = 96  # pixels: smaller images are drawn larger (nearest neighbour), so they can be seen
MIN_CELL = 120  # pixels: room for a caption under narrow tiles
MAX_WIDTH = 720  # pixels: a figure grows to its title's width up to this, then the title wraps
MARGIN = 8  # pixels: between a title and the figure's edge
TITLE_PT, CAPTION_PT = 11, 9  # font sizes (points)
TITLE_LINE = 19  # pixels: one line of the title (11 pt at 100 dpi, matplotlib's 1.2 line spacing)


def image_figure(images: np.ndarray, captions: Sequence[str], cols: int = 8, title: str = "") -> Figure:
    """A figure of ``images`` (N x H x W x 3 uint8) in a grid, each with its caption, ``title`` on top.

    Tiles are shown with nearest-neighbour sampling at native size or larger, so the pixels are
    the batch's pixels, not a blur of them.
    """
    from matplotlib.figure import Figure

    n, h, w = images.shape[:3]
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    scale = max(1, math.ceil(MIN_TILE / max(h, w)))
    tile_w, tile_h = w * scale, h * scale
    cell_w = max(tile_w, MIN_CELL) + 8
    lines = max((c.count("\n") + 1 for c in captions if c), default=0)
    gap = 8 + 15 * lines  # above each row: its captions
    # As wide as the grid, or as its title up to MAX_WIDTH; the title wraps to that width.
    width = max(cols * cell_w, 360, min(math.ceil(text_width(title, TITLE_PT)) + 2 * MARGIN, MAX_WIDTH))
    shown = wrap(title, width - 2 * MARGIN, TITLE_PT)
    head = 18 + TITLE_LINE * (shown.count("\n") + 1) if title else 0
    height = head + rows * (tile_h + gap) + 4
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, label=title or "images")
    # Axes of exactly tile_w x tile_h pixels: each image pixel becomes scale x scale figure pixels.
    side = (width - cols * cell_w + cell_w - tile_w) / 2
    fig.subplots_adjust(left=side / width, right=1 - side / width, bottom=4 / height, top=1 - (head + gap) / height,
                        wspace=(cell_w - tile_w) / tile_w, hspace=gap / tile_h)
    for i, ax in enumerate(fig.subplots(rows, cols, squeeze=False).flat):
        ax.set_axis_off()
        if i < n:
            ax.imshow(images[i], interpolation="nearest")
            if captions[i]:
                text = "\n".join(shorten(part, cell_w - 4, CAPTION_PT) for part in captions[i].split("\n"))
                ax.set_title(text, fontsize=CAPTION_PT, pad=3)
    if title:
        fig.suptitle(shown, fontsize=TITLE_PT, y=1 - 6 / height, va="top")
    return fig


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise InputError(f"images must be a uint8 numpy array, got {got}; use denormalize() on a float batch")
    if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape:
        raise InputError(
            f"images must be N x H x W x 3 (RGB, channels last, not empty), got shape {images.shape}; "
            "for an NCHW batch use denormalize(..., layout='NCHW')"
        )


def draw_grid(
    images: np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    out: Path,
    cols: int = 8,
    captions: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Draw a batch as a grid, each tile captioned with its label (and an optional extra line).

    Args:
        images: uint8 array N x H x W x 3, RGB (see :func:`denormalize`).
        labels: N class indices.
        class_names: names indexed by label; empty to show indices only.
        out: the file to write, .png, .svg or .pdf (replaced atomically; parent folders are created).
        cols: tiles per row (fewer when N < cols).
        captions: optional N extra caption lines, e.g. ``"flipped"``.
        title: drawn across the top, e.g. the dataset, split and settings.

    Returns:
        ``out``.
    """
    check_output(out)
    _check_images(images)
    n = images.shape[0]
    if cols < 1:
        raise InputError(f"cols must be >= 1, got {cols}")
    if len(labels) != n:
        raise InputError(f"got {len(labels)} labels for {n} images; pass one label per image")
    if captions is not None and len(captions) != n:
        raise InputError(f"got {len(captions)} captions for {n} images; pass one caption per image (or none)")
    texts = []
    for i, label in enumerate(labels):
        label = int(label)
        if class_names and not 0 <= label < len(class_names):
            raise InputError(f"label {label} of image {i} is outside class_names ({len(class_names)} names); "
                             "pass the dataset's class list")
        text = f"{label} {class_names[label]}" if class_names else str(label)
        texts.append(f"{text}\n{captions[i]}" if captions is not None else text)
    return save_figure(image_figure(images, texts, cols, title), out)


def draw_image(image: np.ndarray, out: Path, title: str = "") -> Path:
    """Draw one H x W x 3 uint8 RGB image under ``title`` into ``out`` (.png, .svg or .pdf); return ``out``."""
    check_output(out)
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise InputError(f"image must be one H x W x 3 uint8 array, got {getattr(image, 'shape', type(image))}")
    _check_images(image[None])
    return save_figure(image_figure(image[None], [""], 1, title), out)


def denormalize(
    batch: np.ndarray,
    mean_rgb: Sequence[float],
    std_rgb: Sequence[float] | None,
    layout: str,
) -> np.ndarray:
    """Undo ``(pixel - mean) / std`` and return displayable uint8 images.

    Args:
        batch: float batch as the model consumes it (a CPU torch tensor works too).
        mean_rgb: per-channel mean on the 0..255 scale, RGB order.
        std_rgb: per-channel std, RGB order; None when the pipeline only subtracts the mean.
        layout: ``"NCHW"`` or ``"NHWC"``.

    Returns:
        uint8 array N x H x W x 3 (rounded, clipped to 0..255).
    """
    if layout not in ("NCHW", "NHWC"):
        raise InputError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    arr = np.asarray(batch, dtype=np.float64)
    if arr.ndim != 4:
        raise InputError(f"batch must be 4-D ({layout}), got shape {arr.shape}")
    if layout == "NCHW":
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] != 3:
        raise InputError(
            f"batch has {arr.shape[-1]} channels in {layout} layout (shape {np.shape(batch)}); "
            "expected 3 - check the layout"
        )
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise InputError(f"batch holds {bad} NaN/inf values; check the pipeline's normalisation (a zero std?)")
    mean = np.asarray(mean_rgb, dtype=np.float64)
    if mean.shape != (3,):
        raise InputError(f"mean_rgb needs 3 values (R, G, B), got {list(mean_rgb)}")
    if std_rgb is not None:
        std = np.asarray(std_rgb, dtype=np.float64)
        if std.shape != (3,) or not np.all(std > 0):
            raise InputError(f"std_rgb needs 3 positive values (R, G, B) or None, got {list(std_rgb)}")
        arr = arr * std
    return np.clip(np.rint(arr + mean), 0, 255).astype(np.uint8)
