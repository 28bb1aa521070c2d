"""The ``plot`` command: training curves (loss, top-1/top-5, lr, img/s against epoch) from the
trainer's JSON-lines metrics log, resume points marked, drawn with matplotlib.

matplotlib is imported inside the drawing functions, so commands that draw nothing (``convert``,
``info``) do not pay for it. Figures are plain ``matplotlib.figure.Figure`` objects, written by
``apps/figure_file.py`` (format by suffix, atomically); the image grids of ``inspect`` are
``apps/image_grid.py``.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from alexnet_pipe.apps.figure_file import check_output, save_figure
from alexnet_pipe.apps.figure_text import wrap
from alexnet_pipe.errors import FormatError, InputError
from alexnet_pipe.inputs.entries import not_a_file
from alexnet_pipe.text import plural

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

# (panel title, y label, ((row key, legend label), ...)); the panels share the epoch axis.
PANELS = (
    ("loss", "loss", (("train_loss", "train loss"), ("val_loss", "val loss"))),
    ("accuracy", "accuracy %", (("val_top1", "val top-1"), ("val_top5", "val top-5"))),
    ("learning rate", "lr (log scale)", (("lr", "lr"),)),
    ("throughput", "img/s", (("img_per_s", "img/s"),)),
)
METRIC_KEYS = tuple(key for _, _, series in PANELS for key, _ in series)
RESUME_EVENTS = ("resumed", "resume")  # a row {"event": "resumed", "after_epoch": N, "after_step": S}
RESUME_LABEL = "resumed"


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


# A row the trainer writes is under 1 KB. The log is read a line at a time, so a log of any length (per-step
# rows of 90 epochs: tens of MB) costs little memory, and a file that is not a log cannot cost much either.
MAX_LINE = 1 << 20


def _lines(path: Path) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, ends with a newline) of each line of ``path``, read one at a time."""
    why = not_a_file(str(path))  # stat first: opening a FIFO would wait for a writer forever, a device never ends
    if why is not None:
        raise FormatError(f"{path}: {why}; pass the JSON-lines metrics log that `train -o` writes")
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    with f:
        offset = 0
        for lineno in itertools.count(1):
            try:
                raw = f.readline(MAX_LINE + 1)
            except OSError as exc:
                raise FormatError(f"cannot read {path}: {exc.strerror or exc}") from None
            if not raw:
                return
            if len(raw) > MAX_LINE:
                raise FormatError(f"{path}:{lineno}: a line over {MAX_LINE >> 20} MiB, not a metrics row; pass the "
                                  "JSON-lines metrics log that `train -o` writes")
            try:
                if b"\0" in raw:
                    raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "NUL byte")
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FormatError(f"{path} is not a text file (byte {offset + exc.start} is not UTF-8 text); pass the "
                                  "JSON-lines metrics log that `train -o` writes") from None
            offset += len(raw)
            yield lineno, text, raw.endswith(b"\n")


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
        FormatError: the file is not text, a line is not a JSON object (or is nested too deeply to
            parse), a value is not a number, or the file holds no epoch row at all.
    """
    path = Path(path)
    rows: list[dict] = []
    epochs = others = 0
    for lineno, line, ended in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if not ended and (epochs or others):  # no newline after it: a partial write
                log.warning("%s:%d: skipping an unfinished last line", path, lineno)
                continue
            raise FormatError(
                f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object "
                f'such as {{"epoch": 1, "train_loss": 2.3}}; fix or delete that line'
            ) from None
        except RecursionError:  # "[[[[..." nested past the parser's depth: never a row the trainer wrote
            raise FormatError(f"{path}:{lineno}: JSON nested too deeply to read; each line must be one JSON "
                              'object such as {"epoch": 1, "train_loss": 2.3}; fix or delete that line') from None
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
        what = f"only {plural(others, 'other row')}, e.g. test results" if others else "no rows"
        raise FormatError(f"{path} has no per-epoch rows ({what}); pass the metrics log of a training run "
                          "that finished at least one epoch")
    return rows


def epoch_rows(rows: Sequence[dict]) -> tuple[list[dict], list[int]]:
    """The epoch rows sorted by epoch (a later row for the same epoch wins), and the resume points.

    A resume point N means a run went on from a checkpoint taken after epoch N. It shows as a
    ``"resumed"`` marker row, an epoch row with ``"resumed": true``, epochs that go back or skip
    ahead (a log appended by a resumed run, or started anew by one), or a change of
    ``world_size`` / ``global_batch`` (a run keeps both from start to end).

    A resume inside epoch N+1 (the marker's ``after_step`` S > 0) is drawn where it happened:
    at N + S / (the epoch's steps, from its row's ``samples``, ``global_batch`` and ``world_size``).

    Example: epochs 1, 2, 3, 2, 3, 4 (appended after a resume from epoch 1) -> rows 1..4, [1].
    """
    by_epoch: dict[int, dict] = {}
    resumes: set[float] = set()
    mid_epoch: list[tuple[int, int]] = []  # (after_epoch, after_step) of resumes inside an epoch
    prev: dict | None = None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise InputError(f"row {i} is {type(r).__name__}, expected a dict (read_metrics returns them)")
        if r.get("event") in RESUME_EVENTS:
            after = _check_epoch(r.get("after_epoch"), f"row {i}: after_epoch")
            step = _check_epoch(r.get("after_step", 0) or 0, f"row {i}: after_step")
            if step:
                mid_epoch.append((after, step))
            else:
                resumes.add(after)
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
    for after, step in mid_epoch:
        resumes.discard(after)  # the same resume, seen in the epoch rows (a jump, a new rank count)
        steps = _steps_in_epoch(by_epoch.get(after + 1)) or _steps_in_epoch(by_epoch.get(after))
        resumes.add(after + (min(step / steps, 0.99) if steps else 0.5))
    return [by_epoch[e] for e in sorted(by_epoch)], sorted(resumes)


def _steps_in_epoch(row: dict | None) -> int | None:
    """Steps of the epoch ``row`` closes, from its samples and global batch (None: not in the row).

    Each rank reads ceil(samples / ranks) samples in batches of global_batch / ranks, as the loader does."""
    if row is None:
        return None
    samples, batch, ranks = row.get("samples"), row.get("global_batch"), row.get("world_size", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (samples, batch, ranks)):
        return None
    return math.ceil(math.ceil(samples / ranks) / max(batch // ranks, 1))


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


def _lr_within_epochs(rows: list[dict]) -> tuple[list[float], list[float], int]:
    """The lr as a line through each epoch: its first step's (``lr``) at the epoch's start, its last
    step's (``lr_last``, written where warm-up or cosine vary it; else ``lr`` again) at its end; a
    drop between epochs shows as a vertical jump. Returns xs, ys and how many values were left out."""
    xs, ys, bad = [], [], 0
    for r in rows:
        first = _check_number(r.get("lr"), f"epoch {r['epoch']}: lr")
        if first is None:
            continue
        last = _check_number(r.get("lr_last", first), f"epoch {r['epoch']}: lr_last")
        for x, v in ((r["epoch"] - 1, first), (r["epoch"], last)):
            if not math.isfinite(v) or v <= 0:
                bad += 1
                v = math.nan
            xs.append(x)
            ys.append(v)
    return xs, ys, bad


def _draw_panel(ax: Axes, rows: list[dict], panel: tuple, resumes: list[int], marker_size: float) -> int:
    """One panel of :func:`curves_figure`; returns the number of values left out (NaN, inf, lr <= 0)."""
    name, ylabel, series = panel
    bad, drawn = 0, 0
    for key, label in series:
        if key == "lr" and any("lr_last" in r for r in rows):  # warm-up or cosine: the lr within each epoch
            xs, ys, n_bad = _lr_within_epochs(rows)
            bad += n_bad
            if any(math.isfinite(y) for y in ys):
                drawn += 1
                ax.plot(xs, ys, linewidth=1.5, label="lr (first to last step of each epoch)")
            continue
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
    if any("lr_last" in r for r in ordered):  # the lr line starts where the first epoch does
        lo = min(lo, epochs[0] - 1)
    axes[0, 0].set_xlim(lo - 0.5, hi + 0.5)
    axes[0, 0].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    _note_rank_changes(axes[1, 1], ordered, resumes)
    if title:  # a long path wraps to the figure's width
        fig.suptitle(wrap(title, fig.bbox.width - 20, "large"), fontsize="large")
    if bad:
        fig.text(0.995, 0.995, f"values left out (NaN, inf, lr <= 0): {bad}", ha="right", va="top", color="#b41e1e",
                 fontsize="small")
    return fig


def _note_rank_changes(ax: Axes, rows: list[dict], resumes: list[int]) -> None:
    """Beside each resume line on the img/s panel: the ranks and global batch the run went on with."""
    by_epoch = {r["epoch"]: r for r in rows}
    lo, hi = ax.get_xlim()
    for x in resumes:
        after = by_epoch.get(math.floor(x) + 1)
        if after and "world_size" in after:
            text = plural(after["world_size"], "rank")
            if "global_batch" in after:
                text += f", batch {after['global_batch']}"
            right = x - lo > (hi - lo) / 2  # in the right half: written leftwards, so it stays in the panel
            ax.annotate(text, (x, 1), xycoords=("data", "axes fraction"), xytext=(-3 if right else 3, -3),
                        textcoords="offset points", ha="right" if right else "left", va="top", fontsize="x-small",
                        color="0.35")


def plot_curves(rows: Sequence[dict], out: Path, title: str = "") -> Path:
    """Draw :func:`curves_figure` into ``out`` (.png, .svg or .pdf by its suffix); return ``out``."""
    check_output(out)
    return save_figure(curves_figure(rows, title), out)
