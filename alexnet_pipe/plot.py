"""Pillow-only drawings: training curves from the metrics log, and image grids for ``inspect``.

No matplotlib: two small jobs do not justify the dependency. Both writers produce a
PNG atomically (write aside, then rename), so a viewer polling the file never sees half.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import FormatError
from .fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

# (key, legend label, RGB colour): the matplotlib "tab10" colours, easy to tell apart.
LOSS_SERIES = (("train_loss", "train loss", (31, 119, 180)), ("val_loss", "val loss", (255, 127, 14)))
ACC_SERIES = (("val_top1", "val top-1", (44, 160, 44)), ("val_top5", "val top-5", (214, 39, 40)))
METRIC_KEYS = tuple(key for key, _, _ in LOSS_SERIES + ACC_SERIES)

CURVES_SIZE = (1000, 450)
GRID_COLOUR = (232, 232, 232)
AXIS_COLOUR = (60, 60, 60)
TEXT_COLOUR = (20, 20, 20)
NOTE_COLOUR = (180, 30, 30)


# ---------------------------------------------------------------- metrics log


def _check_number(value, where: str) -> float | None:
    """``value`` as a float (None when absent); raise ValueError if it is not a number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} is {value!r}, expected a number")
    return float(value)


def _check_epoch(value, where: str) -> int:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value != int(value) or value < 0:
        raise ValueError(f"{where}: epoch is {value!r}, expected a whole number >= 0")
    return int(value)


def read_metrics(path: Path) -> list[dict]:
    """Read the trainer's JSON-lines metrics log and keep the per-epoch records.

    Blank lines and records without an ``"epoch"`` key (e.g. ``{"event": "test"}``) are
    skipped. An unterminated, unparsable last line is a write still in progress (the
    trainer is running) and is skipped with a warning; any other bad line is an error.

    Args:
        path: the ``metrics.jsonl`` file written by training.

    Returns:
        The epoch records in file order, as dicts.

    Raises:
        FormatError: a line is not a JSON object, has a non-numeric metric, or the
            file holds no epoch record at all.
    """
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    others = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # no newline after it: a partial write
                log.warning("%s:%d: skipping an unfinished last line", path, lineno)
                continue
            raise FormatError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object "
                f'such as {{"epoch": 1, "train_loss": 2.3}}; fix or delete that line'
            ) from None
        if not isinstance(obj, dict):
            raise FormatError(
                f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}; fix or delete that line"
            )
        if "epoch" not in obj:
            others += 1
            continue
        try:
            _check_epoch(obj["epoch"], "record")
            for key in METRIC_KEYS:
                _check_number(obj.get(key), key)
        except ValueError as e:
            raise FormatError(f"{path}:{lineno}: {e}; fix or delete that line") from None
        records.append(obj)
    if not records:
        what = f"only {others} non-epoch record(s), e.g. test results" if others else "no records"
        raise FormatError(
            f"{path} has no per-epoch records ({what}); pass the metrics log of a training run "
            "that finished at least one epoch"
        )
    return records


# ---------------------------------------------------------------- axes helpers


def _font(size: int) -> Font:
    """Pillow's bundled font at ``size``; the small bitmap font on Pillow < 10.1 or without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def nice_ticks(lo: float, hi: float, target: int = 5, integer: bool = False) -> tuple[float, float, list[float]]:
    """Axis limits and tick values on a 1/2/5 x 10^k grid that covers ``[lo, hi]``.

    Example: ``nice_ticks(1.7, 6.9)`` -> ``(0.0, 8.0, [0, 2, 4, 6, 8])``.

    Args:
        lo, hi: the data range (finite; ``lo == hi`` is widened).
        target: about how many intervals to aim for.
        integer: ticks at whole numbers only (epochs).

    Returns:
        (axis_lo, axis_hi, ticks).
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"axis range must be finite, got {lo}..{hi}")
    lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:
        pad = 1.0 if integer or lo == 0 else abs(lo) * 0.1
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, target)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, float(round(step)))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    digits = max(0, -math.floor(math.log10(step))) + 1
    ticks = [round(k * step, digits) for k in range(first, last + 1)]
    return ticks[0], ticks[-1], ticks


def _tick_label(value: float, step: float) -> str:
    if abs(value) >= 1e5 or 0 < step < 1e-4:
        return f"{value:g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


@dataclass(frozen=True)
class _Axes:
    """A plot rectangle in pixels and the data range it shows."""

    left: int
    top: int
    right: int
    bottom: int
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float

    def to_px(self, x: float, y: float) -> tuple[float, float]:
        fx = (x - self.x_lo) / (self.x_hi - self.x_lo)
        fy = (y - self.y_lo) / (self.y_hi - self.y_lo)
        # Clamp so an out-of-range value (e.g. accuracy given as 0..1 or > 100) stays on the panel.
        fx, fy = min(max(fx, 0.0), 1.0), min(max(fy, 0.0), 1.0)
        return self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Font) -> tuple[int, int]:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    return r - l, b - t


def _draw_frame(
    img: Image.Image, ax: _Axes, xticks: list[float], yticks: list[float], xlabel: str, ylabel: str, font: Font
) -> None:
    """Grid lines, axis lines, tick marks with labels, and the two axis titles."""
    draw = ImageDraw.Draw(img)
    xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 1.0
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0
    for t in yticks:
        _, py = ax.to_px(ax.x_lo, t)
        draw.line([(ax.left, py), (ax.right, py)], fill=GRID_COLOUR)
        draw.line([(ax.left - 5, py), (ax.left, py)], fill=AXIS_COLOUR)
        draw.text((ax.left - 8, py), _tick_label(t, ystep), fill=TEXT_COLOUR, font=font, anchor="rm")
    for t in xticks:
        px, _ = ax.to_px(t, ax.y_lo)
        draw.line([(px, ax.top), (px, ax.bottom)], fill=GRID_COLOUR)
        draw.line([(px, ax.bottom), (px, ax.bottom + 5)], fill=AXIS_COLOUR)
        draw.text((px, ax.bottom + 8), _tick_label(t, xstep), fill=TEXT_COLOUR, font=font, anchor="mt")
    draw.line([(ax.left, ax.top), (ax.left, ax.bottom), (ax.right, ax.bottom)], fill=AXIS_COLOUR, width=1)
    draw.text(((ax.left + ax.right) / 2, ax.bottom + 30), xlabel, fill=TEXT_COLOUR, font=font, anchor="mt")
    # Pillow cannot draw rotated text directly: draw it flat on a patch and rotate the patch.
    w, h = _text_size(draw, ylabel, font)
    patch = Image.new("RGB", (w + 4, h + 6), "white")
    ImageDraw.Draw(patch).text((2, 1), ylabel, fill=TEXT_COLOUR, font=font)
    patch = patch.rotate(90, expand=True)
    img.paste(patch, (ax.left - 62, (ax.top + ax.bottom - patch.height) // 2))


def _series(records: list[dict], key: str) -> tuple[list[list[tuple[int, float]]], int]:
    """Line segments of (epoch, value) for ``key``, and how many non-finite values were skipped.

    A missing value (no evaluation that epoch) is bridged; a NaN/inf breaks the line,
    so a gap shows where training blew up.
    """
    segments: list[list[tuple[int, float]]] = [[]]
    skipped = 0
    for r in records:
        v = _check_number(r.get(key), f"epoch {r['epoch']}: {key}")
        if v is None:
            continue
        if not math.isfinite(v):
            skipped += 1
            if segments[-1]:
                segments.append([])
            continue
        segments[-1].append((r["epoch"], v))
    return [s for s in segments if s], skipped


def _draw_panel(
    img: Image.Image,
    x0: int,
    records: list[dict],
    series: tuple[tuple[str, str, tuple[int, int, int]], ...],
    name: str,
    ylabel: str,
    y_range: tuple[float, float] | None,
    fonts: tuple[Font, Font],
) -> int:
    """Draw one panel whose left edge is at ``x0``; return the number of non-finite values skipped."""
    font, small = fonts
    draw = ImageDraw.Draw(img)
    width, height = CURVES_SIZE[0] // 2, CURVES_SIZE[1]
    drawn = [(label, colour, *_series(records, key)) for key, label, colour in series]
    skipped = sum(d[3] for d in drawn)
    values = [v for _, _, segs, _ in drawn for s in segs for _, v in s]

    epochs = [r["epoch"] for r in records]
    x_lo, x_hi, xticks = nice_ticks(min(epochs), max(epochs), target=6, integer=True)
    if y_range is not None:
        y_lo, y_hi, yticks = nice_ticks(*y_range, target=5)
    else:
        y_lo, y_hi, yticks = nice_ticks(min(values, default=0.0), max(values, default=1.0), target=5)
    ax = _Axes(x0 + 80, 72, x0 + width - 22, height - 64, x_lo, x_hi, y_lo, y_hi)
    _draw_frame(img, ax, xticks, yticks, "epoch", ylabel, small)

    # Panel title on the left of the header row, legend on the right.
    draw.text((ax.left, 48), name, fill=TEXT_COLOUR, font=font, anchor="lm")
    x = ax.right
    for label, colour, _segs, _ in reversed(drawn):
        x -= _text_size(draw, label, small)[0]
        draw.text((x, 48), label, fill=TEXT_COLOUR, font=small, anchor="lm")
        x -= 26
        draw.line([(x, 48), (x + 20, 48)], fill=colour, width=2)
        draw.ellipse([x + 7, 45, x + 13, 51], fill=colour)
        x -= 14

    if not values:
        centre = ((ax.left + ax.right) / 2, (ax.top + ax.bottom) / 2)
        draw.text(centre, "no data yet", fill=AXIS_COLOUR, font=font, anchor="mm")
    for _, colour, segs, _ in drawn:
        for seg in segs:
            pts = [ax.to_px(e, v) for e, v in seg]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2, joint="curve")
            for px, py in pts:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    return skipped


def _save_png(img: Image.Image, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return out


def plot_curves(records: list[dict], out: Path, title: str = "") -> Path:
    """Draw loss and accuracy curves per epoch into a 1000x450 PNG.

    Left panel: ``train_loss`` and ``val_loss``; right panel: ``val_top1`` and ``val_top5``
    (percent, 0..100). Records are sorted by epoch; when an epoch appears twice (a resumed
    run appends), the later record wins. Missing values are bridged, NaN/inf values are
    skipped with a note on the chart.

    Args:
        records: epoch records, e.g. from :func:`read_metrics`.
        out: the PNG to write (replaced atomically; parent folders are created).
        title: drawn across the top, e.g. the run name.

    Returns:
        ``out``.
    """
    by_epoch: dict[int, dict] = {}
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "epoch" not in r:
            raise ValueError(f"record {i} has no 'epoch' key; pass only epoch records (read_metrics filters them)")
        by_epoch[_check_epoch(r["epoch"], f"record {i}")] = {**r, "epoch": int(r["epoch"])}
    if not by_epoch:
        raise ValueError("no epoch records to plot; train for at least one epoch first")
    ordered = [by_epoch[e] for e in sorted(by_epoch)]

    img = Image.new("RGB", CURVES_SIZE, "white")
    fonts = (_font(15), _font(12))
    skipped = _draw_panel(img, 0, ordered, LOSS_SERIES, "loss", "loss", None, fonts)
    half = CURVES_SIZE[0] // 2
    skipped += _draw_panel(img, half, ordered, ACC_SERIES, "accuracy %", "accuracy %", (0.0, 100.0), fonts)

    draw = ImageDraw.Draw(img)
    if title:
        draw.text((CURVES_SIZE[0] / 2, 16), title, fill=TEXT_COLOUR, font=_font(17), anchor="mm")
    if skipped:
        note = f"non-finite values skipped ({skipped})"
        draw.text((CURVES_SIZE[0] - 12, 16), note, fill=NOTE_COLOUR, font=fonts[1], anchor="rm")
    return _save_png(img, out)


# ---------------------------------------------------------------- image grids

MIN_TILE = 64  # upscale smaller images (by a whole factor, nearest) so they are visible
MIN_CELL_W = 112  # room for a caption under narrow tiles
PAD = 4
LINE_H = 16


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a :func:`draw_grid` image."""

    n: int
    cols: int
    rows: int
    scale: int
    tile_h: int
    tile_w: int
    cell_h: int
    cell_w: int

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole image."""
        return self.cols * self.cell_w, self.rows * self.cell_h

    def tile_origin(self, i: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of image ``i``'s tile."""
        row, col = divmod(i, self.cols)
        return col * self.cell_w + (self.cell_w - self.tile_w) // 2, row * self.cell_h + PAD


def grid_layout(n: int, height: int, width: int, cols: int = 8, caption_lines: int = 1) -> GridLayout:
    """Geometry for ``n`` images of ``height`` x ``width`` in ``cols`` columns.

    Example: 10 images of 224x224, ``cols=8`` -> 8 columns, 2 rows, tiles at native size.
    Fewer images than ``cols`` use ``n`` columns.
    """
    if n < 1 or height < 1 or width < 1:
        raise ValueError(f"need at least one non-empty image, got {n} of {height}x{width}")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    cols = min(cols, n)
    scale = max(1, math.ceil(MIN_TILE / max(height, width)))
    tile_h, tile_w = height * scale, width * scale
    cell_w = max(tile_w, MIN_CELL_W) + 2 * PAD
    cell_h = PAD + tile_h + 2 + caption_lines * LINE_H + PAD
    return GridLayout(n, cols, math.ceil(n / cols), scale, tile_h, tile_w, cell_h, cell_w)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, width: int) -> str:
    """``text``, cut with "..." so that it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..." if text else ""


def draw_grid(
    images: np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    out: Path,
    cols: int = 8,
    captions: Sequence[str] | None = None,
) -> Path:
    """Draw a batch as a captioned grid PNG, pixels untouched (small images upscaled by a whole factor).

    Args:
        images: uint8 array N x H x W x 3, RGB (see :func:`denormalize`).
        labels: N class indices.
        class_names: names indexed by label; empty to show indices only.
        out: the PNG to write (replaced atomically; parent folders are created).
        cols: tiles per row (fewer when N < cols).
        captions: optional N extra caption lines, e.g. ``"flipped"``.

    Returns:
        ``out``.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"images must be a uint8 numpy array, got {got}; use denormalize() on a float batch")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be N x H x W x 3 (RGB, channels last), got shape {images.shape}; "
            "for an NCHW batch use denormalize(..., layout='NCHW')"
        )
    n = images.shape[0]
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} images; pass one label per image")
    if captions is not None and len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} images; pass one caption per image (or none)")
    for i, label in enumerate(labels):
        if class_names and not 0 <= int(label) < len(class_names):
            raise ValueError(
                f"label {label} of image {i} is outside class_names ({len(class_names)} names); "
                "pass the dataset's class list"
            )

    layout = grid_layout(n, images.shape[1], images.shape[2], cols, 1 if captions is None else 2)
    img = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(img)
    font = _font(12)
    text_w = layout.cell_w - 2 * PAD
    for i in range(n):
        tile = images[i]
        if layout.scale > 1:
            tile = tile.repeat(layout.scale, axis=0).repeat(layout.scale, axis=1)
        x, y = layout.tile_origin(i)
        img.paste(Image.fromarray(np.ascontiguousarray(tile), "RGB"), (x, y))
        label = int(labels[i])
        lines = [f"{label} {class_names[label]}" if class_names else str(label)]
        if captions is not None:
            lines.append(captions[i])
        cx = x + layout.tile_w // 2
        for k, line in enumerate(lines):
            pos = (cx, y + layout.tile_h + 2 + k * LINE_H)
            draw.text(pos, _fit(draw, line, font, text_w), fill=TEXT_COLOUR, font=font, anchor="mt")
    return _save_png(img, out)


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
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    arr = np.asarray(batch, dtype=np.float64)
    if arr.ndim != 4:
        raise ValueError(f"batch must be 4-D ({layout}), got shape {arr.shape}")
    if layout == "NCHW":
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] != 3:
        raise ValueError(
            f"batch has {arr.shape[-1]} channels in {layout} layout (shape {np.shape(batch)}); "
            "expected 3 - check the layout"
        )
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ValueError(f"batch holds {bad} NaN/inf values; check the pipeline's normalisation (a zero std?)")
    mean = np.asarray(mean_rgb, dtype=np.float64)
    if mean.shape != (3,):
        raise ValueError(f"mean_rgb needs 3 values (R, G, B), got {list(mean_rgb)}")
    if std_rgb is not None:
        std = np.asarray(std_rgb, dtype=np.float64)
        if std.shape != (3,) or not np.all(std > 0):
            raise ValueError(f"std_rgb needs 3 positive values (R, G, B) or None, got {list(std_rgb)}")
        arr = arr * std
    return np.clip(np.rint(arr + mean), 0, 255).astype(np.uint8)
