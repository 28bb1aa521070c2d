"""`test --per-class`: per-class top-1/top-5, the confusion matrix (JSON), and a drawing of the
worst classes and the most confused pairs (matplotlib, PNG/SVG/PDF by suffix)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alexnet_pipe.fsutil import atomic_write_bytes, output_error
from alexnet_pipe.text import plural

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LABEL_PX = 260  # pixels: a class's label on the drawing is cut with an ellipsis past this width
AXES_PX = 300  # pixels: the narrowest a panel's bars are drawn
TICK_PT, TITLE_PT = 10, 12  # font sizes (points)
FILES_FROM_KEYS = "relative to the split's raw folder (from the LMDB keys); record: its number in the split's order"
NO_FILES = ("not stored (RecordIO shards keep no file names; convert with --format lmdb or both to have them); "
            "record: its number in the split's order")
RERUN = "free some space (or choose another path), then rerun the same command"  # after a failed write


@dataclass(frozen=True)
class PerClass:
    """Counts over a whole split: ``confusion[true, predicted]`` and per-class top-5 hits; and, per
    record (in the split's stored order), its true class, the predicted one and that prediction's
    probability (absent: empty)."""

    confusion: np.ndarray  # K x K int64: rows the true class, columns the predicted one
    top5_hits: np.ndarray  # K int64
    true: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # per record
    predicted: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # per record
    score: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per record: the probability of ``predicted``

    def misclassified(self) -> np.ndarray:
        """Numbers of the records predicted wrong, the surest mistakes first (then by number)."""
        wrong = np.flatnonzero(self.true != self.predicted)
        return wrong[np.lexsort((wrong, -self.score[wrong]))]

    def table(self, ids: list[str], names: list[str]) -> list[dict]:
        counts = self.confusion.sum(axis=1)
        rows = []
        for k, (cid, name) in enumerate(zip(ids, names)):
            n = int(counts[k])
            rows.append({"index": k, "id": cid, "name": name, "images": n,
                         "top1": 100.0 * self.confusion[k, k] / n if n else None,
                         "top5": 100.0 * self.top5_hits[k] / n if n else None})
        return rows

    def confused_pairs(self, limit: int) -> list[tuple[int, int, int]]:
        """(true, predicted, images) of the most frequent mistakes, largest first."""
        off = self.confusion.copy()
        np.fill_diagonal(off, 0)
        flat = np.argsort(off, axis=None, kind="stable")[::-1][:limit]
        pairs = [(int(i), int(j), int(off[i, j])) for i, j in zip(*np.unravel_index(flat, off.shape))]
        return [p for p in pairs if p[2] > 0]


def write_per_class(per_class: PerClass, ids: list[str], names: list[str], out: Path, worst: int = 20,
                    files: list[str] | None = None, ten_crop: PerClass | None = None) -> list[Path]:
    """``out`` (.json): the table, the confusion matrix (``confusion_rows``: the true class,
    ``confusion_cols``: the predicted one) and every misclassified record, surest first, with
    ``files`` (the source file of each, in ``per_class.misclassified()`` order; None: not stored);
    beside it ``<stem>.png``: the drawing. ``ten_crop`` (test --ten-crop): each class's row also
    holds ``ten_crop_top1`` / ``ten_crop_top5`` and the body ``ten_crop_confusion``, from the
    ten-crop predictions; everything else is the single crop's. Each file is replaced atomically; a
    write that fails (a full disk) raises ``OutputError``, one line, and leaves no part in view."""
    table = per_class.table(ids, names)
    if ten_crop is not None:
        for row, other in zip(table, ten_crop.table(ids, names)):
            row.update(ten_crop_top1=other["top1"], ten_crop_top5=other["top5"])
    pairs = per_class.confused_pairs(worst)
    wrong = per_class.misclassified()
    body = {"classes": table,
            "confused_pairs": [{"true": ids[i], "predicted": ids[j], "images": n} for i, j, n in pairs],
            "confusion_rows": "true", "confusion_cols": "predicted",
            "confusion": per_class.confusion.tolist(),
            "misclassified_files": FILES_FROM_KEYS if files is not None else NO_FILES,
            "misclassified": [{"record": int(r), "file": files[k] if files is not None else None,
                               "true": ids[per_class.true[r]], "predicted": ids[per_class.predicted[r]],
                               "score": round(float(per_class.score[r]), 6)} for k, r in enumerate(wrong)]}
    if ten_crop is not None:
        body["ten_crop_confusion"] = ten_crop.confusion.tolist()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, json.dumps(body).encode())
    except OSError as exc:
        error = output_error(exc, out, RERUN)
        if error is None:
            raise
        raise error from exc
    drawing = out.with_suffix(".png")
    _draw(table, pairs, ids, names, drawing, worst)  # save_figure words a failed write the same way
    return [out, drawing]


def _label(ids: list[str], names: list[str], k: int, width_px: float) -> str:
    """``name (id)``, the name cut with an ellipsis to fit ``width_px`` (the id stays whole: it tells classes apart)."""
    from alexnet_pipe.apps.figure_text import shorten, text_width

    if not names[k] or names[k] == ids[k]:
        return shorten(ids[k], width_px, TICK_PT)
    return f"{shorten(names[k], width_px - text_width(f' ({ids[k]})', TICK_PT), TICK_PT)} ({ids[k]})"


def _draw(table: list[dict], pairs: list[tuple[int, int, int]], ids, names, out: Path, worst: int) -> None:
    from alexnet_pipe.apps.figure_file import save_figure

    save_figure(per_class_figure(table, pairs, ids, names, worst), out)


def per_class_figure(table: list[dict], pairs: list[tuple[int, int, int]], ids: list[str], names: list[str],
                     worst: int) -> Figure:
    """The worst classes by top-1 (left) and the most confused pairs (right), as horizontal bars.

    A long class name is cut with an ellipsis (the JSON has it whole), and the figure is made as
    wide as its labels and titles need, so no text runs past its edge."""
    from matplotlib.figure import Figure

    from alexnet_pipe.apps.figure_text import DPI, text_width

    scored = sorted((r for r in table if r["top1"] is not None), key=lambda r: (r["top1"], r["index"]))[:worst]
    classes = [_label(ids, names, r["index"], LABEL_PX) for r in scored][::-1]
    confused = [f"{_label(ids, names, i, LABEL_PX)} -> {_label(ids, names, j, LABEL_PX)}" for i, j, _ in pairs][::-1]
    titles = (f"the {plural(len(scored), 'worst class', 'worst classes')} by top-1",
              "most confused pairs (true -> predicted)" if pairs else "no confusions")
    axes_px = max(AXES_PX, *(text_width(t, TITLE_PT) + 20 for t in titles))
    widths = [max((text_width(t, TICK_PT) for t in labels), default=0.0) for labels in (classes, confused)]
    width = sum(widths) + 2 * axes_px + 100  # + tick marks, pads and the space between the panels
    fig = Figure(figsize=(width / DPI, max(4.0, 0.3 * max(len(scored), len(pairs)) + 1.5)), dpi=DPI,
                 layout="constrained", label="per-class results")
    left, right = fig.subplots(1, 2, width_ratios=[w + axes_px for w in widths])
    # Bars at positions, labels set apart: two classes whose labels read the same keep a bar each.
    left.barh(range(len(classes)), [r["top1"] for r in scored][::-1], color="tab:red")
    left.set_yticks(range(len(classes)), classes)
    left.set_xlim(0, 100)
    left.set_xlabel("top-1 %")
    left.set_title(titles[0], fontsize=TITLE_PT)
    if pairs:
        right.barh(range(len(confused)), [n for _, _, n in pairs][::-1], color="tab:blue")
        right.set_yticks(range(len(confused)), confused)
    right.set_xlabel("images")
    right.set_title(titles[1], fontsize=TITLE_PT)
    for ax in (left, right):
        ax.tick_params(axis="y", labelsize=TICK_PT)
    return fig
