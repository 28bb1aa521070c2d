"""Training curves from the metrics log, and image grids for ``inspect``, drawn with matplotlib.

matplotlib is imported inside the drawing functions, so commands that draw nothing (``convert``,
``info``) do not pay for it. Figures are plain ``matplotlib.figure.Figure`` objects rendered by
Agg (no display, no pyplot state), written in the format the output's suffix names, atomically:
a viewer polling the file sees the old drawing or the new one, never half.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alexnet_pipe.errors import AlexnetPipeError, FormatError, InputError
from alexnet_pipe.fsutil import fsync_dir

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
# Text stays text: searchable in SVG and PDF, and a tenth of the size of outlined glyphs.
RC = {"svg.fonttype": "none", "pdf.fonttype": 42, "svg.hashsalt": "alexnet-pipe"}

# (panel title, y label, ((row key, legend label), ...)); the panels share the epoch axis.
PANELS = (
    ("loss", "loss", (("train_loss", "train loss"), ("val_loss", "val loss"))),
    ("accuracy", "accuracy %", (("val_top1", "val top-1"), ("val_top5", "val top-5"))),
    ("learning rate", "lr (log scale)", (("lr", "lr"),)),
    ("throughput", "img/s", (("img_per_s", "img/s"),)),
)
METRIC_KEYS = tuple(key for _, _, series in PANELS for key, _ in series)
RESUME_EVENTS = ("resumed", "resume")  # a row {"event": "resumed", "after_epoch": N}
RESUME_LABEL = "resumed"


# ---------------------------------------------------------------- output files


def check_output(out: Path) -> str:
    """The matplotlib format for ``out`` ("png", "svg" or "pdf"); raise when it cannot be written there.

    Called before any drawing, so a wrong path costs no time.
    """
    out = Path(out)
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise AlexnetPipeError(f"{out}: the output must end in .png, .svg or .pdf (the suffix picks the format)")
    if out.is_dir():
        raise AlexnetPipeError(f"{out} is a directory; name a file in it, e.g. {out / ('drawing' + out.suffix)}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise AlexnetPipeError(f"cannot write {out}: {parent} is a file, not a directory")
            break
    return fmt


def save_figure(fig: Figure, out: Path) -> Path:
    """Render ``fig`` in the format ``out``'s suffix names and replace ``out`` with it atomically.

    The drawing is rendered in memory first; the file is written aside in the same directory and
    renamed over ``out``, and the aside file is removed if anything fails. Parent folders are created.
    """
    import matplotlib

    out = Path(out)
    fmt = check_output(out)
    buf = io.BytesIO()
    metadata = {"Title": fig.get_label()} if fmt == "png" else {"Title": fig.get_label(), "Date": None}
    with matplotlib.rc_context(RC):
        fig.savefig(buf, format=fmt, metadata=metadata)
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(out.parent)
    except OSError as exc:
        raise AlexnetPipeError(f"cannot write {out}: {exc.strerror or exc}; pick another output path") from None
    return out


# ---------------------------------------------------------------- metrics log


def _check_number(value, where: str) -> float | None:
    """``value`` as a float (None when absent); raise ValueError if it is not a number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where} is {value!r}, expected a number")
    return float(value)


def _check_epoch(value, where: str) -> int:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value != int(value) or value < 0:
        raise InputError(f"{where} is {value!r}, expected a whole number >= 0")
    return int(value)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path} is not a text file (byte {exc.start} is not UTF-8 text); pass the JSON-lines "
                          "metrics log that `train -o` writes") from None


def read_metrics(path: Path) -> list[dict]:
    """Read the trainer's JSON-lines metrics log: the per-epoch rows and the resume markers.

    Kept, in file order: rows with an ``"epoch"`` and rows ``{"event": "resumed", "after_epoch": N}``.
    Skipped: blank lines, test results (``{"event": "test"}``), per-step rows (with a ``"step"``
    key), and an unterminated, unparsable last line after good ones (a write still in progress:
    the trainer is running), with a warning. Any other bad line is an error that names it.

    Args:
        path: the ``metrics.jsonl`` file written by ``train -o``.

    Returns:
        The rows, as dicts.

    Raises:
        FormatError: the file is not text, a line is not a JSON object, a value is not a number,
            or the file holds no epoch row at all.
    """
    path = Path(path)
    lines = _read_text(path).split("\n")
    rows: list[dict] = []
    epochs = others = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and (epochs or others):  # no newline after it: a partial write
                log.warning("%s:%d: skipping an unfinished last line", path, lineno)
                continue
            raise FormatError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object "
                f'such as {{"epoch": 1, "train_loss": 2.3}}; fix or delete that line'
            ) from None
        if not isinstance(obj, dict):
            raise FormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}; "
                              "fix or delete that line")
        try:
            if obj.get("event") in RESUME_EVENTS:
                _check_epoch(obj.get("after_epoch"), "after_epoch")
                rows.append(obj)
            elif "epoch" in obj and "step" not in obj and "event" not in obj:
                _check_epoch(obj["epoch"], "epoch")
                for key in METRIC_KEYS:
                    _check_number(obj.get(key), key)
                rows.append(obj)
                epochs += 1
            else:
                others += 1
        except ValueError as e:
            raise FormatError(f"{path}:{lineno}: {e}; fix or delete that line") from None
    if not epochs:
        what = f"only {others} other row(s), e.g. test results" if others else "no rows"
        raise FormatError(f"{path} has no per-epoch rows ({what}); pass the metrics log of a training run "
                          "that finished at least one epoch")
    return rows


def epoch_rows(rows: Sequence[dict]) -> tuple[list[dict], list[int]]:
    """The epoch rows sorted by epoch (a later row for the same epoch wins), and the resume points.

    A resume point N means a run went on from a checkpoint taken after epoch N. It shows as a
    ``"resumed"`` marker row, an epoch row with ``"resumed": true``, epochs that go back or skip
    ahead (a log appended by a resumed run, or started anew by one), or a change of
    ``world_size`` / ``global_batch`` (a run keeps both from start to end).

    Example: epochs 1, 2, 3, 2, 3, 4 (appended after a resume from epoch 1) -> rows 1..4, [1].
    """
    by_epoch: dict[int, dict] = {}
    resumes: set[int] = set()
    prev: dict | None = None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InputError(f"row {i} is {type(r).__name__}, expected a dict (read_metrics returns them)")
        if r.get("event") in RESUME_EVENTS:
            resumes.add(_check_epoch(r.get("after_epoch"), f"row {i}: after_epoch"))
            continue
        if "epoch" not in r:
            raise InputError(f"row {i} has no 'epoch' key; pass the rows read_metrics returns")
        e = _check_epoch(r["epoch"], f"row {i}: epoch")
        if r.get("resumed"):
            resumes.add(e - 1)
        elif prev is None:
            if e > 1:  # the log starts after a checkpoint: a resumed run that began a new file
                resumes.add(e - 1)
        elif e != prev["epoch"] + 1 or any(
                key in r and key in prev and r[key] != prev[key] for key in ("world_size", "global_batch")):
            resumes.add(e - 1)
        by_epoch[e] = prev = {**r, "epoch": e}
    if not by_epoch:
        raise InputError("no epoch rows to plot; train for at least one epoch first")
    return [by_epoch[e] for e in sorted(by_epoch)], sorted(resumes)


# ---------------------------------------------------------------- curves


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float], int]:
    """Epochs and values of ``key`` (rows without it left out, so the line bridges them), and
    how many were NaN/inf: those become NaN, which breaks the line where training blew up."""
    xs, ys, bad = [], [], 0
    for r in rows:
        v = _check_number(r.get(key), f"epoch {r['epoch']}: {key}")
        if v is None:
            continue
        if not math.isfinite(v) or (key == "lr" and v <= 0):  # a log axis has no place for lr <= 0
            bad += 1
            v = math.nan
        xs.append(r["epoch"])
        ys.append(v)
    return xs, ys, bad


def _draw_panel(ax: Axes, rows: list[dict], panel: tuple, resumes: list[int], marker_size: float) -> int:
    """One panel of :func:`curves_figure`; returns the number of values left out (NaN, inf, lr <= 0)."""
    name, ylabel, series = panel
    bad, drawn = 0, 0
    for key, label in series:
        xs, ys, n_bad = _series(rows, key)
        bad += n_bad
        if not any(math.isfinite(y) for y in ys):
            continue
        drawn += 1
        # The lr applies during the epoch that ends at its point: a step from the previous epoch.
        ax.plot(xs, ys, marker="o", markersize=marker_size, linewidth=1.5, label=label,
                drawstyle="steps-pre" if key == "lr" else "default")
    if drawn and series[0][0] == "lr":
        ax.set_yscale("log")
    if not drawn:
        ax.text(0.5, 0.5, "not in this log", transform=ax.transAxes, ha="center", va="center", color="0.4")
    for i, x in enumerate(resumes):
        ax.axvline(x, color="0.35", linestyle="--", linewidth=1, label=RESUME_LABEL if i == 0 else "_nolegend_")
    ax.set_title(name)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="0.9")
    if drawn or resumes:
        ax.legend(fontsize="small")
    return bad


def curves_figure(rows: Sequence[dict], title: str = "") -> Figure:
    """Loss, top-1/top-5, learning rate (log scale) and img/s against epoch, resume points dashed.

    Each value is drawn at the epoch that ends with it, with a marker; missing values are
    bridged, NaN/inf values leave a gap and a note. The epoch axis has whole-number ticks and
    half an epoch of margin, so a one-epoch log shows its points in the middle of the panels.

    Args:
        rows: from :func:`read_metrics` (epoch rows and resume markers).
        title: drawn across the top, e.g. the log's path.

    Returns:
        The figure (2 x 2 axes sharing the epoch axis).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ordered, resumes = epoch_rows(rows)
    epochs = [r["epoch"] for r in ordered]
    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained", label=title or "training curves")
    axes = fig.subplots(2, 2, sharex=True)
    marker_size = 5.0 if len(epochs) <= 40 else 2.5 if len(epochs) <= 150 else 0.0
    bad = sum(_draw_panel(ax, ordered, panel, resumes, marker_size) for ax, panel in zip(axes.flat, PANELS))
    lo, hi = min(epochs + resumes), max(epochs)
    axes[0, 0].set_xlim(lo - 0.5, hi + 0.5)
    axes[0, 0].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    _note_rank_changes(axes[1, 1], ordered, resumes)
    if title:
        fig.suptitle(title)
    if bad:
        fig.text(0.995, 0.995, f"values left out (NaN, inf, lr <= 0): {bad}", ha="right", va="top", color="#b41e1e",
                 fontsize="small")
    return fig


def _note_rank_changes(ax: Axes, rows: list[dict], resumes: list[int]) -> None:
    """Beside each resume line on the img/s panel: the ranks and global batch the run went on with."""
    by_epoch = {r["epoch"]: r for r in rows}
    for x in resumes:
        after = by_epoch.get(x + 1)
        if after and "world_size" in after:
            text = f"{after['world_size']} rank{'s' if after['world_size'] != 1 else ''}"
            if "global_batch" in after:
                text += f", batch {after['global_batch']}"
            ax.annotate(text, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                        textcoords="offset points", ha="left", va="top", fontsize="x-small", color="0.35")


def plot_curves(rows: Sequence[dict], out: Path, title: str = "") -> Path:
    """Draw :func:`curves_figure` into ``out`` (.png, .svg or .pdf by its suffix); return ``out``."""
    check_output(out)
    return save_figure(curves_figure(rows, title), out)


# ---------------------------------------------------------------- image grids

MIN_TILE = 96  # pixels: smaller images are drawn larger (nearest neighbour), so they can be seen
MIN_CELL = 120  # pixels: room for a caption under narrow tiles
DPI = 100


def _shorten(text: str, width_px: float, font_px: float = 11.0) -> str:
    """``text`` cut with an ellipsis to about ``width_px`` (matplotlib does not wrap or clip titles)."""
    limit = max(4, int(width_px / (0.6 * font_px)))
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


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
    head = 36 + 16 * title.count("\n") if title else 0
    width, height = max(cols * cell_w, 360), head + rows * (tile_h + gap) + 4
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
                text = "\n".join(_shorten(part, cell_w) for part in captions[i].split("\n"))
                ax.set_title(text, fontsize=9, pad=3)
    if title:
        fig.suptitle(title, fontsize=11)
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
